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

Traffic shaping (L{mta.queue.shaping.Shaper}, when given) lowers a
destination's concurrency below C{destination_concurrency} and paces its
starts: a destination whose rate allows no start now is passed over, the
round returns when it may start again (the manager sets a timer), and of
its waiting jobs those beyond what the rate starts within C{[shaping]
max_wait} are handed out to be deferred, the newest first, rather than hold
the active set.

No Twisted and no I/O: the manager passes in what starts a job.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mta.queue.scheduler import UNPROVEN_CONCURRENCY, Destinations, Suspension
from mta.queue.shaping import Shaper

#: Why jobs deferred for a destination's rate did not run (L{Suspension.why}).
SHAPED = "traffic shaping"

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

    def __init__(
        self, limits: QueueLimits, destinations: Destinations, shaper: Shaper | None = None
    ) -> None:
        self.limits = limits
        self.destinations = destinations
        self.shaper = shaper
        self._wake: float | None = None  # when a destination held by its rate may start
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

    def waiting(self, destination: str) -> int:
        """Jobs waiting for C{destination}."""
        return len(self._waiting.get(destination, ()))

    def dispatch(
        self,
        now: Callable[[], float],
        start: Callable[[J, Running], None],
        skip: Callable[[J, Suspension], None],
    ) -> float | None:
        """Start what the limits allow, destinations in turn.

        Returns when a destination held back by its rate may start again
        (None: none is).  Not re-entrant: a job that completes at once (a
        cached DNS failure, a resting destination) calls back here; that
        call only asks the running loop to go round again (and returns
        None), so the stack stays flat however many jobs wait.
        """
        if self._busy:
            self._again = True
            return None
        self._busy = self._again = True
        try:
            while self._again:
                self._again = False
                self._wake = None
                self._round(now(), start, skip)
        finally:
            self._busy = False
        return self._wake

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
            if not waiting or self._running[dest] >= self.concurrency(dest):
                continue
            suspension = self.destinations.suspension(dest, now)
            proven = self.destinations.proven(dest, now)
            if suspension is None and not proven and not self._unproven_room(dest):
                continue  # not heard from yet: a small share until it answers
            if suspension is None and not self._paced(dest, now, skip):
                continue  # its rate allows no start now
            waiting = self._waiting.get(dest)
            if not waiting:
                continue
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

    def concurrency(self, dest: str) -> int:
        """Deliveries that may run to C{dest} at once."""
        limit = self.limits.destination_concurrency
        return limit if self.shaper is None else min(limit, self.shaper.concurrency(dest))

    def _paced(self, dest: str, now: float, skip: Callable[[J, Suspension], None]) -> bool:
        """Whether C{dest}'s rate lets a job start now (spending its token).

        If not, note when it will, and hand out the jobs beyond what the
        rate starts within C{max_wait}, newest first, to be deferred.
        """
        shaper = self.shaper
        if shaper is None or shaper.take(dest, now):
            return True
        wake = shaper.next_start(dest, now)
        self._wake = wake if self._wake is None else min(self._wake, wake)
        room = shaper.room(dest)
        waiting = self._waiting.get(dest)
        if waiting is not None and len(waiting) > room:
            suspension = Suspension(now, shaper.held_by(dest), SHAPED)
            while waiting is not None and len(waiting) > room:
                skip(waiting.pop(), suspension)
                waiting = self._waiting.get(dest)
        return False

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
