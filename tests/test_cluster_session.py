"""A session whose shared state (Redis) is gone: AUTH and the daily limit
fail closed with temporary replies, and work again once it is back.

The session runs on a StringTransport; L{SwitchableState} stands for Redis
(the real one is in tests/test_shared_state.py and tests/e2e/test_cluster.py).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support import LOGIN, PASSWORD, Harness, make_config, plain


class SharedStateDownTests(SynchronousTestCase):
    """Sessions with the shared state (Redis) down: AUTH fails closed with a temporary reply, also
    when it goes down between the block check and the known-failure check; a wrong password that
    cannot be counted is still 535, after the longest delay; the daily limit fails closed at
    MAIL; down at the end of data nothing is queued; down after the commit the message stays
    queued and only its count is lost (logged)."""

    def setUp(self) -> None:
        config = make_config(limits={"daily_messages": 5}, auth={"failure_delay": 0})
        self.h = Harness(self.mktemp(), config)

    def submit(self, c: object) -> tuple[int, str]:
        c.command(f"MAIL FROM:<{LOGIN}>")  # type: ignore[attr-defined]
        c.command("RCPT TO:<bob@example.net>")  # type: ignore[attr-defined]
        c.command("DATA")  # type: ignore[attr-defined]
        c.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")  # type: ignore[attr-defined]
        return c.replies()[-1]  # type: ignore[attr-defined,no-any-return]

    def test_auth_fails_closed(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.h.shared.down = True
        code, text = c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")
        self.assertEqual(code, 454)
        self.assertIn("4.3.0 Logins cannot be checked right now (a server problem)", text)
        self.assertIsNone(c.session.login)
        self.h.shared.down = False
        self.assertEqual(c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")[0], 235)
        self.flushLoggedErrors()

    def test_auth_fails_closed_after_the_first_check(self) -> None:
        """Down between the block check and the known-failure check: still no login."""
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        c.command("AUTH LOGIN")
        c.command("YWxpY2VAZXhhbXBsZS5jb20=")
        self.h.shared.down = True
        code, text = c.command("Y29ycmVjdCBob3JzZSBiYXR0ZXJ5")
        self.assertEqual((code, text.split(" ")[0]), (454, "4.3.0"))
        self.assertIsNone(c.session.login)
        self.flushLoggedErrors()

    def test_a_wrong_password_that_cannot_be_counted(self) -> None:
        """The client still hears "wrong password", after the longest delay."""
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.h.shared.down, self.h.shared.only = True, {"add_auth_failure"}
        c.send(f"AUTH PLAIN {plain(LOGIN, 'wrong password')}\r\n")
        self.h.clock.advance(self.h.config.auth.failure_delay_max - 0.1)
        self.assertEqual(c.replies(), [])
        self.h.clock.advance(0.1)
        self.assertEqual(c.codes(), [535])
        self.flushLoggedErrors()

    def test_daily_limit_fails_closed(self) -> None:
        c = self.h.connect()
        c.login()
        self.h.shared.down = True
        code, text = c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(code, 451)
        self.assertIn("4.3.0 The daily sending limit cannot be checked right now", text)
        self.h.shared.down = False
        self.assertEqual(self.submit(c)[0], 250)
        self.flushLoggedErrors()

    def test_down_at_end_of_data_queues_nothing(self) -> None:
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        self.h.shared.down = True
        c.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(c.replies()[-1][0], 451)
        self.assertEqual(len(self.h.spool.messages), 0)
        self.flushLoggedErrors()

    def test_down_after_the_commit_loses_only_the_count(self) -> None:
        """The message is queued (it had its checks); its count is logged as lost."""
        c = self.h.connect()
        c.login()
        self.h.shared.down, self.h.shared.only = True, {"add_sent"}
        self.assertEqual(self.submit(c)[0], 250)
        self.assertEqual(len(self.h.spool.messages), 1)
        self.h.shared.down = False
        self.assertEqual(self.successResultOf(self.h.shared.sent_today(LOGIN)), 0)
        self.flushLoggedErrors()
