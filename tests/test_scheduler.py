"""The queue's decisions (L{mta.queue.scheduler}), as tables: no reactor, no files."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.bounce import Classifier
from mta.config import QueueConfig
from mta.delivery.job import RecipientResult
from mta.envelope import Envelope, QueueState, Recipient, RecipientState
from mta.errors import ErrorKind, Reply
from mta.queue import scheduler
from mta.queue.scheduler import Destinations, ReadyQueue, RetryPolicy

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "Try again later")
NO_USER = Reply(550, "5.1.1", "No such user")
LISTED = Reply(554, "5.7.1", "Client host blocked using zen.spamhaus.org")
REFUSED = Reply(451, "4.4.1", "Connection refused")


def envelope(*addresses: str, arrival: float = T0, sender: str = "s@example.com") -> Envelope:
    return Envelope("0000000000Z0000", sender, [Recipient(a) for a in addresses], arrival)


class RetryPolicyTests(SynchronousTestCase):
    """Postfix's backoff: the time in queue, clamped; never past the lifetime."""

    def test_table(self) -> None:
        policy = RetryPolicy()
        for in_queue, delay in [(0, 300), (299, 300), (600, 600), (3999, 3999), (9000, 4000)]:
            self.assertEqual(policy.next_attempt(T0, T0 + in_queue) - (T0 + in_queue), delay)

    def test_never_past_expiry(self) -> None:
        policy = RetryPolicy(maximal_lifetime=1000)
        self.assertEqual(policy.next_attempt(T0, T0 + 900), T0 + 1000)
        self.assertFalse(policy.expired(T0, T0 + 999))
        self.assertTrue(policy.expired(T0, T0 + 1000))

    def test_jitter_is_applied_to_the_backoff(self) -> None:
        self.assertEqual(RetryPolicy().next_attempt(T0, T0, lambda d: d * 2), T0 + 600)

    def test_from_config(self) -> None:
        config = QueueConfig(minimal_backoff_time=1, maximal_backoff_time=2,
                             maximal_queue_lifetime=3)  # fmt: skip
        self.assertEqual(RetryPolicy.from_config(config), RetryPolicy(1, 2, 3))


class ReadyQueueTests(SynchronousTestCase):
    """New messages in order, due deferred ones by time, the two in turn."""

    def test_new_in_order_then_nothing(self) -> None:
        ready = ReadyQueue()
        for q in "abc":
            ready.add(q)
        self.assertEqual([ready.next(T0) for _ in range(4)], ["a", "b", "c", None])

    def test_first(self) -> None:
        ready = ReadyQueue()
        ready.add("late")
        ready.add_first(["x", "y"])
        ready.add("z", first=True)
        self.assertEqual([ready.next(T0) for _ in range(4)], ["z", "x", "y", "late"])

    def test_deferred_by_due_time_only_when_due(self) -> None:
        ready = ReadyQueue()
        ready.schedule("later", T0 + 20)
        ready.schedule("sooner", T0 + 10)
        self.assertIsNone(ready.next(T0))
        self.assertEqual(ready.next_due(), T0 + 10)
        self.assertEqual(ready.next(T0 + 30), "sooner")
        self.assertEqual(ready.next(T0 + 30), "later")
        self.assertIsNone(ready.next_due())

    def test_new_and_due_take_turns(self) -> None:
        ready = ReadyQueue()
        for q in ("n1", "n2", "n3"):
            ready.add(q)
        for q in ("d1", "d2"):
            ready.schedule(q, T0)
        order = [ready.next(T0) for _ in range(5)]
        self.assertEqual(order, ["n1", "d1", "n2", "d2", "n3"])

    def test_rescheduled_entry_is_void(self) -> None:
        ready = ReadyQueue()
        ready.schedule("m", T0 + 10)
        ready.schedule("m", T0 + 50)
        self.assertIsNone(ready.next(T0 + 20))
        self.assertEqual(ready.next_due(), T0 + 50)
        self.assertEqual(ready.deferred_count, 1)

    def test_take(self) -> None:
        ready = ReadyQueue()
        ready.add("new")
        ready.schedule("old", T0 + 5)
        self.assertEqual(ready.take("new"), (True, None))
        self.assertEqual(ready.take("old"), (False, T0 + 5))
        self.assertEqual(ready.take("gone"), (False, None))
        self.assertNotIn("old", ready)
        self.assertIsNone(ready.next(T0 + 10))

    def test_counts_and_contents(self) -> None:
        ready = ReadyQueue()
        ready.add("a")
        ready.schedule("b", T0)
        self.assertEqual((ready.new_count, ready.deferred_count), (1, 1))
        self.assertEqual(sorted(ready), ["a", "b"])
        self.assertEqual(ready.deferred(), ["b"])
        self.assertEqual(ready.due("b"), T0)
        self.assertIsNone(ready.due("a"))


