"""Files made ahead for commits (L{mta.spool.spares}) and their use by the spool."""

from __future__ import annotations

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from mta.spool.fs import SPILL, FileOps, FileStore, Spool
from mta.spool.queueid import QueueIdGenerator
from mta.spool.spares import PREFIX, SpareFiles
from mta.testing import FailingOps, QueuedRunner
from tests.test_spool_fs import (
    MESSAGE_BYTES,
    T0,
    CountingOps,
    entries,
    make_envelope,
    new_root,
    start,
)


class SpareFilesTests(SynchronousTestCase):
    """The set itself: filled to its target, taken one by one, closed."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ops = FileOps()
        self.spares = SpareFiles(self.dir, ops.create, ops.close, target=5)
        self.addCleanup(self.spares.close)

    def test_refill_makes_empty_files_up_to_the_target(self) -> None:
        self.assertTrue(self.spares.wanted())
        self.assertEqual(self.spares.refill(), 5)
        self.assertEqual(len(self.spares), 5)
        names = sorted(os.listdir(self.dir))
        self.assertEqual(len(names), 5)
        self.assertTrue(all(n.startswith(self.spares.prefix) for n in names))
        self.assertTrue(self.spares.prefix.startswith(PREFIX))
        for name in names:
            self.assertEqual(os.path.getsize(os.path.join(self.dir, name)), 0)
        self.assertFalse(self.spares.wanted(), "full")

    def test_one_refill_at_a_time(self) -> None:
        self.assertTrue(self.spares.wanted())
        self.assertFalse(self.spares.wanted(), "one is already running")
        self.spares.refill()
        self.spares.take()
        self.spares.take()
        self.assertFalse(self.spares.wanted(), "3 of 5 left: not yet")
        self.spares.take()
        self.assertTrue(self.spares.wanted(), "done, and under half the target")
        self.assertEqual(self.spares.refill(), 3)

    def test_take_hands_out_open_files_then_none(self) -> None:
        self.spares.refill()
        taken = [self.spares.take() for _ in range(5)]
        self.assertIsNone(self.spares.take())
        for spare in taken:
            assert spare is not None
            path, fd = spare
            os.write(fd, b"x")
            os.close(fd)
            self.assertEqual(os.path.getsize(path), 1)

    def test_refill_stops_at_an_error(self) -> None:
        failing = FailingOps("create", errno.ENOSPC, after=2, times=100)
        spares = SpareFiles(self.dir, failing.create, failing.close, target=5)
        self.addCleanup(spares.close)
        spares.wanted()
        self.assertEqual(spares.refill(), 2)
        self.assertEqual(len(spares), 2)
        self.assertTrue(spares.wanted(), "tried again later (2 of 5 is under half)")

    def test_close_removes_every_spare(self) -> None:
        self.spares.refill()
        self.spares.close()
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(len(self.spares), 0)


class SpoolWithSparesTests(SynchronousTestCase):
    """The daemon's spool writes new messages into spares and keeps them topped up."""

    def setUp(self) -> None:
        self.runner = QueuedRunner()
        self.ops = CountingOps()
        self.store = FileStore(new_root(self), self.ops, spares=True)
        self.addCleanup(self.store.close)
        self.spool = Spool(self.store, self.runner, QueueIdGenerator(lambda: T0))

    def commit(self, data: bytes = MESSAGE_BYTES) -> str:
        d = start(self.spool, data).commit(make_envelope())
        self.runner.run_next(-1)  # the group (a refill may be queued before it)
        return str(self.successResultOf(d))

    def test_a_commit_uses_a_spare_and_creates_nothing(self) -> None:
        first = self.commit()  # no spare yet: it creates its own file
        self.assertEqual(len(self.runner.queue), 1, "a refill follows the first commit")
        self.runner.run_next()
        spares = self.store.spares
        assert spares is not None
        self.assertEqual(len(spares), spares.target)
        self.ops.calls.clear()
        second = self.commit()
        self.assertEqual(self.ops.kinds(), ["syncfs", "rename", "fsync_dir"])
        _, move = self.ops.calls[1]
        source, target = move.split(" -> ")
        self.assertTrue(os.path.basename(source).startswith(spares.prefix))
        self.assertEqual(target, self.store.path("incoming", second))
        self.assertEqual(len(spares), spares.target - 1)
        self.assertEqual(entries(self.spool, "incoming"), sorted([first, second]))
        for queue_id in (first, second):
            with self.store.open_message(queue_id) as f:
                self.assertEqual(f.read(), MESSAGE_BYTES)
            self.assertEqual(self.store.load(queue_id)[1].queue_id, queue_id)

    def test_no_second_refill_while_one_is_queued(self) -> None:
        self.commit()
        self.commit()  # the refill of the first is still queued
        self.assertEqual(len(self.runner.queue), 1)

    def test_a_large_message_keeps_its_own_file(self) -> None:
        self.commit()
        self.runner.run_next()  # the refill
        txn = self.spool.begin()
        txn.write(b"a" * SPILL + b"\r\n")
        self.runner.run_next()  # written to tmp/ID as it arrived
        d = txn.commit(make_envelope())
        self.ops.calls.clear()
        self.runner.run_next()
        queue_id = self.successResultOf(d)
        tmp = self.store.path("tmp", queue_id)
        self.assertIn(
            ("rename", f"{tmp} -> {self.store.path('incoming', queue_id)}"), self.ops.calls
        )

    def test_a_vanished_spare_fails_its_message_alone(self) -> None:
        self.commit()
        self.runner.run_next()
        spares = self.store.spares
        assert spares is not None
        path, _ = spares._ready[0]
        os.unlink(path)
        d = start(self.spool).commit(make_envelope())
        self.runner.run_next()
        self.failureResultOf(d)
        self.flushLoggedErrors()
        self.assertEqual(len(entries(self.spool, "incoming")), 1, "only the first")
        self.commit()  # the next one takes the next spare
        self.assertEqual(len(entries(self.spool, "incoming")), 2)

    def test_clean_tmp_keeps_this_processs_spares(self) -> None:
        self.commit()
        self.runner.run_next()
        stale = [PREFIX + "1-7", "0S3MA0000000001"]  # an earlier run's spare, a crash's file
        for name in stale:
            with open(self.store.path("tmp", name), "wb"):
                pass
        self.assertEqual(self.store.clean_tmp(), 2)
        spares = self.store.spares
        assert spares is not None
        self.assertEqual(len(os.listdir(self.store.path("tmp"))), spares.target)
        self.commit()  # a kept spare still works

    def test_close_removes_the_spares(self) -> None:
        self.commit()
        self.runner.run_next()
        self.store.close()
        self.assertEqual(entries(self.spool, "tmp"), [])

    def test_offline_stores_keep_no_spares(self) -> None:
        store = FileStore(self.store.root)
        self.assertIsNone(store.spares)
