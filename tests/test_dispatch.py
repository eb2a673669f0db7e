"""Which waiting job starts next (L{mta.queue.dispatch}): limits and turns, no reactor."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.errors import Reply
from mta.queue.dispatch import SHAPED, Dispatcher, QueueLimits, Running
from mta.queue.scheduler import Destinations, Suspension
from mta.queue.shaping import Shaper, ShapingPolicy, Signal

T0 = 1_700_000_000.0


class DispatcherTests(SynchronousTestCase):
    """Per-destination and global limits, the share of unproven destinations, turns."""

    def setUp(self) -> None:
        self.destinations = Destinations()
        self.started: list[tuple[str, Running]] = []
        self.skipped: list[tuple[str, Suspension]] = []

    def dispatcher(self, **limits: int) -> Dispatcher[str]:
        return Dispatcher(QueueLimits(**limits), self.destinations)

    def go(self, d: Dispatcher[str]) -> None:
        d.dispatch(
            lambda: T0,
            lambda job, running: self.started.append((job, running)),
            lambda job, suspension: self.skipped.append((job, suspension)),
        )

    def test_unproven_destination_gets_two(self) -> None:
        d = self.dispatcher(destination_concurrency=20)
        for i in range(5):
            d.add("new.example", f"job{i}")
        self.go(d)
        self.assertEqual([j for j, _ in self.started], ["job0", "job1"])
        self.assertTrue(all(r.unproven for _, r in self.started))

    def test_proven_destination_gets_its_concurrency(self) -> None:
        self.destinations.answered("old.example", T0)
        d = self.dispatcher(destination_concurrency=3)
        for i in range(5):
            d.add("old.example", f"job{i}")
        self.go(d)
        self.assertEqual(len(self.started), 3)
        self.assertEqual(d.running("old.example"), 3)
        d.finished(self.started[0][1])
        self.go(d)
        self.assertEqual(len(self.started), 4)

    def test_global_limit_and_half_for_unproven(self) -> None:
        for name in ("a", "b", "c"):
            self.destinations.answered(f"{name}.proven", T0)
        d = self.dispatcher(connections=4)
        for name in ("a", "b", "c", "x", "y", "z"):
            dest = f"{name}.proven" if name in "abc" else f"{name}.new"
            d.add(dest, name)
        self.go(d)
        # Unproven ones share at most half of the 4 connections.
        self.assertEqual(sorted(j for j, _ in self.started), ["a", "b", "c", "x"])
        self.assertEqual(d.running_total, 4)

    def test_destinations_take_turns(self) -> None:
        for name in ("one", "two"):
            self.destinations.answered(name, T0)
        d = self.dispatcher(connections=4)
        for i in range(3):
            d.add("one", f"one{i}")
            d.add("two", f"two{i}")
        self.go(d)
        self.assertEqual([j for j, _ in self.started], ["one0", "two0", "one1", "two1"])

    def test_resting_destination_is_skipped_at_once(self) -> None:
        rest = Suspension(T0 + 60, Reply(451, "4.4.1", "refused"), "unreachable")
        self.destinations.suspended["down.example"] = rest
        d = self.dispatcher(connections=1)
        for i in range(3):
            d.add("down.example", f"job{i}")
        self.go(d)
        self.assertEqual([j for j, _ in self.skipped], ["job0", "job1", "job2"])
        self.assertEqual(self.started, [])

    def test_withdraw(self) -> None:
        d = self.dispatcher(connections=1)
        for job in ("keep", "drop1", "drop2"):
            d.add("x.example", job)
        self.assertEqual(d.withdraw(lambda job: job.startswith("drop")), 2)
        self.go(d)
        self.assertEqual([j for j, _ in self.started], ["keep"])

    def test_a_callback_that_dispatches_again_does_not_recurse(self) -> None:
        d = self.dispatcher(connections=1)
        for i in range(2000):
            d.add("x.example", f"job{i}")
        depth = [0]

        def start(job: str, running: Running) -> None:
            depth[0] += 1
            d.finished(running)  # finishes at once, like a cached failure
            d.dispatch(lambda: T0, start, lambda job, s: None)

        d.dispatch(lambda: T0, start, lambda job, s: None)
        self.assertEqual(depth[0], 2000)
        self.assertEqual(d.running_total, 0)


class ShapedDispatchTests(SynchronousTestCase):
    """With a shaper: a lowered concurrency, starts paced by the rate, a wake-up
    time, and the jobs beyond what the rate starts within max_wait handed out."""

    def setUp(self) -> None:
        self.destinations = Destinations()
        self.destinations.answered("shaped.example", T0)
        self.started: list[str] = []
        self.skipped: list[tuple[str, Suspension]] = []

    def dispatcher(self, shaper: Shaper) -> Dispatcher[str]:
        return Dispatcher(QueueLimits(destination_concurrency=20), self.destinations, shaper)

    def go(self, d: Dispatcher[str], now: float) -> float | None:
        return d.dispatch(
            lambda: now,
            lambda job, running: self.started.append(job),
            lambda job, suspension: self.skipped.append((job, suspension)),
        )

    def shaped(self, **policy: float) -> Shaper:
        shaper = Shaper(ShapingPolicy(**policy))  # type: ignore[arg-type]
        reply = Reply(421, "4.7.28", "rate limited")
        [rule] = [r for r in shaper.policy.rules if r.name == "gmail-rate-limited"]
        for _ in range(10):  # 10 starts in the last second: 10/s measured
            shaper.take("shaped.example", T0 - 1)
        shaper.apply("shaped.example", Signal(rule, reply, T0), T0)  # 10 conns, 5/s
        return shaper

    def test_unshaped_destinations_are_not_held(self) -> None:
        d = self.dispatcher(Shaper())
        for i in range(30):
            d.add("other.example", f"job{i}")
        self.destinations.answered("other.example", T0)
        self.assertIsNone(self.go(d, T0))
        self.assertEqual(len(self.started), 20)

    def test_the_rate_paces_and_says_when_to_come_back(self) -> None:
        d = self.dispatcher(self.shaped())
        for i in range(8):
            d.add("shaped.example", f"job{i}")
        self.assertEqual(self.go(d, T0), T0 + 0.2)  # the bucket is empty after a decrease
        self.assertEqual(self.started, [])
        self.assertEqual(self.go(d, T0 + 0.2), T0 + 0.4)
        self.assertEqual(self.started, ["job0"])
        self.assertEqual(self.go(d, T0 + 1.2), T0 + 1.4)  # a second's worth: 5 tokens
        self.assertEqual(self.started, [f"job{i}" for i in range(6)])
        self.assertEqual(self.skipped, [])
        self.assertIsNone(self.go(d, T0 + 10))
        self.assertEqual(len(self.started), 8)

    def test_the_concurrency_is_lowered(self) -> None:
        d = self.dispatcher(self.shaped(max_wait=100.0))
        for i in range(30):
            d.add("shaped.example", f"job{i}")
        self.go(d, T0 + 100)  # the bucket holds 5
        self.go(d, T0 + 200)
        self.assertEqual(d.running("shaped.example"), 10)
        self.assertEqual(d.concurrency("shaped.example"), 10)

    def test_jobs_beyond_max_wait_are_handed_out_newest_first(self) -> None:
        d = self.dispatcher(self.shaped(max_wait=1.0))  # 5/s: 5 may wait
        for i in range(8):
            d.add("shaped.example", f"job{i}")
        self.go(d, T0)
        self.assertEqual([job for job, _ in self.skipped], ["job7", "job6", "job5"])
        [why] = {s.why for _, s in self.skipped}
        self.assertEqual(why, SHAPED)
        self.assertEqual(str(self.skipped[0][1].reason), "421 4.7.28 rate limited")
        self.assertEqual(d.waiting("shaped.example"), 5)

    def test_a_resting_destination_is_not_paced(self) -> None:
        shaper = self.shaped()
        rest = Suspension(T0 + 60, Reply(451, "4.4.1", "refused"), "unreachable")
        self.destinations.suspended["shaped.example"] = rest
        d = self.dispatcher(shaper)
        for i in range(3):
            d.add("shaped.example", f"job{i}")
        self.assertIsNone(self.go(d, T0))
        self.assertEqual([s.why for _, s in self.skipped], ["unreachable"] * 3)
