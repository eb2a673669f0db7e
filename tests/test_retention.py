"""Retention with a Clock: redact after retention_days, remove later."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.config import RetentionConfig
from mta.queue.retention import Retention
from mta.spool.fs import SpoolStore
from mta.testing import NoSyncOps, queue_message, run_inline

T0 = 1_700_000_000.0
DAY = 86400.0
MESSAGE = b"From: a@example.com\r\nSubject: kept\r\n\r\nSecret body text.\r\n"


class RetentionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SpoolStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.settings = RetentionConfig(
            retention_days=30, remove_after_days=10, sweep_interval=3600
        )

    def service(self) -> Retention:
        r = Retention(self.store, run_inline, self.clock, lambda: self.settings)
        r.startService()
        self.addCleanup(r.stopService)
        return r

    def finished(self, when: float) -> str:
        qid = queue_message(self.store, "a@example.com", ["b@example.net"], MESSAGE, arrival=when)
        _, env = self.store.load(qid)
        self.store.settle(env, "incoming", "done", when)
        return qid

    def test_redacted_after_retention_then_removed(self) -> None:
        qid = self.finished(T0)
        self.service()
        self.clock.advance(30 * DAY - 3600)
        self.assertEqual(self.store.find(qid), "done")
        self.clock.advance(3600)
        state, env = self.store.load(qid)
        self.assertEqual(state, "redacted")
        self.assertEqual(env.redacted, T0 + 30 * DAY)
        self.assertEqual(env.recipients[0].address, "b@example.net")
        with open(self.store.path("redacted", qid, "message"), "rb") as f:
            stored = f.read()
        self.assertTrue(stored.startswith(b"From: a@example.com\r\nSubject: kept\r\n\r\n"))
        self.assertNotIn(b"Secret body text", stored)
        self.assertIn(b"retention period of 30 days", stored)
        self.clock.advance(10 * DAY)
        self.assertRaises(KeyError, self.store.find, qid)

    def test_zero_days_redacts_at_once(self) -> None:
        self.settings = RetentionConfig(retention_days=0, remove_after_days=10)
        r = self.service()
        qid = self.finished(self.clock.seconds())
        r.finished(qid)
        self.assertEqual(self.store.find(qid), "redacted")

    def test_only_old_enough_messages(self) -> None:
        old = self.finished(T0 - 31 * DAY)
        new = self.finished(T0 - 1 * DAY)
        self.service()
        self.assertEqual(self.store.find(old), "redacted")
        self.assertEqual(self.store.find(new), "done")

    def test_settings_reread_each_sweep(self) -> None:
        qid = self.finished(T0)
        self.service()
        self.clock.advance(2 * DAY)
        self.assertEqual(self.store.find(qid), "done")
        self.settings = RetentionConfig(retention_days=1, remove_after_days=10)
        self.clock.advance(3600)
        self.assertEqual(self.store.find(qid), "redacted")

    def test_no_timer_left_after_stop(self) -> None:
        r = self.service()
        r.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
