"""Which waiting delivery job starts next: concurrency limits, destinations in turn.

Jobs wait per destination.  A round goes over the destinations in turn
(the one served last goes to the back) and starts a job where the limits
allow: C{destination_concurrency} connections per destination,
C{connections} in all, and for a destination that has not answered a
transaction lately (L{mta.queue.scheduler.Destinations.proven}) only
L{UNPROVEN_CONCURRENCY}, such destinations together at most half of all,
so that next hops that accept and never speak cannot take every
connection.  A resting destination's jobs are handed out at once, to be
deferred without a connection.

No Twisted and no I/O: the manager passes in what starts a job.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mta.queue.scheduler import UNPROVEN_CONCURRENCY, Destinations, Suspension

J = TypeVar("J")


@dataclass
class QueueLimits:
    active: int = 1000  # messages in memory
    destination_concurrency: int = 20
    connections: int = 100


@dataclass
class Running:
    """A started job's place in the counts, to give back with L{Dispatcher.finished}."""

    destination: str
    unproven: bool


class Dispatcher(Generic[J]):
    """Waiting jobs and the counts of running ones (see the module docstring)."""

    def __init__(self, limits: QueueLimits, destinations: Destinations) -> None:
        self.limits = limits
        self.destinations = destinations
        self._waiting: OrderedDict[str, deque[J]] = OrderedDict()
        self._running: Counter[str] = Counter()
        self.running_total = 0
        self._unproven = 0
        self._busy = self._again = False

    def add(self, destination: str, job: J) -> None:
        self._waiting.setdefault(destination, deque()).append(job)

    def withdraw(self, matches: Callable[[J], bool]) -> int:
        """Take the waiting jobs that match out; returns how many."""
        removed = 0
        for dest in list(self._waiting):
            waiting = self._waiting[dest]
            keep = deque(job for job in waiting if not matches(job))
            removed += len(waiting) - len(keep)
            if keep:
                self._waiting[dest] = keep
            else:
                del self._waiting[dest]
        return removed

    def running(self, destination: str) -> int:
        return self._running[destination]

    def dispatch(
        self,
        now: Callable[[], float],
        start: Callable[[J, Running], None],
        skip: Callable[[J, Suspension], None],
    ) -> None:
        """Start what the limits allow, destinations in turn.

        Not re-entrant: a job that completes at once (a cached DNS failure,
        a resting destination) calls back here; that call only asks the
        running loop to go round again, so the stack stays flat however
        many jobs wait.
        """
        if self._busy:
            self._again = True
            return
        self._busy = self._again = True
        try:
            while self._again:
                self._again = False
                self._round(now(), start, skip)
        finally:
            self._busy = False

    def _round(
        self,
        now: float,
        start: Callable[[J, Running], None],
        skip: Callable[[J, Suspension], None],
    ) -> None:
        limits = self.limits
        for dest in list(self._waiting):
            if self.running_total >= limits.connections:
                return
            waiting = self._waiting.get(dest)
            if not waiting or self._running[dest] >= limits.destination_concurrency:
                continue
            suspension = self.destinations.suspension(dest, now)
            proven = self.destinations.proven(dest, now)
            if suspension is None and not proven and not self._unproven_room(dest):
                continue  # not heard from yet: a small share until it answers
            job = waiting.popleft()
            if not waiting:
                del self._waiting[dest]
            else:
                self._waiting.move_to_end(dest)
            if suspension is not None:
                skip(job, suspension)
            else:
                self._running[dest] += 1
                self.running_total += 1
                self._unproven += not proven
                start(job, Running(dest, not proven))
            self._again = True

    def _unproven_room(self, dest: str) -> bool:
        return self._running[dest] < UNPROVEN_CONCURRENCY and self._unproven < max(
            1, self.limits.connections // 2
        )

    def finished(self, running: Running) -> None:
        """A job started by L{dispatch} ended."""
        dest = running.destination
        self._running[dest] -= 1
        if self._running[dest] <= 0:
            del self._running[dest]
        self.running_total -= 1
        self._unproven -= running.unproven
