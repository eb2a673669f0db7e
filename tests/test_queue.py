"""The queue manager: delivery rounds, retries, limits, suspensions, reports.

On the memory store with a Clock and a delivery spy (L{tests.queue_support});
the flows that touch the spool most run again on the file system store.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mta.config import QueueConfig
from mta.delivery.job import RecipientResult
from mta.envelope import QueueState, RecipientState
from mta.errors import Reply, StorageError
from mta.testing import DeliverySpy, MemorySpool, QueuedRunner, queue_message
from tests.queue_support import (
    LATER,
    NO_USER,
    OK,
    REFUSED,
    T0,
    FileQueueTestCase,
    QueueTestCase,
)


class DeliveryFlowTests(QueueTestCase):
    """A message goes out to its destinations and is filed when all are done."""

    def test_message_at_startup_is_delivered_and_done(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        [job] = self.spy.waiting
        self.assertEqual(job.envelope.queue_id, qid)
        self.assertEqual([r.address for r in job.recipients], ["bob@example.net"])
        self.assertEqual(job.domain, "example.net")
        self.assertEqual(self.store.locate(qid), "active")
        self.spy.answer(0, OK)
        state, env = self.envelope(qid)
        self.assertEqual(state, "done")
        [rcpt] = env.recipients
        self.assertEqual(rcpt.state, RecipientState.SENT)
        self.assertEqual(rcpt.attempts, 1)
        self.assertEqual(rcpt.reply, "250 2.0.0 Ok: queued as X")
        self.assertEqual(rcpt.dsn_status, "2.0.0")
        self.assertEqual(rcpt.relay, "mx.test[192.0.2.1]:25")

    def test_committed_message_is_picked_up_at_once(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.assertEqual(len(self.spy.waiting), 1)

    def test_recipients_grouped_by_domain(self) -> None:
        qid = self.queue("a@one.example", "b@two.example", "c@ONE.example")
        self.manager()
        jobs = sorted(self.spy.waiting, key=lambda j: j.domain)
        self.assertEqual([j.domain for j in jobs], ["one.example", "two.example"])
        self.assertEqual(
            [r.address for r in jobs[0].recipients], ["a@one.example", "c@ONE.example"]
        )
        self.spy.answer(0, OK)
        self.assertEqual(self.store.locate(qid), "active", "one job still running")
        self.spy.answer(1, OK)
        self.assertEqual(self.store.locate(qid), "done")

    def test_permanent_failure_is_final(self) -> None:
        qid = self.queue("nobody@example.net", "bob@example.net")
        self.manager()
        self.spy.answer_each(0, [NO_USER, OK])
        state, env = self.envelope(qid)
        self.assertEqual(state, "done")
        self.assertEqual(
            [r.state for r in env.recipients], [RecipientState.FAILED, RecipientState.SENT]
        )
        self.assertEqual(env.recipients[0].dsn_status, "5.1.1")


class RetryTests(QueueTestCase):
    """Temporary failures wait on Postfix's schedule until the lifetime ends."""

    def test_temporary_failure_defers_with_backoff(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        self.spy.answer(0, LATER)
        state, env = self.envelope(qid)
        self.assertEqual(state, "deferred")
        self.assertEqual(env.recipients[0].state, RecipientState.DEFERRED)
        self.assertEqual(env.recipients[0].next_attempt, T0 + 300)
        self.assertEqual(self.store.scan().deferred, [(T0 + 300, qid)])
        self.clock.advance(299)
        self.assertEqual(len(self.spy.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.spy.calls), 2)
        self.spy.answer(1, OK)
        self.assertEqual(self.store.locate(qid), "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_postfix_schedule_then_expiry(self) -> None:
        """Attempts at 0, 5, 10, 20, 40, 80 minutes, then every 4000 s, until 5 days."""
        qid = self.queue("bob@example.net")
        self.manager()
        times = []
        while True:
            waiting = self.waiting()
            if not waiting:
                state, env = self.envelope(qid)
                if state != "deferred":
                    break
                self.clock.advance(env.recipients[0].next_attempt - self.clock.seconds())
                continue
            times.append(self.clock.seconds() - T0)
            self.spy.answer(waiting[0], LATER)
        self.assertEqual(times[:6], [0, 300, 600, 1200, 2400, 4800])
        self.assertEqual(times[6] - times[5], 4000)
        self.assertEqual(times[-1], 5 * 86400)
        state, env = self.envelope(qid)
        self.assertEqual(state, "done")
        self.assertEqual(env.recipients[0].state, RecipientState.FAILED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_deferred_recipients_are_retried(self) -> None:
        qid = self.queue("a@example.net", "b@example.net")
        self.manager()
        self.spy.answer_each(0, [OK, LATER])
        self.clock.advance(300)
        [job] = self.spy.waiting
        self.assertEqual([r.address for r in job.recipients], ["b@example.net"])
        self.spy.answer(1, OK)
        _, env = self.envelope(qid)
        self.assertEqual([r.attempts for r in env.recipients], [1, 2])

    def test_restart_finds_deferred_and_active_messages(self) -> None:
        deferred = self.queue("a@example.net")
        qm = self.manager()
        self.spy.answer(0, LATER)
        crashed = self.queue("b@example.net")
        self.commit(qm, crashed)
        self.assertEqual(self.store.locate(crashed), "active")
        qm.stopService()
        # A new manager on the same spool: the crash leftover runs at once,
        # the deferred message at its due time, from the scan alone.
        self.restart_store()
        self.spy = DeliverySpy()
        self.manager()
        self.assertEqual([j.envelope.queue_id for j in self.spy.waiting], [crashed])
        self.clock.advance(300)
        self.assertEqual(
            sorted(j.envelope.queue_id for j in self.spy.waiting), sorted([crashed, deferred])
        )


class LimitTests(QueueTestCase):
    """Concurrency per destination and in all, and the bounded active set."""

    def test_destination_concurrency(self) -> None:
        for i in range(25):
            self.queue(f"user{i}@busy.example")
        self.queue("x@quiet.example")
        self.manager(destination_concurrency=20)
        domains = [j.domain for j in self.spy.waiting]
        # Two connections each until a destination has answered
        # (tests/test_hardening.py, UnprovenShareTests).
        self.assertEqual(domains.count("busy.example"), 2)
        self.assertEqual(domains.count("quiet.example"), 1)
        self.assertEqual(self.spy.calls[0][0].domain, "busy.example")
        self.spy.answer(0, OK)
        self.assertEqual([j.domain for j in self.spy.waiting].count("busy.example"), 20)

    def test_global_limit(self) -> None:
        for i in range(10):
            self.queue(f"user@d{i}.example")
        self.manager(connections=4)
        # Destinations not heard from yet share half of the connections
        # (tests/test_hardening.py, UnprovenShareTests).
        self.assertEqual(len(self.spy.waiting), 2)
        self.spy.answer(0, OK)
        self.assertEqual(len(self.spy.waiting), 2)
        self.assertEqual(len(self.spy.calls), 3)

    def test_bounded_active_set(self) -> None:
        for i in range(30):
            self.queue(f"user{i}@example.net")
        qm = self.manager(active=5)
        self.assertEqual(len(qm.messages.active), 5)
        self.assertEqual(len(self.spy.waiting), 2)  # example.net not heard from yet
        self.spy.answer(0, OK)
        self.assertEqual(len(qm.messages.active), 5)
        self.assertEqual(len(self.spy.waiting), 5)
        for i in range(1, 6):
            self.spy.answer(i, OK)
        self.assertEqual(len(qm.messages.active), 5)
        self.assertEqual(len(self.spy.calls), 11)

    def test_large_deferred_queue_is_not_loaded(self) -> None:
        """Deferred messages cost a heap entry each until due, not an envelope read."""
        for i in range(2000):
            self.queue(f"user{i}@example.net")
        qm = self.manager(active=100)
        answered = 0
        while waiting := self.waiting():
            for i in waiting:
                self.spy.answer(i, LATER)
                answered += 1
        self.assertEqual(answered, 2000)
        self.assertEqual(len(qm.messages.active), 0)
        self.assertEqual(qm.messages.ready.deferred_count, 2000)
        loads = self.store.loads
        self.clock.advance(299)
        self.assertEqual(self.store.loads, loads, "nothing read before anything is due")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer for the whole queue")
        self.clock.advance(1)
        self.assertEqual(len(qm.messages.active), 100, "only the active limit is loaded")


class RobustnessTests(QueueTestCase):
    """Unreadable messages and crashing deliveries do not stop the queue."""

    def test_corrupt_envelope_moves_to_corrupt(self) -> None:
        qid = self.queue("a@example.net")
        self.store.unreadable.add(qid)
        self.manager()
        self.assertEqual(self.spy.calls, [])
        self.assertEqual(self.store.locate(qid), "corrupt")

    def test_delivery_crash_is_a_temporary_failure(self) -> None:
        qid = self.queue("a@example.net")
        self.manager()
        _, d = self.spy.calls[0]
        d.errback(RuntimeError("boom"))
        self.flushLoggedErrors(RuntimeError)
        state, env = self.envelope(qid)
        self.assertEqual(state, "deferred")
        self.assertEqual(env.recipients[0].dsn_status, "4.3.0")


class SuspensionTests(QueueTestCase):
    """Dead-site detection and blocklist rest: the destination waits as a whole."""

    def test_unreachable_destination_is_suspended(self) -> None:
        ids = [self.queue(f"user{i}@down.example") for i in range(3)]
        self.manager(destination_concurrency=1)
        refused = Reply(
            451, "4.4.1", "connect to mx.down.example[192.0.2.9]:25: Connection refused"
        )
        self.spy.answer(0, refused, kind="network", relay="none")
        # The two queued jobs were deferred without a connection.
        self.assertEqual(len(self.spy.calls), 1)
        for qid in ids:
            state, env = self.envelope(qid)
            self.assertEqual(state, "deferred")
            self.assertEqual(env.recipients[0].next_attempt, T0 + 300)
        _, skipped = self.envelope(ids[1])
        self.assertEqual(skipped.recipients[0].attempts, 0, "a suspended job is no attempt")
        self.assertIn("suspended (unreachable)", skipped.recipients[0].reply)
        # After the backoff the destination is tried again, once per message.
        self.clock.advance(300)
        self.assertEqual(len(self.spy.calls), 2)
        self.spy.answer(1, OK)
        self.assertEqual(len(self.spy.calls), 3)

    def test_other_destinations_unaffected(self) -> None:
        self.queue("a@down.example")
        self.queue("b@up.example")
        self.manager()
        refused = Reply(451, "4.4.1", "Connection refused")
        down = next(i for i, (j, _) in enumerate(self.spy.calls) if j.domain == "down.example")
        self.spy.answer(down, refused, kind="network", relay="none")
        self.assertIn("up.example", [j.domain for j in self.spy.waiting])

    def test_recipient_refusal_does_not_suspend(self) -> None:
        self.queue("a@example.net")
        self.queue("b@example.net")
        self.manager(destination_concurrency=1)
        self.spy.answer(0, NO_USER)
        self.assertEqual(len(self.spy.waiting), 1)

    def test_blocklist_rests_destination(self) -> None:
        self.settings = QueueConfig(blocklist_rest_time=1800)
        first = self.queue("a@strict.example")
        self.queue("b@strict.example")
        self.manager(destination_concurrency=1)
        listed = Reply(
            554, "5.7.1", "Service unavailable; Client host blocked using zen.spamhaus.org"
        )
        self.spy.answer(0, listed)
        state, env = self.envelope(first)
        self.assertEqual((state, env.recipients[0].category), ("deferred", "blocklist"))
        self.assertEqual(env.recipients[0].next_attempt, T0 + 300)
        self.assertEqual(len(self.spy.calls), 1, "the second message was not tried")
        self.clock.advance(300)
        # The first is due but the destination still rests: no connection.
        self.assertEqual(len(self.spy.calls), 1)
        self.clock.advance(1500)
        self.assertEqual(len(self.spy.waiting), 1)
        self.assertEqual(self.clock.seconds() - T0, 1800)


class NotificationTests(QueueTestCase):
    """Reports go through the spool like any message (RFC 3461/3464)."""

    with_reports = True

    def queue_with(self, notify: tuple[str, ...] | None, sender: str = "sender@example.com") -> str:
        qid = queue_message(self.store, sender, ["bob@example.net"], arrival=self.clock.seconds())
        state, env = self.store.load(qid)
        env.recipients[0].notify = notify
        self.store.settle(env, state, state)
        return qid

    def test_failure_report_to_the_sender(self) -> None:
        qid = self.queue_with(None)
        self.manager()
        self.spy.answer(0, NO_USER)
        [(report_env, report)] = self.reports_sent()
        self.assertEqual(report_env.sender, "")
        self.assertEqual([r.address for r in report_env.recipients], ["sender@example.com"])
        self.assertEqual(report_env.recipients[0].notify, ("NEVER",))
        self.assertIn(b"Action: failed", report)
        self.assertIn(b"Status: 5.1.1", report)
        self.assertIn(b"From: Mail Delivery System <MAILER-DAEMON@mta.test>", report)
        _, env = self.envelope(qid)
        self.assertTrue(env.recipients[0].final_notified)

    def test_report_is_delivered_like_any_message(self) -> None:
        self.queue_with(None)
        self.manager()
        self.spy.answer(0, NO_USER)
        [job] = self.spy.waiting
        self.assertEqual(job.envelope.kind, "dsn")
        self.assertEqual(job.domain, "example.com")

    def test_never_for_null_sender_or_notify_never(self) -> None:
        self.queue_with(None, sender="")
        self.queue_with(("NEVER",))
        self.manager()
        for i in range(2):
            self.spy.answer(i, NO_USER)
        self.assertEqual(self.reports_sent(), [])

    def test_delay_report_once_after_warning_time(self) -> None:
        self.settings = QueueConfig(delay_warning_time=3600)
        qid = self.queue_with(None)
        self.manager()
        answered = 0
        while self.clock.seconds() - T0 < 4 * 3600:
            for i in self.waiting():
                self.spy.answer(i, LATER)
                answered += 1
            self.clock.advance(60)
        [(_, report)] = self.reports_sent()
        self.assertIn(b"Action: delayed", report)
        self.assertIn(b"Will-Retry-Until:", report)
        _, env = self.envelope(qid)
        self.assertTrue(env.recipients[0].delay_notified)
        self.assertGreater(answered, 5)

    def test_relayed_success_only_when_asked_and_next_hop_lacks_dsn(self) -> None:
        self.queue_with(("SUCCESS",))
        self.queue_with(("SUCCESS",))
        self.queue_with(None)
        self.manager()
        job0, d0 = self.spy.calls[0]
        d0.callback([RecipientResult(job0.recipients[0].address, OK, "remote", dsn_passed=False)])
        job1, d1 = self.spy.calls[1]
        d1.callback([RecipientResult(job1.recipients[0].address, OK, "remote", dsn_passed=True)])
        self.spy.answer(2, OK)
        [(_, report)] = self.reports_sent()
        self.assertIn(b"Action: relayed", report)

    def test_expiry_reports_failure(self) -> None:
        self.settings = QueueConfig(maximal_queue_lifetime=900, delay_warning_time=0)
        qid = self.queue_with(None)
        self.manager()
        for _ in range(10):
            for i in self.waiting():
                self.spy.answer(i, LATER)
            self.clock.advance(300)
        state, env = self.envelope(qid)
        self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.FAILED))
        [(_, report)] = self.reports_sent()
        self.assertIn(b"Action: failed", report)
        self.assertIn(b"Status: 4.3.0", report)


class DoubleActivationTests(QueueTestCase):
    """A message is delivered once however its notifications and the scan interleave.

    A L{QueuedRunner} stands in for the spool thread pool: work runs only
    when the test says so, which exposes the orderings a real pool produces.
    """

    def test_commit_during_startup_scan_is_delivered_once(self) -> None:
        runner = QueuedRunner()
        qm = self.manager(runner)  # the scan is queued, not run yet
        qid = self.queue("bob@example.net")
        qm.enqueue(qid)  # load #1 queued behind the scan
        runner.run_all()  # scan finds qid in incoming while load #1 is pending
        self.assertEqual(len(self.spy.calls), 1, "two deliveries of the same message")

    def test_duplicate_heap_entry_activates_once(self) -> None:
        runner = QueuedRunner()
        qm = self.manager(runner)
        qid = self.queue("bob@example.net")
        qm.enqueue(qid)
        runner.run_next(1)  # load #1 before the scan: activated
        self.spy.answer(0, LATER)
        runner.run_next(1)  # the filing puts it in deferred (heap entry #1) ...
        runner.run_all()  # ... then the scan lists deferred (no second entry)
        self.clock.advance(300)
        runner.run_all()
        self.assertEqual(len(self.spy.waiting), 1, "one retry, not two")


class _CachedFailures:
    """An agent like the real one: the first lookup is slow, later ones hit the cache."""

    def __init__(self) -> None:
        self.first: Deferred[Any] = Deferred()
        self.calls: list[Any] = []

    def deliver(self, job: Any) -> Deferred[Any]:
        self.calls.append(job)
        nx = Reply(550, "5.1.2", "Host or domain name not found")
        results = [RecipientResult(r.address, nx, "dns") for r in job.recipients]
        if len(self.calls) == 1:
            self.first.addCallback(lambda _: results)
            return self.first
        return succeed(results)


class DispatchReentrancyTests(QueueTestCase):
    """Many jobs that finish at once (suspended or cached failures) keep the stack flat."""

    def test_many_waiting_jobs_for_a_dead_destination(self) -> None:
        runner = QueuedRunner()
        n = 600
        for i in range(n):
            self.queue(f"user{i}@down.example")
        self.manager(runner, active=n, destination_concurrency=1)
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
            while waiting := self.waiting():
                self.spy.answer(waiting[0], OK)
                runner.run_all()
        self.flushLoggedErrors()
        stuck = list(self.store.ids(QueueState.ACTIVE))
        self.assertEqual(stuck, [], "messages stuck in active (and in memory) for good")
        self.assertEqual(len(list(self.store.ids(QueueState.DONE))), n)
        self.assertEqual(outcome, [None])

    def test_two_suspended_destinations_waiting(self) -> None:
        qm = self.manager(connections=1)
        for rcpt in ("a@a.example", "b@b.example", "x@x.example"):
            self.commit(qm, self.queue(rcpt))
        # Make a.example and b.example dead sites (one connection at a time).
        for dom in ("a.example", "b.example"):
            [idx] = self.waiting()
            self.assertEqual(self.spy.calls[idx][0].domain, dom)
            self.spy.answer(idx, REFUSED, kind="network", relay="none")
        self.assertEqual(set(qm.destinations.suspended), {"a.example", "b.example"})
        [running] = self.waiting()
        self.assertEqual(self.spy.calls[running][0].domain, "x.example")
        # While x.example holds the only connection, one message for both
        # suspended destinations waits.
        qid = self.queue("a2@a.example", "b2@b.example")
        self.commit(qm, qid)
        _, d = self.spy.calls[running]
        self.spy.answer(running, OK)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.assertEqual(outcome, [None], "the result callback failed")

    def test_synchronous_results_do_not_recurse(self) -> None:
        runner = QueuedRunner()
        agent = _CachedFailures()
        n = 400
        for i in range(n):
            self.queue(f"user{i}@typo.example")
        qm = self.manager(runner, agent=agent, active=n, destination_concurrency=1)
        runner.run_all()
        outcome: list[Any] = []
        agent.first.addBoth(outcome.append)
        agent.first.callback(None)
        runner.run_all()
        self.flushLoggedErrors()
        self.assertEqual(len(qm.messages.active), 0, "messages stuck in the active set")
        self.assertEqual(len(list(self.store.ids(QueueState.DONE))), n)
        self.assertEqual(outcome[0], None)


class StorageFailureTests(QueueTestCase):
    """A full disk while filing or reporting loses neither the result nor the report."""

    with_reports = True

    def test_failed_filing_is_retried(self) -> None:
        qid = self.queue("bob@example.net")
        qm = self.manager()
        # The disk fills up just as the result is recorded.
        self.store.fail = StorageError("cannot record: no space left", disk_full=True)
        self.spy.answer(0, OK)
        self.flushLoggedErrors()
        self.assertEqual(self.store.locate(qid), QueueState.ACTIVE)
        self.clock.advance(3600)
        state, env = self.store.load(qid)
        self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.SENT))
        self.assertEqual(qm.messages.active, {})

    def test_failed_report_commit_is_not_forgotten(self) -> None:
        qid = self.queue("nobody@example.net")
        qm = self.manager()
        assert qm.reporter is not None
        failing = qm.reporter.spool
        assert isinstance(failing, MemorySpool)
        failing.fail_begin = StorageError("cannot start a message: no space left", disk_full=True)
        self.spy.answer(0, NO_USER)
        self.flushLoggedErrors()
        state, env = self.store.load(qid)
        self.assertEqual(state, QueueState.ACTIVE, "filed before its report was sent")
        self.assertFalse(env.recipients[0].final_notified)
        failing.fail_begin = None
        self.clock.advance(60)
        [(report, _)] = self.reports_sent()
        self.assertEqual(report.sender, "")
        state, env = self.store.load(qid)
        self.assertEqual(state, QueueState.DONE)
        self.assertTrue(env.recipients[0].final_notified)