class DestinationsTests(SynchronousTestCase):
    """Rests end by themselves; a longer rest wins; answers prove a destination."""

    def test_suspension_ends(self) -> None:
        d = Destinations()
        self.assertIsNotNone(d.suspend("x", 100, REFUSED, "unreachable", T0))
        self.assertEqual(d.suspension("x", T0 + 99).why, "unreachable")  # type: ignore[union-attr]
        self.assertIsNone(d.suspension("x", T0 + 100))
        self.assertEqual(d.suspended, {})

    def test_shorter_rest_changes_nothing(self) -> None:
        d = Destinations()
        d.suspend("x", 100, LISTED, "blocklisted", T0)
        self.assertIsNone(d.suspend("x", 50, REFUSED, "unreachable", T0))
        self.assertEqual(d.suspended["x"].why, "blocklisted")
        self.assertIsNone(d.suspend("x", 0, REFUSED, "unreachable", T0), "zero: no rest")

    def test_resume(self) -> None:
        d = Destinations()
        d.suspend("x", 100, REFUSED, "unreachable", T0)
        d.suspend("y", 100, REFUSED, "unreachable", T0)
        d.resume("x")
        self.assertEqual(list(d.suspended), ["y"])
        d.resume()
        self.assertEqual(d.suspended, {})

    def test_proven_for_an_hour(self) -> None:
        d = Destinations()
        self.assertFalse(d.proven("x", T0))
        d.answered("x", T0)
        self.assertTrue(d.proven("x", T0 + scheduler.PROVEN_TIME - 1))
        self.assertFalse(d.proven("x", T0 + scheduler.PROVEN_TIME))

    def test_prune_forgets_what_ended(self) -> None:
        d = Destinations()
        d.suspend("x", 10, REFUSED, "unreachable", T0)
        d.suspend("y", 1000, REFUSED, "unreachable", T0)
        d.prune(T0 + 20, force=True)
        self.assertEqual(list(d.suspended), ["y"])

    def test_learn_from_a_decision(self) -> None:
        """Each row: the decision's answer and rest, whether it is logged, what is known after."""
        unreachable = (300.0, REFUSED, "unreachable")
        shorter = (100.0, LISTED, "blocklisted")
        for answered, suspend, logged, proven, why in [
            (False, None, None, False, None),
            (True, None, None, True, None),
            (False, unreachable, unreachable, False, "unreachable"),
            (True, shorter, None, True, "unreachable"),  # resting longer already
        ]:
            d = Destinations()
            if why is not None and suspend is not unreachable:
                d.suspend("x", *unreachable, T0)
            decision = scheduler.Decision(suspend=suspend, answered=answered)
            self.assertEqual(d.learn("x", decision, T0), logged, (answered, suspend))
            self.assertEqual(d.proven("x", T0), proven)
            rest = d.suspension("x", T0)
            self.assertEqual(rest.why if rest is not None else None, why)


