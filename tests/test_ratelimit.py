"""Per-user daily sending limits: counting, restart, day rollover, the session."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.dailycount import DailyCounter
from tests.support import LOGIN, Harness, make_config

# 2023-11-14 22:13:20 UTC
T0 = 1_700_000_000.0


class DailyCounterTests(SynchronousTestCase):
    """DailyCounter, the per-login counts of one UTC day in spool/state/: counted per login, kept
    across a restart, a new day starting at zero with old files removed."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.dir = os.path.abspath(self.mktemp())

    def test_counts_per_login(self) -> None:
        counter = DailyCounter(self.dir, self.clock)
        counter.add("a@example.com")
        counter.add("a@example.com")
        counter.add("b@example.com")
        self.assertEqual((counter.count("a@example.com"), counter.count("b@example.com")), (2, 1))

    def test_survives_a_restart(self) -> None:
        counter = DailyCounter(self.dir, self.clock)
        for _ in range(3):
            counter.add("a@example.com")
        counter.close()
        self.assertEqual(DailyCounter(self.dir, self.clock).count("a@example.com"), 3)

    def test_new_day_starts_at_zero_and_old_files_go(self) -> None:
        counter = DailyCounter(self.dir, self.clock)
        counter.add("a@example.com")
        self.clock.advance(2 * 3600)  # past midnight UTC
        self.assertEqual(counter.count("a@example.com"), 0)
        counter.add("a@example.com")
        self.assertEqual(os.listdir(self.dir), ["sent-20231115.log"])


class SessionLimitTests(SynchronousTestCase):
    """The daily sending limit in a session: the configured limit, a user's own limit overriding it,
    zero as no limit, and refused messages not counted."""

    def submit(self, c: object) -> int:
        c.command(f"MAIL FROM:<{LOGIN}>")  # type: ignore[attr-defined]
        c.command("RCPT TO:<bob@example.net>")  # type: ignore[attr-defined]
        c.command("DATA")  # type: ignore[attr-defined]
        c.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")  # type: ignore[attr-defined]
        return int(c.replies()[-1][0])  # type: ignore[attr-defined]

    def test_configured_limit(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"daily_messages": 2}))
        c = h.connect()
        c.login()
        self.assertEqual([self.submit(c), self.submit(c)], [250, 250])
        code, text = c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith("4.7.1 Daily sending limit of 2 messages"))

    def test_user_limit_overrides(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"daily_messages": 0}))
        with h.users.editing() as users:
            users[LOGIN].daily_limit = 1
        c = h.connect()
        c.login()
        self.assertEqual(self.submit(c), 250)
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 451)

    def test_zero_means_unlimited(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"daily_messages": 0}))
        c = h.connect()
        c.login()
        self.assertEqual([self.submit(c) for _ in range(5)], [250] * 5)

    def test_refused_messages_do_not_count(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"daily_messages": 1}))
        c = h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        c.send("From: someone-else@example.org\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(c.replies()[-1][0], 550)
        self.assertEqual(self.submit(c), 250)
