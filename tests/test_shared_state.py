"""The shared-state seam (L{ISharedState}): one contract, in this process and in Redis.

The AUTH throttle and the daily counts are run against L{LocalState} and
against L{RedisState} on a real, private redis-server.  The throttle's
clock is a L{Clock} in both (times are the caller's, never Redis's), so the
windows are tested exactly; the Redis client runs on the real reactor.
Then what only a cluster has: two instances (two clients, two throttles
with their own keys) counting against one Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mta.cluster.local import LocalState
from mta.cluster.redisstate import RedisState
from mta.dailycount import DailyCounter, utc_day
from mta.errors import SharedStateError
from mta.interfaces import ISharedState
from mta.smtp.auth import AuthThrottle, LoginUnavailable, ThrottleSettings
from tests.redisserver import RedisFixture

Gen = Generator[Deferred[Any], Any, None]


class StateContract:
    """What every L{ISharedState} must do, as the throttle and the limit use it."""

    IP = "192.0.2.1"
    clock: Clock
    state: Any

    def make_state(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.state = self.make_state()
        self.throttle = self.throttle_on(self.state)

    def throttle_on(self, state: Any) -> AuthThrottle:
        return AuthThrottle(
            self.clock,
            ThrottleSettings(max_failures=3, window=900, delay=1.0, delay_max=4.0),
            state=state,
        )

    @inlineCallbacks
    def fail(self, n: int, address: str = IP, prefix: str = "guess") -> Gen:
        delays = []
        for i in range(n):
            delays.append(
                (yield self.throttle.failure(address, "alice@example.com", f"{prefix}{i}"))
            )
        return delays

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(ISharedState, self.state))

    @inlineCallbacks
    def test_not_blocked_initially(self) -> Gen:
        self.assertFalse((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_blocked_after_max_distinct_failures(self) -> Gen:
        yield self.fail(2)
        self.assertFalse((yield self.throttle.blocked(self.IP)))
        yield self.fail(1, prefix="other")
        self.assertTrue((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_same_password_counts_once(self) -> Gen:
        """A client retrying one saved wrong password now and then is not locked out..."""
        for _ in range(8):
            yield self.throttle.failure(self.IP, "alice@example.com", "old password")
        self.assertFalse((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_same_password_hammered_is_blocked(self) -> Gen:
        """... but three times max_failures attempts of any kind in the window are."""
        for _ in range(9):
            yield self.throttle.failure(self.IP, "alice@example.com", "old password")
        self.assertTrue((yield self.throttle.blocked(self.IP)))
        self.clock.advance(901)
        self.assertFalse((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_known_failure_skips_the_hash(self) -> Gen:
        yield self.throttle.failure(self.IP, "alice@example.com", "old password", "hash-1")
        t = self.throttle
        self.assertTrue(
            (yield t.known_failure(self.IP, "Alice@Example.com", "old password", "hash-1"))
        )
        # A new stored hash (the password was changed) means: check again.
        self.assertFalse(
            (yield t.known_failure(self.IP, "alice@example.com", "old password", "hash-2"))
        )
        self.assertFalse(
            (yield t.known_failure("192.0.2.99", "alice@example.com", "old password", "hash-1"))
        )
        self.clock.advance(900)
        self.assertFalse(
            (yield t.known_failure(self.IP, "alice@example.com", "old password", "hash-1"))
        )

    @inlineCallbacks
    def test_same_password_other_user_counts(self) -> Gen:
        for user in ["a@example.com", "b@example.com", "c@example.com"]:
            yield self.throttle.failure(self.IP, user, "password1")
        self.assertTrue((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_unblocked_when_window_passes(self) -> Gen:
        yield self.fail(3)
        self.clock.advance(899)
        self.assertTrue((yield self.throttle.blocked(self.IP)))
        self.clock.advance(1)
        self.assertFalse((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_window_slides(self) -> Gen:
        """Each failure expires on its own, window seconds after it."""
        yield self.fail(2, prefix="early")
        self.clock.advance(600)
        yield self.fail(1, prefix="late")
        self.assertTrue((yield self.throttle.blocked(self.IP)))
        self.clock.advance(300)  # the early ones expire
        self.assertFalse((yield self.throttle.blocked(self.IP)))
        yield self.fail(2, prefix="again")
        self.assertTrue((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_other_ips_unaffected(self) -> Gen:
        yield self.fail(3)
        self.assertTrue((yield self.throttle.blocked(self.IP)))
        self.assertFalse((yield self.throttle.blocked("192.0.2.2")))
        self.assertFalse((yield self.throttle.blocked("2001:db8::1")))

    @inlineCallbacks
    def test_ipv6_counted_per_64(self) -> Gen:
        for i in range(3):
            yield self.throttle.failure(f"2001:db8::{i + 1}", "alice@example.com", f"guess{i}")
        self.assertTrue((yield self.throttle.blocked("2001:db8::ffff")))
        self.assertFalse((yield self.throttle.blocked("2001:db8:0:1::1")))

    @inlineCallbacks
    def test_ipv4_mapped_same_as_ipv4(self) -> Gen:
        yield self.fail(3, address="::ffff:192.0.2.1")
        self.assertTrue((yield self.throttle.blocked(self.IP)))

    @inlineCallbacks
    def test_delay_doubles_up_to_max(self) -> Gen:
        self.assertEqual((yield self.fail(5)), [1.0, 2.0, 4.0, 4.0, 4.0])

    @inlineCallbacks
    def test_delay_not_raised_by_repeats(self) -> Gen:
        delays = []
        for _ in range(4):
            delays.append((yield self.throttle.failure(self.IP, "alice@example.com", "same")))
        self.assertEqual(delays, [1.0, 1.0, 1.0, 1.0])

    @inlineCallbacks
    def test_delay_restarts_after_window(self) -> Gen:
        yield self.fail(2)
        self.clock.advance(900)
        self.assertEqual((yield self.fail(1, prefix="new")), [1.0])

    @inlineCallbacks
    def test_zero_delay(self) -> Gen:
        throttle = AuthThrottle(
            self.clock,
            ThrottleSettings(max_failures=3, window=900, delay=0, delay_max=0),
            state=self.state,
        )
        self.assertEqual((yield throttle.failure(self.IP, "a@example.com", "x")), 0)

    @inlineCallbacks
    def test_passwords_not_kept(self) -> Gen:
        """Only keyed hashes of attempts are kept, never the passwords."""
        secret = "correct-horse-battery-staple-42"
        yield self.throttle.failure(self.IP, "alice@example.com", secret)
        kept = repr(vars(self.throttle)) + repr(vars(self.state)) + (yield self.stored())
        self.assertNotIn(secret, kept)

    def stored(self) -> Deferred[str]:
        """Everything the store holds, as text (Redis: every key and value)."""
        raise NotImplementedError

    @inlineCallbacks
    def test_no_timers_left(self) -> Gen:
        """The throttle only reads the clock; it never schedules calls."""
        yield self.fail(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- daily counts ---------------------------------------------------------

    @inlineCallbacks
    def test_daily_counts_add_up(self) -> Gen:
        self.assertEqual((yield self.state.sent_today("a@example.com")), 0)
        self.assertEqual((yield self.state.add_sent("a@example.com", 1)), 1)
        self.assertEqual((yield self.state.add_sent("a@example.com", 3)), 4)
        self.assertEqual((yield self.state.sent_today("a@example.com")), 4)
        self.assertEqual((yield self.state.sent_today("b@example.com")), 0)

    @inlineCallbacks
    def test_daily_counts_start_again_each_utc_day(self) -> Gen:
        self.clock.advance(86400 - self.clock.seconds() % 86400 - 1)  # 23:59:59 UTC
        yield self.state.add_sent("a@example.com", 2)
        self.clock.advance(1)
        self.assertEqual((yield self.state.sent_today("a@example.com")), 0)


class LocalStateTests(StateContract, TestCase):
    """The StateContract on LocalState (the one-process state), and its cap on the number of clients
    it remembers failures for."""

    def make_state(self) -> LocalState:
        return LocalState(DailyCounter(self.mktemp(), self.clock))

    def stored(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        d.callback("")
        return d

    def test_keeps_at_most_max_clients(self) -> None:
        state = self.make_state()
        state.MAX_CLIENTS = 2
        for client in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            state.add_auth_failure(client, b"d", self.clock.seconds(), 900)
        counts = [
            self.successResultOf(state.auth_failures(c, 0)).attempts
            for c in ("192.0.2.1", "192.0.2.2", "192.0.2.3")
        ]
        self.assertEqual(counts, [0, 1, 1])


class RedisStateTests(RedisFixture, StateContract, TestCase):
    """The StateContract on RedisState against a real redis-server, and what only Redis does: day
    keys and failure keys that expire by themselves, two instances counting together, and many
    concurrent increments none of which is lost."""

    def make_state(self) -> RedisState:
        self.prefix = "t" + uuid.uuid4().hex[:12]
        return RedisState(self.client(), self.clock, self.prefix)

    def stored(self) -> Deferred[str]:
        return self.state.client.execute("EVAL", DUMP, 0, self.prefix + ":*").addCallback(repr)

    @inlineCallbacks
    def test_day_keys_expire_by_themselves(self) -> Gen:
        yield self.state.add_sent("a@example.com", 1)
        key = f"{self.prefix}:sent:{utc_day(self.clock.seconds())}:a@example.com"
        ttl = yield self.state.client.execute("PTTL", key)
        self.assertTrue(86400 * 1000 < ttl <= 2 * 86400 * 1000)

    @inlineCallbacks
    def test_failure_keys_expire_a_window_after_the_last_failure(self) -> Gen:
        yield self.fail(1)
        for key in (
            f"{self.prefix}:authfail:{self.IP}:pairs",
            f"{self.prefix}:authfail:{self.IP}:tries",
        ):
            ttl = yield self.state.client.execute("PTTL", key)
            self.assertTrue(899_000 < ttl <= 900_000, (key, ttl))

    @inlineCallbacks
    def test_two_instances_count_together(self) -> Gen:
        """Two instances (their own clients and digest keys) on one Redis: a
        guesser spread over both is blocked on both; a user's count is one."""
        other = RedisState(self.client(), self.clock, self.prefix)
        throttles = [self.throttle, self.throttle_on(other)]
        for i in range(3):
            yield throttles[i % 2].failure(self.IP, "alice@example.com", f"guess{i}")
        for throttle in throttles:
            self.assertTrue((yield throttle.blocked(self.IP)))
        yield self.state.add_sent("a@example.com", 2)
        self.assertEqual((yield other.add_sent("a@example.com", 1)), 3)
        self.assertEqual((yield self.state.sent_today("a@example.com")), 3)

    @inlineCallbacks
    def test_many_concurrent_increments_are_not_lost(self) -> Gen:
        other = RedisState(self.client(), self.clock, self.prefix)
        yield gatherResults(
            [s.add_sent("a@example.com", 1) for s in (self.state, other) for _ in range(50)]
        )
        self.assertEqual((yield self.state.sent_today("a@example.com")), 100)


