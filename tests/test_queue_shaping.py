"""Traffic shaping in the queue (L{mta.queue.traffic} wired into the manager and
the dispatcher): on the memory store, a Clock and a delivery spy whose
Deferreds the test fires, so "in flight" is a delivery the spy has not
answered yet and every time is exact.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from twisted.internet.testing import StringTransport

from mta.controlsocket import ControlProtocol, handle
from mta.envelope import RecipientState
from mta.errors import Reply
from mta.metrics import Metrics, exposition
from mta.queue.actions import ActionError
from mta.queue.dispatch import QueueLimits
from mta.queue.manager import QueueManager
from mta.queue.reports import Reporter
from mta.queue.shaping import Shaper, ShapingPolicy
from mta.queue.traffic import TrafficShaping
from mta.testing import run_inline
from tests.queue_support import OK, T0, QueueTestCase

GMAIL = Reply(
    421, "4.7.28", "Gmail has detected an unusual rate of email. Email has been rate limited."
)
DEST = "example.net"


class ShapingTestCase(QueueTestCase):
    """A manager whose traffic shaping holds 30 s and recovers every 5 s."""

    with_reports = True

    def shaping_manager(self, concurrency: int = 4, **policy: Any) -> QueueManager:
        values: dict[str, Any] = {
            "max_concurrency": concurrency,
            "hold_time": 30.0,
            "recovery_interval": 5.0,
            "rate_step": 0.5,
            "max_wait": 60.0,
            "min_rate": 0.1,
        }
        values.update(policy)
        self.delivered: list[str] = []
        self.metrics = Metrics()
        self.traffic = TrafficShaping(
            Shaper(ShapingPolicy(**values)), self.clock, metrics=self.metrics
        )
        spool = self.report_spool()
        qm = QueueManager(
            self.store, run_inline, self.spy, self.router, self.clock,
            limits=QueueLimits(destination_concurrency=concurrency), settings=self.settings,
            reporter=Reporter(self.store, spool, run_inline, self.clock, "mta.test"),
            traffic=self.traffic, metrics=self.metrics,
        )  # fmt: skip
        spool.add_listener(qm.committed)
        qm.startService()
        self.addCleanup(qm.stopService)
        return qm

    def send(self, qm: QueueManager, n: int) -> list[str]:
        ids = []
        for i in range(n):
            qid = self.queue(f"user{i}@{DEST}")
            self.commit(qm, qid)
            ids.append(qid)
        return ids

    def answer_waiting(self, reply: Reply, count: int | None = None) -> int:
        """Answer the deliveries in flight (the first C{count}); returns how many."""
        waiting = self.waiting()[:count]
        for index in waiting:
            if reply.positive:
                self.delivered.append(self.spy.calls[index][0].envelope.queue_id)
            self.spy.answer(index, reply)
        return len(waiting)

    def warm_up(self, qm: QueueManager) -> None:
        """A first delivery answered: the destination is proven (all 4 connections)."""
        self.send(qm, 1)
        self.answer_waiting(OK)


class DecreaseTests(ShapingTestCase):
    """A rate reply lowers the destination's limits; only that message is deferred."""

    def test_a_rate_reply_lowers_concurrency_and_rate(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.clock.advance(1)
        ids = self.send(qm, 10)
        self.assertEqual(len(self.waiting()), 4)
        self.clock.advance(1)
        first = self.waiting()[0]
        self.spy.answer(first, GMAIL)
        # 5 starts in the 2 s since the first: 2.5/s measured, halved.
        self.assertEqual(qm.traffic.shaper.effective(DEST), (2, 1.25))
        self.assertTrue(self.logged(
            "example.net: traffic shaping: concurrency 4 -> 2, rate no limit -> 75/min "
            "for at least 30 s, after 421 4.7.28 Gmail has detected an unusual rate"
        ))  # fmt: skip
        self.assertTrue(self.logged("(rule gmail-rate-limited (Gmail))"))
        # The other three in flight were sent under the old limits: no second decrease.
        self.assertEqual(self.answer_waiting(GMAIL, 1), 1)
        self.assertEqual(qm.traffic.shaper.limits[DEST].decreases, 1)
        # The message that got the reply waits for its retry; nothing bounced.
        state, env = self.envelope(ids[0])
        self.assertEqual(state, "deferred")
        self.assertEqual(env.recipients[0].state, RecipientState.DEFERRED)
        self.assertEqual(self.reports_sent(), [])
        text = exposition(self.metrics).decode()
        self.assertIn('mta_shaping_decreases_total{rule="gmail-rate-limited"} 1.0', text)
        self.assertIn('mta_shaping_concurrency_limit{destination="example.net"} 2.0', text)
        self.assertIn('mta_shaping_rate_limit{destination="example.net"} 1.25', text)
        self.assertIn("mta_shaping_destinations 1.0", text)

    def test_the_rate_paces_the_next_deliveries(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.clock.advance(1)
        self.send(qm, 10)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)  # 1.25/s from now on: every 0.8 s
        self.answer_waiting(OK)  # the three in flight succeed
        self.assertEqual(self.waiting(), [])  # the bucket is empty after a decrease
        started = []
        for _ in range(8):
            self.clock.advance(0.4)
            started.append(len(self.waiting()))
            self.answer_waiting(OK)
        self.assertEqual(started, [0, 1, 0, 1, 0, 1, 0, 1])

    def test_concurrency_limits_a_shaped_destination(self) -> None:
        qm = self.shaping_manager(concurrency=8, max_rate=600.0)  # per second
        self.warm_up(qm)
        self.send(qm, 20)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)  # 8 -> 4 connections, 600 -> 300/s
        self.answer_waiting(OK)
        self.clock.advance(1)
        self.assertEqual(len(self.waiting()), 4)
        self.assertEqual(qm.dispatcher.running(DEST), 4)

    def test_replies_that_are_no_signal_change_nothing(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.send(qm, 3)
        self.answer_waiting(Reply(451, "4.3.0", "Try again later"))
        self.answer_waiting(Reply(421, "4.7.27", "rate limited because SPF did not pass"))
        self.assertEqual(qm.traffic.shaper.limits, {})
        self.assertEqual(qm.traffic.spread(DEST), None)


class SpreadTests(ShapingTestCase):
    """The retries of a shaped destination are spread at its rate; jobs that
    would wait too long are deferred, never failed."""

    def test_retries_are_spread(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.clock.advance(1)
        ids = self.send(qm, 4)
        self.clock.advance(1)
        self.answer_waiting(GMAIL)  # all four: one decrease, four deferrals
        self.assertEqual(qm.traffic.shaper.limits[DEST].decreases, 1)
        due = sorted(self.envelope(q)[1].recipients[0].next_attempt or 0 for q in ids)
        gaps = [b - a for a, b in itertools.pairwise(due)]
        # One delivery interval (0.8 s at 1.25/s) apart, after the usual backoff.
        self.assertEqual(due[0], T0 + 2 + 300)
        for gap in gaps:
            self.assertAlmostEqual(gap, 0.8)

    def test_jobs_beyond_max_wait_are_deferred_without_an_attempt(self) -> None:
        qm = self.shaping_manager(max_wait=4.0)
        self.warm_up(qm)
        self.clock.advance(1)
        ids = self.send(qm, 12)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)  # 1.25/s: 5 may wait 4 s
        self.answer_waiting(OK)
        # 12 - 4 started = 8 waited; 5 may wait, 3 are deferred (the newest).
        self.assertEqual(qm.dispatcher.waiting(DEST), 5)
        deferred = [q for q in ids if self.store.locate(q) == "deferred"]
        self.assertEqual(deferred, [ids[0], *ids[-3:]])
        for qid in ids[-3:]:
            rcpt = self.envelope(qid)[1].recipients[0]
            self.assertEqual((rcpt.state, rcpt.attempts), (RecipientState.DEFERRED, 0))
            self.assertIn(
                "delivery temporarily suspended (traffic shaping): 421 4.7.28", rcpt.reply
            )
        self.assertEqual(self.reports_sent(), [])

    def test_a_configured_max_rate_defers_with_its_own_reason(self) -> None:
        qm = self.shaping_manager(max_rate=1.0, max_wait=2.0)  # 1/s
        ids = self.send(qm, 6)
        # Unproven: 2 connections; the bucket holds one second's worth (one start).
        self.assertEqual(len(self.waiting()), 1)
        rcpt = self.envelope(ids[-1])[1].recipients[0]
        self.assertEqual(rcpt.state, RecipientState.DEFERRED)
        self.assertIn("destination rate limit reached ([shaping] max_rate)", rcpt.reply)


class RecoveryTests(ShapingTestCase):
    """After the hold, successes raise the limits a step per interval, then they end."""

    def test_recovery_step_by_step(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.clock.advance(1)
        self.send(qm, 200)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)  # (2, 1.25/s)
        seen = []
        for _ in range(160):
            self.clock.advance(0.5)
            self.answer_waiting(OK)
            seen.append(qm.traffic.shaper.effective(DEST))
        # Held for 30 s, then a step every 5 s: +1 connection, +0.5/s, until
        # back at 4 connections and the 2.5/s measured when the reply came.
        steps = [b for a, b in itertools.pairwise(seen) if a != b]
        self.assertEqual(steps, [(3, 1.75), (4, 2.25), (4, None)])
        self.assertTrue(self.logged("example.net: traffic shaping: concurrency 2 -> 3, rate "
                                    "75/min -> 105/min (deliveries succeed again)"))  # fmt: skip
        self.assertTrue(
            self.logged(
                "example.net: traffic shaping ended (deliveries succeed "
                "again): concurrency 4 -> 4, rate 135/min -> no limit"
            )
        )
        self.assertEqual(qm.traffic.shaper.limits, {})

    def test_every_message_is_delivered_once(self) -> None:
        qm = self.shaping_manager(max_wait=2.0)
        self.warm_up(qm)
        self.clock.advance(1)
        ids = self.send(qm, 30)
        self.clock.advance(1)
        self.answer_waiting(GMAIL)
        for _ in range(2000):
            self.clock.advance(0.5)
            self.answer_waiting(OK)
            if all(self.store.locate(q) == "done" for q in ids):
                break
        for qid in ids:
            state, env = self.envelope(qid)
            self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.SENT))
        self.assertEqual(sorted(self.delivered[1:]), sorted(ids))  # (the first: the warm-up)
        self.assertEqual(self.reports_sent(), [])

    def test_no_timer_left_after_stop(self) -> None:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.send(qm, 10)
        self.spy.answer(self.waiting()[0], GMAIL)
        self.answer_waiting(OK)

        def wakes() -> list[Any]:
            calls = self.clock.getDelayedCalls()
            return [c for c in calls if c.active() and "_woken" in repr(c.func)]

        self.assertEqual(len(wakes()), 1)  # the dispatcher waits for the rate
        qm.stopService()
        self.assertEqual(wakes(), [])


