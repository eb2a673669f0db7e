"""The on-disk spool (L{mta.spool.fs}) on a temporary directory.

Durability cannot be observed from inside one process, so these tests check
the recipe instead: which calls happen (through L{FileOps} subclasses that
count or record), and that every failure of one of them leaves nothing of
the message in the queue and nothing behind in C{tmp/}.  The layout is the
documented one (C{docs/spool-format.md}): each message one file, the
message and then its records.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import mta.spool as spool_package
from mta.config import SpoolConfig
from mta.envelope import Committed, Envelope, QueueState, Recipient, RecipientState
from mta.errors import StorageError
from mta.interfaces import ISpool, ISpoolTransaction
from mta.spool import format as envformat
from mta.spool import fs, open_store
from mta.spool.format import FormatError, MissingEnvelopeError
from mta.spool.fs import (
    HIGH_WATER,
    MAX_GROUP,
    SPILL,
    SPOOL_FORMAT,
    TAIL,
    FileOps,
    FileStore,
    Spool,
    SpoolLock,
)
from mta.spool.memory import MemorySpool
from mta.spool.queueid import QueueIdGenerator
from mta.testing import FailingOps, NoSyncOps, QueuedRunner, queue_message, run_inline

MESSAGE_BYTES = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
T0 = 1_700_000_000.0


class CountingOps(FileOps):
    """Real file operations that record the calls durability is made of."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._paths: dict[int, str] = {}

    def create(self, path: str) -> int:
        fd = super().create(path)
        self._paths[fd] = path
        self.calls.append(("create", path))
        return fd

    def append(self, path: str) -> int:
        fd = super().append(path)
        self._paths[fd] = path
        self.calls.append(("append", path))
        return fd

    def fsync(self, fd: int) -> None:
        self.calls.append(("fsync", self._paths.get(fd, "?")))
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self.calls.append(("fsync_dir", path))
        super().fsync_dir(path)

    def syncfs(self, path: str) -> None:
        self.calls.append(("syncfs", path))
        super().syncfs(path)

    def rename(self, src: str, dst: str) -> None:
        self.calls.append(("rename", f"{src} -> {dst}"))
        super().rename(src, dst)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


class RaisingDirSyncOps(FileOps):
    """Raises an unexpected (non-OSError) exception when syncing C{incoming/}."""

    def fsync_dir(self, path: str) -> None:
        if os.path.basename(path) == "incoming":
            raise RuntimeError("unexpected failure")
        super().fsync_dir(path)


