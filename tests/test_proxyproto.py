"""The PROXY protocol on a listener (L{mta.proxyproto}).

Three layers: the header rules as pure functions (v1 and v2, every way a
header can be wrong); the listener's wrapper around the real submission
factory on a StringTransport with a Clock (what the session, the
connection cap and the timeout see); and the whole service on loopback
sockets with real TLS, where a client sends the header a load balancer
would and the stored message names the client it claimed.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import smtplib
import socket
import ssl
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.address import parse_networks
from mta.config import parse
from mta.envelope import QueueState
from mta.proxyproto import (
    V2_SIGNATURE,
    InvalidHeader,
    ProxyHeaderFactory,
    ProxySettings,
    header_length,
    parse_header,
)
from mta.service import MTAService
from mta.smtp.server import SubmissionFactory, SubmissionSession
from mta.spool.fs import FileStore
from mta.testing import TLSStringTransport, write_users
from tests.support import LOGIN, PASSWORD, Client, Harness, make_config

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 587\r\n"
LB = "127.0.0.1"


def v2(
    command: int = 1, family: int = 0x11, addresses: bytes | None = None, version: int = 2
) -> bytes:
    """A v2 header (section 2.2): PROXY (1) or LOCAL (0), TCP over IPv4 by default."""
    if addresses is None:
        addresses = struct.pack(
            "!4s4sHH",
            ipaddress.ip_address("203.0.113.7").packed,
            ipaddress.ip_address("192.0.2.1").packed,
            40000,
            465,
        )
    head = bytes([version << 4 | command, family]) + struct.pack("!H", len(addresses))
    return V2_SIGNATURE + head + addresses


def v2_ipv6() -> bytes:
    addresses = struct.pack(
        "!16s16sHH",
        ipaddress.ip_address("2001:db8::7").packed,
        ipaddress.ip_address("2001:db8::1").packed,
        40000,
        465,
    )
    return v2(family=0x21, addresses=addresses)


class HeaderTests(SynchronousTestCase):
    """Parsing PROXY headers by themselves: v1 for TCP4, TCP6 and UNKNOWN (the connection's own
    addresses kept), v2 PROXY for IPv4 and IPv6 and LOCAL, a partial header waiting for more,
    what is not a header, a v1 line too long, v2 of another version, and garbled headers."""

    def test_v1_tcp4(self) -> None:
        self.assertEqual(header_length(V1 + b"EHLO x\r\n"), len(V1))
        source, dest = parse_header(V1)
        self.assertEqual(source, IPv4Address("TCP", "203.0.113.7", 40000))
        self.assertEqual(dest, IPv4Address("TCP", "192.0.2.1", 587))

    def test_v1_tcp6(self) -> None:
        source, _ = parse_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 587\r\n")
        self.assertEqual(source, IPv6Address("TCP", "2001:db8::7", 40000))

    def test_v1_unknown_keeps_the_real_addresses(self) -> None:
        self.assertEqual(parse_header(b"PROXY UNKNOWN\r\n"), (None, None))
        self.assertEqual(parse_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), (None, None))

    def test_v2_proxy_ipv4_and_ipv6(self) -> None:
        header = v2()
        self.assertEqual(header_length(header + b"rest"), len(header))
        self.assertEqual(parse_header(header)[0], IPv4Address("TCP", "203.0.113.7", 40000))
        self.assertEqual(parse_header(v2_ipv6())[0], IPv6Address("TCP", "2001:db8::7", 40000))

    def test_v2_local_keeps_the_real_addresses(self) -> None:
        self.assertEqual(parse_header(v2(command=0, family=0, addresses=b"")), (None, None))

    def test_partial_headers_wait_for_more(self) -> None:
        for whole in (V1, v2()):
            for cut in range(1, len(whole)):
                length = header_length(whole[:cut])
                self.assertTrue(length is None or length > cut, (whole, cut))

    def test_not_a_header(self) -> None:
        for data in (
            b"EHLO client.example\r\n",
            b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
            b"GET / HTTP/1.0\r\n",
            b"PROXX",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            V2_SIGNATURE[:5] + b"x",
        ):
            self.assertRaises(InvalidHeader, header_length, data)

    def test_v1_too_long(self) -> None:
        self.assertRaises(InvalidHeader, header_length, b"PROXY TCP4 " + b"1" * 100)

    def test_v2_of_another_version(self) -> None:
        self.assertRaises(InvalidHeader, header_length, v2(version=3))

    def test_garbled_headers(self) -> None:
        for header in (
            b"PROXY TCP4 garbage 192.0.2.1 40000 587\r\n",
            b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 587\r\n",  # the wrong family
            b"PROXY TCP4 203.0.113.7 192.0.2.1 port 587\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 587\r\n",
            b"PROXY TCP4 203.0.113.7\r\n",
            b"PROXY SCTP 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 \xff\xfe 192.0.2.1 1 2\r\n",
            v2(family=0x12),  # UDP over IPv4
            v2(family=0x31, addresses=b"/tmp/a".ljust(108, b"\0") * 2),  # a UNIX socket
            v2(addresses=b"\x01\x02"),  # too short for its addresses
            v2(command=5),
        ):
            self.assertRaises(InvalidHeader, parse_header, header)


class ListenerTests(SynchronousTestCase):
    """The wrapper around the real submission factory, on a StringTransport."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp(), make_config(limits={"connections_per_ip": 1}))
        self.inner = SubmissionFactory(self.h.settings, implicit_tls=False)
        self.factory = ProxyHeaderFactory(
            self.inner, ProxySettings(parse_networks(["127.0.0.0/8"]), timeout=5), self.h.clock
        )

    def connect(self, lb: str = LB) -> tuple[Any, TLSStringTransport]:
        address = IPv4Address("TCP", lb, 50000)
        protocol = self.factory.buildProtocol(address)
        transport = TLSStringTransport(peerAddress=address)
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def session(self, protocol: Any) -> SubmissionSession:
        self.assertIsInstance(protocol.wrappedProtocol, SubmissionSession)
        return protocol.wrappedProtocol  # type: ignore[no-any-return]

    def test_the_session_sees_the_client_of_the_header(self) -> None:
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"")  # no greeting before the header
        protocol.dataReceived(V1)
        self.assertTrue(transport.value().startswith(b"220 "))
        session = self.session(protocol)
        self.assertEqual(session.peer, "203.0.113.7")
        self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "203.0.113.7", 40000))
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "192.0.2.1", 587))
        self.assertEqual(dict(self.inner.per_ip), {"203.0.113.7": 1})

    def test_header_split_anywhere_and_commands_in_the_same_packet(self) -> None:
        protocol, transport = self.connect()
        data = V1 + b"EHLO client.test\r\n"
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
        client = Client(protocol, transport)
        self.assertEqual(client.codes(), [220, 250])

    def test_v2_header(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(v2() + b"EHLO client.test\r\n")
        self.assertEqual(self.session(protocol).peer, "203.0.113.7")
        self.assertEqual(Client(protocol, transport).codes(), [220, 250])

    def test_v2_local_is_the_balancer_itself(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(v2(command=0, family=0, addresses=b""))
        self.assertEqual(self.session(protocol).peer, LB)

    def test_connection_cap_counts_the_real_clients(self) -> None:
        """connections_per_ip = 1: a second connection of one client is refused,
        another client through the same balancer is not."""
        first, _ = self.connect()
        first.dataReceived(V1)
        second, transport = self.connect()
        second.dataReceived(V1)
        self.assertTrue(transport.value().startswith(b"421 4.7.0 Too many connections from"))
        third, transport = self.connect()
        third.dataReceived(V1.replace(b"203.0.113.7", b"203.0.113.8"))
        self.assertTrue(transport.value().startswith(b"220 "))

    def test_no_header_is_refused_without_a_reply(self) -> None:
        for data in (b"EHLO client.test\r\n", b"\x16\x03\x01\x00\xa5\x01", b"PROXY TCP4 x\r\n"):
            protocol, transport = self.connect()
            protocol.dataReceived(data)
            self.assertTrue(transport.disconnected, data)
            self.assertEqual(transport.value(), b"")
            self.assertIsNone(protocol.wrappedProtocol)
            protocol.dataReceived(b"EHLO more\r\n")  # ignored, no session appears
            self.assertIsNone(protocol.wrappedProtocol)
        self.assertEqual(dict(self.inner.per_ip), {})

    def test_header_timeout(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"PROXY TCP4 203.0.113.7")
        self.h.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.h.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_only_from_the_balancers(self) -> None:
        protocol, _ = self.connect(lb="192.0.2.99")
        self.assertIsNone(protocol)

    def test_no_timers_left(self) -> None:
        for send in (V1, b""):
            protocol, _ = self.connect()
            if send:
                protocol.dataReceived(send)
            protocol.connectionLost(None)
        session_timers = [c for c in self.h.clock.getDelayedCalls() if c.active()]
        self.assertEqual(session_timers, [])


def _queued(store: FileStore) -> list[str]:
    return [qid for state in QueueState for qid in store.ids(state)]


class SocketTests(TestCase):
    """The service with PROXY listeners on loopback, real TLS, smtplib as the client."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        write_users(os.path.join(self.dir, "users.json"), {LOGIN: PASSWORD})
        any_port = "tcp:0:interface=127.0.0.1"
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {
                "submissions": any_port,
                "submission": any_port,
                "proxy_submissions": any_port,
                "proxy_submission": any_port,
                "proxy_from": ["127.0.0.1"],
            },
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": 9, "dns_timeout": 1},
            "routes": {"*": "[127.0.0.1]:9"},
        }
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.service = MTAService(parse(doc, "test.toml", self.dir), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        ports = [p.getHost().port for p in self.service.ports[:4]]
        self.tls_port, self.plain_port, self.proxy_tls_port, self.proxy_plain_port = ports
        self.context = ssl.create_default_context(
            cafile=os.path.join(self.dir, "spool", "selfsigned", "cert.pem")
        )

    def stored(self) -> bytes:
        store = FileStore(os.path.join(self.dir, "spool"))
        [queue_id] = _queued(store)
        with store.open_message(queue_id) as f:
            return f.read()

    def send(self, smtp: smtplib.SMTP) -> None:
        smtp.login(LOGIN, PASSWORD)
        body = f"From: {LOGIN}\r\nTo: a@example.net\r\nSubject: proxied\r\n\r\nHi.\r\n"
        smtp.sendmail(LOGIN, ["a@example.net"], body)

    def test_implicit_tls_behind_the_balancer(self) -> Any:
        context, port = self.context, self.proxy_tls_port

        class Proxied(smtplib.SMTP_SSL):
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = socket.create_connection((host, port), timeout)
                sock.sendall(v2())
                return context.wrap_socket(sock, server_hostname=host)

        def client() -> None:
            with Proxied("localhost", port, context=context, timeout=30) as s:
                self.send(s)

        def check(_: object) -> None:
            stored = self.stored()
            received = stored.split(b"\r\n\t(using")[0]
            self.assertTrue(received.endswith(b" ([203.0.113.7])"), received)

        return deferToThread(client).addCallback(check)

    def test_starttls_behind_the_balancer(self) -> Any:
        port = self.proxy_plain_port

        class Proxied(smtplib.SMTP):
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = socket.create_connection((host, port), timeout)
                sock.sendall(V1)
                return sock

        def client() -> None:
            with Proxied("localhost", port, timeout=30) as s:
                s.starttls(context=self.context)
                self.send(s)

        def check(_: object) -> None:
            head = self.stored().split(b"\r\n\r\n")[0]
            self.assertIn(b"[203.0.113.7]", head)
            self.assertIn(b"(using TLSv1.3 ", head)  # the handshake was seen through the wrapper

        return deferToThread(client).addCallback(check)

    def test_a_plain_listener_never_honours_a_header(self) -> Any:
        port = self.plain_port

        def client() -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                f = sock.makefile("rb")
                f.readline()  # the greeting
                sock.sendall(V1)
                line = f.readline()
            return int(line[:3]), line

        def check(result: tuple[int, bytes]) -> None:
            self.assertEqual(result[0], 500, result)

        return deferToThread(client).addCallback(check)

    def test_a_proxy_listener_refuses_a_direct_client(self) -> Any:
        port = self.proxy_plain_port

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"EHLO direct.example\r\n")
                try:
                    return sock.recv(100)  # b"" once closed ...
                except ConnectionResetError:
                    return b""  # ... or reset

        return deferToThread(client).addCallback(self.assertEqual, b"")
