"""The queue manager with a Clock, a real spool directory and a delivery spy."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.config import QueueConfig
from mta.delivery.relay import RecipientResult
from mta.delivery.routes import Router
from mta.envelope import RecipientState
from mta.errors import Reply
from mta.queue.manager import QueueLimits, QueueManager
from mta.spool.fs import Spool, SpoolStore
from mta.spool.queueid import QueueIdGenerator
from mta.testing import DeliverySpy, NoSyncOps, queue_message, run_inline

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok: queued as X")
LATER = Reply(451, "4.3.0", "Try again later")
NO_USER = Reply(550, "5.1.1", "No such user")


class CountingStore(SpoolStore):
    """A SpoolStore that counts envelope loads (to prove what is not read)."""

    loads = 0

    def load(self, queue_id: str, state: str | None = None) -> Any:
        self.loads += 1
        return super().load(queue_id, state)


class QueueTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = CountingStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.spy = DeliverySpy()
        self.router = Router({})
        self.settings = QueueConfig()
        self.reports: Spool | None = None  # where notifications go, if anywhere

    def manager(self, **limits: int) -> QueueManager:
        qm = QueueManager(
            self.store,
            run_inline,
            self.spy,
            self.router,
            self.clock,
            limits=QueueLimits(**limits),
            settings=lambda: self.settings,
            reports=self.reports,
            hostname="mta.test",
        )
        if self.reports is not None:
            self.reports.add_listener(qm.committed)
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

    def envelope(self, queue_id: str) -> Any:
        return self.store.load(queue_id)


class DeliveryFlowTests(QueueTestCase):
    def test_message_at_startup_is_delivered_and_done(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        [job] = self.spy.waiting
        self.assertEqual(job.envelope.queue_id, qid)
        self.assertEqual([r.address for r in job.recipients], ["bob@example.net"])
        self.assertEqual(job.domain, "example.net")
        self.assertEqual(self.store.find(qid), "active")
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
        qm.committed(qid, "incoming")
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
        self.assertEqual(self.store.find(qid), "active", "one job still running")
        self.spy.answer(1, OK)
        self.assertEqual(self.store.find(qid), "done")

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
    def test_temporary_failure_defers_with_backoff(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        self.spy.answer(0, LATER)
        state, env = self.envelope(qid)
        self.assertEqual(state, "deferred")
        self.assertEqual(env.recipients[0].state, RecipientState.DEFERRED)
        self.assertEqual(env.recipients[0].next_attempt, T0 + 300)
        self.assertEqual(os.stat(self.store.path("deferred", qid)).st_mtime, T0 + 300)
        self.clock.advance(299)
        self.assertEqual(len(self.spy.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.spy.calls), 2)
        self.spy.answer(1, OK)
        self.assertEqual(self.store.find(qid), "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_postfix_schedule_then_expiry(self) -> None:
        """Attempts at 0, 5, 10, 20, 40, 80 minutes, then every 4000 s, until 5 days."""
        qid = self.queue("bob@example.net")
        self.manager()
        times = []
        while True:
            waiting = [i for i, (_, d) in enumerate(self.spy.calls) if not d.called]
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
        qm.committed(crashed, "incoming")
        self.assertEqual(self.store.find(crashed), "active")
        qm.stopService()
        # A new manager on the same spool: the crash leftover runs at once,
        # the deferred message at its due time, read from stat only.
        self.spy = DeliverySpy()
        self.manager()
        self.assertEqual([j.envelope.queue_id for j in self.spy.waiting], [crashed])
        self.clock.advance(300)
        self.assertEqual(
            sorted(j.envelope.queue_id for j in self.spy.waiting), sorted([crashed, deferred])
        )


class LimitTests(QueueTestCase):
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
        self.assertEqual(len(qm.active), 5)
        self.assertEqual(len(self.spy.waiting), 2)  # example.net not heard from yet
        self.spy.answer(0, OK)
        self.assertEqual(len(qm.active), 5)
        self.assertEqual(len(self.spy.waiting), 5)
        for i in range(1, 6):
            self.spy.answer(i, OK)
        self.assertEqual(len(qm.active), 5)
        self.assertEqual(len(self.spy.calls), 11)

    def test_large_deferred_queue_is_not_loaded(self) -> None:
        """Deferred messages cost a heap entry each until due, not an envelope read."""
        for i in range(2000):
            self.queue(f"user{i}@example.net")
        qm = self.manager(active=100)
        answered = 0
        while waiting := [i for i, (_, d) in enumerate(self.spy.calls) if not d.called]:
            for i in waiting:
                self.spy.answer(i, LATER)
                answered += 1
        self.assertEqual(answered, 2000)
        self.assertEqual(len(qm.active), 0)
        self.assertEqual(len(qm.deferred), 2000)
        loads = self.store.loads
        self.clock.advance(299)
        self.assertEqual(self.store.loads, loads, "nothing read before anything is due")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer for the whole queue")
        self.clock.advance(1)
        self.assertEqual(len(qm.active), 100, "only the active limit is loaded")


class RobustnessTests(QueueTestCase):
    def test_corrupt_envelope_moves_to_corrupt(self) -> None:
        qid = self.queue("a@example.net")
        with open(self.store.path("incoming", qid, "envelope.json"), "w") as f:
            f.write("{not json")
        self.manager()
        self.assertEqual(self.spy.calls, [])
        self.assertEqual(self.store.find(qid), "corrupt")

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

    def setUp(self) -> None:
        super().setUp()
        self.reports = Spool(self.store, run_inline, QueueIdGenerator(self.clock.seconds))

    def reports_sent(self) -> list[tuple[Any, bytes]]:
        out = []
        for state in ("incoming", "active", "deferred", "done"):
            for qid in self.store.ids(state):
                _, env = self.store.load(qid, state)
                if env.kind == "dsn":
                    with open(self.store.path(state, qid, "message"), "rb") as f:
                        out.append((env, f.read()))
        return out

    def queue_with(self, notify: tuple[str, ...] | None, sender: str = "sender@example.com") -> str:
        qid = queue_message(self.store, sender, ["bob@example.net"], arrival=self.clock.seconds())
        _, env = self.store.load(qid)
        env.recipients[0].notify = notify
        self.store.write_envelope("incoming", env)
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
            waiting = [i for i, (_, d) in enumerate(self.spy.calls) if not d.called]
            for i in waiting:
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
            waiting = [i for i, (_, d) in enumerate(self.spy.calls) if not d.called]
            for i in waiting:
                self.spy.answer(i, LATER)
            self.clock.advance(300)
        state, env = self.envelope(qid)
        self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.FAILED))
        [(_, report)] = self.reports_sent()
        self.assertIn(b"Action: failed", report)
        self.assertIn(b"Status: 4.3.0", report)
