"""Group commits whose messages are synced by several threads at once."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import Envelope, QueueState, Recipient, RecipientState
from mta.spool.fs import FileOps, FileStore, _Commit
from mta.spool.queueid import QueueIdGenerator


class RecordingOps(FileOps):
    """Records every fsync and the threads that made them; fails the file fsync
    of one queue ID."""

    def __init__(self, fail_id: str = "") -> None:
        self.fail_id = fail_id
        self.events: list[str] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}

    def _note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())

    def create(self, path: str) -> int:
        fd = super().create(path)
        with self._lock:
            self._paths[fd] = path
        return fd

    def fsync(self, fd: int) -> None:
        path = self._paths.get(fd, "?")
        if self.fail_id and self.fail_id in path:
            raise OSError(5, "injected")
        super().fsync(fd)
        self._note(f"file {path}")

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self._note(f"dir {path}")


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "a@example.com", [Recipient("b@example.net")], 0.0, size=6)


class ParallelGroupTests(SynchronousTestCase):
    """With the fsync barrier, files are fsync'd concurrently; the one
    directory fsync comes after all of them."""

    def setUp(self) -> None:
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        self.root = os.path.join(root, "spool")

    def store(self, ops: FileOps) -> FileStore:
        store = FileStore(self.root, ops, workers=4, barrier="fsync")
        store.open()
        self.addCleanup(store.close)
        return store

    def ids(self, n: int) -> list[str]:
        new_id = QueueIdGenerator(lambda: 1.8e9)
        return sorted(new_id() for _ in range(n))

    def commit(self, store: FileStore, ids: list[str]) -> list[object]:
        return list(store.commit_group([_Commit.of(envelope(q), b"body\r\n") for q in ids]))

    def test_every_message_is_synced_before_the_shared_directory(self) -> None:
        ops = RecordingOps()
        store = self.store(ops)
        ops.events.clear()  # opening wrote spool.json
        ids = self.ids(12)
        self.assertEqual(self.commit(store, ids), [None] * 12)
        incoming = f"dir {store.path('incoming')}"
        self.assertEqual(ops.events[-1], incoming, "the incoming/ sync comes last")
        self.assertEqual(ops.events.count(incoming), 1, "one sync for the group")
        self.assertEqual(len(ops.events), 13, "one fsync per file and no other")
        for queue_id in ids:
            self.assertIn(f"file {store.path('tmp', queue_id)}", ops.events)
            self.assertEqual(store.load(queue_id)[0], "incoming")
        self.assertGreater(len(ops.threads), 1, "synced by several threads")

    def test_a_failing_message_fails_alone(self) -> None:
        ids = self.ids(8)
        store = self.store(RecordingOps(fail_id=ids[3]))
        results = self.commit(store, ids)
        self.assertIsNotNone(results[3])
        self.assertEqual([r for i, r in enumerate(results) if i != 3], [None] * 7)
        self.assertEqual(sorted(store.ids(QueueState.INCOMING)), ids[:3] + ids[4:])
        self.assertEqual(os.listdir(store.path("tmp")), [])

    def test_filing_a_group_moves_every_message(self) -> None:
        ops = RecordingOps()
        store = self.store(ops)
        ids = self.ids(10)
        self.commit(store, ids)
        done = []
        for queue_id in ids:
            self.assertTrue(store.claim(queue_id))
            env = store.load(queue_id)[1]
            env.recipients[0].state = RecipientState.SENT
            done.append((env, QueueState.DONE, 1.8e9))
        ops.events.clear()
        self.assertEqual(store.file(done), [None] * 10)
        self.assertEqual(ops.events, [], "filing waits for no disk")
        self.assertEqual(sorted(store.ids(QueueState.DONE)), ids)
        for queue_id in ids:
            self.assertEqual(store.load(queue_id)[1].recipients[0].state, RecipientState.SENT)
