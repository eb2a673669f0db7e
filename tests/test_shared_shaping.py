"""Traffic-shaping limits shared by the instances of a cluster (SPEC section 9).

The C{destination_*} methods of L{ISharedState} are one contract, run
against L{LocalState} and against L{RedisState} on a real, private
redis-server.  Then instances (L{TrafficShaping} each, with its own
L{Shaper}) on one store: a decrease one of them makes is every instance's, a
round of replies seen by two lowers the limits once, and with Redis away
delivery goes on with each instance's own limits until it is back.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.cluster import SharedLimits
from mta.cluster.local import LocalState
from mta.cluster.redisstate import SHAPE_KEY_LIFETIME_MS, RedisState
from mta.dailycount import DailyCounter
from mta.delivery.job import RecipientResult
from mta.errors import ErrorKind, Reply
from mta.queue.shaping import Shaper, ShapingPolicy
from mta.queue.traffic import TrafficShaping
from mta.testing import SwitchableState
from tests.redisserver import RedisFixture

Gen = Generator[Deferred[Any], Any, None]
T0 = 1_700_000_000.0
GMAIL = Reply(421, "4.7.28", "Gmail has detected an unusual rate of email. Rate limited.")
OK = Reply(250, "2.0.0", "Ok")
DEST = "gmail.com"
DOC = {"version": 1, "token": "a1", "concurrency": 10.0}


def results(reply: Reply) -> list[RecipientResult]:
    return [RecipientResult("a@gmail.com", reply, ErrorKind.REMOTE, connected=True)]


class ShapingContract:
    """Compare-and-set of one destination's document; the instances alive."""

    state: Any

    @inlineCallbacks
    def test_create_update_delete(self) -> Gen:
        self.assertEqual((yield self.state.destination_change(DEST, DOC, "")), (True, DOC))
        # A second create loses: it gets the stored document.
        other = {**DOC, "token": "b1"}
        self.assertEqual((yield self.state.destination_change(DEST, other, "")), (False, DOC))
        newer = {**DOC, "version": 2, "token": "a2"}
        self.assertEqual((yield self.state.destination_change(DEST, newer, "b1")), (False, DOC))
        self.assertEqual((yield self.state.destination_change(DEST, newer, "a1")), (True, newer))
        shared = yield self.state.destination_limits("one", T0, 6.0)
        self.assertEqual(shared, SharedLimits(1, {DEST: newer}))
        self.assertEqual((yield self.state.destination_change(DEST, None, "a1")), (False, newer))
        self.assertEqual((yield self.state.destination_change(DEST, None, "a2")), (True, None))
        self.assertEqual((yield self.state.destination_change(DEST, None, "a2")), (False, None))
        self.assertEqual((yield self.state.destination_limits("one", T0, 6.0)).limits, {})

    @inlineCallbacks
    def test_instances_alive_within_the_window(self) -> Gen:
        self.assertEqual((yield self.state.destination_limits("one", T0, 6.0)).instances, 1)
        self.assertEqual((yield self.state.destination_limits("two", T0 + 1, 6.0)).instances, 2)
        self.assertEqual((yield self.state.destination_limits("two", T0 + 5, 6.0)).instances, 2)
        # "one" last asked at T0: gone from a window that starts at T0.
        self.assertEqual((yield self.state.destination_limits("two", T0 + 6, 6.0)).instances, 1)

    @inlineCallbacks
    def test_documents_are_kept_apart_by_destination(self) -> Gen:
        yield self.state.destination_change("a.example", DOC, "")
        yield self.state.destination_change("b.example", {**DOC, "token": "b"}, "")
        shared = yield self.state.destination_limits("one", T0, 6.0)
        self.assertEqual(sorted(shared.limits), ["a.example", "b.example"])
        self.assertEqual(shared.limits["b.example"]["token"], "b")


class LocalShapingTests(ShapingContract, TestCase):
    """The destination-limit methods of L{ISharedState} on one instance's own state."""

    def setUp(self) -> None:
        self.state = LocalState(DailyCounter(self.mktemp(), Clock()))


