"""A small client for the line protocols of scanning daemons (clamd, spamd).

One connection per request: send a command and, optionally, a message
file in chunks (each chunk passed through C{transform}), then collect the
whole answer until the daemon closes the connection or C{complete} says
the answer is whole (with C{half_close}, our side of the connection is
shut once everything is sent: spamd waits for that when the last line
has no line end).  The Deferred can be cancelled (the plugin host's
timeout does that), which aborts the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mta.checks import tempfail
from mta.errors import ConfigError

MAX_ANSWER = 1 << 20
log = Logger(namespace="mta.checks")


class DaemonError(Exception):
    """The daemon could not be reached or broke off."""


def report_ping(pinged: Deferred[bool], name: str, address: str, logger: Logger) -> Deferred[None]:
    """The start-up check of a scanning daemon: log whether it answers PING."""

    def report(ok: bool | Failure) -> None:
        if ok is True:
            logger.info("{name} at {a} answers PING", name=name, a=address)
            return
        if isinstance(ok, Failure) and ok.check(CancelledError):
            why = "no answer within the plugin's timeout"
        else:
            why = ok.getErrorMessage() if isinstance(ok, Failure) else "no PONG"
        logger.warn(
            "{name} at {a} does not answer ({why}); messages get 451 until it does",
            name=name,
            a=address,
            why=why,
        )

    return pinged.addBoth(report)


def finish_scan(
    d: Deferred[bytes], answered: Callable[[bytes], Any], opened: IO[bytes], *,
    name: str, address: str, queue_id: str, text: str,
) -> Deferred[Any]:  # fmt: skip
    """The end of every scan: the answer goes to C{answered}; a daemon that
    cannot be reached or breaks off gives a tempfail (logged) with C{text};
    the message file is closed either way."""

    def unreachable(failure: Failure) -> Any:
        if not failure.check(DaemonError, ConnectError, OSError):
            return failure
        log.error("{qid}: {name} at {a}: {e}", qid=queue_id, name=name, a=address,
                  e=failure.getErrorMessage())  # fmt: skip
        return tempfail(text)

    def close(result: object) -> object:
        opened.close()
        return result

    return d.addCallbacks(answered, unreachable).addBoth(close)


def endpoint(reactor: Any, description: str, where: str) -> IStreamClientEndpoint:
    if not description.startswith(("unix:", "tcp:")):
        raise ConfigError(f"{where}: must start with unix: or tcp:, got {description!r}")
    try:
        client: IStreamClientEndpoint = clientFromString(reactor, description)
        return client
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: bad endpoint {description!r}: {e}") from None


class _Exchange(Protocol):
    def __init__(
        self,
        head: bytes,
        body: IO[bytes] | None,
        tail: bytes,
        *,
        transform: Callable[[bytes], bytes],
        complete: Callable[[bytes], bool],
        half_close: bool,
    ) -> None:
        self.head, self.body, self.tail = head, body, tail
        self.half_close = half_close
        self.transform = transform
        self.complete = complete
        self.answer = b""
        self.done: Deferred[bytes] = Deferred()
        self._finished = False

    def connectionMade(self) -> None:
        self.transport.write(self.head)  # type: ignore[union-attr]
        if self.body is None:
            self._sent(None)
            return
        sending = FileSender().beginFileTransfer(self.body, self.transport, self.transform)

        # The daemon may answer (and close) before it has read everything,
        # e.g. clamd's size limit; the answer is what counts.
        sending.addCallbacks(self._sent, lambda f: None)

    def _sent(self, _: object) -> None:
        if self._finished:
            return
        self.transport.write(self.tail)  # type: ignore[union-attr]
        if self.half_close:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if len(self.answer) > MAX_ANSWER:
            self._finish(Failure(DaemonError("answer too long")))
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self.complete(self.answer):
            self._finish(self.answer)
            # Nothing more to say, and the daemon may not read the rest.
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.answer:
            self._finish(self.answer)
        else:
            self._finish(Failure(DaemonError(f"connection closed: {reason.getErrorMessage()}")))

    def _finish(self, result: bytes | Failure) -> None:
        if not self._finished:
            self._finished = True
            self.done.callback(result)


def exchange(
    endpoint: IStreamClientEndpoint,
    head: bytes,
    body: IO[bytes] | None = None,
    tail: bytes = b"",
    *,
    transform: Callable[[bytes], bytes] = lambda chunk: chunk,
    complete: Callable[[bytes], bool] = lambda answer: False,
    half_close: bool = False,
) -> Deferred[bytes]:
    """Send C{head}, the chunks of C{body}, C{tail}; fire with the answer.

    Fails with L{DaemonError} (or the connection error) when no answer
    came.  Cancelling aborts the connection.
    """
    protocol = _Exchange(
        head, body, tail, transform=transform, complete=complete, half_close=half_close
    )
    connecting = connectProtocol(endpoint, protocol)

    def cancel(d: Deferred[bytes]) -> None:
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]

    result: Deferred[bytes] = Deferred(cancel)

    def connected(_: object) -> Deferred[bytes]:
        return protocol.done

    def finish(outcome: bytes | Failure) -> None:
        if not result.called:
            result.callback(outcome)

    connecting.addCallback(connected).addBoth(finish)
    return result


class LimitedFile:
    """At most C{limit} bytes of a file, for FileSender."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self.f = f
        self.left = limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data
