"""A small Redis client on Twisted: one connection, bounded waits, reconnects by itself.

Why not txredisapi (PyPI): it runs on this Python and Twisted, but it
imports the global reactor when it is imported and schedules its reply
timeouts and reconnections on it (C{LineReceiver.callLater =
reactor.callLater}), which this code base does not allow (library code is
given its reactor and clock, and the failure paths are tested on a
C{Clock}); it is also untyped.  What mta needs is a handful of commands
(C{GET}, C{EVAL}, C{HGETALL}, C{PING}), so the client is this module:

  - one connection to the endpoint of C{[cluster] redis} (a Twisted client
    endpoint description: C{tcp:host=...:port=...} or C{unix:path=...}),
    opened at the first command and again after it is lost; commands are
    pipelined on it and answered in order (RESP2, L{mta.cluster.resp});
  - every command is answered within C{timeout} seconds or fails with
    L{SharedStateError}; a command that times out closes the connection
    (a late reply could no longer be matched to its command), which fails
    the others in flight, and the next command connects again;
  - after a failed connection attempt, commands fail at once for C{retry}
    seconds instead of each waiting for a connection that is not there:
    when Redis is down, the checks that need it answer their temporary
    reply without delay, and the first command after C{retry} tries again;
  - with a password, C{AUTH} is the first command on every new connection.

State changes (lost, restored, refused) are logged once each, not per command.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.cluster.resp import Arg, ErrorReply, ReplyParser, RESPProtocolError, encode_command
from mta.errors import SharedStateError

log = Logger(namespace="mta.cluster")


class RedisReplyError(SharedStateError):
    """Redis answered a command with an error reply (C{-ERR ...}, C{-LOADING ...})."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"Redis refused the command: {reply.message}")
        self.reply = reply


class RedisProtocol(Protocol):
    """Commands written in order; each reply fires the oldest waiting Deferred."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._waiting: deque[Deferred[Any]] = deque()
        self.lost: Deferred[None] = Deferred()
        self.closed = False

    def send(self, d: Deferred[Any], args: tuple[Arg, ...]) -> None:
        self._waiting.append(d)
        self.transport.write(encode_command(*args))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except RESPProtocolError as e:
            log.error("not a Redis reply ({e}); closing the connection", e=str(e))
            self.abort()
            return
        for reply in replies:
            if not self._waiting:
                log.error("a Redis reply that no command asked for; closing the connection")
                self.abort()
                return
            d = self._waiting.popleft()
            if d.called:  # timed out already (and the connection is going)
                continue
            if isinstance(reply, ErrorReply):
                d.errback(RedisReplyError(reply))
            else:
                d.callback(reply)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            if not d.called:
                d.errback(SharedStateError(f"the connection to Redis was lost: {reason.value}"))
        self.lost.callback(None)


class RedisClient:
    """Commands to one Redis server; see the module's description."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        name: str,
        timeout: float,
        retry: float,
        password: str = "",
    ) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self.name = name  # the endpoint description, for messages
        self.timeout = timeout
        self.retry = retry
        self._password = password
        self._protocol: RedisProtocol | None = None
        self._connecting: Deferred[RedisProtocol] | None = None
        self._pending: list[tuple[Deferred[Any], tuple[Arg, ...]]] = []
        self._down_until = 0.0
        self._down_reason = ""
        self._was_up = False
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    def execute(self, *args: Arg) -> Deferred[Any]:
        """Send one command; fires with its reply or fails with L{SharedStateError}."""
        if self._closing:
            return fail(SharedStateError("the Redis client is closed"))
        protocol = self._protocol
        up = protocol is not None and not protocol.closed
        if not up and self._connecting is None and self._clock.seconds() < self._down_until:
            return fail(
                SharedStateError(f"Redis at {self.name} is unreachable: {self._down_reason}")
            )
        d: Deferred[Any] = Deferred(self._timed_out)
        d.addTimeout(self.timeout, self._clock)
        d.addErrback(self._explain)
        if up:
            assert protocol is not None
            protocol.send(d, args)
            return d
        self._pending.append((d, args))
        if self._connecting is None:
            self._connect()
        return d

    def _explain(self, f: Failure) -> Failure:
        if f.check(TimeoutError):
            return Failure(
                SharedStateError(f"Redis at {self.name} did not answer within {self.timeout}s")
            )
        if f.check(SharedStateError):
            return f
        return Failure(SharedStateError(f"Redis at {self.name}: {f.getErrorMessage()}"))

    def _timed_out(self, d: Deferred[Any]) -> None:
        """Cancelled by its timeout: the connection's replies are out of step now."""
        self._pending = [(p, a) for p, a in self._pending if p is not d]
        if self._protocol is not None:
            log.warn(
                "Redis at {name} did not answer within {t}s; reconnecting",
                name=self.name,
                t=self.timeout,
            )
            self._protocol.abort()

    def _connect(self) -> None:
        factory = Factory.forProtocol(RedisProtocol)
        connecting: Deferred[Any] = self._endpoint.connect(factory)
        connecting.addTimeout(self.timeout, self._clock)
        self._connecting = connecting
        connecting.addCallbacks(self._up, self._failed)

    def _up(self, protocol: RedisProtocol) -> None:
        self._connecting = None
        self._protocol = protocol
        protocol.lost.addCallback(self._lost, protocol)
        if self._was_up or self._down_reason:
            log.info("Redis at {name} is reachable again", name=self.name)
        self._was_up = True
        self._down_reason = ""
        self._down_until = 0.0
        if self._password:
            auth: Deferred[Any] = Deferred()
            auth.addErrback(self._auth_failed, protocol)
            protocol.send(auth, ("AUTH", self._password))
        pending, self._pending = self._pending, []
        for d, args in pending:
            if not d.called:
                protocol.send(d, args)
        if self._closing:
            protocol.abort()

    def _auth_failed(self, f: Failure, protocol: RedisProtocol) -> None:
        log.error(
            "Redis at {name} refused the password: {e}", name=self.name, e=f.getErrorMessage()
        )
        protocol.abort()

    def _failed(self, f: Failure) -> None:
        self._connecting = None
        if f.check(TimeoutError, CancelledError):
            reason = f"no connection within {self.timeout}s"
        else:
            reason = f.getErrorMessage()
        if not self._down_reason:
            log.error(
                "Redis at {name} is unreachable ({reason}); the checks that need it "
                "answer with temporary errors until it is back",
                name=self.name,
                reason=reason,
            )
        self._down_reason = reason
        self._down_until = self._clock.seconds() + self.retry
        pending, self._pending = self._pending, []
        for d, _ in pending:
            if not d.called:
                d.errback(SharedStateError(f"Redis at {self.name} is unreachable: {reason}"))

    def _lost(self, _: None, protocol: RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            if not self._closing:
                log.warn("lost the connection to Redis at {name}", name=self.name)

    def close(self) -> Deferred[None]:
        """Close the connection (at shutdown); fires when it is closed."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self._protocol
        if protocol is None or protocol.closed:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        done: Deferred[None] = Deferred()
        protocol.lost.addCallback(lambda _: done.callback(None))
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return done
