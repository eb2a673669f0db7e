"""Test helpers for the outbound client (tests/test_smtp_client.py).

- L{TLSFakeTransport}: iosim's in-memory transport, but STARTTLS runs a
  real TLS layer (pyOpenSSL memory BIOs, as C{twisted.internet._newtls}
  does for TCP) instead of iosim's pretend negotiation, and every
  application-level C{write} is logged in a shared transcript;
- L{Wire}: a L{ClientProtocol} and an L{OutboundConnection} connected in
  memory to any server protocol, driven by a L{Clock};
- L{RecordingSinkFactory}: a L{SinkFactory} whose servers log the raw
  chunks they receive and tell when their connection is closed;
- L{ScriptedServer}: a server that answers each line with the next reply
  of a list, for dialogues the sink cannot play (HELO refused, AUTH LOGIN,
  plain text where a TLS handshake should be);
- L{outbound}: an L{OutboundMessage} for some bytes; L{unstuff}: the
  receiver's side of RFC 5321 section 4.5.2.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from mta.errors import DeliveryError
from mta.smtp.client import (
    ClientPolicy,
    ClientProtocol,
    OutboundConnection,
    OutboundMessage,
    OutboundRecipient,
)
from mta.testing import DROP, HANG, SinkBehaviour, SinkFactory, SinkServer

T = TypeVar("T")

CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 25)


class _Wire:
    """What the TLS layer writes to: the simulated network under it."""

    def __init__(self, transport: TLSFakeTransport) -> None:
        self._t = transport

    def write(self, data: bytes) -> None:
        self._t.put_on_wire(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._t)

    def abortConnection(self) -> None:
        iosim.FakeTransport.abortConnection(self._t)

    def getPeer(self) -> Any:
        return self._t.getPeer()

    def getHost(self) -> Any:
        return self._t.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        iosim.FakeTransport.registerProducer(self._t, producer, streaming)

    def unregisterProducer(self) -> None:
        iosim.FakeTransport.unregisterProducer(self._t)


class TLSFakeTransport(iosim.FakeTransport):
    """An iosim transport on which C{startTLS} does real TLS in memory."""

    def __init__(
        self,
        protocol: Any,
        isServer: bool,
        *,
        transcript: list[tuple[str, bytes]] | None = None,
    ) -> None:
        host, peer = (
            (SERVER_ADDRESS, CLIENT_ADDRESS) if isServer else (CLIENT_ADDRESS, SERVER_ADDRESS)
        )
        super().__init__(protocol, isServer, hostAddress=host, peerAddress=peer)
        self.transcript = transcript if transcript is not None else []
        self.side = "S" if isServer else "C"
        self.on_wire: list[bytes] = []  # what went over the simulated network
        self.tls_layer: TLSMemoryBIOProtocol | None = None
        self.tls_context: Any = None

    def write(self, data: bytes) -> None:
        self.transcript.append((self.side, data))
        if self.disconnecting:
            return
        if self.tls_layer is not None:
            self.tls_layer.write(data)
        else:
            self.put_on_wire(data)

    def put_on_wire(self, data: bytes) -> None:
        if not self.disconnecting:
            self.on_wire.append(data)
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        client = (not self.isServer) if beNormal else self.isServer
        self.tls_context = contextFactory
        factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=Clock())
        # Not the factory's BufferingTLSTransport: that one delays writes
        # with a callLater, which only hides the order of events here.
        layer = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.tls_layer = layer
        self.protocol = layer
        self.getHandle = layer.getHandle
        self.getPeerCertificate = layer.getPeerCertificate
        directlyProvides(self, ISSLTransport)
        layer.makeConnection(_Wire(self))


class Wire:
    """A client connection to C{server} in memory.

    C{transcript} lists every application-level write in order:
    C{("C", bytes)} from the client, C{("S", bytes)} from the server.
    """

    def __init__(
        self,
        server: Protocol,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock | None = None,
        server_name: str = "sink.test",
        client: Protocol | None = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.transcript: list[tuple[str, bytes]] = []
        if client is None:
            client = ClientProtocol(self.clock)
            client.remote = "sink.test[127.0.0.1]:25"
        self.client = client
        self.server = server
        self.client_io = TLSFakeTransport(self.client, False, transcript=self.transcript)
        self.server_io = TLSFakeTransport(server, True, transcript=self.transcript)
        self.pump = iosim.connect(
            server, self.server_io, self.client, self.client_io, greet=False, clock=self.clock
        )
        self.conn = (
            OutboundConnection(client, policy or ClientPolicy("client.test"), server_name)
            if isinstance(client, ClientProtocol)
            else None
        )

    def flush(self) -> None:
        """Move bytes until both sides are idle (file senders included).

        iosim's own C{flush} stops while a non-streaming producer (our
        FileSender) still has chunks to give, so this loops on that too.
        A streaming producer (the submission session registers itself for
        flow control) produces nothing on its own and is not waited for.
        """

        def sending(io: TLSFakeTransport) -> bool:
            return io.producer is not None and not io.streamingProducer

        for _ in range(100_000):
            moved = self.pump.pump()
            if not moved and not sending(self.client_io) and not sending(self.server_io):
                return
        raise AssertionError("the conversation never settles")

    def run(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Start a coroutine of the client and pump until nothing moves."""
        d = Deferred.fromCoroutine(coroutine)
        self.flush()
        return d

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    @property
    def connection(self) -> OutboundConnection:
        assert self.conn is not None
        return self.conn

    def client_writes(self) -> list[bytes]:
        return [data for side, data in self.transcript if side == "C"]

    def server_writes(self) -> list[bytes]:
        return [data for side, data in self.transcript if side == "S"]

    def commands(self) -> list[bytes]:
        """The client's command lines, in order, without the message data."""
        lines: list[bytes] = []
        for data in self.client_writes():
            lines += data.split(b"\r\n")[:-1]
        return lines


