"""Operator actions on a running queue (L{mta.queue.operator}) and the control socket.

A Clock, a memory store and a delivery spy whose Deferreds the test fires:
so a delivery "in flight" is one the spy has not answered yet.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from mta.controlsocket import ControlProtocol, handle
from mta.envelope import RecipientState
from mta.errors import Reply
from mta.queue.actions import ActionError
from mta.queue.manager import QueueManager
from mta.queue.scheduler import Suspension
from mta.testing import QueuedRunner
from tests.queue_support import LATER, NO_USER, OK, T0, QueueTestCase


class ControlTestCase(QueueTestCase):
    """Shared by the operator action tests: a queue with reports, act() and refused() on the
    operator, a message that failed once and waits 300 s, and the reports it sent."""

    with_reports = True

    def act(self, qm: QueueManager, op: str, queue_id: str) -> str:
        return str(self.successResultOf(qm.operator.act(op, queue_id)))

    def refused(self, d: Deferred[Any]) -> str:
        return str(self.failureResultOf(d, ActionError).value)

    def deferred_message(self, qm: Any, *recipients: str) -> str:
        """A message that failed once and waits 300 s for its next attempt."""
        qid = self.queue(*recipients)
        self.commit(qm, qid)
        self.spy.answer(len(self.spy.calls) - 1, LATER)
        self.assertEqual(self.store.locate(qid), "deferred")
        return qid

    def dsn_reports(self) -> list[Any]:
        return [env for env, _ in self.reports_sent()]


class HoldReleaseTests(ControlTestCase):
    """Hold keeps a message from delivery until release; release keeps its schedule."""

    def test_held_message_is_not_delivered(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.assertEqual(self.act(qm, "hold", qid), f"{qid}: put on hold")
        self.assertEqual(self.store.locate(qid), "hold")
        self.clock.advance(86400)
        self.assertEqual(len(self.spy.calls), 1, "a held message was delivered")
        self.assertEqual(qm.messages.counts()["deferred"], 0)

    def test_release_makes_it_due_again(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.act(qm, "hold", qid)
        self.clock.advance(1000)
        self.assertEqual(self.act(qm, "release", qid), f"{qid}: released")
        self.assertEqual(len(self.spy.waiting), 1, "overdue when released: delivered at once")
        self.spy.answer(1, OK)
        self.assertEqual(self.store.locate(qid), "done")

    def test_release_keeps_a_future_schedule(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.act(qm, "hold", qid)
        self.act(qm, "release", qid)
        self.assertEqual(self.store.locate(qid), "deferred")
        self.clock.advance(299)
        self.assertEqual(len(self.spy.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.spy.calls), 2)

    def test_hold_twice_and_release_of_unheld_are_refused(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.assertIn("it is deferred", self.refused(qm.operator.act("release", qid)))
        self.act(qm, "hold", qid)
        self.assertIn("on hold", self.refused(qm.operator.act("hold", qid)))
        self.assertIn("on hold", self.refused(qm.operator.act("flush", qid)))

    def test_hold_during_delivery_applies_when_it_ends(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        text = self.act(qm, "hold", qid)
        self.assertIn("being delivered", text)
        self.assertEqual(self.store.locate(qid), "active")
        self.spy.answer(0, LATER)
        self.assertEqual(self.store.locate(qid), "hold")
        self.clock.advance(3600)
        self.assertEqual(len(self.spy.calls), 1)

    def test_hold_of_a_message_delivered_meanwhile_leaves_it_done(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.act(qm, "hold", qid)
        self.spy.answer(0, OK)
        self.assertEqual(self.store.locate(qid), "done")


class DeleteTests(ControlTestCase):
    """Delete removes a message, also one in delivery (after the attempt in flight)."""

    def test_delete_deferred(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.assertEqual(self.act(qm, "delete", qid), f"{qid}: deleted")
        self.assertRaises(KeyError, self.store.locate, qid)
        self.clock.advance(86400)
        self.assertEqual(len(self.spy.calls), 1)
        self.assertEqual(self.dsn_reports(), [], "a deleted message gets no report")
        self.assertTrue(self.logged(f"{qid}: removed by the mail administrator"))

    def test_delete_racing_a_delivery_that_succeeds(self) -> None:
        """The delivery in flight finishes; the message is then gone, sent once."""
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.assertIn("being delivered", self.act(qm, "delete", qid))
        self.spy.answer(0, OK)
        self.assertRaises(KeyError, self.store.locate, qid)
        self.clock.advance(86400 * 6)
        self.assertEqual(len(self.spy.calls), 1)
        self.assertEqual(qm.messages.counts(), {"incoming": 0, "active": 0, "deferred": 0})

    def test_delete_racing_a_delivery_that_fails(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.act(qm, "delete", qid)
        self.spy.answer(0, LATER)
        self.assertRaises(KeyError, self.store.locate, qid)
        self.clock.advance(86400)
        self.assertEqual(len(self.spy.calls), 1, "retried after delete")

    def test_delete_withdraws_jobs_not_started(self) -> None:
        """Of two destinations, one job runs and one waits: the waiting one never starts."""
        qm = self.manager(connections=1)
        qid = self.queue("a@one.example", "b@two.example")
        self.commit(qm, qid)
        self.assertEqual(len(self.spy.calls), 1)
        self.act(qm, "delete", qid)
        self.spy.answer(0, OK)
        self.assertEqual(len(self.spy.calls), 1, "the withdrawn job was started")
        self.assertRaises(KeyError, self.store.locate, qid)

    def test_delete_corrupt_and_held(self) -> None:
        qm = self.manager()
        held = self.deferred_message(qm, "bob@example.net")
        self.act(qm, "hold", held)
        self.act(qm, "delete", held)
        self.assertRaises(KeyError, self.store.locate, held)

    def test_unknown_and_malformed_ids(self) -> None:
        qm = self.manager()
        self.assertIn("no message", self.refused(qm.operator.act("delete", "0000000000Z0000")))
        self.assertIn("not a queue ID", self.refused(qm.operator.act("delete", "../x")))
        self.assertIn("unknown action", self.refused(qm.operator.act("explode", "0000000000Z0000")))

    def test_finished_message_is_left_to_retention(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.spy.answer(0, OK)
        self.assertIn("finished", self.refused(qm.operator.act("delete", qid)))


class BounceTests(ControlTestCase):
    """Bounce fails what is pending and sends one report."""

    def test_bounce_deferred_sends_one_report(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net", "carol@example.net")
        self.assertEqual(self.act(qm, "bounce", qid), f"{qid}: bounced to the sender")
        state, env = self.envelope(qid)
        self.assertEqual(state, "done")
        self.assertEqual([r.state for r in env.recipients], [RecipientState.FAILED] * 2)
        self.assertEqual([r.dsn_status for r in env.recipients], ["5.4.7", "5.4.7"])
        self.assertTrue(all(r.final_notified for r in env.recipients))
        self.assertIn("last attempt: 451 4.3.0 Try again later", env.recipients[0].reply)
        [report] = self.dsn_reports()
        self.assertEqual([r.address for r in report.recipients], ["sender@example.com"])
        self.assertTrue(self.logged("status=expired"))
        attempts = [job.envelope.queue_id for job, _ in self.spy.calls[1:]]
        self.assertNotIn(qid, attempts, "a bounced message was tried again")

    def test_bounce_during_delivery(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net", "nobody@example.net")
        self.commit(qm, qid)
        self.assertIn("being delivered", self.act(qm, "bounce", qid))
        self.spy.answer_each(0, [OK, LATER])
        state, env = self.envelope(qid)
        self.assertEqual(state, "done")
        self.assertEqual(
            [r.state for r in env.recipients], [RecipientState.SENT, RecipientState.FAILED]
        )
        [report] = self.dsn_reports()
        self.assertEqual(report.sender, "")

    def test_bounce_held_message(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.act(qm, "hold", qid)
        self.act(qm, "bounce", qid)
        self.assertEqual(self.store.locate(qid), "done")
        self.assertEqual(len(self.dsn_reports()), 1)


class FlushTests(ControlTestCase):
    """Flush makes messages due now and ends destination rests; requeue."""

    def test_flush_one(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.assertEqual(self.act(qm, "flush", qid), f"{qid}: flushed")
        self.assertEqual(len(self.spy.waiting), 1, "not retried at once")
        self.spy.answer(1, OK)
        self.assertEqual(self.store.locate(qid), "done")

    def test_flush_all_ends_suspensions(self) -> None:
        qm = self.manager()
        first = self.deferred_message(qm, "bob@example.net")
        second = self.deferred_message(qm, "carol@example.org")
        gone = Reply(421, "4.4.2", "gone")
        qm.destinations.suspended["example.net"] = Suspension(T0 + 3600, gone, "unreachable")
        self.assertEqual(self.successResultOf(qm.operator.flush()), "flushed 2 deferred message(s)")
        self.assertEqual(qm.destinations.suspended, {})
        self.assertEqual(
            sorted(j.envelope.queue_id for j in self.spy.waiting), sorted([first, second])
        )

    def test_flush_domain(self) -> None:
        qm = self.manager()
        net = self.deferred_message(qm, "bob@example.net")
        self.deferred_message(qm, "carol@example.org")
        text = self.successResultOf(qm.operator.flush("EXAMPLE.net."))
        self.assertEqual(text, "flushed 1 deferred message(s) for EXAMPLE.net.")
        self.assertEqual([j.envelope.queue_id for j in self.spy.waiting], [net])

    def test_flush_during_delivery_retries_right_after(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")
        self.commit(qm, qid)
        self.act(qm, "flush", qid)
        self.spy.answer(0, LATER)
        self.assertEqual(len(self.spy.waiting), 1)

    def test_requeue_repaired_corrupt_message(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.store.unreadable.add(qid)
        qm.operator.flush()  # the manager finds it unreadable and files it as corrupt
        self.assertEqual(self.store.locate(qid), "corrupt")
        self.assertTrue(self.logged(f"{qid}: unreadable envelope, moved to corrupt/"))
        self.assertIn("unreadable", self.refused(qm.operator.act("requeue", qid)))
        self.store.unreadable.discard(qid)  # repaired
        self.assertEqual(self.act(qm, "requeue", qid), f"{qid}: requeued")
        self.spy.answer(len(self.spy.calls) - 1, NO_USER)
        self.assertEqual(self.store.locate(qid), "done")


class CorruptTests(ControlTestCase):
    """A message without its envelope is set aside."""

    def test_missing_envelope_is_set_aside(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        self.store.drop_envelope(qid)
        qm.operator.flush()
        self.assertEqual(self.store.locate(qid), "corrupt")
        self.assertTrue(self.logged(f"{qid}: no envelope, moved to corrupt/"))
        self.assertEqual(qm.messages.counts(), {"incoming": 0, "active": 0, "deferred": 0})


class WhileLoadingTests(ControlTestCase):
    """An action that arrives while the message's envelope is being read."""

    def stepped_manager(self) -> tuple[QueueManager, QueuedRunner]:
        runner = QueuedRunner()
        return self.manager(runner), runner

    def test_hold_of_a_loading_message_that_turns_out_corrupt(self) -> None:
        qid = self.queue("bob@example.net")
        self.store.unreadable.add(qid)
        qm, runner = self.stepped_manager()
        runner.run_next()  # the start-up scan; the load is now waiting
        self.assertEqual(qm.messages.counts()["active"], 1)
        answer = qm.operator.act("hold", qid)
        self.assertNoResult(answer)
        runner.run_all()
        self.assertIn("unreadable", self.refused(answer))
        self.assertEqual(self.store.locate(qid), "corrupt")
        # Repaired and requeued, it is delivered: no stale hold waits for it.
        self.store.unreadable.discard(qid)
        requeued = qm.operator.act("requeue", qid)
        runner.run_all()
        self.assertEqual(self.successResultOf(requeued), f"{qid}: requeued")
        self.assertEqual(len(self.spy.waiting), 1)

    def test_delete_of_a_loading_message_waits_for_its_delivery(self) -> None:
        qid = self.queue("bob@example.net")
        qm, runner = self.stepped_manager()
        runner.run_next()
        answer = qm.operator.act("delete", qid)
        self.assertNoResult(answer)
        runner.run_all()
        self.assertIn("being delivered", self.successResultOf(answer))
        self.spy.answer(0, OK)
        runner.run_all()
        self.assertRaises(KeyError, self.store.locate, qid)


