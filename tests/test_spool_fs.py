"""The on-disk spool (L{mta.spool.fs}) on a temporary directory.

Durability cannot be observed from inside one process, so these tests check
the recipe instead: which calls happen (through L{FileOps} subclasses that
count or record), and that every failure of one of them leaves nothing of
the message in the queue and nothing behind in C{tmp/}.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mta.envelope import Envelope, Recipient, RecipientState
from mta.errors import StorageError
from mta.interfaces import ISpool, ISpoolTransaction
from mta.spool import format as envformat
from mta.spool.format import FormatError
from mta.spool.fs import (
    ENVELOPE,
    MAX_GROUP,
    MESSAGE,
    SPOOL_FORMAT,
    STATES,
    FileOps,
    FileStore,
    Spool,
    SpoolLock,
)
from mta.spool.memory import MemorySpool
from mta.spool.queueid import QueueIdGenerator, is_queue_id
from mta.testing import FailingOps, QueuedRunner, run_inline

MESSAGE_BYTES = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


# -- test doubles --------------------------------------------------------------
# These would be at home in mta/testing.py.


class CountingOps(FileOps):
    """Real file operations that record each directory fsync and rename."""

    def __init__(self) -> None:
        self.dir_syncs: list[str] = []
        self.renames: list[tuple[str, str]] = []

    def fsync_dir(self, path: str) -> None:
        self.dir_syncs.append(path)
        super().fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self.renames.append((src, dst))
        super().rename(src, dst)


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class RenameSpyOps(FileOps):
    """Records what the source and the target of each rename held just before it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes | None, bytes | None]] = []

    def rename(self, src: str, dst: str) -> None:
        self.seen.append((src, dst, _read_or_none(src), _read_or_none(dst)))
        super().rename(src, dst)


class NearlyFullFile(io.FileIO):
    """A message file on a disk with room for C{room} more octets."""

    def __init__(self, path: str, room: int) -> None:
        super().__init__(path, "xb")
        self.room = room

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


class NearlyFullOps(FileOps):
    """File operations whose message files run out of space after C{room} octets."""

    def __init__(self, room: int) -> None:
        self.room = room

    def open_new(self, path: str) -> Any:
        if os.path.basename(path) == MESSAGE:
            return NearlyFullFile(path, self.room)
        return super().open_new(path)


class RaisingDirSyncOps(FileOps):
    """Raises an unexpected (non-OSError) exception when syncing C{incoming/}."""

    def fsync_dir(self, path: str) -> None:
        if os.path.basename(path) == "incoming":
            raise RuntimeError("unexpected failure")
        super().fsync_dir(path)


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
) -> Spool:
    """A L{Spool} on a fresh directory whose store uses C{ops}.

    The layout is made with plain file operations first, so that a
    L{FailingOps} counts only the calls of the commit under test.
    """
    store = FileStore(root or new_root(case), ops)
    ids = QueueIdGenerator(lambda: 1_700_000_000.0, lambda bits: 0)
    return Spool(store, runner, ids)