class PlanTests(SynchronousTestCase):
    """Due recipients, grouped by destination and domain, in envelope order."""

    def test_groups(self) -> None:
        env = envelope("a@one.example", "b@two.example", "c@one.example")
        plans = scheduler.plan(env, T0, lambda domain: domain)
        self.assertEqual(
            [(p.destination, p.domain, [r.address for r in p.recipients]) for p in plans],
            [("one.example", "one.example", ["a@one.example", "c@one.example"]),
             ("two.example", "two.example", ["b@two.example"])],
        )  # fmt: skip

    def test_one_relay_several_domains(self) -> None:
        env = envelope("a@one.example", "b@two.example")
        plans = scheduler.plan(env, T0, lambda domain: "[relay]:25")
        self.assertEqual(
            [(p.destination, p.domain) for p in plans],
            [("[relay]:25", "one.example"), ("[relay]:25", "two.example")],
        )

    def test_only_due_and_pending(self) -> None:
        env = envelope("due@x.example", "later@x.example", "sent@x.example", "failed@x.example")
        env.recipients[0].next_attempt = T0
        env.recipients[1].next_attempt = T0 + 1
        env.recipients[2].state = RecipientState.SENT
        env.recipients[3].state = RecipientState.FAILED
        [p] = scheduler.plan(env, T0, lambda domain: domain)
        self.assertEqual([r.address for r in p.recipients], ["due@x.example"])
        [p] = scheduler.plan(env, T0, lambda domain: domain, flushed=True)
        self.assertEqual([r.address for r in p.recipients], ["due@x.example", "later@x.example"])

    def test_nothing_due(self) -> None:
        env = envelope("a@x.example")
        env.recipients[0].state = RecipientState.SENT
        self.assertEqual(scheduler.plan(env, T0, lambda domain: domain), [])