class Producer:
    """Records pauseProducing/resumeProducing, as a transport would get them."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")


# -- helpers -------------------------------------------------------------------


def new_root(case: SynchronousTestCase) -> str:
    """A fresh spool directory with the layout in place."""
    root = os.path.abspath(case.mktemp())
    FileStore(root).open()
    return root


def new_spool(
    case: SynchronousTestCase,
    ops: FileOps | None = None,
    runner: Callable[[Callable[[], Any]], Deferred[Any]] = run_inline,
    root: str | None = None,
    **store: Any,
) -> Spool:
    """A L{Spool} on a fresh directory whose store uses C{ops}.

    The layout is made with plain file operations first, so that a
    L{FailingOps} counts only the calls of the commit under test.
    """
    files = FileStore(root or new_root(case), ops, **store)
    return Spool(files, runner, QueueIdGenerator(lambda: T0))


def make_envelope(*recipients: str, sender: str = "alice@example.com") -> Envelope:
    return Envelope(
        queue_id="",
        sender=sender,
        recipients=[Recipient(r) for r in (recipients or ("bob@example.net",))],
        arrival=T0 + 0.25,
        size=len(MESSAGE_BYTES),
        auth_user="alice@example.com",
        client_address="192.0.2.7",
    )


def entries(spool: Spool, state: str) -> list[str]:
    return sorted(os.listdir(spool.store.path(state)))


def start(spool: Spool, data: bytes = MESSAGE_BYTES) -> ISpoolTransaction:
    txn = spool.begin()
    txn.write(data)
    return txn


def committed(case: SynchronousTestCase, spool: Spool, data: bytes = MESSAGE_BYTES) -> str:
    txn = start(spool, data)
    return str(case.successResultOf(txn.commit(make_envelope())))


def file_bytes(spool: Spool, state: str, queue_id: str) -> bytes:
    with open(spool.store.path(state, queue_id), "rb") as f:
        return f.read()


# -- open ----------------------------------------------------------------------


class OpenTests(SynchronousTestCase):
    """The layout is made, checked and refused when it is not ours."""

    def test_creates_layout(self) -> None:
        root = os.path.abspath(self.mktemp())
        FileStore(root).open()
        self.assertEqual(
            sorted(os.listdir(root)),
            ["corrupt", "deferred", "done", "hold", "incoming", "journal", "redacted",
             "spool.json", "state", "tmp"],
        )  # fmt: skip
        with open(os.path.join(root, "spool.json")) as f:
            self.assertEqual(json.load(f), {"format": SPOOL_FORMAT})

    def test_reopen_existing(self) -> None:
        root = new_root(self)
        FileStore(root).open(create=False)

    def test_refuses_other_format(self) -> None:
        root = new_root(self)
        with open(os.path.join(root, "spool.json"), "w") as f:
            json.dump({"format": "mta-spool/9"}, f)
        e = self.assertRaises(StorageError, FileStore(root).open)
        self.assertIn("mta-spool/9", str(e))

    def test_refuses_spool_json_that_is_not_json(self) -> None:
        root = new_root(self)
        with open(os.path.join(root, "spool.json"), "w") as f:
            f.write("{nope")
        self.assertRaises(StorageError, FileStore(root).open)

    def test_no_create_on_plain_directory(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        e = self.assertRaises(StorageError, FileStore(root).open, create=False)
        self.assertIn("not an mta spool", str(e))
        self.assertEqual(os.listdir(root), [])

    def test_root_is_a_file(self) -> None:
        root = os.path.abspath(self.mktemp())
        with open(root, "w") as f:
            f.write("x")
        self.assertRaises(StorageError, FileStore(root).open)

    def test_unknown_directory(self) -> None:
        store = FileStore(new_root(self))
        self.assertRaises(ValueError, store.path, "active")
        self.assertRaises(ValueError, store.path, "../etc")


# -- committing ------------------------------------------------------------------


class CommitTests(SynchronousTestCase):
    """One file per message: the message, then its envelope as one JSON line."""

    def test_committed_message_layout(self) -> None:
        spool = new_spool(self)
        queue_id = committed(self, spool)
        self.assertEqual(entries(spool, "incoming"), [queue_id])
        self.assertEqual(entries(spool, "tmp"), [])
        data = file_bytes(spool, "incoming", queue_id)
        self.assertTrue(data.startswith(MESSAGE_BYTES))
        record = data[len(MESSAGE_BYTES) :]
        self.assertTrue(record.endswith(b"\n"))
        self.assertEqual(record.count(b"\n"), 1, "one line: tail -n 1 | jq")
        doc = json.loads(record)
        self.assertEqual(doc["format"], "mta-envelope/2")
        self.assertEqual((doc["id"], doc["size"]), (queue_id, len(MESSAGE_BYTES)))
        self.assertEqual([r["address"] for r in doc["recipients"]], ["bob@example.net"])
        state, env = spool.store.load(queue_id)
        self.assertEqual((state, env.sender, env.size), ("incoming", "alice@example.com",
                                                          len(MESSAGE_BYTES)))  # fmt: skip
        with spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)

    def test_one_syncfs_and_one_directory_fsync(self) -> None:
        """The default barrier: the file system synced once, before the rename."""
        ops = CountingOps()
        spool = new_spool(self, ops)
        queue_id = committed(self, spool)
        self.assertEqual(ops.kinds(), ["create", "syncfs", "rename", "fsync_dir"])
        tmp, incoming = spool.store.path("tmp", queue_id), spool.store.path("incoming", queue_id)
        self.assertEqual(ops.calls[0], ("create", tmp))
        self.assertEqual(ops.calls[1], ("syncfs", spool.store.path("tmp")))
        self.assertEqual(ops.calls[2], ("rename", f"{tmp} -> {incoming}"))
        self.assertEqual(ops.calls[3], ("fsync_dir", spool.store.path("incoming")))

    def test_one_file_fsync_and_one_directory_fsync(self) -> None:
        """The fsync barrier: the file's own fsync, then the rename."""
        ops = CountingOps()
        spool = new_spool(self, ops, barrier="fsync")
        queue_id = committed(self, spool)
        self.assertEqual(ops.kinds(), ["create", "fsync", "rename", "fsync_dir"])
        tmp, incoming = spool.store.path("tmp", queue_id), spool.store.path("incoming", queue_id)
        self.assertEqual(ops.calls[0], ("create", tmp))
        self.assertEqual(ops.calls[1], ("fsync", tmp))
        self.assertEqual(ops.calls[2], ("rename", f"{tmp} -> {incoming}"))
        self.assertEqual(ops.calls[3], ("fsync_dir", spool.store.path("incoming")))

    def test_an_unknown_barrier_is_refused(self) -> None:
        self.assertRaises(ValueError, FileStore, new_root(self), barrier="sometimes")

    def test_syncfs_where_the_system_has_none_is_refused_at_start(self) -> None:
        self.patch(spool_package, "SYNCFS_AVAILABLE", False)
        e = self.assertRaises(StorageError, open_store, new_root(self), settings=SpoolConfig())
        self.assertIn('barrier = "fsync"', str(e))
        store = open_store(new_root(self), settings=SpoolConfig(barrier="fsync"))
        self.assertEqual(store.barrier, "fsync")

    def test_syncfs_reports_what_the_system_says(self) -> None:
        self.patch(fs, "_SYNCFS", None)
        e = self.assertRaises(OSError, FileOps().syncfs, new_root(self))
        self.assertEqual(e.errno, errno.ENOSYS)

    def test_nothing_on_disk_before_the_commit(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        self.assertEqual(entries(spool, "tmp"), [])
        with txn.open_written() as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)
        txn.abort()
        self.assertEqual(entries(spool, "tmp"), [])

    def test_listeners_get_the_envelope_and_the_bytes(self) -> None:
        spool = new_spool(self)
        heard: list[Committed] = []
        spool.add_listener(heard.append)
        queue_id = committed(self, spool)
        [notice] = heard
        self.assertEqual((notice.queue_id, notice.data), (queue_id, MESSAGE_BYTES))
        self.assertEqual(notice.envelope.queue_id, queue_id)

    def test_message_without_a_final_line_end(self) -> None:
        spool = new_spool(self)
        queue_id = committed(self, spool, b"Subject: x\r\n\r\nno end")
        data = file_bytes(spool, "incoming", queue_id)
        self.assertTrue(data.startswith(b"Subject: x\r\n\r\nno end\n{"), "records start a line")
        with spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nno end")

    def test_empty_message(self) -> None:
        spool = new_spool(self)
        queue_id = committed(self, spool, b"")
        with spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), b"")
        self.assertEqual(spool.store.load(queue_id)[1].size, 0)

    def test_a_message_that_looks_like_a_record(self) -> None:
        tricky = b'{"format":"mta-envelope/2","id":"X","size":0,"update":{}}\n'
        spool = new_spool(self)
        queue_id = committed(self, spool, tricky * 3)
        _, env = spool.store.load(queue_id)
        self.assertEqual(env.queue_id, queue_id)
        with spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), tricky * 3)

    def test_write_after_commit(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        self.successResultOf(txn.commit(make_envelope()))
        self.assertRaises(StorageError, txn.write, b"more")

    def test_second_commit_fails_and_keeps_the_first(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        first = self.successResultOf(txn.commit(make_envelope()))
        self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertEqual(entries(spool, "incoming"), [first])

    def test_abort_after_commit_keeps_the_message(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        txn.abort()
        self.assertEqual(entries(spool, "incoming"), [queue_id])

    def test_open_written_after_the_commit_reads_the_queued_message(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        self.successResultOf(txn.commit(make_envelope()))
        with txn.open_written() as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)

    def test_listener_error_does_not_fail_the_commit(self) -> None:
        spool = new_spool(self)

        def broken(notice: Committed) -> None:
            raise RuntimeError("listener bug")

        spool.add_listener(broken)
        committed(self, spool)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_listener_not_called_on_failure(self) -> None:
        spool = new_spool(self, FailingOps("syncfs"))
        heard: list[Committed] = []
        spool.add_listener(heard.append)
        self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.flushLoggedErrors()
        self.assertEqual(heard, [])


class LargeMessageTests(SynchronousTestCase):
    """A large message is written to tmp/ as it arrives, in the spool threads,
    and the client is paused while the disk lags."""

    def setUp(self) -> None:
        self.runner = QueuedRunner()
        self.spool = new_spool(self, runner=self.runner)

    def test_written_as_it_arrives(self) -> None:
        txn = self.spool.begin()
        txn.write(b"a" * (SPILL - 1))
        self.assertEqual(self.runner.queue, [], "small so far: in memory")
        txn.write(b"b" * 10)
        self.assertEqual(len(self.runner.queue), 1, "handed to a thread")
        self.assertEqual(entries(self.spool, "tmp"), [])
        self.runner.run_all()
        self.assertEqual(entries(self.spool, "tmp"), [txn.queue_id])
        txn.write(b"c\r\n")
        with txn.open_written() as f:
            self.assertEqual(f.read(), b"a" * (SPILL - 1) + b"b" * 10 + b"c\r\n")
        d = txn.commit(make_envelope())
        self.runner.run_all()
        queue_id = self.successResultOf(d)
        with self.spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), b"a" * (SPILL - 1) + b"b" * 10 + b"c\r\n")
        self.assertEqual(entries(self.spool, "tmp"), [])

    def test_read_back_while_a_write_is_in_flight(self) -> None:
        txn = self.spool.begin()
        txn.write(b"x" * SPILL)
        txn.write(b"y" * 5)
        with txn.open_written() as f:
            self.assertEqual(f.read(), b"x" * SPILL + b"y" * 5)
        self.runner.run_all()

    def test_the_client_waits_for_the_disk(self) -> None:
        txn = self.spool.begin()
        producer = Producer()
        txn.producer = producer
        txn.write(b"x" * SPILL)  # first write in flight
        while len(self.runner.queue) == 1 and producer.events == []:
            txn.write(b"y" * 65536)
            self.assertLess(txn.size, SPILL + HIGH_WATER + 65536 * 2)
        self.assertEqual(producer.events, ["pause"])
        self.runner.run_all()
        self.assertEqual(producer.events, ["pause", "resume"])
        d = txn.commit(make_envelope())
        self.runner.run_all()
        queue_id = self.successResultOf(d)
        self.assertEqual(self.spool.store.load(queue_id)[1].size, txn.size)

    def test_commit_waits_for_the_write_in_flight(self) -> None:
        txn = self.spool.begin()
        txn.write(b"z" * (SPILL + 1))
        d = txn.commit(make_envelope())
        self.assertNoResult(d)
        self.runner.run_all()
        queue_id = self.successResultOf(d)
        with self.spool.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), b"z" * (SPILL + 1))

    def test_abort_removes_what_was_written(self) -> None:
        txn = self.spool.begin()
        txn.write(b"z" * (SPILL + 1))
        txn.abort()
        self.runner.run_all()
        self.assertEqual(entries(self.spool, "tmp"), [])

    def test_disk_full_while_writing(self) -> None:
        spool = new_spool(self, FailingOps("write", errno.ENOSPC))
        txn = spool.begin()
        txn.write(b"z" * (SPILL + 1))  # written at once (run_inline), and it fails
        e = self.assertRaises(StorageError, txn.write, b"more")
        self.assertTrue(e.disk_full)
        failure = self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertTrue(failure.value.disk_full)
        self.assertEqual(entries(spool, "tmp"), [])
        self.assertEqual(entries(spool, "incoming"), [])