class PickupTests(ControlTestCase):
    """Pickup: a message another process committed (mta-sendmail)."""

    def test_pickup_of_a_message_written_by_another_process(self) -> None:
        qm = self.manager()
        qid = self.queue("bob@example.net")  # written behind the manager's back
        self.assertEqual(self.spy.calls, [])
        self.assertEqual(qm.operator.pickup(qid), f"{qid}: queued")
        self.assertEqual(qm.operator.pickup(qid), f"{qid}: queued")  # twice is harmless
        self.assertEqual(len(self.spy.calls), 1)

    def test_pickup_of_nothing(self) -> None:
        qm = self.manager()
        self.assertRaises(ActionError, qm.operator.pickup, "0000000000Z0000")


class ProtocolTests(ControlTestCase):
    """The control socket: one JSON request, one JSON answer."""

    def converse(self, qm: Any, line: bytes) -> dict[str, Any]:
        proto = ControlProtocol(qm.operator)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(line)
        self.assertTrue(transport.disconnecting)
        reply = json.loads(transport.value())
        self.assertIsInstance(reply, dict)
        return dict(reply)

    def test_requests(self) -> None:
        qm = self.manager()
        qid = self.deferred_message(qm, "bob@example.net")
        ok = self.converse(qm, json.dumps({"op": "hold", "id": qid}).encode() + b"\n")
        self.assertEqual(ok, {"ok": True, "text": f"{qid}: put on hold"})
        again = self.converse(qm, json.dumps({"op": "hold", "id": qid}).encode() + b"\n")
        self.assertFalse(again["ok"])
        self.assertIn("on hold", again["text"])

    def test_bad_requests(self) -> None:
        qm = self.manager()
        for line, words in [
            (b"not json\n", "not JSON"),
            (b"[]\n", "'op'"),
            (b'{"op": "flush"}\n', "ID, a domain or all"),
            (b'{"op": "flush", "domain": "bad domain"}\n', "not a domain"),
            (b'{"op": "hold", "id": 5}\n', "not a queue ID"),
            (b'{"op": "format", "id": "0000000000Z0000"}\n', "unknown action"),
            (b"x" * 5000, "too long"),
        ]:
            reply = self.converse(qm, line)
            self.assertFalse(reply["ok"], line)
            self.assertIn(words, reply["text"])

    def test_ping(self) -> None:
        qm = self.manager()
        text = self.successResultOf(handle(qm.operator, {"op": "ping"}))
        self.assertTrue(text.startswith("pid "))