class ApplyTests(SynchronousTestCase):
    """What one job's results mean, recipient by recipient."""

    def decide(
        self,
        env: Envelope,
        results: list[RecipientResult],
        now: float = T0,
        **kw: object,
    ) -> scheduler.Decision:
        settings = kw.pop("settings", QueueConfig())
        return scheduler.apply(
            env, env.recipients, results, now, settings=settings,  # type: ignore[arg-type]
            classifier=Classifier(), **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    def test_table(self) -> None:
        # (reply, kind, in queue, state, status, next attempt after now, category)
        rows = [
            (OK, "remote", 0, RecipientState.SENT, "sent", None, None),
            (LATER, "remote", 0, RecipientState.DEFERRED, "deferred", 300, "greylist"),
            (LATER, "remote", 1000, RecipientState.DEFERRED, "deferred", 1000, "greylist"),
            (LATER, "remote", 5 * 86400, RecipientState.FAILED, "expired", None, "greylist"),
            (NO_USER, "remote", 0, RecipientState.FAILED, "bounced", None, "recipient"),
            (LISTED, "remote", 0, RecipientState.DEFERRED, "deferred", 300, "blocklist"),
            (REFUSED, "network", 0, RecipientState.DEFERRED, "deferred", 300, "network"),
            (Reply(550, "5.1.2", "nx"), "dns", 0, RecipientState.FAILED, "bounced", None, "dns"),
        ]
        for reply, kind, age, state, status, after, category in rows:
            env = envelope("bob@example.net", arrival=T0 - age)
            result = RecipientResult("bob@example.net", reply, kind, "mx[1]:25")
            decision = self.decide(env, [result])
            rcpt = env.recipients[0]
            got_after = None if rcpt.next_attempt is None else rcpt.next_attempt - T0
            self.assertEqual(
                (rcpt.state, decision.outcomes[0].status, got_after, rcpt.category),
                (state, status, after, category),
                str(reply),
            )
            self.assertEqual((rcpt.attempts, rcpt.last_attempt, rcpt.reply), (1, T0, str(reply)))
            self.assertEqual(rcpt.relay, "mx[1]:25")

    def test_failure_and_relayed_notices(self) -> None:
        env = envelope("no@example.net", "ok@example.net", "ok2@example.net")
        env.recipients[1].notify = ("SUCCESS",)
        env.recipients[2].notify = ("SUCCESS",)
        results = [
            RecipientResult("no@example.net", NO_USER, "remote"),
            RecipientResult("ok@example.net", OK, "remote", dsn_passed=False),
            RecipientResult("ok2@example.net", OK, "remote", dsn_passed=True),
        ]
        decision = self.decide(env, results)
        self.assertEqual(
            [(n.recipient.address, n.action) for n in decision.notices],
            [("no@example.net", "failed"), ("ok@example.net", "relayed")],
        )

    def test_no_notices_for_the_null_sender(self) -> None:
        env = envelope("no@example.net", sender="")
        decision = self.decide(env, [RecipientResult("no@example.net", NO_USER, "remote")])
        self.assertEqual(decision.notices, [])

    def test_a_skipped_job_is_no_attempt_and_waits_for_the_rest(self) -> None:
        env = envelope("bob@example.net")
        suspension = scheduler.Suspension(T0 + 1800, LISTED, "blocklisted")
        results = scheduler.suspended_results(env.recipients, suspension)
        self.assertEqual(results[0].kind, ErrorKind.SUSPENDED)
        self.assertEqual(results[0].reply.code, 451)
        self.assertIn("suspended (blocklisted)", str(results[0].reply))
        decision = self.decide(env, results, ran=False, resume=T0 + 1800)
        rcpt = env.recipients[0]
        self.assertEqual((rcpt.attempts, rcpt.next_attempt), (0, T0 + 1800))
        self.assertIsNone(decision.suspend)
        self.assertFalse(decision.answered)

    def test_dead_site_and_blocklist_rest(self) -> None:
        env = envelope("a@x.example", "b@x.example")
        refused = [RecipientResult(r.address, REFUSED, "network") for r in env.recipients]
        self.assertEqual(self.decide(env, refused).suspend, (300.0, REFUSED, "unreachable"))
        env = envelope("a@x.example")
        lost = [RecipientResult("a@x.example", REFUSED, "network", connected=True)]
        self.assertIsNone(self.decide(env, lost).suspend, "it got a session: not dead")
        env = envelope("a@x.example")
        listed = [RecipientResult("a@x.example", LISTED, "remote")]
        settings = QueueConfig(blocklist_rest_time=1234)
        decision = self.decide(env, listed, settings=settings)
        self.assertEqual(decision.suspend, (1234, LISTED, "blocklisted"))
        self.assertTrue(decision.answered)

    def test_a_crashed_delivery_is_a_local_temporary_failure(self) -> None:
        env = envelope("a@x.example", "b@x.example")
        results = scheduler.crashed_results(env.recipients)
        self.assertEqual(
            [(r.address, r.reply, r.kind) for r in results],
            [(r.address, scheduler.INTERNAL_ERROR, ErrorKind.LOCAL) for r in env.recipients],
        )
        self.decide(env, results)
        self.assertEqual([r.state for r in env.recipients], [RecipientState.DEFERRED] * 2)


class FilingTests(SynchronousTestCase):
    """Where a message goes when its round ends."""

    def test_table(self) -> None:
        sent, due_later, due_soon = (RecipientState.SENT, RecipientState.DEFERRED,
                                     RecipientState.DEFERRED)  # fmt: skip
        env = envelope("a@x.example", "b@x.example", "c@x.example")
        env.recipients[0].state = sent
        env.recipients[1].state, env.recipients[1].next_attempt = due_later, T0 + 900
        env.recipients[2].state, env.recipients[2].next_attempt = due_soon, T0 + 300
        self.assertEqual(scheduler.filing(env, T0), (QueueState.DEFERRED, T0 + 300))
        self.assertEqual(scheduler.filing(env, T0, flushed=True), (QueueState.DEFERRED, T0))
        self.assertEqual(scheduler.filing(env, T0, hold=True), (QueueState.HOLD, T0))
        for r in env.recipients:
            r.state = RecipientState.SENT
        self.assertEqual(scheduler.filing(env, T0, hold=True), (QueueState.DONE, T0))

    def test_pending_without_a_time_is_due_now(self) -> None:
        env = envelope("a@x.example")
        self.assertEqual(scheduler.filing(env, T0), (QueueState.DEFERRED, T0))


class NoticeTests(SynchronousTestCase):
    """Reports owed, delay warnings once, administrative bounces."""

    def test_owed_failures(self) -> None:
        env = envelope("a@x.example", "b@x.example", "c@x.example")
        env.recipients[0].state = RecipientState.FAILED
        env.recipients[1].state = RecipientState.FAILED
        env.recipients[1].final_notified = True
        self.assertEqual([n.recipient.address for n in scheduler.owed_notices(env)],
                         ["a@x.example"])  # fmt: skip

    def test_delay_once_after_the_warning_time(self) -> None:
        env = envelope("a@x.example")
        env.recipients[0].state = RecipientState.DEFERRED
        self.assertEqual(scheduler.delay_notices(env, T0 + 3599, 3600), [])
        [notice] = scheduler.delay_notices(env, T0 + 3600, 3600)
        self.assertEqual(notice.action, "delayed")
        scheduler.notified([notice])
        self.assertTrue(env.recipients[0].delay_notified)
        self.assertEqual(scheduler.delay_notices(env, T0 + 7200, 3600), [])
        self.assertEqual(scheduler.delay_notices(envelope("b@x.example"), T0 + 9e9, 0), [])

    def test_expire(self) -> None:
        env = envelope("a@x.example", "b@x.example")
        env.recipients[0].state = RecipientState.SENT
        env.recipients[1].reply = str(LATER)
        [rcpt] = scheduler.expire(env, T0)
        self.assertEqual((rcpt.address, rcpt.state, rcpt.dsn_status),
                         ("b@x.example", RecipientState.FAILED, "5.4.7"))  # fmt: skip
        self.assertIn("last attempt: 451 4.3.0", rcpt.reply or "")

    def test_make_due(self) -> None:
        env = envelope("a@x.example", "b@x.example")
        env.recipients[0].state = RecipientState.SENT
        scheduler.make_due(env, T0 + 5)
        self.assertEqual([r.next_attempt for r in env.recipients], [None, T0 + 5])


class ProgressRecordTests(SynchronousTestCase):
    """Which results go to the journal ahead of the message file, and as what."""

    def test_a_transaction_s_deliveries(self) -> None:
        env = envelope("a@x.example", "b@x.example", "c@x.example", "d@x.example")
        env.recipients[3].notify = ("SUCCESS",)
        env.recipients[1].attempts = 2
        results = [
            RecipientResult("b@x.example", OK, "remote", "mx[1]:25"),
            RecipientResult("c@x.example", NO_USER, "remote"),
            RecipientResult("d@x.example", OK, "remote"),  # owed a relayed notice
            RecipientResult("a@x.example", OK, "remote"),
        ]
        records = scheduler.sent_records(env, env.recipients, results, T0, written={"a@x.example"})
        [record] = records
        r = record.recipient
        self.assertEqual((record.index, r.address, r.state, r.attempts, r.last_attempt),
                         (1, "b@x.example", RecipientState.SENT, 3, T0))  # fmt: skip
        self.assertEqual((r.reply, r.dsn_status, r.relay), (str(OK), "2.0.0", "mx[1]:25"))
        self.assertIsNot(r, env.recipients[1])
        self.assertEqual(env.recipients[1].state, RecipientState.PENDING, "only a copy is marked")

    def test_a_job_s_results_as_applied(self) -> None:
        env = envelope("a@x.example", "b@x.example", "c@x.example")
        env.recipients[2].notify = ("SUCCESS",)
        results = [
            RecipientResult("a@x.example", OK, "remote"),
            RecipientResult("b@x.example", LATER, "remote"),
            RecipientResult("c@x.example", OK, "remote"),  # owed a relayed notice
        ]
        decision = scheduler.apply(env, env.recipients, results, T0, settings=QueueConfig(),
                                   classifier=Classifier())  # fmt: skip
        records = scheduler.progress_records(env, decision, written={"a@x.example"})
        [record] = records
        self.assertEqual((record.index, record.recipient.state), (1, RecipientState.DEFERRED))
        self.assertEqual(record.recipient, env.recipients[1])
        self.assertIsNot(record.recipient, env.recipients[1])