class GroupCommitTests(SynchronousTestCase):
    """Concurrent commits share one hand-off to the threads and one directory fsync."""

    def setUp(self) -> None:
        self.runner = QueuedRunner()

    def incoming_syncs(self, spool: Spool, ops: CountingOps) -> int:
        return ops.calls.count(("fsync_dir", spool.store.path("incoming")))

    def test_commits_during_a_group_go_in_the_next_group(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops, self.runner)
        txns = [start(spool, b"message %d\r\n" % i) for i in range(4)]
        self.assertEqual(self.runner.queue, [], "nothing for the threads while receiving")
        first = txns[0].commit(make_envelope())
        self.assertEqual(len(self.runner.queue), 1)
        rest = [t.commit(make_envelope()) for t in txns[1:]]
        self.assertEqual(len(self.runner.queue), 1, "no second group while one is in flight")
        self.assertNoResult(first)
        self.runner.run_next()
        self.assertEqual(self.successResultOf(first), txns[0].queue_id)
        self.assertEqual(self.incoming_syncs(spool, ops), 1)
        for d in rest:
            self.assertNoResult(d)
        self.assertEqual(len(self.runner.queue), 1, "the waiting commits form one group")
        self.runner.run_next()
        self.assertEqual([self.successResultOf(d) for d in rest], [t.queue_id for t in txns[1:]])
        self.assertEqual(self.incoming_syncs(spool, ops), 2)
        self.assertEqual(ops.kinds().count("syncfs"), 2, "once per group")
        self.assertEqual(ops.kinds().count("fsync"), 0, "no file of its own")
        self.assertEqual(entries(spool, "incoming"), sorted(t.queue_id for t in txns))
        self.assertEqual(entries(spool, "tmp"), [])
        for i, t in enumerate(txns):
            with spool.store.open_message(t.queue_id) as f:
                self.assertEqual(f.read(), b"message %d\r\n" % i)

    def test_groups_are_bounded(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops, self.runner)
        blocker = start(spool).commit(make_envelope())
        waiting = [start(spool).commit(make_envelope()) for _ in range(MAX_GROUP + 1)]
        self.runner.run_next()
        self.successResultOf(blocker)
        self.runner.run_next()
        self.assertEqual(sum(1 for d in waiting if d.called), MAX_GROUP)
        self.runner.run_all()
        self.assertEqual(sum(1 for d in waiting if d.called), MAX_GROUP + 1)

    def test_one_failing_message_does_not_fail_the_group(self) -> None:
        for failing, barrier in (("write", "syncfs"), ("fsync", "fsync")):
            with self.subTest(failing=failing, barrier=barrier):
                spool = new_spool(self, FailingOps(failing, after=2), self.runner, barrier=barrier)
                blocker = start(spool).commit(make_envelope())
                a, b, c = (start(spool, b"%d\r\n" % i).commit(make_envelope()) for i in range(3))
                self.runner.run_all()
                self.successResultOf(blocker)
                self.successResultOf(a)
                self.failureResultOf(b, StorageError)
                self.successResultOf(c)
                self.flushLoggedErrors()
                self.assertEqual(len(entries(spool, "incoming")), 3)
                self.assertEqual(entries(spool, "tmp"), [])

    def test_a_failed_syncfs_fails_the_whole_group(self) -> None:
        spool = new_spool(self, FailingOps("syncfs", after=1), self.runner)
        blocker = start(spool).commit(make_envelope())
        group = [start(spool, b"%d\r\n" % i).commit(make_envelope()) for i in range(3)]
        self.runner.run_all()
        self.successResultOf(blocker)
        for d in group:
            self.failureResultOf(d, StorageError)
        self.flushLoggedErrors()
        self.assertEqual(len(entries(spool, "incoming")), 1, "none of the group renamed")
        self.assertEqual(entries(spool, "tmp"), [])

    def test_incoming_sync_failure_fails_the_whole_group(self) -> None:
        spool = new_spool(self, FailingOps("fsync_dir"), self.runner)
        commits = [start(spool).commit(make_envelope()) for _ in range(3)]
        self.runner.run_all()
        self.flushLoggedErrors()
        self.failureResultOf(commits[0], StorageError)
        self.successResultOf(commits[1])  # the next group syncs again
        self.successResultOf(commits[2])
        self.assertEqual(len(entries(spool, "incoming")), 2, "the failed entry was taken out")

    def test_runner_failure_fails_the_group(self) -> None:
        store = FileStore(new_root(self))

        def broken(work: Callable[[], Any]) -> Deferred[Any]:
            return fail(RuntimeError("the thread pool is gone"))

        spool = Spool(store, broken, QueueIdGenerator(lambda: T0))
        self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(entries(spool, "incoming"), [])

    def test_unexpected_error_after_rename_leaves_nothing_in_incoming(self) -> None:
        spool = new_spool(self, RaisingDirSyncOps())
        self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.flushLoggedErrors()
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])


