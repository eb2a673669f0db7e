"""Unit tests for the fixes that the attack and fault tests (issue 7) led to.

Each fix was first seen end to end (tests/e2e/test_attacks.py,
tests/e2e/test_faults.py); these pin it down at the protocol layer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mta.errors import Reply
from mta.smtp.server import CLOSE_GRACE
from tests.dnsserver import DNSTestServer
from tests.queue_support import LATER, NO_USER, OK, QueueTestCase
from tests.support import LOGIN, Harness, make_config


class CloseGraceTests(SynchronousTestCase):
    """A connection we close must go away even if the client never reads.

    Found with 465 clients that never start the TLS handshake: TLS holds
    the 421 until the handshake, and an orderly close waits for the 421,
    so the idle timeout closed nothing.
    """

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def test_idle_connection_is_aborted_when_the_close_does_not_complete(self) -> None:
        c = self.h.connect()
        c.replies()
        self.h.clock.advance(300)
        self.assertEqual(c.codes(), [421])
        self.assertTrue(c.transport.disconnecting)
        self.assertFalse(c.transport.disconnected)  # an orderly close, first
        self.h.clock.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(c.transport.disconnected)
        self.h.clock.advance(0.1)
        self.assertTrue(c.transport.disconnected)  # then aborted

    def test_quit_is_aborted_too_if_the_client_never_reads(self) -> None:
        c = self.h.connect()
        c.replies()
        c.send("QUIT\r\n")
        self.h.clock.advance(CLOSE_GRACE)
        self.assertTrue(c.transport.disconnected)

    def test_no_abort_after_the_connection_closed(self) -> None:
        c = self.h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\nQUIT\r\n")
        c.protocol.connectionLost()
        self.assertEqual(self.h.clock.getDelayedCalls(), [])


class FuzzFindingsTests(SynchronousTestCase):
    """What the fuzz target (tests/test_fuzz_smtp.py) found in the session."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def test_overlong_line_same_answer_in_one_packet_or_many(self) -> None:
        """A line over the AUTH limit was refused only when it came in
        pieces; in one packet it was run (here: an AUTH line of 13 kB)."""
        line = b"AUTH PLAIN " + b"A" * 13_000 + b"\r\n"
        answers = []
        for chunks in (
            [line],
            [line[:6000], line[6000:]],
            [line[i : i + 512] for i in range(0, len(line), 512)],
        ):
            c = self.h.connect()
            c.replies()
            c.command("EHLO client.test")
            for chunk in chunks:
                c.send(chunk)
            c.send(b"NOOP\r\n")
            answers.append(c.replies())
        self.assertEqual(answers[0], [(500, "5.5.2 Line too long"), (250, "2.0.0 Ok")])
        self.assertEqual(answers[1], answers[0])
        self.assertEqual(answers[2], answers[0])

    def test_idle_timer_after_quit_is_harmless(self) -> None:
        """The idle timer fired on a session closed by QUIT whose close had
        not completed, and closed it again (an exception in the reactor)."""
        c = self.h.connect()
        c.replies()
        c.send("QUIT\r\n")
        self.h.clock.advance(300)
        self.assertEqual(c.codes(), [221])


class DataRateTests(SynchronousTestCase):
    """A client inside DATA must keep up [limits] data_min_rate (500 octets/s).

    Before, every packet restarted the idle timer, so an authenticated
    client sending a byte a second held its connection for ever.
    """

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())
        self.c = self.h.connect()
        self.c.login()
        self.c.send(f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        self.assertEqual(self.c.codes(), [250, 250, 354])

    def test_byte_a_second_is_cut_after_the_idle_timeout(self) -> None:
        seconds = 0
        while not self.c.closed and seconds < 400:
            self.c.send(b"x")
            self.h.clock.advance(1)
            seconds += 1
        # 300 s of idle timeout, plus 1/500 s for each octet.
        self.assertTrue(self.c.closed)
        self.assertIn(seconds, range(300, 303))
        self.assertEqual(self.c.codes(), [421])

    def test_steady_sender_is_not_cut(self) -> None:
        for _ in range(400):
            self.c.send(b"x" * 99 + b"\r\n")  # 505 octets a second
            self.h.clock.advance(0.2)
        self.assertFalse(self.c.closed)
        self.c.send(f"From: <{LOGIN}>\r\n\r\n.\r\n")
        self.assertEqual(self.c.codes(), [550])  # the body made no header section

    def test_a_pause_within_the_idle_timeout_after_fast_input(self) -> None:
        self.c.send(b"x" * 998 + b"\r\n")
        self.h.clock.advance(299)
        self.assertFalse(self.c.closed)
        # Credit is what is sent: 150 kB at 500 octets/s is the full 300 s.
        self.c.send((b"y" * 998 + b"\r\n") * 150)
        self.h.clock.advance(299)
        self.assertFalse(self.c.closed)
        self.h.clock.advance(2)
        self.assertTrue(self.c.closed)

    def test_zero_restores_the_plain_idle_timeout(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"data_min_rate": 0}))
        c = h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        for _ in range(400):
            c.send(b"x")
            h.clock.advance(1)
        self.assertFalse(c.closed)


