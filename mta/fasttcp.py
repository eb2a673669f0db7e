"""TCP transports that send at once what the socket takes.

Twisted's TCP transport never writes in C{write()}: it buffers the data,
registers the socket for writability with epoll, writes at the next turn
of the reactor and unregisters it again.  For a protocol of short
request-reply exchanges (an SMTP reply, a pipelined MAIL/RCPT/DATA) that is
two C{epoll_ctl} calls, one more turn of the loop and the Python around
them for every reply, and each reply waits for the next turn: measured,
about a fifth of the daemon's reactor thread under load (C{bench/RESULTS.md}).

L{WriteThrough} sends a write at once when nothing is queued before it and
the socket takes it whole; anything else (a partial send, a full socket
buffer, an error, a connection in TLS mode or closing, a registered pull
producer, which Twisted drives from its buffered writes) takes Twisted's
usual path, which keeps its ordering, back-pressure and error handling.  A
push producer (the SMTP session registers itself, to be paused when a
client does not read its replies) is paused by Twisted only when the
buffer fills, and a write sent at once never fills it.
L{WriteThroughReactor} hands these transports to Twisted's endpoints: it
is the reactor with C{listenTCP} and C{connectTCP} that make them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp


class WriteThrough:
    """Mixed into a Twisted TCP connection class (see the module docstring)."""

    # Attributes of twisted.internet.tcp.Connection / abstract.FileDescriptor.
    TLS: bool
    connected: int
    disconnecting: int
    dataBuffer: bytes
    _tempDataBuffer: list[bytes]
    _writeDisconnected: bool
    producer: Any
    streamingProducer: bool
    socket: Any

    def write(self, data: bytes) -> None:
        if (
            self.TLS
            or not data
            or self.dataBuffer
            or self._tempDataBuffer
            or not self.connected
            or self.disconnecting
            or self._writeDisconnected
            or (self.producer is not None and not self.streamingProducer)
            or not isinstance(data, bytes)
        ):
            super().write(data)  # type: ignore[misc]
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Reported the usual way: the buffered write fails in doWrite.
            super().write(data)  # type: ignore[misc]
            return
        if sent < len(data):
            super().write(data[sent:])  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


class Server(WriteThrough, tcp.Server):
    """An accepted connection that writes through."""


class Client(WriteThrough, tcp.Client):
    """An outgoing connection that writes through."""


class Port(tcp.Port):
    """A listening port whose connections write through."""

    transport = Server


class Connector(tcp.Connector):
    """A connector whose connections write through."""

    def _makeTransport(self) -> Client:
        return Client(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


class WriteThroughReactor:
    """The reactor, with TCP listening and connecting that use L{Port} and L{Connector}.

    For Twisted's endpoints (C{serverFromString}, C{TCP4ClientEndpoint}), which
    call C{listenTCP} and C{connectTCP} on the reactor they are given; every
    other attribute is the real reactor's.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Port:
        p = Port(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> Connector:
        c = Connector(host, port, factory, timeout, bindAddress, self._reactor)
        c.connect()
        return c

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
