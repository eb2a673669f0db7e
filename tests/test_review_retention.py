"""Review findings in retention."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.config import RetentionConfig
from mta.queue.retention import Retention
from mta.spool.fs import ENVELOPE, SpoolStore
from mta.testing import NoSyncOps, queue_message, run_inline

T0 = 1_700_000_000.0
DAY = 86400.0
MESSAGE = b"From: a@example.com\r\nSubject: kept\r\n\r\nSecret body text.\r\n"


class RetentionRobustnessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SpoolStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.settings = RetentionConfig(retention_days=30, remove_after_days=10)

    def put(self, state: str, when: float) -> str:
        qid = queue_message(self.store, "a@example.com", ["b@example.net"], MESSAGE, arrival=when)
        _, env = self.store.load(qid)
        self.store.settle(env, "incoming", state, when)
        return qid

    def test_one_bad_done_entry_does_not_stop_removals(self) -> None:
        bad = self.put("done", T0 - 31 * DAY)
        with open(self.store.path("done", bad, ENVELOPE), "w") as f:
            f.write("{not json")
        os.utime(self.store.path("done", bad), (T0 - 31 * DAY, T0 - 31 * DAY))
        old = self.put("redacted", T0 - 50 * DAY)
        r = Retention(self.store, run_inline, self.clock, lambda: self.settings)
        r.startService()  # sweeps at once
        self.addCleanup(r.stopService)
        self.flushLoggedErrors()
        self.assertRaises(KeyError, self.store.find, old)