class UnprovenShareTests(QueueTestCase):
    """Destinations that have not answered a transaction lately get two
    connections each, and half of [delivery] max_connections together.

    Found end to end (tests/e2e/test_faults.py, TarpitDomains): eight
    domains whose MX accepts and never speaks took all 100 connections
    until the greeting timeout, and mail to good domains waited.
    """

    def start(self, *recipients: str) -> list[str]:
        ids = [self.queue(r) for r in recipients]
        for qid in ids:
            self.commit(self.qm, qid)
        return ids

    def destinations(self) -> list[str]:
        return sorted(job.domain for job in self.spy.waiting)

    def test_tarpits_take_at_most_half_and_a_responsive_destination_still_starts(self) -> None:
        self.qm = self.manager(connections=10)
        self.start("a@good.example")
        self.spy.answer(0, OK)  # good.example answered: responsive
        self.start(*[f"u@tarpit{n}.example" for n in range(20)])
        self.assertEqual(len(self.spy.waiting), 5)  # half of 10
        self.start("b@good.example", "c@good.example", "d@good.example")
        self.assertEqual(self.destinations().count("good.example"), 3)
        self.assertEqual(len(self.spy.waiting), 8)

    def test_a_destination_that_answers_is_no_longer_limited(self) -> None:
        self.qm = self.manager(connections=4)
        self.start(*[f"u{n}@slow.example" for n in range(6)])
        self.assertEqual(len(self.spy.waiting), 2)
        self.spy.answer(0, NO_USER)  # an SMTP answer, even a refusal, proves it
        self.assertEqual(len(self.spy.waiting), 4)  # now up to the global limit

    def test_timeouts_do_not_prove_a_destination(self) -> None:
        self.qm = self.manager(connections=4)
        self.start(*[f"u{n}@tarpit.example" for n in range(6)])
        self.spy.answer(0, LATER, kind="timeout", connected=True)
        self.assertEqual(len(self.spy.waiting), 2)

    def test_proof_expires(self) -> None:
        self.qm = self.manager(connections=4)
        self.start("a@once.example")
        self.spy.answer(0, OK)
        self.clock.advance(3601)
        self.start(*[f"u{n}@once.example" for n in range(6)])
        self.assertEqual(len(self.spy.waiting), 2)

    def test_a_new_destination_gets_two_connections_until_it_answers(self) -> None:
        self.qm = self.manager(connections=100)
        self.start(*[f"u{n}@new.example" for n in range(30)])
        self.assertEqual(len(self.spy.waiting), 2)
        self.spy.answer(1, OK)
        self.assertEqual(len(self.spy.waiting), 20)  # destination_concurrency


class ReplyTextTests(SynchronousTestCase):
    """Reply texts never echo control characters a client sent in a command (found by the fuzz
    target)."""

    def test_control_characters_from_a_command_are_not_echoed(self) -> None:
        """Found by the fuzz target: "501 ... Bad parameter syntax: <NUL>"."""
        h = Harness(self.mktemp())
        c = h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}> \x00\x1b[2J\x7f\tx\r\n")
        text = c.transport.value().replace(b"\r\n", b"")
        self.assertNotRegex(text, rb"[\x00-\x08\x0a-\x1f\x7f]")
        self.assertIn(b"Bad parameter syntax: ??[2J?\tx\r\n", c.transport.value())
        self.assertEqual(c.codes(), [501])


class ReplyCodeTests(SynchronousTestCase):
    """A L{Reply} with a code out of range or an enhanced code that is
    malformed or of another class is refused, the first time and again (the
    pairs already checked are remembered)."""

    def test_bad_codes_are_refused_every_time(self) -> None:
        for _ in range(2):
            for code, enhanced in [(199, None), (600, "5.0.0"), (250, "2.0"), (250, "5.0.0")]:
                with self.assertRaises(ValueError):
                    Reply(code, enhanced, "x")

    def test_good_codes_are_taken_every_time(self) -> None:
        for _ in range(2):
            self.assertEqual(Reply(421, "4.7.28", "slow").wire, b"421 4.7.28 slow\r\n")
            self.assertEqual(Reply(220, None, "hi").wire, b"220 hi\r\n")


class DNSTestServerPortTests(SynchronousTestCase):
    """The loopback DNS server of the tests tries another port when the TCP
    half of its port is taken (it caught OSError, which Twisted's
    CannotListenError is not: the source of "Address already in use"
    failures in tests/test_dns.py and of a DNS helper that did not start)."""

    class Reactor(MemoryReactor):
        """MemoryReactor with a UDP listen that hands out ports in turn."""

        next_port = 40000

        def listenUDP(self, port: int, protocol: Any, interface: str = "", **kw: Any) -> Any:
            self.next_port += 1
            return _UDPPort(port or self.next_port)

    def test_tcp_port_taken_tries_another(self) -> None:
        reactor = self.Reactor()
        real_listen = reactor.listenTCP
        refused: list[int] = []

        def listen_tcp(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            if not refused:
                refused.append(port)
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return real_listen(port, factory, backlog, interface)

        reactor.listenTCP = listen_tcp  # type: ignore[method-assign]
        server = DNSTestServer({}, reactor=reactor)
        port = server.start()
        self.assertEqual(refused, [40001])
        self.assertEqual(port, 40002)
        self.assertEqual([p[0] for p in reactor.tcpServers], [40002])


class _UDPPort:
    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        return None
