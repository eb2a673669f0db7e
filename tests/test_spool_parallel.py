"""Group commits whose messages are synced by several threads at once."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import IO

from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import Envelope, Recipient, RecipientState
from mta.spool import format as envformat
from mta.spool.fs import ENVELOPE, MESSAGE, FileOps, FileStore
from mta.spool.queueid import QueueIdGenerator


class RecordingOps(FileOps):
    """Records every fsync; fails the file fsyncs of one queue ID."""

    def __init__(self, fail_id: str = "") -> None:
        self.fail_id = fail_id
        self.events: list[str] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def _note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())

    def fsync(self, f: IO[bytes]) -> None:
        if self.fail_id and self.fail_id in f.name:  # type: ignore[attr-defined]
            raise OSError(5, "injected")
        super().fsync(f)
        self._note(f"file {f.name}")  # type: ignore[attr-defined]

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self._note(f"dir {path}")


def envelope(queue_id: str) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        sender="a@example.com",
        recipients=[Recipient("b@example.net")],
        arrival=0.0,
        size=5,
    )


class ParallelGroupTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        self.root = os.path.join(root, "spool")

    def store(self, ops: FileOps) -> FileStore:
        store = FileStore(self.root, ops, workers=4)
        store.open()
        return store

    def ids(self, n: int) -> list[str]:
        new_id = QueueIdGenerator(lambda: 1.8e9)
        return sorted(new_id() for _ in range(n))

    def commit(self, store: FileStore, ids: list[str]) -> list[object]:
        items = []
        for queue_id in ids:
            f = store.create_tmp(queue_id)
            f.write(b"body\r\n")
            items.append((queue_id, f, envformat.dumps(envelope(queue_id))))
        return list(store.commit_group(items))

    def test_every_message_is_synced_before_the_shared_directory(self) -> None:
        ops = RecordingOps()
        store = self.store(ops)
        ids = self.ids(12)
        self.assertEqual(self.commit(store, ids), [None] * 12)
        incoming = f"dir {store.path('incoming')}"
        self.assertEqual(ops.events[-1], incoming, "the incoming/ sync comes last")
        self.assertEqual(ops.events.count(incoming), 1, "one sync for the group")
        for queue_id in ids:
            self.assertIn(f"file {store.path('tmp', queue_id, MESSAGE)}", ops.events)
            self.assertIn(f"file {store.path('tmp', queue_id, ENVELOPE)}", ops.events)
            self.assertIn(f"dir {store.path('tmp', queue_id)}", ops.events)
            self.assertEqual(store.load(queue_id)[0], "incoming")

    def test_a_failing_message_fails_alone(self) -> None:
        ids = self.ids(8)
        store = self.store(RecordingOps(fail_id=ids[3]))
        results = self.commit(store, ids)
        self.assertIsNotNone(results[3])
        self.assertEqual([r for i, r in enumerate(results) if i != 3], [None] * 7)
        self.assertEqual(sorted(store.ids("incoming")), ids[:3] + ids[4:])
        self.assertEqual(os.listdir(store.path("tmp")), [])

    def test_settle_group_moves_every_message(self) -> None:
        ops = RecordingOps()
        store = self.store(ops)
        ids = self.ids(10)
        self.commit(store, ids)
        done = []
        for queue_id in ids:
            env = store.load(queue_id)[1]
            env.recipients[0].state = RecipientState.SENT
            done.append((env, "incoming", "done", None))
        ops.events.clear()
        self.assertEqual(store.settle_group(done), [None] * 10)
        self.assertEqual(sorted(store.ids("done")), ids)
        self.assertEqual(
            sorted(ops.events[-2:]), [f"dir {store.path('done')}", f"dir {store.path('incoming')}"]
        )
        for queue_id in ids:
            self.assertEqual(store.load(queue_id)[1].recipients[0].state, RecipientState.SENT)
