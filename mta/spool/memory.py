"""The spool in memory, for tests of the layers above it.

L{MemoryStore} keeps the contract of L{mta.interfaces.IQueueStore} in
dictionaries; the conformance suite (C{tests/test_queue_store.py}) runs
against it and against the file system store alike.  Envelopes are copied
in and out, as the file system store serialises them, so a caller that
changes an envelope it loaded changes nothing stored until it records it.

L{MemorySpool} is the way in (L{mta.interfaces.ISpool}) for the submission
tests: it fires commits synchronously (or not at all, when told to hold
them) into a L{MemoryStore}, and can be told to fail, so a test can see
what the session does when storage breaks.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mta.envelope import Committed, Envelope, ProgressRecord, QueueScan, QueueState
from mta.errors import StorageError
from mta.interfaces import IQueueStore, ISpool, ISpoolTransaction
from mta.spool import journal
from mta.spool.format import FormatError, MissingEnvelopeError
from mta.spool.queueid import QueueIdGenerator


@dataclass
class _Stored:
    state: QueueState
    envelope: Envelope | None  # None: the envelope is missing (a broken spool)
    data: bytes
    time: float | None = None  # due (deferred) or finished (done, redacted)
    where: QueueState | None = None  # while active: the state it was taken from


@implementer(IQueueStore)
class MemoryStore:
    """An L{IQueueStore} in memory, with knobs for failure.

    C{fail} (an exception) is raised by the next change; C{fail_times}
    says how many changes fail in a row.  C{unreadable} holds IDs whose
    envelope does not parse (C{FormatError} on load).
    """

    def __init__(self) -> None:
        self.messages: dict[str, _Stored] = {}
        self.sent: list[ProgressRecord] = []  # the journal, as written
        self.tokens: dict[int, list[ProgressRecord]] = {}
        self.unreadable: set[str] = set()
        self.fail: Exception | None = None
        self.fail_times = 1
        self.loads = 0  # how many envelopes were read (to prove what is not)
        self.fresh: set[str] = set()  # committed by this process, not claimed yet
        self._token = 0

    def _change(self) -> None:
        if self.fail is not None:
            error = self.fail
            self.fail_times -= 1
            if self.fail_times <= 0:
                self.fail = None
            raise error

    def _get(self, queue_id: str, state: QueueState | None = None) -> _Stored:
        stored = self.messages.get(queue_id)
        if stored is None or (state is not None and stored.state != state):
            raise KeyError(queue_id)
        return stored

    # -- start-up ------------------------------------------------------------

    def recover(self, *, incomplete: bool = True) -> journal.Recovery:
        """As after a restart: messages in delivery are back where they were,
        with the journal's results applied."""
        result = journal.Recovery()
        for stored in self.messages.values():
            if stored.state == QueueState.ACTIVE:
                stored.state, stored.where = stored.where or QueueState.INCOMING, None
        by_id: dict[str, list[ProgressRecord]] = {}
        for record in self.sent:
            by_id.setdefault(record.queue_id, []).append(record)
        for queue_id, records in by_id.items():
            found = self.messages.get(queue_id)
            if found is None or found.envelope is None:
                continue
            if not (found.state.waiting or found.state == QueueState.HOLD):
                continue
            changed = journal.apply(found.envelope, records)
            if changed:
                result.recipients += changed
                result.messages += 1
        self.sent = []
        self.tokens = {}
        self.fresh = set()
        return result

    def scan(self) -> QueueScan:
        def of(state: QueueState) -> list[str]:
            return sorted(q for q, m in self.messages.items() if m.state == state)

        deferred = [
            (m.time or 0.0, q) for q, m in self.messages.items() if m.state == QueueState.DEFERRED
        ]
        return QueueScan(of(QueueState.INCOMING), deferred)

    def writable(self) -> bool:
        return True

    # -- reading -------------------------------------------------------------

    def ids(self, state: QueueState) -> Iterator[str]:
        return iter([q for q, m in self.messages.items() if m.state == state])

    def count(self, state: QueueState) -> int:
        return sum(1 for m in self.messages.values() if m.state == state)

    def locate(self, queue_id: str) -> QueueState:
        return self._get(queue_id).state

    def load(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        stored = self._get(queue_id, QueueState(state) if state is not None else None)
        self.loads += 1
        if stored.envelope is None:
            raise KeyError(queue_id)
        if queue_id in self.unreadable:
            raise FormatError(f"not valid JSON: {queue_id} was made unreadable by the test")
        return stored.state, copy.deepcopy(stored.envelope)

    def journaled(self, queue_id: str) -> list[ProgressRecord]:
        return [r for r in self.sent if r.queue_id == queue_id]

    def view(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        found, envelope = self.load(queue_id, state)
        if found.waiting:
            journal.apply(envelope, self.journaled(queue_id))
        return found, envelope

    def listing(self, states: Sequence[QueueState]) -> Iterator[tuple[str, QueueState, object]]:
        for state in QueueState:
            if state not in states:
                continue
            for queue_id in sorted(self.ids(state)):
                try:
                    _, envelope = self.view(queue_id, state)
                except KeyError:
                    continue
                except FormatError as e:
                    yield queue_id, state, e
                    continue
                yield queue_id, state, envelope

    def close(self) -> None:
        pass

    def location(self, queue_id: str, state: QueueState) -> str:
        return f"memory:{state}/{queue_id}"

    def open_message(self, queue_id: str, state: QueueState | None = None) -> IO[bytes]:
        try:
            stored = self._get(queue_id, state)
        except KeyError:
            raise StorageError(f"{queue_id} is no longer in the spool") from None
        return io.BytesIO(stored.data)

    def finished_before(self, state: QueueState, when: float) -> list[str]:
        return [
            q
            for q, m in self.messages.items()
            if m.state == state and m.time is not None and m.time <= when
        ]

    # -- changing ------------------------------------------------------------

    def add(self, envelope: Envelope, data: bytes) -> None:
        self._change()
        if envelope.queue_id in self.messages:
            raise StorageError(f"{envelope.queue_id} is already in the spool")
        self.messages[envelope.queue_id] = _Stored(
            QueueState.INCOMING, copy.deepcopy(envelope), bytes(data)
        )
        self.fresh.add(envelope.queue_id)

    def claim(self, queue_id: str) -> bool:
        stored = self.messages.get(queue_id)
        if queue_id not in self.fresh or stored is None or stored.state != QueueState.INCOMING:
            return False
        self.fresh.discard(queue_id)
        stored.state, stored.where = QueueState.ACTIVE, QueueState.INCOMING
        return True

    def activate(self, queue_id: str) -> Envelope | None:
        stored = self.messages.get(queue_id)
        if stored is None:
            return None
        if stored.envelope is None or queue_id in self.unreadable:
            if not stored.state.waiting:
                return None
            stored.state = QueueState.CORRUPT
            if stored.envelope is None:
                raise MissingEnvelopeError(f"{queue_id} has no envelope")
            raise FormatError(f"not valid JSON: {queue_id} was made unreadable by the test")
        if not stored.state.waiting or stored.state == QueueState.ACTIVE:
            return None
        self._change()
        self.fresh.discard(queue_id)
        stored.state, stored.where = QueueState.ACTIVE, stored.state
        self.loads += 1
        return copy.deepcopy(stored.envelope)

    def file(
        self, items: Sequence[tuple[Envelope, QueueState, float | None]]
    ) -> list[StorageError | None]:
        results: list[StorageError | None] = []
        for envelope, dst, when in items:
            try:
                self.settle(envelope, QueueState.ACTIVE, dst, when)
                results.append(None)
            except StorageError as e:
                results.append(e)
            except KeyError:
                results.append(StorageError(f"{envelope.queue_id} is not active"))
        return results

    def settle(
        self, envelope: Envelope, src: QueueState, dst: QueueState, due: float | None = None
    ) -> None:
        stored = self._get(envelope.queue_id, src)
        self._change()
        stored.envelope = copy.deepcopy(envelope)
        stored.state, stored.where = QueueState(dst), None
        if due is not None:
            stored.time = due

    def move(self, queue_id: str, src: QueueState, dst: QueueState) -> None:
        stored = self._get(queue_id, src)
        self._change()
        stored.state, stored.where = QueueState(dst), None

    def remove(self, queue_id: str, state: QueueState) -> None:
        self._get(queue_id, state)
        self._change()
        del self.messages[queue_id]

    def redact(self, queue_id: str, transform: Callable[[bytes], bytes], when: float) -> bool:
        try:
            stored = self._get(queue_id, QueueState.DONE)
        except KeyError:
            return False
        if stored.envelope is None or queue_id in self.unreadable:
            raise FormatError(f"{queue_id}: unreadable envelope")
        self._change()
        stored.data = transform(stored.data)
        stored.envelope.redacted = when
        stored.state = QueueState.REDACTED
        stored.time = when
        return True

    # -- the progress journal ------------------------------------------------

    def journal(self, records: list[ProgressRecord]) -> object | None:
        if not records:
            return None
        self.sent.extend(records)
        self._token += 1
        self.tokens[self._token] = list(records)
        return self._token

    def release(self, token: object | None) -> None:
        if isinstance(token, int):
            for record in self.tokens.pop(token, []):
                if record in self.sent:
                    self.sent.remove(record)

    # -- for tests -------------------------------------------------------------

    def due_hint(self, queue_id: str) -> float | None:
        """The time kept beside a message (due, or finished)."""
        return self._get(queue_id).time

    def drop_envelope(self, queue_id: str) -> None:
        """Lose a message's envelope, as a broken disk would."""
        self._get(queue_id).envelope = None


@implementer(ISpoolTransaction)
class MemoryTransaction:
    def __init__(self, spool: MemorySpool, queue_id: str) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.size = 0
        self.producer: object = None
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
    """An L{ISpool} into a L{MemoryStore} (C{queue}), with knobs for failure."""

    def __init__(
        self,
        now: Callable[[], float] = lambda: 1_700_000_000.0,
        queue: MemoryStore | None = None,
    ) -> None:
        self._new_id = QueueIdGenerator(now)
        self.queue = queue if queue is not None else MemoryStore()
        self.transactions: list[MemoryTransaction] = []
        self.fail_begin: StorageError | None = None
        self.fail_write: StorageError | None = None
        self.fail_commit: StorageError | None = None
        self.hold_commits = False
        self.held: list[tuple[MemoryTransaction, Envelope, Deferred[str]]] = []
        self._listeners: list[Callable[[Committed], None]] = []

    @property
    def messages(self) -> dict[str, tuple[str, Envelope | None, bytes]]:
        """Every committed message: queue ID to (state, envelope, bytes)."""
        return {q: (m.state, m.envelope, m.data) for q, m in self.queue.messages.items()}

    def begin(self) -> ISpoolTransaction:
        if self.fail_begin is not None:
            raise self.fail_begin
        txn = MemoryTransaction(self, self._new_id())
        self.transactions.append(txn)
        return txn

    def store(self, txn: MemoryTransaction, envelope: Envelope) -> None:
        envelope.size = len(txn.data)
        self.queue.add(envelope, bytes(txn.data))
        notice = Committed(txn.queue_id, envelope, bytes(txn.data))
        for listener in self._listeners:
            listener(notice)

    def release_held(self) -> None:
        """Complete the commits held back by C{hold_commits}."""
        held, self.held = self.held, []
        for txn, envelope, d in held:
            self.store(txn, envelope)
            d.callback(txn.queue_id)

    def add_listener(self, listener: Callable[[Committed], None]) -> None:
        self._listeners.append(listener)