DUMP = """
local out = {}
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'string' then table.insert(out, redis.call('GET', key))
    elseif kind == 'zset' then
        for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do table.insert(out, m) end
    end
    table.insert(out, key)
end
return out
"""


class RedisDownTests(RedisFixture, TestCase):
    """Redis gone: the throttle and the limit fail closed; back: they work again."""

    @inlineCallbacks
    def test_throttle_fails_closed_and_recovers(self) -> Gen:
        clock = Clock()
        state = RedisState(self.client(retry=0.05), clock, "t" + uuid.uuid4().hex[:12])
        throttle = AuthThrottle(
            clock, ThrottleSettings(max_failures=3, window=900, delay=1, delay_max=4), state=state
        )
        self.assertFalse((yield throttle.blocked("192.0.2.1")))
        self.server.stop()
        try:
            for check in (
                lambda: throttle.blocked("192.0.2.1"),
                lambda: throttle.known_failure("192.0.2.1", "a@example.com", "x", ""),
            ):
                with self.assertRaises(LoginUnavailable) as caught:
                    yield check()
                self.assertEqual(caught.exception.reply.code, 454)
                self.assertEqual(caught.exception.reply.enhanced, "4.3.0")
            # A wrong password that cannot be counted earns the longest delay.
            self.assertEqual((yield throttle.failure("192.0.2.1", "a@example.com", "x")), 4)
            self.flushLoggedErrors()
        finally:
            self.server.start()
        yield deferLater(reactor, 0.1)  # past the retry time
        self.assertFalse((yield throttle.blocked("192.0.2.1")))

    @inlineCallbacks
    def test_daily_count_fails_with_shared_state_error(self) -> Gen:
        state = RedisState(self.client(retry=0.05), Clock(), "t" + uuid.uuid4().hex[:12])
        yield state.add_sent("a@example.com", 1)
        self.server.stop()
        try:
            with self.assertRaises(SharedStateError):
                yield state.sent_today("a@example.com")
            with self.assertRaises(SharedStateError):
                yield state.add_sent("a@example.com", 1)
        finally:
            self.server.start()
        yield deferLater(reactor, 0.1)
        # A restart without persistence lost the count: what the operations doc warns of.
        self.assertEqual((yield state.sent_today("a@example.com")), 0)
