"""The spool interface in memory, for tests of the layers above it.

It keeps committed messages in dictionaries, fires commits synchronously
(or not at all, when told to hold them), and can be told to fail, so a test
can see what the session does when storage breaks.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import IO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mta.envelope import Envelope
from mta.errors import StorageError
from mta.interfaces import ISpool, ISpoolTransaction
from mta.spool.queueid import QueueIdGenerator


@implementer(ISpoolTransaction)
class MemoryTransaction:
    def __init__(self, spool: MemorySpool, queue_id: str) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.size = 0
        self.data = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        if self._spool.fail_write is not None:
            raise self._spool.fail_write
        self.data += data
        self.size += len(data)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        envelope.queue_id = self.queue_id
        if self._spool.fail_commit is not None:
            self.aborted = True
            return fail(self._spool.fail_commit)
        if self._spool.hold_commits:
            d: Deferred[str] = Deferred()
            self._spool.held.append((self, envelope, d))
            return d
        self._spool.store(self, envelope)
        return succeed(self.queue_id)

    def abort(self) -> None:
        self.aborted = True

    def open_written(self) -> IO[bytes]:
        return io.BytesIO(bytes(self.data))


@implementer(ISpool)
class MemorySpool:
    """An L{ISpool} in memory with knobs for failure."""

    def __init__(self, now: Callable[[], float] = lambda: 1_700_000_000.0) -> None:
        self._new_id = QueueIdGenerator(now)
        self.messages: dict[str, tuple[str, Envelope, bytes]] = {}
        self.transactions: list[MemoryTransaction] = []
        self.fail_begin: StorageError | None = None
        self.fail_write: StorageError | None = None
        self.fail_commit: StorageError | None = None
        self.hold_commits = False
        self.held: list[tuple[MemoryTransaction, Envelope, Deferred[str]]] = []
        self._listeners: list[Callable[[str, str], None]] = []

    def begin(self) -> ISpoolTransaction:
        if self.fail_begin is not None:
            raise self.fail_begin
        txn = MemoryTransaction(self, self._new_id())
        self.transactions.append(txn)
        return txn

    def store(self, txn: MemoryTransaction, envelope: Envelope) -> None:
        self.messages[txn.queue_id] = ("incoming", envelope, bytes(txn.data))
        for listener in self._listeners:
            listener(txn.queue_id, "incoming")

    def release_held(self) -> None:
        """Complete the commits held back by C{hold_commits}."""
        held, self.held = self.held, []
        for txn, envelope, d in held:
            self.store(txn, envelope)
            d.callback(txn.queue_id)

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)

    def ids(self, state: str) -> Iterator[str]:
        return iter([qid for qid, (s, _, _) in self.messages.items() if s == state])

    def load(self, queue_id: str) -> tuple[str, Envelope]:
        state, envelope, _ = self.messages[queue_id]
        return state, envelope

    def message_path(self, queue_id: str, state: str) -> str:
        raise NotImplementedError("a memory spool has no files")