class RedisShapingTests(RedisFixture, ShapingContract, TestCase):
    """The destination-limit methods of L{ISharedState} on a real Redis."""

    def setUp(self) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.state = RedisState(self.client(), Clock(), self.prefix)

    @inlineCallbacks
    def test_keys(self) -> Gen:
        yield self.state.destination_change(DEST, DOC, "")
        yield self.state.destination_limits("one", T0, 6.0)
        ttl = yield self.state.client.execute("PTTL", f"{self.prefix}:shape:limits")
        self.assertTrue(SHAPE_KEY_LIFETIME_MS - 60_000 < ttl <= SHAPE_KEY_LIFETIME_MS)
        ttl = yield self.state.client.execute("PTTL", f"{self.prefix}:shape:instances")
        self.assertTrue(0 < ttl <= 12_000, ttl)

    @inlineCallbacks
    def test_what_is_not_a_document_can_be_replaced(self) -> Gen:
        yield self.state.client.execute("HSET", f"{self.prefix}:shape:limits", DEST, "{broken")
        shared = yield self.state.destination_limits("one", T0, 6.0)
        self.assertEqual(shared.limits, {DEST: b"{broken"})
        self.assertEqual((yield self.state.destination_change(DEST, DOC, "x")), (False, b"{broken"))
        self.assertEqual((yield self.state.destination_change(DEST, DOC, "")), (True, DOC))


class Instance:
    """One mta instance's traffic shaping on a shared store (a Clock for its time)."""

    def __init__(self, name: str, state: Any, clock: Clock, tokens: Any) -> None:
        policy = ShapingPolicy(max_concurrency=10, hold_time=30.0, recovery_interval=5.0)
        self.shaper = Shaper(policy, token=lambda: f"{name}{next(tokens)}")
        self.traffic = TrafficShaping(
            self.shaper, clock, shared=state, instance=name, sync_interval=2.0
        )

    def limits(self) -> tuple[int, float | None]:
        return self.shaper.effective(DEST)