class CommitFailureTests(SynchronousTestCase):
    """Any failed step leaves nothing in the queue and nothing in tmp/."""

    barrier = "syncfs"
    steps = ("create", "write", "syncfs", "rename", "fsync_dir")

    def fails(self, operation: str, code: int = errno.EIO) -> StorageError:
        spool = new_spool(self, FailingOps(operation, code), barrier=self.barrier)
        failure = self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.flushLoggedErrors()
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])
        return failure.value  # type: ignore[no-any-return]

    def test_each_step(self) -> None:
        for operation in self.steps:
            with self.subTest(operation=operation):
                self.assertFalse(self.fails(operation).disk_full)

    def test_enospc_and_edquot_are_disk_full(self) -> None:
        for code in (errno.ENOSPC, errno.EDQUOT):
            self.assertTrue(self.fails("write", code).disk_full)
        self.assertTrue(self.fails("fsync_dir", errno.ENOSPC).disk_full)


class FsyncBarrierCommitFailureTests(CommitFailureTests):
    """The same with the fsync barrier (an fsync of each file)."""

    barrier = "fsync"
    steps = ("create", "write", "fsync", "rename", "fsync_dir")


class CleanTmpTests(SynchronousTestCase):
    """What a crash left in tmp/ is removed at start-up."""

    def test_removes_what_a_crash_left(self) -> None:
        store = FileStore(new_root(self))
        for name in ("0S3MA0000000001", "0S3MA0000000002.redacted"):
            with open(store.path("tmp", name), "wb") as f:
                f.write(b"half")
        self.assertEqual(store.recover().incomplete, 2)
        self.assertEqual(os.listdir(store.path("tmp")), [])
        self.assertEqual(store.recover().incomplete, 0)