def make_envelope(*recipients: str, sender: str = "alice@example.com") -> Envelope:
    return Envelope(
        queue_id="",
        sender=sender,
        recipients=[Recipient(r) for r in (recipients or ("bob@example.net",))],
        arrival=1_700_000_000.25,
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


# -- open ----------------------------------------------------------------------


class OpenTests(SynchronousTestCase):
    def test_creates_layout(self) -> None:
        root = os.path.abspath(self.mktemp())
        FileStore(root).open()
        for state in ("tmp", *STATES):
            path = os.path.join(root, state)
            self.assertTrue(os.path.isdir(path), state)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o077, 0, state)
        with open(os.path.join(root, "spool.json"), "rb") as f:
            self.assertEqual(json.load(f), {"format": SPOOL_FORMAT})
        self.assertFalse(os.path.exists(os.path.join(root, "spool.json.tmp")))

    def test_reopen_existing(self) -> None:
        root = new_root(self)
        FileStore(root).open()
        FileStore(root).open(create=False)

    def test_refuses_other_format(self) -> None:
        root = new_root(self)
        with open(os.path.join(root, "spool.json"), "w") as f:
            json.dump({"format": "mta-spool/99"}, f)
        for create in (True, False):
            e = self.assertRaises(StorageError, FileStore(root).open, create=create)
            self.assertIn("mta-spool/99", str(e))
            self.assertIn(root, str(e))

    def test_refuses_spool_json_that_is_not_json(self) -> None:
        root = new_root(self)
        with open(os.path.join(root, "spool.json"), "wb") as f:
            f.write(b"{nope")
        e = self.assertRaises(StorageError, FileStore(root).open)
        self.assertIn(root, str(e))

    def test_refuses_spool_json_that_is_not_an_object(self) -> None:
        root = new_root(self)
        with open(os.path.join(root, "spool.json"), "wb") as f:
            f.write(b'["mta-spool/1"]\n')
        self.assertRaises(StorageError, FileStore(root).open)

    def test_no_create_on_plain_directory(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        e = self.assertRaises(StorageError, FileStore(root).open, create=False)
        self.assertIn(root, str(e))
        self.assertFalse(e.disk_full)
        self.assertEqual(os.listdir(root), [])

    def test_no_create_on_missing_directory(self) -> None:
        root = os.path.abspath(self.mktemp())
        self.assertRaises(StorageError, FileStore(root).open, create=False)
        self.assertFalse(os.path.exists(root))

    def test_root_is_a_file(self) -> None:
        root = os.path.abspath(self.mktemp())
        with open(root, "w") as f:
            f.write("x")
        self.assertRaises(StorageError, FileStore(root).open)

    def test_unknown_state(self) -> None:
        store = FileStore(new_root(self))
        self.assertRaises(ValueError, store.path, "nowhere")
        self.assertRaises(ValueError, store.path, "../incoming")


# -- committing ----------------------------------------------------------------


class CommitTests(SynchronousTestCase):
    def test_committed_message_layout(self) -> None:
        spool = new_spool(self)
        heard: list[tuple[str, str]] = []
        spool.add_listener(lambda queue_id, state: heard.append((queue_id, state)))
        txn = spool.begin()
        txn.write(MESSAGE_BYTES[:10])
        txn.write(MESSAGE_BYTES[10:])
        self.assertEqual(txn.size, len(MESSAGE_BYTES))
        self.assertEqual(entries(spool, "tmp"), [txn.queue_id])
        self.assertEqual(entries(spool, "incoming"), [])

        queue_id = self.successResultOf(txn.commit(make_envelope("bob@example.net")))

        self.assertEqual(queue_id, txn.queue_id)
        self.assertTrue(is_queue_id(queue_id))
        self.assertEqual(entries(spool, "incoming"), [queue_id])
        self.assertEqual(
            sorted(os.listdir(spool.store.path("incoming", queue_id))), [ENVELOPE, MESSAGE]
        )
        with open(spool.store.path("incoming", queue_id, "message"), "rb") as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)
        state, envelope = spool.store.load(queue_id)
        self.assertEqual(state, "incoming")
        self.assertEqual(envelope.queue_id, queue_id)
        self.assertEqual(envelope.sender, "alice@example.com")
        self.assertEqual([r.address for r in envelope.recipients], ["bob@example.net"])
        self.assertEqual(envelope.client_address, "192.0.2.7")
        self.assertEqual(entries(spool, "tmp"), [])
        self.assertEqual(heard, [(queue_id, "incoming")])

    def test_envelope_file_is_json(self) -> None:
        spool = new_spool(self)
        queue_id = self.successResultOf(start(spool).commit(make_envelope()))
        with open(spool.store.path("incoming", queue_id, ENVELOPE), "rb") as f:
            doc = json.load(f)
        self.assertEqual(doc["id"], queue_id)
        self.assertEqual(doc["format"], envformat.FORMAT)

    def test_open_written_after_the_commit_reads_the_queued_message(self) -> None:
        # What an on-queued hook's message.open() does: the message may have
        # moved on (delivery) by the time the hook reads it.
        spool = new_spool(self)
        txn = start(spool)
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        with txn.open_written() as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)
        spool.store.move(queue_id, "incoming", "active")
        with txn.open_written() as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)
        spool.store.remove(queue_id, "active")
        e = self.assertRaises(StorageError, txn.open_written)
        self.assertIn("no longer in the spool", str(e))

    def test_open_written_after_an_abort_fails(self) -> None:
        txn = start(new_spool(self))
        txn.abort()
        self.assertRaises(StorageError, txn.open_written)

    def test_commit_syncs_files_and_directories(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops)
        queue_id = self.successResultOf(start(spool).commit(make_envelope()))
        store = spool.store
        self.assertEqual(ops.dir_syncs, [store.path("tmp", queue_id), store.path("incoming")])
        self.assertEqual(
            ops.renames, [(store.path("tmp", queue_id), store.path("incoming", queue_id))]
        )

    def test_empty_message(self) -> None:
        spool = new_spool(self)
        txn = spool.begin()
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        with open(spool.store.path("incoming", queue_id, "message"), "rb") as f:
            self.assertEqual(f.read(), b"")

    def test_ids_are_distinct(self) -> None:
        spool = new_spool(self)
        first = self.successResultOf(start(spool).commit(make_envelope()))
        second = self.successResultOf(start(spool).commit(make_envelope()))
        self.assertNotEqual(first, second)
        self.assertEqual(sorted(spool.store.ids("incoming")), sorted([first, second]))

    def test_write_after_commit(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        self.successResultOf(txn.commit(make_envelope()))
        self.assertRaises(StorageError, txn.write, b"more")

    def test_second_commit_fails_and_keeps_the_first(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertEqual(entries(spool, "incoming"), [queue_id])

    def test_abort_after_commit_keeps_the_message(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        queue_id = self.successResultOf(txn.commit(make_envelope()))
        txn.abort()
        self.assertEqual(entries(spool, "incoming"), [queue_id])
        self.assertEqual(spool.store.load(queue_id)[0], "incoming")

    def test_listener_error_does_not_fail_the_commit(self) -> None:
        spool = new_spool(self)
        heard: list[str] = []

        def broken(queue_id: str, state: str) -> None:
            raise ValueError("listener bug")

        spool.add_listener(broken)
        spool.add_listener(lambda queue_id, state: heard.append(queue_id))
        queue_id = self.successResultOf(start(spool).commit(make_envelope()))
        self.assertEqual(heard, [queue_id])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_listener_not_called_on_failure(self) -> None:
        spool = new_spool(self, FailingOps("rename"))
        heard: list[str] = []
        spool.add_listener(lambda queue_id, state: heard.append(queue_id))
        self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.assertEqual(heard, [])


class BeginTests(SynchronousTestCase):
    def test_id_collision_takes_the_next_id(self) -> None:
        root = new_root(self)
        ids = iter(["0000000000A0000", "0000000000A0000", "0000000000B0000"])
        spool = Spool(FileStore(root), run_inline, lambda: next(ids))
        first = spool.begin()
        second = spool.begin()
        self.assertEqual(first.queue_id, "0000000000A0000")
        self.assertEqual(second.queue_id, "0000000000B0000")
        first.abort()
        second.abort()

    def test_gives_up_after_repeated_collisions(self) -> None:
        root = new_root(self)
        spool = Spool(FileStore(root), run_inline, lambda: "0000000000A0000")
        first = spool.begin()
        self.addCleanup(first.abort)
        self.assertRaises(StorageError, spool.begin)
        self.assertEqual(entries(spool, "tmp"), ["0000000000A0000"])

    def test_mkdir_disk_full(self) -> None:
        spool = new_spool(self, FailingOps("mkdir", errno.ENOSPC))
        e = self.assertRaises(StorageError, spool.begin)
        self.assertTrue(e.disk_full)
        self.assertEqual(entries(spool, "tmp"), [])

    def test_open_failure(self) -> None:
        spool = new_spool(self, FailingOps("open_new", errno.EIO))
        e = self.assertRaises(StorageError, spool.begin)
        self.assertFalse(e.disk_full)

    def test_open_failure_leaves_nothing_in_tmp(self) -> None:
        spool = new_spool(self, FailingOps("open_new", errno.ENOSPC))
        self.assertRaises(StorageError, spool.begin)
        self.assertEqual(entries(spool, "tmp"), [])


# -- group commit --------------------------------------------------------------


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.runner = QueuedRunner()

    def incoming_syncs(self, spool: Spool, ops: CountingOps) -> int:
        return ops.dir_syncs.count(spool.store.path("incoming"))

    def test_commits_during_a_group_go_in_the_next_group(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops, self.runner)
        txns = [start(spool, b"message %d\r\n" % i) for i in range(4)]

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
        self.assertEqual(self.runner.queue, [])
        self.assertEqual(entries(spool, "incoming"), sorted(t.queue_id for t in txns))
        self.assertEqual(entries(spool, "tmp"), [])
        for i, t in enumerate(txns):
            with open(spool.store.path("incoming", t.queue_id, "message"), "rb") as f:
                self.assertEqual(f.read(), b"message %d\r\n" % i)

    def test_groups_are_bounded(self) -> None:
        ops = CountingOps()
        spool = new_spool(self, ops, self.runner)
        txns = [start(spool, b"x") for _ in range(MAX_GROUP + 2)]
        ds = [t.commit(make_envelope()) for t in txns]
        self.runner.run_next()  # the first message, alone
        self.runner.run_next()  # the next MAX_GROUP
        self.assertEqual(len([d for d in ds if d.called]), 1 + MAX_GROUP)
        self.assertNoResult(ds[-1])
        self.runner.run_next()  # the last one
        self.assertEqual(self.runner.queue, [])
        self.assertEqual(self.incoming_syncs(spool, ops), 3)
        self.assertEqual([self.successResultOf(d) for d in ds], [t.queue_id for t in txns])

    def test_listener_called_for_each_message_of_a_group(self) -> None:
        spool = new_spool(self, None, self.runner)
        heard: list[tuple[str, str]] = []
        spool.add_listener(lambda queue_id, state: heard.append((queue_id, state)))
        txns = [start(spool) for _ in range(3)]
        for t in txns:
            t.commit(make_envelope())
        self.runner.run_next()
        self.runner.run_next()
        self.assertEqual(heard, [(t.queue_id, "incoming") for t in txns])

    def test_one_failing_message_does_not_fail_the_group(self) -> None:
        # Renames: the first group's message, then the second group's three.
        spool = new_spool(self, FailingOps("rename", errno.EIO, after=2), self.runner)
        txns = [start(spool) for _ in range(4)]
        ds = [t.commit(make_envelope()) for t in txns]
        self.runner.run_next()
        self.runner.run_next()
        self.assertEqual(self.successResultOf(ds[0]), txns[0].queue_id)
        self.assertEqual(self.successResultOf(ds[1]), txns[1].queue_id)
        self.failureResultOf(ds[2], StorageError)
        self.assertEqual(self.successResultOf(ds[3]), txns[3].queue_id)
        self.assertEqual(
            entries(spool, "incoming"),
            sorted([txns[0].queue_id, txns[1].queue_id, txns[3].queue_id]),
        )
        self.assertEqual(entries(spool, "tmp"), [])

    def test_failed_group_does_not_stop_the_next(self) -> None:
        # Directory syncs: tmp/A, incoming (fails); then tmp/B, tmp/C, incoming.
        spool = new_spool(self, FailingOps("fsync_dir", errno.EIO, after=1), self.runner)
        txns = [start(spool) for _ in range(3)]
        ds = [t.commit(make_envelope()) for t in txns]
        self.runner.run_next()
        self.failureResultOf(ds[0], StorageError)
        self.runner.run_next()
        self.assertEqual(self.successResultOf(ds[1]), txns[1].queue_id)
        self.assertEqual(self.successResultOf(ds[2]), txns[2].queue_id)
        self.assertEqual(entries(spool, "incoming"), sorted([txns[1].queue_id, txns[2].queue_id]))

    def test_incoming_sync_failure_fails_the_whole_group(self) -> None:
        # Directory syncs: tmp/A, incoming; then tmp/B, tmp/C, incoming (fails).
        spool = new_spool(self, FailingOps("fsync_dir", errno.EIO, after=4), self.runner)
        txns = [start(spool) for _ in range(3)]
        ds = [t.commit(make_envelope()) for t in txns]
        self.runner.run_next()
        self.runner.run_next()
        self.assertEqual(self.successResultOf(ds[0]), txns[0].queue_id)
        self.failureResultOf(ds[1], StorageError)
        self.failureResultOf(ds[2], StorageError)
        self.assertEqual(entries(spool, "incoming"), [txns[0].queue_id])
        self.assertEqual(entries(spool, "tmp"), [])

    def test_runner_failure_fails_the_group(self) -> None:
        def broken_runner(work: Callable[[], Any]) -> Deferred[Any]:
            return fail(RuntimeError("thread pool is gone"))

        spool = new_spool(self, None, broken_runner)
        txn = start(spool)
        failure = self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertIn("thread pool is gone", str(failure.value))
        self.assertEqual(entries(spool, "tmp"), [])
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unexpected_error_after_rename_leaves_nothing_in_incoming(self) -> None:
        spool = new_spool(self, RaisingDirSyncOps())
        self.failureResultOf(start(spool).commit(make_envelope()), StorageError)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])


# -- failures during commit ----------------------------------------------------


class CommitFailureTests(SynchronousTestCase):
    """Each step of the commit recipe failing, one at a time.

    With one message the calls are, in order: fsync(message), open_new
    (envelope; the message file was open_new number 0), fsync(envelope),
    fsync_dir(tmp/ID), rename, fsync_dir(incoming).
    """

    def commit_fails(self, ops: FailingOps) -> StorageError:
        spool = new_spool(self, ops)
        txn = start(spool)
        failure = self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])
        self.assertIn(txn.queue_id, str(failure.value))
        self.assertEqual(ops.calls.get(ops.operation, 0), ops.after + 1, "the fault was reached")
        # The spool stays usable after the failure.
        queue_id = self.successResultOf(start(spool).commit(make_envelope()))
        self.assertEqual(entries(spool, "incoming"), [queue_id])
        return failure.value

    def test_fsync_of_message(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("fsync", errno.EIO, after=0)).disk_full)

    def test_open_of_envelope(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("open_new", errno.EIO, after=1)).disk_full)

    def test_fsync_of_envelope(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("fsync", errno.EIO, after=1)).disk_full)

    def test_fsync_of_tmp_directory(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("fsync_dir", errno.EIO, after=0)).disk_full)

    def test_rename(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("rename", errno.EIO, after=0)).disk_full)

    def test_fsync_of_incoming_removes_the_renamed_entry(self) -> None:
        self.assertFalse(self.commit_fails(FailingOps("fsync_dir", errno.EIO, after=1)).disk_full)

    def test_enospc_is_disk_full(self) -> None:
        self.assertTrue(self.commit_fails(FailingOps("fsync", errno.ENOSPC)).disk_full)

    def test_edquot_is_disk_full(self) -> None:
        self.assertTrue(self.commit_fails(FailingOps("open_new", errno.EDQUOT, after=1)).disk_full)

    def test_enospc_on_incoming_sync_is_disk_full(self) -> None:
        ops = FailingOps("fsync_dir", errno.ENOSPC, after=1)
        self.assertTrue(self.commit_fails(ops).disk_full)


