"""Retention with a Clock: redact after retention_days, remove later."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.config import RetentionConfig
from mta.envelope import QueueState
from mta.interfaces import IQueueStore
from mta.queue.retention import Retention
from mta.spool import FileStore
from mta.testing import MemoryStore, NoSyncOps, queue_message, run_inline

T0 = 1_700_000_000.0
DAY = 86400.0
MESSAGE = b"From: a@example.com\r\nSubject: kept\r\n\r\nSecret body text.\r\n"


class RetentionTests(SynchronousTestCase):
    """Finished messages keep their content for retention_days, then only the
    facts; one bad message does not stop the sweep.  On the memory store."""

    def make_store(self) -> IQueueStore:
        return MemoryStore()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = self.make_store()
        self.settings = RetentionConfig(
            retention_days=30, remove_after_days=10, sweep_interval=3600
        )

    def service(self) -> Retention:
        r = Retention(self.store, run_inline, self.clock, self.settings)
        r.startService()
        self.addCleanup(r.stopService)
        return r

    def put(self, state: QueueState, when: float) -> str:
        qid = queue_message(self.store, "a@example.com", ["b@example.net"], MESSAGE, arrival=when)
        _, env = self.store.load(qid)
        self.store.settle(env, QueueState.INCOMING, state, when)
        return qid

    def finished(self, when: float) -> str:
        return self.put(QueueState.DONE, when)

    def test_redacted_after_retention_then_removed(self) -> None:
        qid = self.finished(T0)
        self.service()
        self.clock.advance(30 * DAY - 3600)
        self.assertEqual(self.store.locate(qid), "done")
        self.clock.advance(3600)
        state, env = self.store.load(qid)
        self.assertEqual(state, "redacted")
        self.assertEqual(env.redacted, T0 + 30 * DAY)
        self.assertEqual(env.recipients[0].address, "b@example.net")
        with self.store.open_message(qid) as f:
            stored = f.read()
        self.assertTrue(stored.startswith(b"From: a@example.com\r\nSubject: kept\r\n\r\n"))
        self.assertNotIn(b"Secret body text", stored)
        self.assertIn(b"retention period of 30 days", stored)
        self.clock.advance(10 * DAY)
        self.assertRaises(KeyError, self.store.locate, qid)

    def test_zero_days_redacts_at_once(self) -> None:
        self.settings = RetentionConfig(retention_days=0, remove_after_days=10)
        r = self.service()
        qid = self.finished(self.clock.seconds())
        r.finished(qid)
        self.assertEqual(self.store.locate(qid), "redacted")

    def test_only_old_enough_messages(self) -> None:
        old = self.finished(T0 - 31 * DAY)
        new = self.finished(T0 - 1 * DAY)
        self.service()
        self.assertEqual(self.store.locate(old), "redacted")
        self.assertEqual(self.store.locate(new), "done")

    def test_new_settings_apply_at_the_next_sweep(self) -> None:
        qid = self.finished(T0)
        r = self.service()
        self.clock.advance(2 * DAY)
        self.assertEqual(self.store.locate(qid), "done")
        r.configure(RetentionConfig(retention_days=1, remove_after_days=10))
        self.clock.advance(3600)
        self.assertEqual(self.store.locate(qid), "redacted")

    def test_no_timer_left_after_stop(self) -> None:
        r = self.service()
        r.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_bad_done_entry_does_not_stop_removals(self) -> None:
        bad = self.put(QueueState.DONE, T0 - 31 * DAY)
        self.break_envelope(bad)
        old = self.put(QueueState.REDACTED, T0 - 50 * DAY)
        self.service()  # sweeps at once
        self.flushLoggedErrors()
        self.assertRaises(KeyError, self.store.locate, old)
        self.assertEqual(self.store.locate(bad), QueueState.CORRUPT)

    def break_envelope(self, queue_id: str) -> None:
        self.store.unreadable.add(queue_id)


class FileStoreRetentionTests(RetentionTests):
    """L{RetentionTests} on the file system store."""

    def make_store(self) -> IQueueStore:
        store = FileStore(os.path.abspath(self.mktemp()), NoSyncOps())
        store.open()
        return store

    def break_envelope(self, queue_id: str) -> None:
        path = self.store.path("done", queue_id)
        when = os.stat(path).st_mtime
        with open(path, "wb") as f:
            f.write(MESSAGE + b"{not json\n")
        os.utime(path, (when, when))