# -- filing and reading -------------------------------------------------------------


class FilingTests(SynchronousTestCase):
    """After a round: one appended record and a rename, nothing fsync'd (standard)."""

    def setUp(self) -> None:
        self.ops = CountingOps()
        self.spool = new_spool(self, self.ops)
        self.store = self.spool.store

    def deliver(self, *recipients: str) -> tuple[str, Envelope]:
        txn = start(self.spool)
        queue_id = self.successResultOf(txn.commit(make_envelope(*recipients)))
        self.assertTrue(self.store.claim(queue_id))
        _, env = self.store.load(queue_id)
        self.ops.calls.clear()
        return queue_id, env

    def test_done_is_an_append_and_a_rename(self) -> None:
        queue_id, env = self.deliver()
        env.recipients[0].state = RecipientState.SENT
        env.recipients[0].reply = "250 2.0.0 Ok"
        self.assertEqual(self.store.file([(env, QueueState.DONE, T0 + 9)]), [None])
        self.assertEqual(self.ops.kinds(), ["append", "rename"], "no fsync, no new file")
        data = file_bytes(self.spool, "done", queue_id)
        lines = data[len(MESSAGE_BYTES) :].split(b"\n")
        self.assertEqual(len(lines), 3)  # two records and the final LF
        self.assertEqual(json.loads(lines[1])["recipients"][0]["state"], "sent")
        self.assertEqual(os.stat(self.store.path("done", queue_id)).st_mtime, T0 + 9)
        self.assertEqual(self.store.finished_before(QueueState.DONE, T0 + 9), [queue_id])

    def test_strict_mode_syncs_the_filing(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops, sync="strict")
        txn = start(spool)
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        spool.store.claim(queue_id)
        _, env = spool.store.load(queue_id)
        ops.calls.clear()
        env.recipients[0].state = RecipientState.SENT
        spool.store.file([(env, QueueState.DONE, T0)])
        self.assertEqual(ops.kinds(), ["append", "fsync", "rename", "fsync_dir", "fsync_dir"])

    def test_nothing_changed_is_only_a_rename(self) -> None:
        queue_id, env = self.deliver()
        self.store.file([(env, QueueState.HOLD, None)])
        self.assertEqual(self.ops.kinds(), ["rename"])
        self.assertEqual(self.store.load(queue_id)[0], QueueState.HOLD)

    def test_many_recipients_get_updates_not_copies(self) -> None:
        recipients = [f"user{i}@example.net" for i in range(200)]
        queue_id, env = self.deliver(*recipients)
        full = os.stat(self.store.path("incoming", queue_id)).st_size - len(MESSAGE_BYTES)
        for attempt in range(1, 40):
            env.recipients[7].attempts = attempt
            env.recipients[7].state = RecipientState.DEFERRED
            state = QueueState.INCOMING if attempt == 1 else QueueState.DEFERRED
            self.assertEqual(self.store.file([(env, QueueState.DEFERRED, T0)]), [None], state)
            env = self.store.activate(queue_id)  # type: ignore[assignment]
            self.assertEqual(env.recipients[7].attempts, attempt)
        size = os.stat(self.store.path("deferred", queue_id)).st_size - len(MESSAGE_BYTES)
        self.assertLess(size, 3 * full, "the records stay within a few full ones")
        last = file_bytes(self.spool, "deferred", queue_id).rstrip(b"\n").rsplit(b"\n", 1)[1]
        self.assertIn(b'"update":{"7":', last)

    def test_a_failed_append_leaves_it_active(self) -> None:
        spool = new_spool(self, FailingOps("append", errno.ENOSPC))
        queue_id = committed(self, spool)
        spool.store.claim(queue_id)
        _, env = spool.store.load(queue_id)
        env.recipients[0].state = RecipientState.SENT
        [error] = spool.store.file([(env, QueueState.DONE, T0)])
        self.assertIsInstance(error, StorageError)
        self.assertTrue(error.disk_full)  # type: ignore[union-attr]
        self.assertEqual(spool.store.locate(queue_id), QueueState.ACTIVE)
        self.assertEqual(spool.store.file([(env, QueueState.DONE, T0)]), [None], "again")
        self.assertEqual(spool.store.load(queue_id)[1].recipients[0].state, "sent")