class ClusterTestCase(SynchronousTestCase):
    """Two instances on one L{LocalState} (answers at once, so the Clock decides)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.state = SwitchableState(LocalState(DailyCounter(self.mktemp(), self.clock)))
        tokens = itertools.count(1)
        self.a = Instance("a", self.state, self.clock, tokens)
        self.b = Instance("b", self.state, self.clock, tokens)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sync(self) -> None:
        for instance in (self.a, self.b):
            instance.traffic.tick()

    def meet(self) -> None:
        """Both instances have seen that there are two."""
        self.sync()
        self.sync()
        self.assertEqual((self.a.shaper.instances, self.b.shaper.instances), (2, 2))

    def logged(self, text: str) -> bool:
        return any(text in formatEvent(e) for e in self.events)

    def stored(self) -> dict[str, Any]:
        return dict(self.successResultOf(self.state.inner.destination_limits("x", 0, 1e12)).limits)


class ClusterTests(ClusterTestCase):
    """Two instances sharing one store: a decrease, a recovery step and an
    end are every instance's, each applying its share; one round of replies
    lowers once; limits learnt while the store is away stay local, and a
    broken or unreachable store is survived."""

    def test_a_decrease_is_every_instances(self) -> None:
        self.meet()  # two instances: each applies half
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.assertEqual(self.a.limits(), (5, 0.05))  # 20 -> 10 for the cluster; the floor
        self.assertEqual(self.b.limits(), (10, None))
        self.b.traffic.tick()
        self.assertEqual(self.b.limits(), (5, 0.05))
        self.assertTrue(self.logged("gmail.com: traffic shaping from another instance: "
                                    "concurrency 10 -> 5"))  # fmt: skip
        self.assertEqual(self.b.shaper.limits[DEST], self.a.shaper.limits[DEST])
        self.assertEqual(self.stored()[DEST]["token"], self.a.shaper.token(DEST))

    def test_one_round_of_replies_seen_by_both_lowers_once(self) -> None:
        self.meet()
        started = self.clock.seconds()
        self.clock.advance(1)
        self.a.traffic.observe(DEST, results(GMAIL), started)
        # b has not synced: it lowers its own limits, loses the race, takes
        # a's state and finds its reply was of the same round.
        self.b.traffic.observe(DEST, results(GMAIL), started)
        for instance in (self.a, self.b):
            self.assertEqual(instance.shaper.limits[DEST].decreases, 1)
            self.assertEqual(instance.limits(), (5, 0.05))
        self.assertEqual(self.stored()[DEST]["decreases"], 1)

    def test_a_reply_of_a_later_round_lowers_again(self) -> None:
        self.meet()
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.clock.advance(1)
        self.b.traffic.observe(DEST, results(GMAIL), self.clock.seconds())  # started after
        self.assertEqual(self.b.shaper.limits[DEST].decreases, 2)
        self.a.traffic.tick()
        self.assertEqual(self.a.shaper.limits[DEST].decreases, 2)
        self.assertEqual(self.a.limits(), (2, 0.05))

    def test_recovery_steps_once_for_the_cluster(self) -> None:
        self.meet()
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.sync()
        self.clock.advance(31)  # past the hold
        started = self.clock.seconds()
        self.a.traffic.observe(DEST, results(OK), started)
        self.b.traffic.observe(DEST, results(OK), started)  # too soon after a's step
        self.assertEqual(self.stored()[DEST]["concurrency"], 11.0)
        self.assertEqual(self.b.shaper.limits[DEST].concurrency, 11.0)

    def test_an_end_is_every_instances(self) -> None:
        self.meet()
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.sync()
        self.assertEqual(self.a.traffic.reset(DEST), 1)
        self.assertEqual(self.stored(), {})
        self.b.traffic.tick()
        self.assertEqual(self.b.shaper.limits, {})
        self.assertTrue(self.logged("gmail.com: traffic shaping ended (ended by another instance)"))


class RedisAwayTests(ClusterTestCase):
    """Delivery goes on with this instance's limits; the cluster's come back."""

    def test_limits_stay_local_while_away_then_are_shared(self) -> None:
        self.meet()
        self.state.down = True
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.assertEqual(self.a.limits(), (5, 0.05))  # applied here at once
        self.sync()  # fails quietly for both
        self.assertEqual(self.b.limits(), (10, None))
        self.assertEqual(self.stored(), {})
        self.state.down = False
        self.a.traffic.tick()  # the cluster does not know it: written
        self.assertEqual(self.stored()[DEST]["token"], self.a.shaper.token(DEST))
        self.b.traffic.tick()
        self.assertEqual(self.b.limits(), (5, 0.05))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_the_clusters_state_wins_over_one_learnt_meanwhile(self) -> None:
        self.meet()
        self.b.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        self.state.down = True
        self.clock.advance(1)
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())  # a knew nothing
        self.state.down = False
        self.a.traffic.tick()
        self.assertEqual(self.a.shaper.limits[DEST], self.b.shaper.limits[DEST])

    def test_a_broken_document_is_replaced(self) -> None:
        self.meet()
        self.a.traffic.observe(DEST, results(GMAIL), self.clock.seconds())
        broken = {"token": "x", "junk": True}
        self.state.destination_change(DEST, broken, self.a.shaper.token(DEST))
        self.a.traffic.tick()
        self.assertTrue(self.logged("ignoring the cluster's traffic-shaping state of gmail.com"))
        self.assertEqual(self.stored()[DEST]["token"], self.a.shaper.token(DEST))


class RealRedisAwayTests(RedisFixture, TestCase):
    """The same with a real redis-server stopped and started again."""

    @inlineCallbacks
    def test_sync_fails_quietly_and_recovers(self) -> Gen:
        clock = Clock()
        clock.advance(T0)
        state = RedisState(self.client(retry=0.05), clock, "t" + uuid.uuid4().hex[:12])
        a = Instance("a", state, clock, itertools.count(1))
        a.traffic.tick()
        yield deferLater(reactor, 0.2)
        self.server.stop()
        try:
            a.traffic.observe(DEST, results(GMAIL), clock.seconds())
            self.assertEqual(a.limits(), (5, 0.1))
            a.traffic.tick()
            yield deferLater(reactor, 0.2)
            self.assertEqual(a.limits(), (5, 0.1))  # still its own
        finally:
            self.server.start()
        yield deferLater(reactor, 0.2)
        a.traffic.tick()
        yield deferLater(reactor, 0.3)
        shared = yield state.destination_limits("a", clock.seconds(), 6.0)
        self.assertEqual(shared.limits[DEST]["token"], a.shaper.token(DEST))
        self.assertEqual(self.flushLoggedErrors(), [])