class OperatorTests(ShapingTestCase):
    """C{mtactl queue shaping} as the control socket answers it."""

    def converse(self, qm: QueueManager, request: dict[str, Any]) -> dict[str, Any]:
        proto = ControlProtocol(qm.operator)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(json.dumps(request).encode() + b"\n")
        return dict(json.loads(transport.value()))

    def shaped(self) -> QueueManager:
        qm = self.shaping_manager()
        self.warm_up(qm)
        self.clock.advance(1)
        self.send(qm, 10)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)
        return qm

    def test_the_limits_and_why(self) -> None:
        qm = self.shaped()
        answer = self.converse(qm, {"op": "shaping"})
        self.assertTrue(answer["ok"])
        doc = json.loads(answer["text"])
        self.assertEqual((doc["enabled"], doc["instances"], doc["max_concurrency"]), (True, 1, 4))
        [row] = doc["destinations"]
        self.assertEqual(
            {k: row[k] for k in ("destination", "concurrency", "rate_per_minute", "running",
                                 "waiting", "decreases")},
            {"destination": DEST, "concurrency": 2, "rate_per_minute": 75.0, "running": 3,
             "waiting": 6, "decreases": 1},
        )  # fmt: skip
        self.assertEqual(row["reason"]["reply"], str(GMAIL))
        self.assertEqual((row["reason"]["rule"], row["reason"]["provider"]),
                         ("gmail-rate-limited", "Gmail"))  # fmt: skip
        self.assertEqual((row["since"], row["hold_until"]), (T0 + 2, T0 + 32))

    def test_nothing_shaped(self) -> None:
        qm = self.shaping_manager()
        doc = json.loads(self.successResultOf(handle(qm.operator, {"op": "shaping"})))
        self.assertEqual(doc["destinations"], [])

    def test_reset(self) -> None:
        qm = self.shaped()
        self.assertEqual(
            self.converse(qm, {"op": "shaping", "reset": DEST}),
            {"ok": True, "text": "example.net: traffic-shaping limits ended"},
        )
        self.assertTrue(self.logged("example.net: traffic shaping ended (reset by the mail "
                                    "administrator)"))  # fmt: skip
        again = self.converse(qm, {"op": "shaping", "reset": DEST})
        self.assertEqual(
            again, {"ok": False, "text": "example.net: no traffic-shaping limits to end"}
        )
        self.assertEqual(
            self.converse(qm, {"op": "shaping", "reset": True}),
            {"ok": True, "text": "ended the traffic-shaping limits of 0 destination(s)"},
        )

    def test_bad_requests(self) -> None:
        qm = self.shaping_manager()
        for reset in ("", "  ", 5, False, ["x"]):
            answer = self.converse(qm, {"op": "shaping", "reset": reset})
            self.assertEqual(answer, {"ok": False, "text": "reset needs a destination or true"})
        self.failureResultOf(handle(qm.operator, {"op": "shaping", "reset": 0}), ActionError)