class ReadTests(SynchronousTestCase):
    """Reading a message file back: the last full record and the updates after it."""

    def setUp(self) -> None:
        self.spool = new_spool(self, NoSyncOps())
        self.store = self.spool.store

    def path(self, queue_id: str) -> str:
        return self.store.path("incoming", queue_id)

    def test_a_torn_last_record_is_passed_over(self) -> None:
        queue_id = committed(self, self.spool)
        with open(self.path(queue_id), "ab") as f:
            f.write(b'{"format":"mta-envelope/2","id":"' + queue_id.encode() + b'","si')
        _, env = self.store.load(queue_id)
        self.assertEqual(env.recipients[0].state, RecipientState.PENDING)

    def test_a_record_longer_than_what_is_read_first(self) -> None:
        recipients = [f"someone.with.a.long.name{i}@example.net" for i in range(600)]
        txn = start(self.spool)
        queue_id = self.successResultOf(txn.commit(make_envelope(*recipients)))
        self.assertGreater(os.stat(self.path(queue_id)).st_size, TAIL)
        _, env = self.store.load(queue_id)
        self.assertEqual(len(env.recipients), 600)

    def test_no_record(self) -> None:
        with open(self.path("0S3MA0000000001"), "wb") as f:
            f.write(MESSAGE_BYTES)
        self.assertRaises(MissingEnvelopeError, self.store.load, "0S3MA0000000001")
        self.assertRaises(MissingEnvelopeError, self.store.activate, "0S3MA0000000001")
        self.assertEqual(self.store.locate("0S3MA0000000001"), QueueState.CORRUPT)

    def test_an_update_that_does_not_fit(self) -> None:
        queue_id = committed(self, self.spool)
        with open(self.path(queue_id), "ab") as f:
            f.write(envformat.update_record(queue_id, len(MESSAGE_BYTES), {5: "{}"}))
        self.assertRaises(FormatError, self.store.load, queue_id)

    def test_ids_skip_other_names(self) -> None:
        queue_id = committed(self, self.spool)
        for name in ("notes.txt", ".0S3MA0000000001.v1", "0S3MA000000000"):
            with open(os.path.join(self.store.path("incoming"), name), "w") as f:
                f.write("x")
        self.assertEqual(list(self.store.ids(QueueState.INCOMING)), [queue_id])

    def test_load_unknown(self) -> None:
        self.assertRaises(KeyError, self.store.load, "0S3MA0000000001")
        self.assertRaises(KeyError, self.store.load, "../../etc/passwd")


