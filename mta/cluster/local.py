"""L{ISharedState} for one instance: what mta has always kept by itself.

Daily counts go to L{mta.dailycount.DailyCounter} (a file per day in
C{spool/state/}, read back at start-up); wrong passwords are kept in
memory, at most C{MAX_CLIENTS} client keys (the least recently failing
ones are forgotten first), and are lost at a restart, as before.  Every
answer is ready at once (a fired Deferred), so a session on it never waits.
Traffic-shaping documents are kept in memory with the same compare-and-set
as in Redis (a single instance does not need them; the contract is one).
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mta.cluster import NO_FAILURES, FailureCounts, SharedLimits
from mta.dailycount import DailyCounter
from mta.interfaces import ISharedState


@dataclass
class _Client:
    failures: dict[bytes, float] = field(default_factory=dict)  # digest -> time
    attempts: deque[float] = field(default_factory=deque)  # every failure's time


@implementer(ISharedState)
class LocalState:
    """This process's counts; nothing is shared."""

    MAX_CLIENTS = 100_000

    def __init__(self, counter: DailyCounter) -> None:
        self.counter = counter
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._limits: dict[str, dict[str, Any]] = {}
        self._instances: dict[str, float] = {}

    def sent_today(self, login: str) -> Deferred[int]:
        return succeed(self.counter.count(login))

    def add_sent(self, login: str, n: int) -> Deferred[int]:
        self.counter.add(login, n)
        return succeed(self.counter.count(login))

    def _recent(self, client: str, since: float) -> _Client | None:
        record = self._clients.get(client)
        if record is None:
            return None
        for digest in [d for d, t in record.failures.items() if t <= since]:
            del record.failures[digest]
        while record.attempts and record.attempts[0] <= since:
            record.attempts.popleft()
        if not record.attempts:
            del self._clients[client]
            return None
        return record

    @staticmethod
    def _counts(record: _Client | None) -> FailureCounts:
        if record is None:
            return NO_FAILURES
        return FailureCounts(len(record.failures), len(record.attempts))

    def auth_failures(self, client: str, since: float) -> Deferred[FailureCounts]:
        return succeed(self._counts(self._recent(client, since)))

    def auth_failed_before(self, client: str, digest: bytes, since: float) -> Deferred[bool]:
        record = self._recent(client, since)
        return succeed(record is not None and digest in record.failures)

    def add_auth_failure(
        self, client: str, digest: bytes, when: float, window: float
    ) -> Deferred[FailureCounts]:
        record = self._recent(client, when - window) or _Client()
        record.failures[digest] = when
        record.attempts.append(when)
        self._clients[client] = record
        self._clients.move_to_end(client)
        while len(self._clients) > self.MAX_CLIENTS:
            self._clients.popitem(last=False)
        return succeed(self._counts(record))

    def destination_limits(
        self, instance: str, now: float, window: float
    ) -> Deferred[SharedLimits]:
        self._instances[instance] = now
        for name in [n for n, t in self._instances.items() if t <= now - window]:
            del self._instances[name]
        return succeed(SharedLimits(len(self._instances), copy.deepcopy(self._limits)))

    def destination_change(
        self, destination: str, doc: dict[str, Any] | None, token: str
    ) -> Deferred[tuple[bool, dict[str, Any] | None]]:
        stored = self._limits.get(destination)
        if ("" if stored is None else stored.get("token")) != token:
            return succeed((False, copy.deepcopy(stored)))
        if doc is None:
            self._limits.pop(destination, None)
        else:
            self._limits[destination] = copy.deepcopy(doc)
        return succeed((True, copy.deepcopy(doc)))

    def close(self) -> Deferred[None]:
        self.counter.close()
        return succeed(None)
