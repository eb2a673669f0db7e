"""The PROXY protocol (v1 and v2) on a listener behind a load balancer.

HAProxy's PROXY protocol (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt)
lets a TCP load balancer tell the server who the client is: before any
byte of the client's own, it sends one header, a text line in version 1
(section 2.1: C{PROXY TCP4 203.0.113.7 192.0.2.1 40000 465\\r\\n}, at most
107 octets) or a binary block in version 2 (section 2.2: a 12-octet
signature, version and command, family, length, addresses).  A listener in
PROXY mode here reads that header first and only then starts the session
(and, on C{submissions}, the TLS handshake), whose transport's C{getPeer()}
is then the client the header names.  So everything that looks at the
client address sees the real one: the per-IP connection cap
(L{mta.smtp.server.SubmissionFactory} counts the address it is built
with), the AUTH throttle, the C{Received:} field, the logs and the plugins.

The header is parsed with Twisted's own parsers (C{twisted.protocols.haproxy}).
Its ready-made wrapper (C{proxyEndpoint}) is not used, because it

  - connects the session at once, before the header has arrived: the
    session's C{connectionMade} and the factory's C{buildProtocol} would
    see the balancer's address (the per-IP cap would count HAProxy as one
    client), and the greeting would go out before the header was read;
  - closes a connection whose first read holds fewer than 16 octets, where
    TCP may split a header anywhere;
  - has no time limit for a header that never comes, and accepts a header
    from anyone who can connect.

What this module adds (section 2 of the specification: "the receiver MUST
... only accept the header from trusted sources", and a connection without
a valid header must be dropped, never taken as a direct one):

  - connections are accepted only from C{[listen] proxy_from}; any other
    source is closed at once, before a byte is read;
  - a connection whose first bytes are not a valid v1 or v2 header, or that
    sends none within C{[listen] proxy_timeout} seconds, is closed without a
    reply and logged; so is a header that names a client that is not a TCP
    IPv4/IPv6 address (UDP, a UNIX socket, an address that does not parse);
  - v2 C{LOCAL} and v1 C{UNKNOWN} (the balancer's own connections, e.g.
    health checks) keep the real connection's addresses, as the
    specification says.

A plain listener never reads a PROXY header: to its session, a header
line is an unknown command (C{500}), so a client cannot claim another
address by sending one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mta.address import Network, in_networks

log = Logger(namespace="mta.proxy")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # section 2.1: the longest line, CRLF included
V2_SIGNATURE = V2Parser.PREFIX
V2_FIXED = 16  # signature, version/command, family/protocol, length


class InvalidHeader(Exception):  # noqa: N818 - a verdict on input
    """Not a PROXY header we accept; the text says why, for the log."""


@dataclass(frozen=True)
class ProxySettings:
    """What a PROXY-mode listener needs: who may send headers, and how long to wait."""

    networks: tuple[Network, ...]  # [listen] proxy_from
    timeout: float = 10.0  # [listen] proxy_timeout


def header_length(data: bytes) -> int | None:
    """The length of the PROXY header at the start of C{data}, once it is known.

    None: more bytes are needed.  Raises L{InvalidHeader} as soon as the
    bytes cannot begin a header of either version.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        if len(data) < V2_FIXED:
            return None
        if data[12] >> 4 != 2:
            raise InvalidHeader(f"PROXY v2 header of unknown version {data[12] >> 4}")
        return V2_FIXED + int.from_bytes(data[14:16], "big")
    if len(data) < len(V1_PREFIX) and V1_PREFIX.startswith(data):
        return None
    if not data.startswith(V1_PREFIX):
        raise InvalidHeader("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end >= 0:
        return end + 2
    if len(data) >= V1_MAX:
        raise InvalidHeader("PROXY v1 header longer than 107 octets")
    return None


def _client(address: IAddress | None) -> IPv4Address | IPv6Address | None:
    """The header's source, checked: a TCP address whose host is an IP address."""
    if address is None:
        return None  # LOCAL / UNKNOWN: the connection's own addresses
    if not isinstance(address, IPv4Address | IPv6Address) or address.type != "TCP":
        raise InvalidHeader(f"PROXY header for a connection that is not TCP: {address!r:.80}")
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise InvalidHeader(f"PROXY header with a bad address {address.host!r:.60}") from None
    if isinstance(ip, ipaddress.IPv4Address) != isinstance(address, IPv4Address):
        raise InvalidHeader(f"PROXY header with an address of the wrong family {ip}")
    if not 0 <= address.port <= 65535:
        raise InvalidHeader(f"PROXY header with a bad port {address.port}")
    # The canonical text (2001:db8::7, not v2's 2001:db8:0:0:0:0:0:7) for
    # logs, Received: and the throttle's keys alike.
    return type(address)("TCP", str(ip), address.port)


def parse_header(header: bytes) -> tuple[IPv4Address | IPv6Address | None, IAddress | None]:
    """(source, destination) of one whole header; None for LOCAL / UNKNOWN.

    Raises L{InvalidHeader}.  Twisted's parsers do the parsing; their
    errors (and the C{ValueError}s some malformed fields raise in them)
    all become L{InvalidHeader}.
    """
    if header[len(V1_PREFIX) :].split(b" ", 1)[0] in (b"UNKNOWN", b"UNKNOWN\r\n"):
        # Section 2.1: "PROXY UNKNOWN" may end there (Twisted's parser
        # wants more); the rest of the line, if any, is to be ignored.
        return None, None
    try:
        if header.startswith(V2_SIGNATURE):
            info = V2Parser.parse(header)
        else:
            info = V1Parser.parse(header[:-2])
    except Exception as e:  # InvalidProxyHeader and its kin, ValueError, KeyError, ...
        raise InvalidHeader(f"malformed PROXY header ({type(e).__name__})") from None
    source = _client(info.source)
    return source, (info.destination if source is not None else None)


@implementer(IHandshakeListener)
class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the header, then builds the real protocol for the client it names.

    Until then nothing is built and nothing is written; afterwards this is
    the session's transport (as in any L{ProtocolWrapper}), which answers
    C{getPeer()}/C{getHost()} with the header's addresses and passes the
    TLS handshake's completion on (for STARTTLS, Twisted puts its TLS layer
    under this wrapper).
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, clock: IReactorTime, timeout: float) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._peer: IAddress | None = None
        self._host: IAddress | None = None

    def makeConnection(self, transport: Any) -> None:
        # Not ProtocolWrapper's: the inner protocol waits for the header.
        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(f"no PROXY header within {self._timeout}s")

    def _refuse(self, reason: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        log.warn(
            "closing the connection from [{peer}]: {reason}",
            peer=getattr(self.transport.getPeer(), "host", "?"),  # type: ignore[union-attr]
            reason=reason,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:
            return  # refused already
        self._buffer += data
        try:
            length = header_length(self._buffer)
            if length is None or len(self._buffer) < length:
                return
            source, destination = parse_header(self._buffer[:length])
        except InvalidHeader as e:
            self._refuse(str(e))
            return
        rest, self._buffer = self._buffer[length:], b""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._start(source, destination, rest)

    def _start(self, source: IAddress | None, destination: IAddress | None, rest: bytes) -> None:
        real: Any = self.transport.getPeer()  # type: ignore[union-attr]
        self._peer, self._host = source, destination
        if source is None:
            log.info("PROXY header from [{lb}] for its own connection", lb=real.host)
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    def getPeer(self) -> IAddress:
        return self._peer or self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self._host or self.transport.getHost()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None  # type: ignore[assignment]


@implementer(IProtocolFactory)
class ProxyHeaderFactory(WrappingFactory):
    """A listener's factory in PROXY mode, around the factory of its sessions."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, settings: ProxySettings, clock: IReactorTime):
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.settings = settings
        self.clock = clock

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        host = getattr(addr, "host", "")
        if not in_networks(host, self.settings.networks):
            log.warn(
                "closing the connection from [{host}]: not a load balancer in "
                "[listen] proxy_from, and this listener expects a PROXY header",
                host=host,
            )
            return None
        return ProxyHeaderProtocol(self, self.clock, self.settings.timeout)

    def logPrefix(self) -> str:
        return "PROXY"