class StartupScanFailureTests(QueueTestCase):
    """A start-up scan that fails (out of file descriptors) is tried again a
    minute later, unless the queue has stopped meanwhile."""

    def failing_scan(self) -> list[int]:
        """Make the store's next scan fail once; returns a list that counts scans."""
        scan, calls = self.store.scan, []

        def scan_once_failing() -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise StorageError("cannot list the queue: too many open files")
            return scan()

        self.store.scan = scan_once_failing
        return calls

    def test_retried_a_minute_later(self) -> None:
        self.queue("bob@example.net")
        calls = self.failing_scan()
        self.manager()
        self.assertEqual(len(self.flushLoggedErrors(StorageError)), 1)
        self.assertTrue(self.logged("cannot read the queue; trying again in a minute"))
        self.clock.advance(59)
        self.assertEqual((len(calls), len(self.spy.calls)), (1, 0))
        self.clock.advance(1)
        self.assertEqual((len(calls), len(self.spy.calls)), (2, 1))

    def test_not_after_a_stop(self) -> None:
        self.queue("bob@example.net")
        calls = self.failing_scan()
        qm = self.manager()
        self.flushLoggedErrors(StorageError)
        qm.stopService()
        self.clock.advance(3600)
        self.assertEqual((len(calls), len(self.spy.calls)), (1, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SuspensionScopeTests(QueueTestCase):
    """Only a destination that never answered is a dead site."""

    def test_lost_connection_during_data_does_not_suspend(self) -> None:
        self.queue("a@big.example")
        qm = self.manager(destination_concurrency=1)
        lost = Reply(451, "4.4.2", "mx.big.example[192.0.2.1]:25: lost connection")
        self.spy.answer(
            0, lost, kind="network", relay="mx.big.example[192.0.2.1]:25", connected=True
        )
        self.assertEqual(qm.destinations.suspended, {})


class StarvationTests(QueueTestCase):
    """New mail does not keep due retries waiting."""

    def test_due_deferred_message_is_not_starved(self) -> None:
        old = self.queue("old@example.net")
        qm = self.manager(active=1)
        self.spy.answer(0, LATER)  # old is deferred until T0 + 300
        self.clock.advance(250)
        self.commit(qm, self.queue("n0@example.net"))
        self.clock.advance(100)  # old is due now, n0 holds the only slot
        for i in range(1, 20):
            self.commit(qm, self.queue(f"n{i}@example.net"))
            self.spy.answer(self.waiting()[0], OK)
            self.clock.advance(60)
        tried = [j.envelope.queue_id for j, _ in self.spy.calls]
        self.assertGreater(tried.count(old), 1, "the due deferred message was never retried")


class BoundsTests(QueueTestCase):
    """What the manager remembers about destinations does not grow for ever."""

    def test_expired_suspensions_are_pruned(self) -> None:
        # Each message's last attempt (here: its only one, at the end of its
        # lifetime) finds its destination dead; no more mail goes there.
        self.settings = QueueConfig(maximal_queue_lifetime=0)
        qm = self.manager()
        for i in range(50):
            self.commit(qm, self.queue(f"u@dead{i}.example"))
        for k in range(50):
            self.spy.answer(k, REFUSED, kind="network", relay="none")
        self.assertEqual(len(qm.destinations.suspended), 50)
        # Much later, other mail flows normally.
        self.clock.advance(86400)
        for i in range(5):
            self.commit(qm, self.queue(f"u{i}@alive.example"))
            self.spy.answer(len(self.spy.calls) - 1, OK)
        self.assertEqual(qm.destinations.suspended, {})


class ForgottenMessageTests(QueueTestCase):
    """A message the store cannot read for a moment is looked at again."""

    def test_transient_load_error_is_retried(self) -> None:
        qid = self.queue("bob@example.net")
        self.store.fail = OSError(errno.EMFILE, "Too many open files")
        self.manager()
        self.flushLoggedErrors()
        self.assertEqual(self.spy.calls, [])
        self.clock.advance(3600)
        self.assertEqual(len(self.spy.calls), 1, f"{qid} never delivered")


class FileStoreDeliveryFlowTests(DeliveryFlowTests, FileQueueTestCase):
    """L{DeliveryFlowTests} on the file system store."""


class FileStoreRetryTests(RetryTests, FileQueueTestCase):
    """L{RetryTests} on the file system store."""


class FileStoreNotificationTests(NotificationTests, FileQueueTestCase):
    """L{NotificationTests} on the file system store, reports through a real L{Spool}."""
