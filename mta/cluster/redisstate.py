"""L{ISharedState} in Redis: every instance of a cluster counts in one place.

Keys (all under C{[cluster] prefix}, C{mta} by default, so that several
sites can share one Redis):

  - C{PREFIX:sent:YYYYMMDD:LOGIN}: a login's units sent that UTC day, an
    integer; it expires two days after its first count, so past days go
    away by themselves.
  - C{PREFIX:authfail:CLIENT:pairs}: a sorted set of the keyed digests of
    wrong (username, password, stored hash) triples from one client key
    (an IPv4 address or an IPv6 /64), each scored by its last time;
    C{PREFIX:authfail:CLIENT:tries}: one member per wrong attempt, scored by
    its time.  Both expire a window after the last failure.
  - C{PREFIX:shape:limits}: a hash of the traffic-shaping document of each
    shaped destination (JSON, L{mta.queue.shaping.Limits.to_doc}), changed
    only by compare-and-set on the document's C{token}; it expires a day
    after its last change.  C{PREFIX:shape:instances}: a sorted set of the
    instances' names, scored by the time each last asked for the limits.

Every change is one Lua script (C{EVAL}), which Redis runs atomically: an
increment and its expiry, or the pruning, adding and counting of a
window, can never be half done or interleaved with another instance's.
Times come from the caller's clock (instances keep their clocks in step
with NTP, as mail servers do anyway), never from Redis.

The digests are keyed per instance (L{mta.smtp.auth.AuthThrottle} makes
its key at start): the same wrong password through two instances counts
as two distinct pairs.  That errs on the strict side, and keeps the key
out of Redis, where anyone who can read Redis could otherwise test guesses
of the wrong passwords at the speed of a fast hash.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mta.cluster import FailureCounts, SharedLimits
from mta.cluster.client import RedisClient
from mta.dailycount import utc_day
from mta.errors import SharedStateError
from mta.interfaces import ISharedState

DAY_KEY_LIFETIME_MS = 2 * 86400 * 1000

ADD_SENT = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return total
"""

ADD_FAILURE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""

COUNT_FAILURES = """
local after = '(' .. ARGV[1]
return {redis.call('ZCOUNT', KEYS[1], after, '+inf'), redis.call('ZCOUNT', KEYS[2], after, '+inf')}
"""


SHAPE_KEY_LIFETIME_MS = 86400 * 1000

SHAPE_LIMITS = """
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {redis.call('ZCARD', KEYS[2]), redis.call('HGETALL', KEYS[1])}
"""

# A stored document that is not one counts as none (token ""): it can be replaced.
SHAPE_CHANGE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local token = ''
if stored then
    local ok, doc = pcall(cjson.decode, stored)
    if ok and type(doc) == 'table' and type(doc['token']) == 'string' then
        token = doc['token']
    end
end
if token ~= ARGV[2] then
    return {0, stored}
end
if ARGV[3] == '' then
    redis.call('HDEL', KEYS[1], ARGV[1])
else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {1, ARGV[3]}
"""


def _score(seconds: float) -> str:
    return repr(float(seconds))


def _int(reply: Any) -> int:
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes) and reply.lstrip(b"-").isdigit():
        return int(reply)
    if reply is None:
        return 0
    raise SharedStateError(f"unexpected reply from Redis: {reply!r:.60}")


def _counts(reply: Any) -> FailureCounts:
    if not (isinstance(reply, list) and len(reply) == 2):
        raise SharedStateError(f"unexpected reply from Redis: {reply!r:.60}")
    return FailureCounts(_int(reply[0]), _int(reply[1]))


def _doc(value: Any) -> Any:
    """A stored shaping document: the JSON object, or what it is when it is not one."""
    if value is None or value == b"":
        return None
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return value


def _shared_limits(reply: Any) -> SharedLimits:
    if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)):
        raise SharedStateError(f"unexpected reply from Redis: {reply!r:.60}")
    flat = reply[1]
    limits = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        if isinstance(name, bytes):
            limits[name.decode("utf-8", "replace")] = _doc(value)
    return SharedLimits(max(1, _int(reply[0])), limits)


def _changed(reply: Any) -> tuple[bool, Any]:
    if not (isinstance(reply, list) and len(reply) in (1, 2)):
        raise SharedStateError(f"unexpected reply from Redis: {reply!r:.60}")
    return _int(reply[0]) == 1, _doc(reply[1] if len(reply) == 2 else None)


@implementer(ISharedState)
class RedisState:
    """The cluster's counts in Redis (see the module's description)."""

    def __init__(self, client: RedisClient, clock: IReactorTime, prefix: str = "mta") -> None:
        self.client = client
        self.clock = clock
        self.prefix = prefix

    def _sent_key(self, login: str) -> str:
        return f"{self.prefix}:sent:{utc_day(self.clock.seconds())}:{login}"

    def _fail_keys(self, client: str) -> tuple[str, str]:
        base = f"{self.prefix}:authfail:{client}"
        return f"{base}:pairs", f"{base}:tries"

    def sent_today(self, login: str) -> Deferred[int]:
        return self.client.execute("GET", self._sent_key(login)).addCallback(_int)

    def add_sent(self, login: str, n: int) -> Deferred[int]:
        d = self.client.execute("EVAL", ADD_SENT, 1, self._sent_key(login), n, DAY_KEY_LIFETIME_MS)
        return d.addCallback(_int)

    def auth_failures(self, client: str, since: float) -> Deferred[FailureCounts]:
        pairs, tries = self._fail_keys(client)
        d = self.client.execute("EVAL", COUNT_FAILURES, 2, pairs, tries, _score(since))
        return d.addCallback(_counts)

    def auth_failed_before(self, client: str, digest: bytes, since: float) -> Deferred[bool]:
        pairs, _ = self._fail_keys(client)

        def recent(score: Any) -> bool:
            if score is None:
                return False
            try:
                return float(score) > since
            except (TypeError, ValueError):
                raise SharedStateError(f"unexpected reply from Redis: {score!r:.60}") from None

        return self.client.execute("ZSCORE", pairs, digest).addCallback(recent)

    def add_auth_failure(
        self, client: str, digest: bytes, when: float, window: float
    ) -> Deferred[FailureCounts]:
        pairs, tries = self._fail_keys(client)
        attempt = f"{_score(when)}:{secrets.token_hex(8)}"
        ttl = max(1, math.ceil(window * 1000))
        d = self.client.execute(
            "EVAL", ADD_FAILURE, 2, pairs, tries,
            digest, _score(when), _score(when - window), ttl, attempt,
        )  # fmt: skip
        return d.addCallback(_counts)

    def destination_limits(
        self, instance: str, now: float, window: float
    ) -> Deferred[SharedLimits]:
        keys = (f"{self.prefix}:shape:limits", f"{self.prefix}:shape:instances")
        ttl = max(1, math.ceil(window * 2000))
        d = self.client.execute(
            "EVAL", SHAPE_LIMITS, 2, *keys, instance, _score(now), _score(now - window), ttl
        )
        return d.addCallback(_shared_limits)

    def destination_change(
        self, destination: str, doc: dict[str, Any] | None, token: str
    ) -> Deferred[tuple[bool, Any]]:
        text = "" if doc is None else json.dumps(doc, separators=(",", ":"))
        d = self.client.execute(
            "EVAL", SHAPE_CHANGE, 1, f"{self.prefix}:shape:limits", destination, token, text,
            SHAPE_KEY_LIFETIME_MS,
        )  # fmt: skip
        return d.addCallback(_changed)

    def close(self) -> Deferred[None]:
        return self.client.close()
