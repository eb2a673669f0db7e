"""The queue manager's bookkeeping (L{mta.queue.bookkeeping}), as tables: no reactor."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import Envelope, QueueScan, QueueState
from mta.queue.bookkeeping import CACHE_BYTES, ActiveMessage, Bookkeeping
from mta.spool.queueid import QueueIdGenerator, arrival_of

T0 = 1_700_000_000.0


def ids(n: int) -> list[str]:
    """C{n} queue IDs, one a second from T0, oldest first."""
    times = iter(range(n))
    make = QueueIdGenerator(lambda: T0 + next(times), lambda bits: 0)
    return [make() for _ in range(n)]


def message(queue_id: str) -> ActiveMessage:
    return ActiveMessage(Envelope(queue_id, "s@example.com", [], T0), T0)


class PlacesTests(SynchronousTestCase):
    """Which messages are known, and the room in the active set."""

    def test_known_in_each_place(self) -> None:
        book = Bookkeeping(10)
        book.ready.add("new")
        book.ready.schedule("deferred", T0)
        book.take("active", message("active"), None)
        book.loading.add("loading")
        book.busy.add("busy")
        for queue_id, known in [("new", True), ("deferred", True), ("active", True),
                                ("loading", True), ("busy", True), ("other", False)]:  # fmt: skip
            self.assertEqual(book.known(queue_id), known, queue_id)

    def test_room_counts_active_and_loading(self) -> None:
        book = Bookkeeping(2)
        self.assertTrue(book.has_room())
        book.take("a", message("a"), None)
        self.assertTrue(book.has_room())
        book.loading.add("b")
        self.assertFalse(book.has_room())

    def test_next_ready_while_there_is_room(self) -> None:
        book = Bookkeeping(2)
        for queue_id in ["a", "b", "c"]:
            book.ready.add(queue_id)
        self.assertEqual(book.next_ready(T0), "a")
        book.loading.add("a")
        self.assertEqual(book.next_ready(T0), "b")
        book.loading.add("b")
        self.assertIsNone(book.next_ready(T0), "the active set is full")
        self.assertIn("c", book.ready)

    def test_next_ready_passes_over_one_taken_up_meanwhile(self) -> None:
        book = Bookkeeping(5)
        book.ready.add("a")
        book.ready.add("b")
        book.take("a", message("a"), None)
        self.assertEqual(book.next_ready(T0), "b")
        self.assertIsNone(book.next_ready(T0))


class ScanTests(SynchronousTestCase):
    """The start-up scan, taken in beside what is known already."""

    def test_table(self) -> None:
        book = Bookkeeping(10)
        book.ready.add("committed")
        book.busy.add("acted-on")
        found = QueueScan(
            ready=["r1", "committed", "r2", "acted-on"],
            deferred=[(T0 + 60, "d1"), (T0, "acted-on"), (T0 + 30, "committed")],
        )
        self.assertEqual(book.add_scan(found), 2)
        self.assertEqual([book.ready.next(T0) for _ in range(3)], ["r1", "r2", "committed"])
        self.assertEqual(book.ready.deferred(), ["d1"])
        self.assertEqual(book.ready.due("d1"), T0 + 60)


class FlushAndFilingTests(SynchronousTestCase):
    """The flush mark is spent at the plan; filing puts the message where it waits."""

    def test_pop_flushed(self) -> None:
        book = Bookkeeping(10)
        book.flushed.add("a")
        self.assertEqual([book.pop_flushed("a"), book.pop_flushed("a")], [True, False])

    def test_filed(self) -> None:
        for state, deferred, flushed in [
            (QueueState.DEFERRED, True, True),
            (QueueState.DONE, False, False),
            (QueueState.HOLD, False, False),
            (None, False, False),
        ]:
            book = Bookkeeping(10)
            active = message("a")
            book.take("a", active, None)
            book.flushed.add("a")
            book.filed(active, state, T0 + 5)
            self.assertEqual(book.active, {}, state)
            self.assertEqual(book.ready.due("a"), T0 + 5 if deferred else None, state)
            self.assertEqual("a" in book.flushed, flushed, state)


class CacheTests(SynchronousTestCase):
    """New messages' bytes are kept while they fit, until the message is filed."""

    def test_table(self) -> None:
        book = Bookkeeping(10)
        big, small, late = message("big"), message("small"), message("late")
        book.take("big", big, b"x" * (CACHE_BYTES - 10))
        book.take("small", small, b"y" * 10)
        book.take("late", late, b"z")
        self.assertEqual([m.data is not None for m in (big, small, late)], [True, True, False])
        self.assertEqual(book.cached, CACHE_BYTES)
        book.filed(big, QueueState.DONE, T0)
        self.assertIsNone(big.data)
        self.assertEqual(book.cached, 10)


class CountsTests(SynchronousTestCase):
    """What the metrics show of the manager's messages."""

    def test_counts_oldest_and_idle(self) -> None:
        new, deferred, active, loading = ids(4)
        book = Bookkeeping(10)
        self.assertEqual(book.counts(), {"incoming": 0, "active": 0, "deferred": 0})
        self.assertIsNone(book.oldest_arrival())
        self.assertTrue(book.idle)
        book.ready.schedule(deferred, T0)
        self.assertTrue(book.idle, "a deferred message may wait")
        book.ready.add(new)
        book.take(active, message(active), None)
        book.loading.add(loading)
        self.assertEqual(book.counts(), {"incoming": 1, "active": 2, "deferred": 1})
        self.assertEqual(book.oldest_arrival(), arrival_of(new))
        self.assertFalse(book.idle)