class WriteFailureTests(SynchronousTestCase):
    def test_disk_full_during_write(self) -> None:
        spool = new_spool(self, NearlyFullOps(room=10))
        txn = spool.begin()
        txn.write(b"0123456789")
        e = self.assertRaises(StorageError, txn.write, b"more")
        self.assertTrue(e.disk_full)
        self.assertIn(txn.queue_id, str(e))
        self.assertEqual(txn.size, 10)
        # The transaction stays failed.
        again = self.assertRaises(StorageError, txn.write, b"x")
        self.assertTrue(again.disk_full)

        failure = self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertTrue(failure.value.disk_full)
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])
        txn.abort()


# -- abort and clean_tmp -------------------------------------------------------


class AbortTests(SynchronousTestCase):
    def test_abort_removes_tmp_entry(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        self.assertEqual(entries(spool, "tmp"), [txn.queue_id])
        txn.abort()
        self.assertEqual(entries(spool, "tmp"), [])
        txn.abort()
        self.assertEqual(entries(spool, "tmp"), [])
        self.assertEqual(entries(spool, "incoming"), [])

    def test_nothing_after_abort(self) -> None:
        spool = new_spool(self)
        txn = start(spool)
        txn.abort()
        self.assertRaises(StorageError, txn.write, b"more")
        self.failureResultOf(txn.commit(make_envelope()), StorageError)
        self.assertEqual(entries(spool, "incoming"), [])
        self.assertEqual(entries(spool, "tmp"), [])


class CleanTmpTests(SynchronousTestCase):
    def test_removes_what_a_crash_left(self) -> None:
        root = new_root(self)
        before = new_spool(self, root=root)
        kept = self.successResultOf(start(before).commit(make_envelope()))
        stale = [start(before, b"half a mess"), start(before)]
        for txn in stale:
            self.addCleanup(txn.abort)  # closes the files the "crash" left open
        self.assertEqual(len(entries(before, "tmp")), 2)

        after = FileStore(root)
        after.open()
        self.assertEqual(after.clean_tmp(), 2)
        self.assertEqual(os.listdir(after.path("tmp")), [])
        self.assertEqual(list(after.ids("incoming")), [kept])
        with open(after.path("incoming", kept, MESSAGE), "rb") as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)

    def test_nothing_to_clean(self) -> None:
        store = FileStore(new_root(self))
        self.assertEqual(store.clean_tmp(), 0)


