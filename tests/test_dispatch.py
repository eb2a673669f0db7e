"""Which waiting job starts next (L{mta.queue.dispatch}): limits and turns, no reactor."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.errors import Reply
from mta.queue.dispatch import Dispatcher, QueueLimits, Running
from mta.queue.scheduler import Destinations, Suspension

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