class RecordingSinkServer(SinkServer):
    """A sink server that logs raw input chunks and reports its closing."""

    def __init__(self, factory: RecordingSinkFactory) -> None:
        super().__init__(factory)
        self.received: list[bytes] = []
        self.closed: Deferred[None] = Deferred()
        factory.servers.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


class RecordingSinkFactory(SinkFactory):
    def __init__(self, behaviour: SinkBehaviour | None = None, tls: Any = None) -> None:
        super().__init__(behaviour, tls)
        self.servers: list[RecordingSinkServer] = []

    def buildProtocol(self, addr: Any) -> RecordingSinkServer:
        return RecordingSinkServer(self)

    def all_closed(self) -> Deferred[Any]:
        """Fires when every connection made so far has been closed."""
        d: Deferred[Any] = succeed(None)
        for server in self.servers:
            closed = server.closed
            d.addCallback(lambda _, c=closed: c)
        return d


STARTTLS_NOW = "<starttls>"  # answer 220 and start TLS with the server's context
NOT_TLS = "<not-tls>"  # answer 220, then answer the handshake with plain text


class ScriptedServer(Protocol):
    """Answers each command line with the next of C{replies}.

    A reply is a reply text (lines joined by newlines), L{HANG}, L{DROP},
    L{STARTTLS_NOW} or L{NOT_TLS}.  After a C{354} reply the lines up to
    "." are message data and the "." line gets the next reply.
    """

    def __init__(self, greeting: str, replies: Iterable[str], tls: Any = None) -> None:
        self.greeting = greeting
        self.replies = list(replies)
        self.tls = tls
        self.lines: list[str] = []
        self.data: list[bytes] = []
        self.buffer = b""
        self.in_data = False
        self.hung = False
        self.not_tls = False

    def connectionMade(self) -> None:
        self.answer(self.greeting)

    def answer(self, reply: str) -> None:
        assert self.transport is not None
        if reply == HANG:
            self.hung = True
        elif reply == DROP:
            self.transport.loseConnection()
        elif reply == STARTTLS_NOW:
            self.transport.write(b"220 2.0.0 Go ahead\r\n")
            self.buffer = b""
            self.transport.startTLS(self.tls)  # type: ignore[attr-defined]
        elif reply == NOT_TLS:
            self.transport.write(b"220 2.0.0 Go ahead\r\n")
            self.buffer = b""
            self.not_tls = True
        else:
            self.transport.write(reply.replace("\n", "\r\n").encode() + b"\r\n")
            self.in_data = reply.startswith("354")

    def dataReceived(self, data: bytes) -> None:
        if self.not_tls:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 This is not TLS\r\n\r\n")
            self.not_tls = self.hung = True
            return
        self.buffer += data
        while not self.hung and b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.in_data and line != b".":
                self.data.append(line)
                continue
            self.in_data = False
            self.lines.append(line.decode("utf-8", "replace"))
            self.answer(self.replies.pop(0) if self.replies else "502 5.5.2 Not scripted")


@implementer(IOpenSSLServerConnectionCreator)
class NoCertificateTLS:
    """Server TLS without a certificate: every handshake fails."""

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)


NO_RESULT = object()


def peek(d: Deferred[Any]) -> Any:
    """The current result of C{d} (a value or a Failure), or L{NO_RESULT};
    the Deferred keeps it."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    return box[0] if box else NO_RESULT


def deferred_test(f: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Deferred[None]]:
    """Let a trial TestCase method be a coroutine."""

    @functools.wraps(f)
    def wrapper(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))

    return wrapper


async def client_closed(conn: OutboundConnection) -> None:
    """Wait until the client side of C{conn} has lost its connection.

    A reply awaited on a lost connection fails at once, and one awaited on
    a closing connection fails when it is lost.
    """
    if conn.p.lost:
        return
    try:
        reply = await conn.p.expect(5.0)
    except DeliveryError:
        return
    raise AssertionError(f"unexpected reply {reply} while waiting for the close")


def sink_wire(
    behaviour: SinkBehaviour | None = None,
    policy: ClientPolicy | None = None,
    *,
    tls: Any = None,
    clock: Clock | None = None,
) -> tuple[RecordingSinkFactory, Wire]:
    factory = RecordingSinkFactory(behaviour, tls)
    server = factory.buildProtocol(SERVER_ADDRESS)
    return factory, Wire(server, policy, clock=clock)


def outbound(
    data: bytes,
    recipients: Iterable[str | OutboundRecipient] = ("bob@example.net",),
    *,
    sender: str = "alice@example.com",
    **kw: Any,
) -> OutboundMessage:
    """A message whose bytes are C{data} (already CRLF, not stuffed)."""
    rcpts = [r if isinstance(r, OutboundRecipient) else OutboundRecipient(r) for r in recipients]
    return OutboundMessage(
        sender=sender,
        recipients=rcpts,
        open=lambda: io.BytesIO(data),
        size=len(data),
        **kw,
    )


def unstuff(stream: bytes) -> bytes:
    """RFC 5321 section 4.5.2, receiver side: the message in a DATA stream.

    C{stream} is what follows the CRLF of the DATA command, up to and
    including the terminating C{.CRLF}; the result has no terminator.
    Raises ValueError when the stream is not terminated where it ends.
    """
    whole = b"\r\n" + stream
    end = whole.find(b"\r\n.\r\n")
    if end < 0 or end + 5 != len(whole):
        raise ValueError(f"terminator at {end}, stream length {len(stream)}")
    body = whole[: end + 2]
    lines = body[2:].split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)
