"""Unit tests for the fixes that the attack and fault tests (issue 7) led to.

Each fix was first seen end to end (tests/e2e/test_attacks.py,
tests/e2e/test_faults.py); these pin it down at the protocol layer.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.smtp.server import CLOSE_GRACE
from tests.support import LOGIN, Harness


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