# -- the queue: envelopes, states ---------------------------------------------


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = new_root(self)
        spool = new_spool(self, root=self.root)
        self.queue_id = self.successResultOf(start(spool).commit(make_envelope("bob@example.net")))

    def store(self, ops: FileOps | None = None) -> FileStore:
        return FileStore(self.root, ops)

    def envelope_bytes(self, state: str = "incoming") -> bytes:
        with open(self.store().path(state, self.queue_id, ENVELOPE), "rb") as f:
            return f.read()

    def test_write_envelope_replaces_atomically(self) -> None:
        ops = RenameSpyOps()
        store = self.store(ops)
        old = self.envelope_bytes()
        _, envelope = store.load(self.queue_id)
        envelope.recipients[0].state = RecipientState.DEFERRED
        envelope.recipients[0].attempts = 1
        envelope.recipients[0].reply = "451 4.7.1 try later"

        store.write_envelope("incoming", envelope)

        target = store.path("incoming", self.queue_id, ENVELOPE)
        ((src, dst, src_before, dst_before),) = ops.seen
        self.assertEqual(dst, target)
        self.assertNotEqual(src, dst)
        self.assertEqual(os.path.dirname(src), os.path.dirname(dst))
        self.assertEqual(dst_before, old, "the old envelope is whole until the rename")
        self.assertEqual(src_before, envformat.dumps(envelope))
        self.assertEqual(
            sorted(os.listdir(store.path("incoming", self.queue_id))), [ENVELOPE, MESSAGE]
        )
        _, loaded = store.load(self.queue_id)
        self.assertEqual(loaded.recipients[0].state, RecipientState.DEFERRED)
        self.assertEqual(loaded.recipients[0].reply, "451 4.7.1 try later")

    def test_write_envelope_failure_keeps_the_old_one(self) -> None:
        old = self.envelope_bytes()
        store = self.store(FailingOps("rename", errno.EIO))
        _, envelope = store.load(self.queue_id)
        envelope.sender = "mallory@example.com"
        e = self.assertRaises(StorageError, store.write_envelope, "incoming", envelope)
        self.assertFalse(e.disk_full)
        self.assertEqual(self.envelope_bytes(), old)
        self.assertEqual(store.load(self.queue_id)[1].sender, "alice@example.com")

    def test_write_envelope_failure_leaves_no_temporary_file(self) -> None:
        store = self.store(FailingOps("rename", errno.EIO))
        _, envelope = store.load(self.queue_id)
        self.assertRaises(StorageError, store.write_envelope, "incoming", envelope)
        self.assertEqual(
            sorted(os.listdir(store.path("incoming", self.queue_id))), [ENVELOPE, MESSAGE]
        )

    def test_write_envelope_disk_full(self) -> None:
        store = self.store(FailingOps("fsync", errno.ENOSPC))
        _, envelope = store.load(self.queue_id)
        e = self.assertRaises(StorageError, store.write_envelope, "incoming", envelope)
        self.assertTrue(e.disk_full)

    def test_move(self) -> None:
        ops = CountingOps()
        store = self.store(ops)
        envelope_before = self.envelope_bytes()
        store.move(self.queue_id, "incoming", "deferred")
        self.assertEqual(store.locate(self.queue_id), "deferred")
        self.assertEqual(list(store.ids("incoming")), [])
        self.assertEqual(list(store.ids("deferred")), [self.queue_id])
        self.assertEqual(store.load(self.queue_id)[0], "deferred")
        self.assertEqual(self.envelope_bytes("deferred"), envelope_before)
        with open(store.path("deferred", self.queue_id, MESSAGE), "rb") as f:
            self.assertEqual(f.read(), MESSAGE_BYTES)
        self.assertEqual(
            sorted(ops.dir_syncs), sorted([store.path("deferred"), store.path("incoming")])
        )

    def test_move_through_every_state(self) -> None:
        store = self.store()
        here = "incoming"
        for there in [*STATES[1:], "incoming"]:
            store.move(self.queue_id, here, there)
            self.assertEqual(store.locate(self.queue_id), there)
            here = there

    def test_move_failure(self) -> None:
        store = self.store(FailingOps("rename", errno.ENOSPC))
        e = self.assertRaises(StorageError, store.move, self.queue_id, "incoming", "hold")
        self.assertTrue(e.disk_full)
        self.assertIn(self.queue_id, str(e))
        self.assertEqual(store.locate(self.queue_id), "incoming")

    def test_move_missing_message(self) -> None:
        store = self.store()
        self.assertRaises(StorageError, store.move, self.queue_id, "deferred", "active")
        self.assertEqual(store.locate(self.queue_id), "incoming")

    def test_remove(self) -> None:
        store = self.store()
        store.remove(self.queue_id, "incoming")
        self.assertRaises(KeyError, store.locate, self.queue_id)
        self.assertRaises(KeyError, store.load, self.queue_id)
        self.assertEqual(os.listdir(store.path("incoming")), [])
        self.assertEqual(os.listdir(store.path("tmp")), [])

    def test_remove_failure_keeps_the_message(self) -> None:
        store = self.store(FailingOps("rename", errno.EIO))
        self.assertRaises(StorageError, store.remove, self.queue_id, "incoming")
        self.assertEqual(store.locate(self.queue_id), "incoming")
        self.assertEqual(os.listdir(store.path("tmp")), [])

    def test_find(self) -> None:
        store = self.store()
        self.assertEqual(store.locate(self.queue_id), "incoming")
        self.assertRaises(KeyError, store.locate, "0000000000Z0000")
        for bad in ("", "..", "../spool.json", "incoming", self.queue_id.lower()):
            self.assertRaises(KeyError, store.locate, bad)

    def test_ids_skip_other_names(self) -> None:
        store = self.store()
        for name in ("README", ".hidden", self.queue_id + ".tmp"):
            with open(store.path("incoming", name), "w") as f:
                f.write("x")
        os.mkdir(store.path("incoming", "not-an-id"))
        self.assertEqual(list(store.ids("incoming")), [self.queue_id])
        self.assertEqual(list(store.ids("hold")), [])

    def test_load_corrupt_envelope(self) -> None:
        store = self.store()
        for garbage in (b"{not json", b"\xff\xfe", b'{"format": "mta-envelope/99"}', b"[]"):
            with open(store.path("incoming", self.queue_id, ENVELOPE), "wb") as f:
                f.write(garbage)
            self.assertRaises(FormatError, store.load, self.queue_id)

    def test_load_unknown(self) -> None:
        store = self.store()
        self.assertRaises(KeyError, store.load, "0000000000Z0000")
        self.assertRaises(KeyError, store.load, self.queue_id, "deferred")
        self.assertEqual(store.load(self.queue_id, "incoming")[0], "incoming")


# -- the lock ------------------------------------------------------------------


class SpoolLockTests(SynchronousTestCase):
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


# -- interfaces ----------------------------------------------------------------


class InterfaceTests(SynchronousTestCase):
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