class StoreChangeTests(SynchronousTestCase):
    """Operator moves and removals are durable; failures keep the message."""

    def setUp(self) -> None:
        self.spool = new_spool(self)
        self.store = self.spool.store

    def test_move_through_every_state(self) -> None:
        queue_id = committed(self, self.spool)
        here = QueueState.INCOMING
        for there in (QueueState.DEFERRED, QueueState.HOLD, QueueState.CORRUPT,
                      QueueState.DONE, QueueState.REDACTED, QueueState.INCOMING):  # fmt: skip
            self.store.move(queue_id, here, there)
            self.assertEqual(self.store.locate(queue_id), there)
            here = there

    def test_move_failure(self) -> None:
        spool = new_spool(self)
        queue_id = committed(self, spool)
        spool.store.ops = FailingOps("rename")
        self.assertRaises(StorageError, spool.store.move, queue_id, "incoming", "hold")
        self.assertEqual(spool.store.locate(queue_id), QueueState.INCOMING)

    def test_remove_failure_keeps_the_message(self) -> None:
        queue_id = committed(self, self.spool)
        self.store.ops = FailingOps("unlink")
        self.assertRaises(StorageError, self.store.remove, queue_id, QueueState.INCOMING)
        self.assertEqual(self.store.locate(queue_id), QueueState.INCOMING)

    def test_settle_is_durable(self) -> None:
        ops = CountingOps()
        self.store.ops = ops
        queue_id = committed(self, self.spool)
        ops.calls.clear()
        _, env = self.store.load(queue_id)
        env.recipients[0].next_attempt = T0 + 60
        self.store.settle(env, QueueState.INCOMING, QueueState.DEFERRED, T0 + 60)
        self.assertEqual(ops.kinds(), ["append", "fsync", "rename", "fsync_dir", "fsync_dir"])

    def test_redact(self) -> None:
        queue_id = committed(self, self.spool)
        self.store.move(queue_id, QueueState.INCOMING, QueueState.DONE)
        self.assertTrue(self.store.redact(queue_id, lambda data: data[:8], T0 + 5))
        state, env = self.store.load(queue_id)
        self.assertEqual((state, env.redacted, env.size), (QueueState.REDACTED, T0 + 5, 8))
        with self.store.open_message(queue_id) as f:
            self.assertEqual(f.read(), MESSAGE_BYTES[:8])
        self.assertEqual(entries(self.spool, "done"), [])
        self.assertEqual(entries(self.spool, "tmp"), [])

    def test_redact_failure_keeps_the_done_message(self) -> None:
        queue_id = committed(self, self.spool)
        self.store.move(queue_id, QueueState.INCOMING, QueueState.DONE)
        self.store.ops = FailingOps("fsync", errno.ENOSPC)
        self.assertRaises(StorageError, self.store.redact, queue_id, lambda d: d[:8], T0)
        self.assertEqual(self.store.locate(queue_id), QueueState.DONE)
        self.assertEqual(entries(self.spool, "tmp"), [])


