"""The queue manager's bookkeeping: what it keeps of a message in delivery
and of its jobs, and where each message it knows of is.

A message the manager knows of is in one of four places, by queue ID:

  - C{ready}: waiting to be taken up (L{ReadyQueue}: new messages, and
    deferred ones by the time they are due);
  - C{loading}: its envelope is being read (L{IQueueStore.activate});
  - C{active}: in delivery, its envelope in memory;
  - C{busy}: an operator action is changing its files
    (L{mta.queue.operator}).

Two marks go with them: C{requests}, an operator action waiting for the
message's round to end, and C{flushed}, every pending recipient due at the
message's next plan.  The active set and the loading ones together are
held to C{[queue] active_limit}; a new message's bytes, when the spool
handed them over, are kept for its first delivery, up to L{CACHE_BYTES}
of them at a time.

No Twisted and no I/O: the manager and the operator move the messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mta import dsn
from mta.delivery.job import DeliveryJob
from mta.envelope import Envelope, QueueScan, QueueState
from mta.queue.dispatch import Running
from mta.queue.scheduler import ReadyQueue
from mta.spool.queueid import arrival_of

CACHE_BYTES = 32 * 1024 * 1024  # new messages' bytes kept for their first delivery


@dataclass
class ActiveMessage:
    """A message in delivery: its envelope, and what its round has yet to do."""

    envelope: Envelope
    activated: float
    jobs: int = 0  # waiting or running
    notices: list[dsn.Notice] = field(default_factory=list)  # owed to the sender
    journal: list[object] = field(default_factory=list)  # tokens of IQueueStore.journal
    data: bytes | None = None  # the message's bytes, while the spool's copy is at hand


@dataclass
class QueuedJob:
    """A delivery job of an active message, from its plan to its results."""

    message: ActiveMessage
    job: DeliveryJob
    running: Running | None = None  # its place in the dispatcher's counts, once started
    journaled: set[str] = field(default_factory=set)  # addresses in the progress journal


class Bookkeeping:
    """The places of the messages (see the module docstring)."""

    def __init__(self, active_limit: int) -> None:
        self.active_limit = active_limit
        self.ready = ReadyQueue()
        self.active: dict[str, ActiveMessage] = {}
        self.loading: set[str] = set()
        self.busy: set[str] = set()  # an operator action is changing its files
        self.requests: dict[str, str] = {}  # actions waiting for a round to end
        self.flushed: set[str] = set()  # every pending recipient due at the next plan
        self.cached = 0  # bytes of ActiveMessage.data

    def has_room(self) -> bool:
        """Whether one more message may be taken up (active or loading)."""
        return len(self.active) + len(self.loading) < self.active_limit

    def known(self, queue_id: str) -> bool:
        """Whether the message is in any of the four places."""
        return (
            queue_id in self.active
            or queue_id in self.loading
            or queue_id in self.busy
            or queue_id in self.ready
        )

    def next_ready(self, now: float) -> str | None:
        """The next message to take up at C{now} while there is room, or None.

        One the ready queue gives that is already active or loading (taken
        up another way meanwhile) is passed over.
        """
        while self.has_room():
            queue_id = self.ready.next(now)
            if queue_id is None:
                return None
            if queue_id not in self.active and queue_id not in self.loading:
                return queue_id
        return None

    def take(self, queue_id: str, message: ActiveMessage, data: bytes | None) -> None:
        """Make a message active, with its bytes (C{data}) if they fit in the cache."""
        if data is not None and self.cached + len(data) <= CACHE_BYTES:
            message.data = data
            self.cached += len(data)
        self.active[queue_id] = message

    def add_scan(self, found: QueueScan) -> int:
        """Take in what the start-up scan found; returns how many are ready.

        Messages committed (or acted on) while the scan ran are already
        known: they stay where they are.  The ready ones go before any
        committed meanwhile, in the scan's order.
        """
        known = set(self.ready) | set(self.active) | self.loading | self.busy
        fresh = [queue_id for queue_id in found.ready if queue_id not in known]
        self.ready.add_first(fresh)
        for when, queue_id in found.deferred:
            if queue_id not in known:
                self.ready.schedule(queue_id, when)
        return len(fresh)

    def pop_flushed(self, queue_id: str) -> bool:
        """Whether the message was flushed; the mark is spent (at its plan)."""
        flushed = queue_id in self.flushed
        self.flushed.discard(queue_id)
        return flushed

    def filed(self, message: ActiveMessage, state: QueueState | None, due: float) -> None:
        """The message's round ended and it was filed in C{state} (None: removed).

        Its bytes leave the cache.  A deferred message waits in the ready
        queue until C{due}; any other leaves the manager's hands, and its
        flush mark with it.
        """
        queue_id = message.envelope.queue_id
        if message.data is not None:
            self.cached -= len(message.data)
            message.data = None
        self.active.pop(queue_id, None)
        if state == QueueState.DEFERRED:
            self.ready.schedule(queue_id, due)
        else:
            self.flushed.discard(queue_id)

    def counts(self) -> dict[str, int]:
        """Messages by state as the manager sees them (for metrics)."""
        return {
            "incoming": self.ready.new_count,
            "active": len(self.active) + len(self.loading),
            "deferred": self.ready.deferred_count,
        }

    def oldest_arrival(self) -> float | None:
        """Arrival time of the oldest message waiting or in delivery."""
        oldest = min([*self.ready, *self.active, *self.loading], default=None)
        return None if oldest is None else arrival_of(oldest)

    @property
    def idle(self) -> bool:
        """Nothing active, loading or ready (deferred messages may wait)."""
        return not self.active and not self.loading and not self.ready.has_new
