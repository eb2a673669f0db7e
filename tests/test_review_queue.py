"""Review findings in the queue manager (each test demonstrates one bug).

A L{QueuedRunner} stands in for the spool thread pool: work runs only when
the test says so, which exposes the orderings a real pool produces.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.config import QueueConfig
from mta.delivery.routes import Router
from mta.envelope import RecipientState
from mta.errors import Reply
from mta.queue.manager import QueueLimits, QueueManager
from mta.spool.fs import Spool, SpoolStore
from mta.spool.queueid import QueueIdGenerator
from mta.testing import (
    DeliverySpy,
    FailingOps,
    NoSyncOps,
    QueuedRunner,
    queue_message,
    run_inline,
)

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "Try again later")
NO_USER = Reply(550, "5.1.1", "No such user")
REFUSED = Reply(451, "4.4.1", "connect to mx[192.0.2.9]:25: Connection refused")


class ReviewQueueCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SpoolStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.spy = DeliverySpy()
        self.settings = QueueConfig()

    def manager(self, runner: Any = run_inline, deliver: Any = None, **kw: Any) -> QueueManager:
        limits = kw.pop("limits", None)
        qm = QueueManager(
            self.store,
            runner,
            deliver or self.spy,
            Router({}),
            self.clock,
            limits=limits or QueueLimits(),
            settings=lambda: self.settings,
            **kw,
        )
        qm.startService()
        self.addCleanup(qm.stopService)
        return qm

    def queue(self, *recipients: str) -> str:
        return queue_message(
            self.store, "sender@example.com", list(recipients), arrival=self.clock.seconds()
        )


class DoubleActivationTests(ReviewQueueCase):
    def test_commit_during_startup_scan_is_delivered_once(self) -> None:
        runner = QueuedRunner()
        qm = self.manager(runner)  # the scan is queued, not run yet
        qid = self.queue("bob@example.net")
        qm.committed(qid, "incoming")  # load #1 queued behind the scan
        runner.run_all()  # scan finds qid in incoming/ while load #1 is pending
        self.assertEqual(len(self.spy.calls), 1, "two deliveries of the same message")

    def test_duplicate_heap_entry_activates_once(self) -> None:
        runner = QueuedRunner()
        qm = self.manager(runner)
        qid = self.queue("bob@example.net")
        qm.committed(qid, "incoming")
        runner.run_next(1)  # load #1 before the scan: activated
        self.spy.answer(0, LATER)
        runner.run_next(1)  # the settle files it in deferred/ (heap entry #1) ...
        runner.run_all()  # ... then the scan lists deferred/ (no second entry)
        self.clock.advance(300)
        runner.run_all()
        self.assertEqual(len(self.spy.waiting), 1, "one retry, not two")


class DispatchReentrancyTests(ReviewQueueCase):
    def test_many_waiting_jobs_for_a_dead_destination(self) -> None:
        runner = QueuedRunner()
        n = 600
        for i in range(n):
            self.queue(f"user{i}@down.example")
        self.manager(runner, limits=QueueLimits(active=n, destination_concurrency=1))
        runner.run_all()  # scan and loads: 1 job runs, n-1 wait
        self.assertEqual(len(self.spy.waiting), 1)
        self.spy.answer(0, REFUSED, kind="network", relay="none")  # dead site
        _, d = self.spy.calls[0]
        outcome: list[Any] = []
        d.addBoth(outcome.append)  # consume any failure so it is not logged later
        runner.run_all()
        # Let everything run to the end: the site comes back, all is accepted.
        for _ in range(5):
            self.clock.advance(400)
            runner.run_all()
            while waiting := [k for k, (_, d) in enumerate(self.spy.calls) if not d.called]:
                self.spy.answer(waiting[0], OK)
                runner.run_all()
        self.flushLoggedErrors()
        stuck = list(self.store.ids("active"))
        self.assertEqual(stuck, [], "messages stuck in active/ (and in memory) for good")
        self.assertEqual(len(list(self.store.ids("done"))), n)
        self.assertEqual(outcome, [None])

    def test_two_suspended_destinations_waiting(self) -> None:
        qm = self.manager(limits=QueueLimits(connections=1))
        for rcpt in ("a@a.example", "b@b.example", "x@x.example"):
            qm.committed(self.queue(rcpt), "incoming")
        # Make a.example and b.example dead sites (one connection at a time).
        for dom in ("a.example", "b.example"):
            [idx] = [k for k, (j, d) in enumerate(self.spy.calls) if not d.called]
            self.assertEqual(self.spy.calls[idx][0].domain, dom)
            self.spy.answer(idx, REFUSED, kind="network", relay="none")
        self.assertEqual(set(qm.suspended), {"a.example", "b.example"})
        [running] = [k for k, (j, d) in enumerate(self.spy.calls) if not d.called]
        self.assertEqual(self.spy.calls[running][0].domain, "x.example")
        # While x.example holds the only connection, one message for both
        # suspended destinations waits.
        qid = self.queue("a2@a.example", "b2@b.example")
        qm.committed(qid, "incoming")
        _, d = self.spy.calls[running]
        self.spy.answer(running, OK)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.assertEqual(outcome, [None], "the result callback failed")

    def test_synchronous_results_do_not_recurse(self) -> None:
        """Models the real agent: the first lookup is slow, later ones hit the cache."""
        runner = QueuedRunner()
        first: Deferred[Any] = Deferred()
        calls: list[Any] = []

        def deliver(job: Any) -> Deferred[Any]:
            from mta.delivery.relay import RecipientResult  # noqa: PLC0415

            calls.append(job)
            nx = Reply(550, "5.1.2", "Host or domain name not found")
            results = [RecipientResult(r.address, nx, "dns") for r in job.recipients]
            if len(calls) == 1:
                first.addCallback(lambda _: results)
                return first
            return succeed(results)

        n = 400
        for i in range(n):
            self.queue(f"user{i}@typo.example")
        qm = self.manager(runner, deliver, limits=QueueLimits(active=n, destination_concurrency=1))
        runner.run_all()
        outcome: list[Any] = []
        first.addBoth(outcome.append)
        first.callback(None)
        runner.run_all()
        self.flushLoggedErrors()
        self.assertEqual(len(qm.active), 0, "messages stuck in the active set")
        self.assertEqual(len(list(self.store.ids("done"))), n)
        self.assertEqual(outcome[0], None)


class LostResultTests(ReviewQueueCase):
    def test_failed_settle_is_retried(self) -> None:
        qid = self.queue("bob@example.net")
        qm = self.manager()
        # The disk fills up just as the result is recorded.
        self.store.ops = FailingOps("fsync", code=errno.ENOSPC, times=1)
        self.spy.answer(0, OK)
        self.flushLoggedErrors()
        self.clock.advance(3600)
        state, env = self.store.load(qid)
        self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.SENT))
        self.assertEqual(qm.active, {})

    def test_failed_report_commit_is_not_forgotten(self) -> None:
        reports_store = SpoolStore(os.path.abspath(self.mktemp()), NoSyncOps())
        reports_store.open()
        reports_store.ops = FailingOps("mkdir", code=errno.ENOSPC, times=1)
        reports = Spool(reports_store, run_inline, QueueIdGenerator(self.clock.seconds))
        qid = self.queue("nobody@example.net")
        self.manager(reports=reports, hostname="mta.test")
        self.spy.answer(0, NO_USER)
        self.flushLoggedErrors()
        state, env = self.store.load(qid)
        # Either a report exists, or the envelope still owes one (to retry).
        made = list(reports_store.ids("incoming"))
        self.assertTrue(
            made or not env.recipients[0].final_notified,
            f"bounce lost: state={state}, final_notified={env.recipients[0].final_notified}",
        )


class SuspensionScopeTests(ReviewQueueCase):
    def test_lost_connection_during_data_does_not_suspend(self) -> None:
        self.queue("a@big.example")
        qm = self.manager(limits=QueueLimits(destination_concurrency=1))
        lost = Reply(451, "4.4.2", "mx.big.example[192.0.2.1]:25: lost connection")
        self.spy.answer(
            0, lost, kind="network", relay="mx.big.example[192.0.2.1]:25", connected=True
        )
        self.assertEqual(qm.suspended, {})


class StarvationTests(ReviewQueueCase):
    def test_due_deferred_message_is_not_starved(self) -> None:
        old = self.queue("old@example.net")
        qm = self.manager(limits=QueueLimits(active=1))
        self.spy.answer(0, LATER)  # old is deferred until T0 + 300
        self.clock.advance(250)
        qm.committed(self.queue("n0@example.net"), "incoming")
        self.clock.advance(100)  # old is due now, n0 holds the only slot
        for i in range(1, 20):
            qm.committed(self.queue(f"n{i}@example.net"), "incoming")
            waiting = [k for k, (_, d) in enumerate(self.spy.calls) if not d.called]
            self.spy.answer(waiting[0], OK)
            self.clock.advance(60)
        tried = [j.envelope.queue_id for j, _ in self.spy.calls]
        self.assertGreater(tried.count(old), 1, "the due deferred message was never retried")


class BoundsTests(ReviewQueueCase):
    def test_expired_suspensions_are_pruned(self) -> None:
        # Each message's last attempt (here: its only one, at the end of its
        # lifetime) finds its destination dead; no more mail goes there.
        self.settings = QueueConfig(maximal_queue_lifetime=0)
        qm = self.manager()
        for i in range(50):
            qm.committed(self.queue(f"u@dead{i}.example"), "incoming")
        for k in range(50):
            self.spy.answer(k, REFUSED, kind="network", relay="none")
        self.assertEqual(len(qm.suspended), 50)
        # Much later, other mail flows normally.
        self.clock.advance(86400)
        for i in range(5):
            qm.committed(self.queue(f"u{i}@alive.example"), "incoming")
            self.spy.answer(len(self.spy.calls) - 1, OK)
        self.assertEqual(qm.suspended, {})


class FlakyLoadStore(SpoolStore):
    """A store whose first envelope read fails like a process out of file descriptors."""

    failures = 1

    def load(self, queue_id: str, state: str | None = None) -> Any:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().load(queue_id, state)


class ForgottenMessageTests(ReviewQueueCase):
    def test_transient_load_error_is_retried(self) -> None:
        self.store = FlakyLoadStore(self.store.root, NoSyncOps())
        qid = self.queue("bob@example.net")
        self.manager()
        self.flushLoggedErrors()
        self.clock.advance(3600)
        self.assertEqual(len(self.spy.calls), 1, f"{qid} never delivered")