class SpoolLockTests(SynchronousTestCase):
    """Only one daemon works on a spool."""

    def setUp(self) -> None:
        self.root = new_root(self)

    def test_second_acquire_fails(self) -> None:
        first = SpoolLock(self.root)
        first.acquire()
        self.addCleanup(first.release)
        e = self.assertRaises(StorageError, SpoolLock(self.root).acquire)
        self.assertIn(self.root, str(e))

    def test_release_lets_another_acquire(self) -> None:
        first = SpoolLock(self.root)
        first.acquire()
        first.release()
        second = SpoolLock(self.root)
        second.acquire()
        self.addCleanup(second.release)
        self.assertRaises(StorageError, SpoolLock(self.root).acquire)

    def test_lock_file_names_the_process(self) -> None:
        lock = SpoolLock(self.root)
        lock.acquire()
        self.addCleanup(lock.release)
        with open(os.path.join(self.root, "lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")

    def test_release_twice(self) -> None:
        lock = SpoolLock(self.root)
        lock.acquire()
        lock.release()
        lock.release()
        other = SpoolLock(self.root)
        other.acquire()
        other.release()


class InterfaceTests(SynchronousTestCase):
    """The spools provide what they claim."""

    def test_spool(self) -> None:
        spool = new_spool(self)
        self.assertTrue(verifyObject(ISpool, spool))
        txn = spool.begin()
        self.addCleanup(txn.abort)
        self.assertTrue(verifyObject(ISpoolTransaction, txn))

    def test_memory_spool(self) -> None:
        spool = MemorySpool()
        self.assertTrue(verifyObject(ISpool, spool))
        self.assertTrue(verifyObject(ISpoolTransaction, spool.begin()))


class ShortWriteOps(NoSyncOps):
    """The disk fills in the middle of the next write: half of it is written
    (write(2) returns a short count), then ENOSPC."""

    armed = False

    def write(self, fd: int, data: bytes) -> None:
        if self.armed:
            self.armed = False
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(fd, data)


class TornRecordTests(SynchronousTestCase):
    """A filing that failed half-way leaves no torn bytes for the next record
    (found while documenting mta-spool/2)."""

    def test_a_filing_tried_again_after_a_full_disk_is_read(self) -> None:
        """A filing that failed half-way (ENOSPC after a short write) is tried
        again by the queue manager a minute later.  Appended right after
        the torn bytes of the first, on the same line, the second record
        so it would not parse either: the file would go on saying the state
        of its last good record (both recipients pending), and the recipient
        that was delivered would be delivered again.  The failed append is
        cut off, so the second record is a line of its own.
        """
        ops = ShortWriteOps()
        store = FileStore(os.path.abspath(self.mktemp()), ops)
        store.open()
        qid = queue_message(store, "alice@example.com", ["bob@example.net", "carol@example.org"])
        env = store.activate(qid)
        assert env is not None
        bob, carol = env.recipients
        bob.state, bob.attempts, bob.reply = RecipientState.SENT, 1, "250 2.0.0 Ok"
        carol.state, carol.attempts, carol.next_attempt = RecipientState.DEFERRED, 1, T0 + 300
        ops.armed = True
        [error] = store.file([(env, QueueState.DEFERRED, T0 + 300)])
        self.assertIsInstance(error, StorageError)
        self.assertEqual(store.file([(env, QueueState.DEFERRED, T0 + 300)]), [None])
        state, again = FileStore(store.root).load(qid)
        self.assertEqual(state, QueueState.DEFERRED)
        self.assertEqual(
            [r.state for r in again.recipients], [RecipientState.SENT, RecipientState.DEFERRED]
        )
