"""Shared set-up of the queue tests: a queue manager on a store, a Clock and a
delivery spy whose Deferreds the test fires (so a delivery "in flight" is
one the spy has not answered yet)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mta.config import QueueConfig
from mta.delivery.routes import Router
from mta.envelope import Envelope, QueueState
from mta.errors import Reply
from mta.interfaces import IQueueStore, ISpool
from mta.queue.dispatch import QueueLimits
from mta.queue.manager import QueueManager
from mta.queue.reports import Reporter
from mta.spool import FileStore, receiver
from mta.spool.queueid import QueueIdGenerator
from mta.testing import DeliverySpy, MemorySpool, MemoryStore, NoSyncOps, queue_message, run_inline

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok: queued as X")
LATER = Reply(451, "4.3.0", "Try again later")
NO_USER = Reply(550, "5.1.1", "No such user")
REFUSED = Reply(451, "4.4.1", "connect to mx[192.0.2.9]:25: Connection refused")


class QueueTestCase(SynchronousTestCase):
    """A L{QueueManager} on a L{MemoryStore} (L{make_store} may give another),
    a Clock at T0, a L{DeliverySpy}, and with C{with_reports} the sender
    notifications committed back into the same store."""

    with_reports = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store: Any = self.make_store()
        self.spy = DeliverySpy()
        self.router = Router({})
        self.settings = QueueConfig()
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def make_store(self) -> IQueueStore:
        return MemoryStore()

    def report_spool(self) -> ISpool:
        """The way into C{self.store} for reports."""
        if isinstance(self.store, MemoryStore):
            return MemorySpool(self.clock.seconds, self.store)
        return receiver(self.store, run_inline, QueueIdGenerator(self.clock.seconds))

    def manager(
        self, runner: Any = run_inline, *, agent: Any = None, **limits: int
    ) -> QueueManager:
        reporter = None
        spool = None
        if self.with_reports:
            spool = self.report_spool()
            reporter = Reporter(self.store, spool, runner, self.clock, "mta.test")
        qm = QueueManager(
            self.store,
            runner,
            agent or self.spy,
            self.router,
            self.clock,
            limits=QueueLimits(**limits),
            settings=self.settings,
            reporter=reporter,
        )
        if spool is not None:
            spool.add_listener(qm.committed)
        qm.startService()
        self.addCleanup(qm.stopService)
        return qm

    def queue(self, *recipients: str, arrival: float | None = None) -> str:
        return queue_message(
            self.store,
            "sender@example.com",
            list(recipients),
            arrival=arrival or self.clock.seconds(),
        )

    def envelope(self, queue_id: str) -> tuple[QueueState, Envelope]:
        state, env = self.store.load(queue_id)
        return state, env

    def waiting(self) -> list[int]:
        """Indexes of the spy's calls not answered yet."""
        return [i for i, (_, d) in enumerate(self.spy.calls) if not d.called]

    def reports_sent(self) -> list[tuple[Envelope, bytes]]:
        out = []
        for state in QueueState:
            for qid in list(self.store.ids(state)):
                _, env = self.store.load(qid, state)
                if env.kind == "dsn":
                    with self.store.open_message(qid, state) as f:
                        out.append((env, f.read()))
        return out

    def logged(self, text: str) -> bool:
        return any(text in formatEvent(e) for e in self.events)


class FileQueueTestCase(QueueTestCase):
    """The same, on the file system store in a temporary directory."""

    def make_store(self) -> IQueueStore:
        store = FileStore(os.path.abspath(self.mktemp()), NoSyncOps())
        store.open()
        return store
