"""Each destination's limits learnt from its replies (L{mta.queue.shaping}): tables, no reactor.

The time is a number passed in; nothing waits.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mta.config import parse
from mta.delivery.job import RecipientResult
from mta.errors import ErrorKind, Reply
from mta.queue.shaping import (
    RATE_LIMITED,
    Ending,
    Limits,
    Shaper,
    ShapingPolicy,
    Signal,
    Success,
)
from mta.queue.shaping_rules import DEFAULT_RULES, ShapingRule
from mta.service import shaping_policy

T0 = 1_700_000_000.0
GMAIL = Reply(421, "4.7.28", "Gmail has detected an unusual rate of email. rate limited")
TSS04 = Reply(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred")
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "Try again later")
DEST = "gmail.com"


def policy(**overrides: Any) -> ShapingPolicy:
    values: dict[str, Any] = {
        "max_concurrency": 20,
        "min_rate": 0.1,
        "hold_time": 60.0,
        "recovery_interval": 10.0,
        "rate_step": 1.0,
        "max_wait": 30.0,
        "forget_after": 3600.0,
        "spread_window": 1000.0,
    }
    values.update(overrides)
    return ShapingPolicy(**values)


def result(reply: Reply, *, connected: bool = True, kind: ErrorKind = ErrorKind.REMOTE) -> Any:
    return RecipientResult("a@gmail.com", reply, kind, connected=connected)


def shaper(**overrides: Any) -> Shaper:
    counter = itertools.count(1)
    return Shaper(policy(**overrides), token=lambda: f"t{next(counter)}")


def start(s: Shaper, n: int, at: float, dest: str = DEST) -> None:
    """C{n} deliveries started at C{at} (the meter counts them)."""
    for _ in range(n):
        assert s.take(dest, at)


class DecreaseTests(SynchronousTestCase):
    """A signal multiplies the limits down, once per round, to the floors."""

    def test_first_signal_halves_the_ceiling_and_the_measured_rate(self) -> None:
        s = shaper()
        start(s, 50, T0)  # 50 deliveries in the last 5 s: 10 a second
        change = s.observe(DEST, [result(GMAIL)], T0, T0 + 5)
        assert change is not None
        self.assertEqual(change.kind, "decrease")
        self.assertEqual(change.before, (20, None))
        self.assertEqual(change.after, (10, 5.0))
        self.assertEqual(s.concurrency(DEST), 10)
        self.assertEqual(s.rate(DEST), 5.0)
        assert change.reason is not None
        self.assertEqual(
            (change.reason.rule, change.reason.provider), ("gmail-rate-limited", "Gmail")
        )
        self.assertEqual(change.reason.reply, str(GMAIL))
        self.assertEqual((change.hold, change.why), (60.0, "gmail-rate-limited (Gmail)"))
        self.assertEqual(s.limits[DEST].hold_until, T0 + 65)

    def test_a_configured_max_rate_is_the_starting_point(self) -> None:
        s = shaper(max_rate=2.0)
        start(s, 1, T0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        self.assertEqual(s.effective(DEST), (10, 1.0))

    def test_replies_from_deliveries_started_before_the_decrease_count_once(self) -> None:
        s = shaper()
        start(s, 40, T0)
        self.assertIsNotNone(s.observe(DEST, [result(GMAIL)], T0, T0 + 4))
        for _ in range(5):  # the rest of the round: started at T0
            self.assertIsNone(s.observe(DEST, [result(GMAIL)], T0, T0 + 4.5))
        self.assertEqual(s.effective(DEST), (10, 5.0))
        # One started after the decrease, under the new limits: counted.
        change = s.observe(DEST, [result(GMAIL)], T0 + 5, T0 + 6)
        assert change is not None
        self.assertEqual(change.after, (5, 2.5))
        self.assertEqual(s.limits[DEST].decreases, 2)

    def test_floors(self) -> None:
        s = shaper(min_concurrency=2, min_rate=0.5)
        start(s, 10, T0)
        for n in range(10):
            s.observe(DEST, [result(GMAIL)], T0 + n, T0 + n + 0.5)
        self.assertEqual(s.effective(DEST), (2, 0.5))

    def test_the_rules_factors(self) -> None:
        s = shaper()
        start(s, 40, T0)
        s.observe(DEST, [result(TSS04)], T0, T0 + 4)  # Yahoo: a quarter of both
        self.assertEqual(s.effective(DEST), (5, 2.5))
        busy = Reply(421, None, "Too many concurrent connections")
        s.observe("other.example", [result(busy)], T0, T0 + 1)  # the concurrency only
        self.assertEqual(s.effective("other.example"), (10, None))
        self.assertTrue(s.take("other.example", T0 + 1))  # no rate limit: never held

    def test_a_rules_duration(self) -> None:
        rule = ShapingRule("long", codes=("421",), duration=900)
        s = Shaper(policy(rules=(rule, *DEFAULT_RULES)))
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        self.assertEqual(s.limits[DEST].hold_until, T0 + 901)

    def test_no_signal(self) -> None:
        s = shaper()
        for results in (
            [result(LATER)],  # a 4xx that says nothing of rates
            [result(Reply(421, "4.7.27", "rate limited because SPF did not pass"))],  # ignored
            [result(Reply(451, "4.4.1", "Connection refused"), kind=ErrorKind.NETWORK)],
            [result(Reply(550, "5.7.1", "This email has been rate limited"))],
            [],
        ):
            self.assertIsNone(s.observe(DEST, results, T0, T0 + 1), results)
        self.assertEqual(s.limits, {})

    def test_a_greeting_that_refuses_the_session(self) -> None:
        s = shaper()
        busy = Reply(421, None, "mx.example.net Service not available, try again later")
        change = s.observe(DEST, [result(busy, connected=False)], T0, T0 + 1)
        assert change is not None
        assert change.reason is not None
        self.assertEqual(change.reason.rule, "connect-try-again-later")

    def test_the_first_signal_among_the_results_decides(self) -> None:
        s = shaper()
        s.observe(DEST, [result(OK), result(LATER), result(TSS04), result(GMAIL)], T0, T0 + 1)
        self.assertEqual(s.limits[DEST].reason.rule, "yahoo-tss04")

    def test_disabled(self) -> None:
        s = shaper(enabled=False, max_rate=1.0)
        self.assertIsNone(s.observe(DEST, [result(GMAIL)], T0, T0 + 1))
        self.assertEqual(s.effective(DEST), (20, None))
        self.assertTrue(all(s.take(DEST, T0) for _ in range(100)))


class IncreaseTests(SynchronousTestCase):
    """After the hold, each recovery interval with a success adds a step; then the end."""

    def shaped(self, **overrides: Any) -> Shaper:
        s = shaper(**overrides)
        start(s, 40, T0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 4)  # (10, 5.0), held until T0 + 64
        return s

    def test_no_increase_while_held(self) -> None:
        s = self.shaped()
        self.assertIsNone(s.observe(DEST, [result(OK)], T0 + 5, T0 + 63))
        self.assertEqual(s.effective(DEST), (10, 5.0))

    def test_steps_then_the_end(self) -> None:
        s = self.shaped(rate_step=1.0)
        change = s.observe(DEST, [result(OK)], T0 + 60, T0 + 64)
        assert change is not None
        self.assertEqual(
            (change.kind, change.before, change.after), ("increase", (10, 5.0), (11, 6.0))
        )
        # Not again within the recovery interval.
        self.assertIsNone(s.observe(DEST, [result(OK)], T0 + 65, T0 + 70))
        changes = [s.observe(DEST, [result(OK)], T0, T0 + 64 + 10 * n) for n in range(1, 20)]
        kinds = [c.kind for c in changes if c is not None]
        # The rate is back at the measured 10/s after 4 more steps, the
        # concurrency at 20 after 9: then the limits end.
        self.assertEqual(kinds, ["increase"] * 8 + ["end"])
        self.assertEqual(s.effective(DEST), (20, None))
        self.assertEqual(s.limits, {})

    def test_a_signal_during_recovery_decreases_again(self) -> None:
        s = self.shaped()
        s.observe(DEST, [result(OK)], T0 + 60, T0 + 64)  # (11, 6.0)
        change = s.observe(DEST, [result(GMAIL)], T0 + 64, T0 + 65)
        assert change is not None
        self.assertEqual(change.after, (5, 3.0))
        self.assertEqual(s.limits[DEST].hold_until, T0 + 125)

    def test_failures_that_are_no_signal_do_not_increase(self) -> None:
        s = self.shaped()
        self.assertIsNone(s.observe(DEST, [result(LATER)], T0 + 60, T0 + 100))


class PacingTests(SynchronousTestCase):
    """The token bucket, waiting room and spread retries."""

    def test_unshaped_without_a_max_rate_is_never_held(self) -> None:
        s = shaper()
        self.assertTrue(all(s.take(DEST, T0) for _ in range(1000)))
        self.assertEqual(s.next_start(DEST, T0), T0)

    def test_max_rate_paces_every_destination(self) -> None:
        s = shaper(max_rate=2.0)
        self.assertEqual([s.take(DEST, T0) for _ in range(3)], [True, True, False])
        self.assertEqual(s.next_start(DEST, T0), T0 + 0.5)
        self.assertFalse(s.take(DEST, T0 + 0.4))
        self.assertTrue(s.take(DEST, T0 + 0.5))

    def test_a_decrease_empties_the_bucket(self) -> None:
        s = shaper()
        start(s, 10, T0)  # 2/s over 5 s
        s.observe(DEST, [result(GMAIL)], T0, T0 + 5)  # rate 1.0
        self.assertFalse(s.take(DEST, T0 + 5))
        self.assertEqual(s.next_start(DEST, T0 + 5), T0 + 6)
        self.assertTrue(s.take(DEST, T0 + 6))
        self.assertFalse(s.take(DEST, T0 + 6.5))

    def test_no_burst_when_the_limits_end(self) -> None:
        s = shaper(max_rate=10.0)
        start(s, 10, T0)  # the bucket starts full: 10
        s.observe(DEST, [result(GMAIL)], T0, T0 + 0.5)  # 5/s, the bucket empty
        s.reset(DEST, T0 + 1)
        # Back at 10/s, but not with a full second's worth at once.
        self.assertEqual(sum(s.take(DEST, T0 + 1) for _ in range(10)), 5)

    def test_room(self) -> None:
        s = shaper(max_wait=30.0)
        self.assertEqual(s.room(DEST), 2**31)
        start(s, 10, T0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 5)  # 1/s: 30 may wait
        self.assertEqual(s.room(DEST), 30)
        self.assertEqual(shaper(max_wait=0.0, max_rate=0.01).room(DEST), 1)

    def test_held_by(self) -> None:
        s = shaper(max_rate=1.0)
        self.assertEqual(s.held_by(DEST), RATE_LIMITED)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        self.assertEqual(str(s.held_by(DEST)), str(GMAIL))

    def test_retries_are_spread_at_the_lowered_rate(self) -> None:
        s = shaper(spread_window=5.0)
        self.assertEqual(s.retry_at(DEST, T0 + 300), T0 + 300)  # not shaped: unchanged
        start(s, 10, T0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 5)  # 1/s
        slots = [s.retry_at(DEST, T0 + 300) for _ in range(8)]
        self.assertEqual(slots, [T0 + 300 + n for n in range(6)] + [T0 + 300, T0 + 301])
        self.assertEqual(s.retry_at(DEST, T0 + 900), T0 + 900)  # later than the last: as is


class UpkeepTests(SynchronousTestCase):
    """Idle destinations, the operator's reset, several instances."""

    def test_idle_destinations_are_released(self) -> None:
        s = shaper(forget_after=600.0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        self.assertEqual(s.prune(T0 + 500), [])
        s.take(DEST, T0 + 550)  # a delivery started: still in use
        self.assertEqual(s.prune(T0 + 1100), [])
        [change] = s.prune(T0 + 1151)
        self.assertEqual((change.kind, change.why), ("end", "no delivery for a while"))
        self.assertEqual(s.limits, {})

    def test_a_limit_of_connections_only_spreads_nothing(self) -> None:
        s = shaper()
        s.observe(DEST, [result(Reply(421, None, "too many connections"))], T0, T0 + 1)
        self.assertEqual([s.retry_at(DEST, T0 + 300) for _ in range(3)], [T0 + 300] * 3)
        self.assertEqual(s.room(DEST), 2**31)

    def test_prune_forgets_old_measurements(self) -> None:
        s = shaper()
        start(s, 5, T0)
        s.prune(T0 + 60)
        s.observe(DEST, [result(GMAIL)], T0 + 60, T0 + 61)
        self.assertEqual(s.limits[DEST].ceiling_rate, 0.1)  # nothing measured: the floor

    def test_reset(self) -> None:
        s = shaper()
        for dest in ("a.example", "b.example"):
            s.observe(dest, [result(GMAIL)], T0, T0 + 1)
        self.assertEqual([c.destination for c in s.reset("a.example", T0 + 2)], ["a.example"])
        self.assertEqual(s.reset("a.example", T0 + 2), [])
        [change] = s.reset(None, T0 + 3)
        self.assertEqual((change.kind, change.why), ("end", "reset by the mail administrator"))

    def test_apply_an_ending(self) -> None:
        s = shaper()
        self.assertIsNone(s.apply(DEST, Ending("idle"), T0))
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        change = s.apply(DEST, Ending("idle"), T0 + 2)
        assert change is not None
        self.assertEqual(change.kind, "end")

    def test_several_instances_share_the_limits(self) -> None:
        s = shaper()
        s.instances = 3
        start(s, 20, T0)  # 4/s here, about 12/s for the cluster
        s.observe(DEST, [result(GMAIL)], T0, T0 + 5)
        state = s.limits[DEST]
        self.assertEqual((state.concurrency, state.rate), (30.0, 6.0))  # the cluster's
        self.assertEqual(s.effective(DEST), (10, 2.0))  # this instance's share
        s.instances = 40
        self.assertEqual(s.concurrency(DEST), 1)  # at least one each


class DocumentTests(SynchronousTestCase):
    """The state as the instances of a cluster share it."""

    def test_round_trip(self) -> None:
        s = shaper()
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        doc = s.export(DEST)
        assert doc is not None
        self.assertEqual(Limits.from_doc(doc), s.limits[DEST])
        self.assertEqual(doc["token"], "t1")
        self.assertEqual(s.token(DEST), "t1")
        self.assertIsNone(s.export("other.example"))
        self.assertEqual(s.token("other.example"), "")

    def test_not_documents(self) -> None:
        s = shaper()
        s.observe(DEST, [result(GMAIL)], T0, T0 + 1)
        good = s.export(DEST)
        assert good is not None
        for bad in [
            "text",
            {**good, "reason": "x"},
            {**good, "rate": "fast"},
            {**good, "rate": float("nan")},
            {**good, "rate": 0},
            {**good, "version": 1.5},
            {**good, "decreases": True},
            {**good, "token": ""},
            {**good, "reason": {**good["reason"], "rule": 7}},
        ]:
            self.assertRaises(ValueError, Limits.from_doc, bad)

    def test_adopt(self) -> None:
        mine, theirs = shaper(), Shaper(policy(), token=lambda: "other")
        theirs.observe(DEST, [result(TSS04)], T0, T0 + 1)
        change = mine.adopt(DEST, theirs.export(DEST), T0 + 2)
        assert change is not None
        self.assertEqual((change.kind, change.after), ("shared", (5, 0.1)))  # the floor
        self.assertEqual(mine.limits[DEST], theirs.limits[DEST])
        self.assertIsNone(mine.adopt(DEST, theirs.export(DEST), T0 + 3))  # the same: nothing
        ended = mine.adopt(DEST, None, T0 + 4)
        assert ended is not None
        self.assertEqual((ended.kind, ended.why), ("end", "ended by another instance"))
        self.assertIsNone(mine.adopt(DEST, None, T0 + 5))

    def test_a_lost_race_applied_again(self) -> None:
        """An event made on a state the cluster replaced, applied to the cluster's."""
        first, second = shaper(), Shaper(policy(), token=lambda: "second")
        for s in (first, second):
            start(s, 40, T0)
        signal = Signal(DEFAULT_RULES[2], GMAIL, T0)  # gmail-rate-limited
        first.apply(DEST, signal, T0 + 4)
        second.apply(DEST, signal, T0 + 4.5)
        second.adopt(DEST, first.export(DEST), T0 + 5)  # its write lost: take the first's
        self.assertIsNone(second.apply(DEST, signal, T0 + 5))  # same round: nothing more
        self.assertEqual(second.effective(DEST), (10, 5.0))
        self.assertIsNone(second.apply(DEST, Success(), T0 + 5))


class PolicyTests(SynchronousTestCase):
    """The shaper's settings as the daemon builds them from C{[shaping]}, and
    how a destination's limits are described."""

    def test_from_config(self) -> None:
        config = parse(
            {
                "delivery": {"destination_concurrency": 8},
                "queue": {"maximal_backoff_time": 900},
                "shaping": {"max_rate": 120, "min_rate": 3, "rate_step": 30, "hold_time": 5,
                            "rules": [{"name": "mine", "codes": ["421"]}]},
            },
            "mta.toml",
            "/etc/mta",
        )  # fmt: skip
        p = shaping_policy(config)
        self.assertEqual(
            (p.max_concurrency, p.max_rate, p.min_rate, p.rate_step), (8, 2.0, 0.05, 0.5)
        )
        self.assertEqual((p.hold_time, p.spread_window), (5.0, 900.0))
        self.assertEqual(p.rules[0].name, "mine")
        self.assertEqual(p.rules[1:], DEFAULT_RULES)

    def test_describe(self) -> None:
        s = shaper()
        start(s, 40, T0)
        s.observe(DEST, [result(GMAIL)], T0, T0 + 4)
        row = s.describe(DEST, T0 + 5)
        self.assertEqual(
            {k: row[k] for k in ("destination", "concurrency", "max_concurrency",
                                 "rate_per_minute", "max_rate_per_minute", "decreases")},
            {"destination": DEST, "concurrency": 10, "max_concurrency": 20,
             "rate_per_minute": 300.0, "max_rate_per_minute": 600.0, "decreases": 1},
        )  # fmt: skip
        self.assertEqual((row["since"], row["hold_until"]), (T0 + 4, T0 + 64))
        self.assertEqual(row["next_increase"], T0 + 64)
        # 10 more connections at 1 a step: the last at 9 intervals after the first.
        self.assertEqual(row["recovered_by"], T0 + 64 + 9 * 10)
        self.assertEqual(row["reason"]["rule"], "gmail-rate-limited")
