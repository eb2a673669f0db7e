"""Traffic shaping: each destination's limits, learnt from what it answers.

No Twisted and no I/O; every call gets the time.  The dispatcher
(L{mta.queue.dispatch}) asks L{Shaper} how many connections a destination
may have and whether a delivery may start now; the queue manager tells it
each job's results (through L{mta.queue.traffic}, which logs, counts and
shares the changes).

Additive increase, multiplicative decrease, per destination (the key the
dispatcher groups jobs by):

  - A failed result whose reply matches a rule of
    L{mta.queue.shaping_rules} (a I{signal}) multiplies the destination's
    concurrency and message rate by the rule's factors, down to
    C{min_concurrency} and C{min_rate}, and holds them for the rule's
    duration.  The first signal starts from the ceilings: C{[delivery]
    destination_concurrency} and C{[shaping] max_rate}; without a
    C{max_rate}, a destination has no rate limit until a rule lowers its
    rate, which then starts from the rate the destination was getting
    (measured over L{METER_WINDOW}), its ceiling from then on.  A
    signal from a delivery that started before the last decrease is not
    counted again: it was sent under the old limits, and one round of
    replies must lower the limits once, not once per connection.
  - After the hold, every C{recovery_interval} in which a delivery
    succeeds adds C{concurrency_step} and C{rate_step}; when both are back
    at their ceilings the destination's limits end.  A destination with no
    delivery for C{forget_after} is released too.
  - The rate is a token bucket of one second's worth of starts (at least
    one); L{Shaper.take} spends a token, L{Shaper.next_start} says when the
    next one is there.
  - Retries are spread: the deferred messages of a shaped destination are
    given attempt times at least one delivery interval (1 / rate) apart
    (L{Shaper.retry_at}), so they do not all come back at the instant the
    limit recovers; and jobs that would wait longer than C{max_wait} for the
    rate are deferred instead of holding the queue's active set
    (L{Shaper.room}).

Shaping never fails a message: a shaped job waits, or is deferred like any
temporary failure, and its retry times stay within the queue lifetime.

With several instances (C{[cluster] redis}) the limits are the cluster's:
each instance applies its share (L{Shaper.instances}), and the state of
each destination travels as a document (L{Limits.to_doc}) that
L{mta.queue.traffic} keeps in step with the other instances.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mta.bounce import parse_reply
from mta.delivery.job import RecipientResult
from mta.errors import Reply
from mta.queue.shaping_rules import DEFAULT_RULES, IGNORE, ShapingRule, find, stage_of

#: Seconds over which the start rate of a destination is measured.
METER_WINDOW = 10.0
METER_SAMPLES = 4096
PER_MINUTE = 60.0
#: What a job deferred for a configured rate limit (no receiver's reply) says.
RATE_LIMITED = Reply(451, "4.4.5", "destination rate limit reached ([shaping] max_rate)")


@dataclass(frozen=True)
class ShapingPolicy:
    """The settings of L{Shaper}; rates in messages per second."""

    enabled: bool = True
    max_concurrency: int = 20
    max_rate: float = 0.0  # 0: none until a receiver asks for less
    min_concurrency: int = 1
    min_rate: float = 0.1
    decrease_factor: float = 0.5
    hold_time: float = 300.0
    concurrency_step: int = 1
    rate_step: float = 0.5
    recovery_interval: float = 60.0
    max_wait: float = 60.0
    forget_after: float = 3600.0
    spread_window: float = 4000.0
    rules: tuple[ShapingRule, ...] = DEFAULT_RULES


@dataclass(frozen=True)
class Reason:
    """The reply that lowered a destination's limits, the rule that read it, and when."""

    reply: str
    rule: str
    provider: str
    at: float


@dataclass(frozen=True)
class Limits:
    """A shaped destination's state; the numbers are the cluster's (for all
    instances together), L{Shaper} applies its share.  C{rate} is None while
    there is no rate limit; C{ceiling_rate} is the rate at which the limits
    end (None with C{rate}); C{version} counts its changes and
    C{token} names this one (random: the instances compare and set on it)."""

    concurrency: float
    rate: float | None
    ceiling_rate: float | None
    since: float
    changed: float
    decreased: float
    hold_until: float
    reason: Reason
    decreases: int = 0
    version: int = 0
    token: str = ""

    def to_doc(self) -> dict[str, Any]:
        """A JSON-ready document, to share with the other instances."""
        reason = self.reason
        return {
            "version": self.version,
            "token": self.token,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "ceiling_rate": self.ceiling_rate,
            "since": self.since,
            "changed": self.changed,
            "decreased": self.decreased,
            "hold_until": self.hold_until,
            "decreases": self.decreases,
            "reason": {
                "reply": reason.reply,
                "rule": reason.rule,
                "provider": reason.provider,
                "at": reason.at,
            },
        }

    @classmethod
    def from_doc(cls, doc: object) -> Limits:
        """The inverse of L{to_doc}; C{ValueError} for a document that is not one."""
        if not isinstance(doc, dict) or not isinstance(doc.get("reason"), dict):
            raise ValueError(f"not a shaping document: {doc!r:.80}")
        why = doc["reason"]
        reason = Reason(
            _text(why.get("reply"), "reason.reply"), _text(why.get("rule"), "reason.rule"),
            _text(why.get("provider"), "reason.provider"), _number(why.get("at"), "reason.at"),
        )  # fmt: skip
        limits = cls(
            _number(doc.get("concurrency"), "concurrency"), _maybe(doc.get("rate"), "rate"),
            _maybe(doc.get("ceiling_rate"), "ceiling_rate"), _number(doc.get("since"), "since"),
            _number(doc.get("changed"), "changed"), _number(doc.get("decreased"), "decreased"),
            _number(doc.get("hold_until"), "hold_until"), reason,
            _whole(doc.get("decreases"), "decreases"), _whole(doc.get("version"), "version"),
            _text(doc.get("token"), "token"),
        )  # fmt: skip
        rates = (limits.rate, limits.ceiling_rate)
        if (rates[0] is None) != (rates[1] is None) or any(r is not None and r <= 0 for r in rates):
            raise ValueError(f"not a shaping document (rates): {doc!r:.80}")
        if limits.concurrency <= 0 or not limits.token:
            raise ValueError(f"not a shaping document (limits, token): {doc!r:.80}")
        return limits


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number in a shaping document, got {value!r:.40}")
    return float(value)


def _maybe(value: object, key: str) -> float | None:
    return None if value is None else _number(value, key)


def _whole(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer in a shaping document, got {value!r:.40}")
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string in a shaping document, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class Signal:
    """A receiver's reply that a rule reads as "slow down"."""

    rule: ShapingRule
    reply: Reply
    started: float  # when the delivery that got it started


@dataclass(frozen=True)
class Success:
    """A delivery to the destination succeeded."""


@dataclass(frozen=True)
class Ending:
    """The limits end without the destination's say: idle, or the operator's reset."""

    why: str


Event = Signal | Success | Ending


@dataclass(frozen=True)
class Change:
    """What an event did to a destination's limits (for the log, the metrics
    and the cluster).  C{before} and C{after} are this instance's
    (concurrency, messages per second or None for no rate limit).  C{kind}
    is C{decrease}, C{increase}, C{end} or C{shared} (taken from another
    instance).  C{base} is the token of the state the change was made on
    ("" for none); C{event} is what made it, to apply again after losing a
    race with another instance."""

    destination: str
    kind: str
    before: tuple[int, float | None]
    after: tuple[int, float | None]
    reason: Reason | None
    why: str
    base: str
    event: Event | None = None
    hold: float = 0.0


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Meter:
    """Starts within the last L{METER_WINDOW} seconds."""

    created: float
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=METER_SAMPLES))

    def tick(self, now: float) -> None:
        self.starts.append(now)

    def rate(self, now: float) -> float:
        starts = self.starts
        while starts and starts[0] <= now - METER_WINDOW:
            starts.popleft()
        if not starts:
            return 0.0
        if len(starts) == starts.maxlen:
            span = now - starts[0]
        else:
            span = min(METER_WINDOW, now - self.created)
        return len(starts) / max(span, 1.0)


class Shaper:
    """The limits of every destination (see the module docstring)."""

    def __init__(
        self,
        policy: ShapingPolicy | None = None,
        token: Callable[[], str] = lambda: secrets.token_hex(8),
    ) -> None:
        self.policy = policy or ShapingPolicy()
        self._token = token
        #: How many instances share the limits (L{mta.queue.traffic} learns it).
        self.instances = 1
        self.limits: dict[str, Limits] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._meters: dict[str, _Meter] = {}
        self._slots: dict[str, float] = {}  # the last retry time handed out
        self._active: dict[str, float] = {}  # the last start or result of a shaped one

    # -- what the dispatcher asks -------------------------------------------------

    def concurrency(self, dest: str) -> int:
        """Connections this instance may have to C{dest} at once."""
        ceiling = self.policy.max_concurrency
        state = self.limits.get(dest)
        if state is None or not self.policy.enabled:
            return ceiling
        return max(1, min(ceiling, math.floor(state.concurrency / self.instances + 1e-9)))

    def rate(self, dest: str) -> float | None:
        """Deliveries a second this instance may start to C{dest} (None: any)."""
        policy = self.policy
        if not policy.enabled:
            return None
        state = self.limits.get(dest)
        if state is not None:
            return None if state.rate is None else state.rate / self.instances
        return policy.max_rate or None

    def take(self, dest: str, now: float) -> bool:
        """May a delivery to C{dest} start now?  If so it is counted as started."""
        rate = self.rate(dest)
        if rate is not None:
            bucket = self._bucket(dest, rate, now)
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
        meter = self._meters.get(dest)
        if meter is None:
            meter = self._meters[dest] = _Meter(now)
        meter.tick(now)
        if dest in self.limits:
            self._active[dest] = now
        return True

    def _bucket(self, dest: str, rate: float, now: float) -> _Bucket:
        capacity = max(1.0, rate)
        bucket = self._buckets.get(dest)
        if bucket is None:
            bucket = self._buckets[dest] = _Bucket(capacity, now)
        elapsed = max(0.0, now - bucket.at)
        bucket.tokens = min(capacity, bucket.tokens + elapsed * rate)
        bucket.at = now
        return bucket

    def next_start(self, dest: str, now: float) -> float:
        """When L{take} will next say yes for C{dest} (now, if it would now)."""
        rate = self.rate(dest)
        if rate is None:
            return now
        bucket = self._bucket(dest, rate, now)
        return now + max(0.0, 1.0 - bucket.tokens) / rate

    def room(self, dest: str) -> int:
        """Jobs that may wait for C{dest}'s rate; more are deferred (C{max_wait})."""
        rate = self.rate(dest)
        if rate is None:
            return 2**31
        return max(1, math.ceil(rate * self.policy.max_wait))

    def held_by(self, dest: str) -> Reply:
        """Why jobs deferred for C{dest}'s rate wait: the receiver's reply, or our limit."""
        state = self.limits.get(dest)
        if state is None:
            return RATE_LIMITED
        try:
            return parse_reply(state.reason.reply)
        except ValueError:
            return RATE_LIMITED

    def retry_at(self, dest: str, when: float) -> float:
        """A retry time for a message deferred to C{dest} at the earliest C{when}:
        at least one delivery interval after the last one handed out, within
        C{spread_window} of C{when}."""
        rate = self.rate(dest)
        if rate is None or dest not in self.limits:
            return when  # a limit of connections only: no rate to spread at
        slot = max(when, self._slots.get(dest, 0.0) + 1.0 / rate)
        if slot - when > self.policy.spread_window:
            slot = when
        self._slots[dest] = slot
        return slot

    # -- what deliveries say --------------------------------------------------------

    def event_of(self, results: Sequence[RecipientResult], started: float) -> Event | None:
        """A job's results as one event: the first signal, else a success, else None."""
        seen: set[tuple[Reply, str]] = set()  # recipients of a job mostly share a reply
        for result in results:
            stage = stage_of(result)
            if stage is None or (result.reply, stage) in seen:
                continue
            seen.add((result.reply, stage))
            rule = find(self.policy.rules, result.reply, stage)
            if rule is not None:
                return None if rule.action == IGNORE else Signal(rule, result.reply, started)
        if any(r.ok for r in results):
            return Success()
        return None

    def observe(
        self, dest: str, results: Sequence[RecipientResult], started: float, now: float
    ) -> Change | None:
        """Learn from a job's results (see L{event_of} and L{apply})."""
        if not self.policy.enabled:
            return None
        if dest in self.limits:
            self._active[dest] = now
        event = self.event_of(results, started)
        return None if event is None else self.apply(dest, event, now)

    def apply(self, dest: str, event: Event, now: float) -> Change | None:
        """What C{event} does to C{dest}'s limits; None if nothing changed."""
        if isinstance(event, Signal):
            return self._decrease(dest, event, now)
        if isinstance(event, Success):
            return self._increase(dest, event, now)
        if dest in self.limits:
            return self._end(dest, event.why, now, event)
        return None

    def _decrease(self, dest: str, signal: Signal, now: float) -> Change | None:
        policy, rule, state = self.policy, signal.rule, self.limits.get(dest)
        if state is not None and signal.started < state.decreased:
            return None  # sent under the old limits: this round was counted
        before = self.effective(dest)
        if state is None:
            state = self._first(now)
        f_c = policy.decrease_factor if rule.concurrency is None else rule.concurrency
        f_r = policy.decrease_factor if rule.rate is None else rule.rate
        hold = policy.hold_time if rule.duration is None else rule.duration
        rate, ceiling = state.rate, state.ceiling_rate
        if rate is None and f_r < 1:
            rate = ceiling = self._measured(dest, now)  # the rate that drew the signal
        self.limits[dest] = replace(
            state, concurrency=max(float(policy.min_concurrency), state.concurrency * f_c),
            rate=None if rate is None else max(policy.min_rate, rate * f_r), ceiling_rate=ceiling,
            changed=now, decreased=now, hold_until=max(state.hold_until, now + hold),
            reason=Reason(str(signal.reply), rule.name, rule.provider, now),
            decreases=state.decreases + 1, version=state.version + 1, token=self._token(),
        )  # fmt: skip
        bucket = self._buckets.get(dest)
        if bucket is not None:
            bucket.tokens, bucket.at = 0.0, now
        else:
            self._buckets[dest] = _Bucket(0.0, now)
        self._active[dest] = now
        return Change(dest, "decrease", before, self.effective(dest), self.limits[dest].reason,
                      rule.describe(), state.token, signal, hold)  # fmt: skip

    def _first(self, now: float) -> Limits:
        """The state a destination's first signal decreases: the ceilings."""
        policy, n = self.policy, self.instances
        top = policy.max_rate * n if policy.max_rate else None
        nobody = Reason("", "", "", now)
        return Limits(float(policy.max_concurrency * n), top, top, now, now, now, now, nobody)

    def _measured(self, dest: str, now: float) -> float:
        """The rate C{dest} was getting (the cluster's, estimated), at least C{min_rate}."""
        meter = self._meters.get(dest)
        observed = meter.rate(now) * self.instances if meter is not None else 0.0
        return max(observed, self.policy.min_rate)

    def _increase(self, dest: str, event: Success, now: float) -> Change | None:
        policy, state = self.policy, self.limits.get(dest)
        if state is None:
            return None
        if now < state.hold_until or now < state.changed + policy.recovery_interval:
            return None
        top = float(policy.max_concurrency * self.instances)
        concurrency = min(top, state.concurrency + policy.concurrency_step)
        rate, ceiling = state.rate, state.ceiling_rate
        if rate is not None and ceiling is not None:
            rate = min(ceiling, rate + policy.rate_step)
        if concurrency >= top and (rate is None or ceiling is None or rate >= ceiling):
            return self._end(dest, "deliveries succeed again", now, event)
        before = self.effective(dest)
        self.limits[dest] = replace(
            state, concurrency=concurrency, rate=rate, changed=now, version=state.version + 1,
            token=self._token(),
        )  # fmt: skip
        return Change(dest, "increase", before, self.effective(dest), state.reason,
                      "deliveries succeed again", state.token, event)  # fmt: skip

    def _end(self, dest: str, why: str, now: float, event: Event | None) -> Change:
        before = self.effective(dest)
        state = self.limits.pop(dest)
        # The bucket stays: it fills at the new rate, no burst at the end.
        self._slots.pop(dest, None)
        self._active.pop(dest, None)
        return Change(dest, "end", before, self.effective(dest), state.reason, why,
                      state.token, event)  # fmt: skip

    def effective(self, dest: str) -> tuple[int, float | None]:
        """This instance's (concurrency, rate) for C{dest} now."""
        return self.concurrency(dest), self.rate(dest)

    # -- upkeep, the operator, the cluster ------------------------------------------------

    def prune(self, now: float) -> list[Change]:
        """Release destinations idle for C{forget_after}; forget old measurements."""
        changes = []
        for dest, state in list(self.limits.items()):
            last = max(state.changed, self._active.get(dest, 0.0))
            if last <= now - self.policy.forget_after:
                changes.append(self._end(dest, "no delivery for a while", now, Ending("idle")))
        for dest, meter in list(self._meters.items()):
            if meter.rate(now) == 0.0:
                del self._meters[dest]
        for dest in [d for d in self._buckets if d not in self.limits]:
            if self._buckets[dest].tokens >= max(1.0, self.policy.max_rate):
                del self._buckets[dest]  # full again: as good as a new one
        return changes

    def reset(self, dest: str | None, now: float) -> list[Change]:
        """End the limits of one destination, or of all (C{mtactl queue shaping --reset})."""
        names = list(self.limits) if dest is None else [dest] if dest in self.limits else []
        ending = Ending("reset by the mail administrator")
        return [self._end(name, ending.why, now, ending) for name in names]

    def export(self, dest: str) -> dict[str, Any] | None:
        """C{dest}'s state as a document for the cluster (None: not shaped)."""
        state = self.limits.get(dest)
        return None if state is None else state.to_doc()

    def token(self, dest: str) -> str:
        """The token of C{dest}'s state ("" when it is not shaped)."""
        state = self.limits.get(dest)
        return "" if state is None else state.token

    def adopt(self, dest: str, doc: object, now: float) -> Change | None:
        """Take the cluster's state of C{dest} (None: not shaped); C{ValueError}
        for a document that is not one.  None when it changes nothing here."""
        if doc is None:
            if dest not in self.limits:
                return None
            return self._end(dest, "ended by another instance", now, None)
        state = Limits.from_doc(doc)
        current = self.limits.get(dest)
        if current is not None and current.token == state.token:
            return None
        before = self.effective(dest)
        self.limits[dest] = state
        self._active.setdefault(dest, now)
        after = self.effective(dest)
        return Change(dest, "shared", before, after, state.reason, "from another instance",
                      "" if current is None else current.token)  # fmt: skip

    # -- for people ------------------------------------------------------------------

    def describe(self, dest: str, now: float) -> dict[str, Any]:
        """A shaped destination for C{mtactl queue shaping} (rates per minute)."""
        policy, state = self.policy, self.limits[dest]
        concurrency, rate = self.effective(dest)
        n = self.instances
        rate_left = (state.ceiling_rate or 0.0) - (state.rate or 0.0)
        steps = max(
            math.ceil((policy.max_concurrency * n - state.concurrency) / policy.concurrency_step),
            math.ceil(rate_left / policy.rate_step),
            1,
        )
        next_step = max(state.hold_until, state.changed + policy.recovery_interval, now)
        return {
            "destination": dest,
            "concurrency": concurrency,
            "max_concurrency": policy.max_concurrency,
            "rate_per_minute": _per_minute(rate),
            "max_rate_per_minute": _per_minute(
                None if state.ceiling_rate is None else state.ceiling_rate / n
            ),
            "since": state.since,
            "hold_until": state.hold_until,
            "next_increase": next_step,
            "recovered_by": next_step + (steps - 1) * policy.recovery_interval,
            "decreases": state.decreases,
            "reason": {
                "reply": state.reason.reply,
                "rule": state.reason.rule,
                "provider": state.reason.provider,
                "at": state.reason.at,
            },
        }


def _per_minute(rate: float | None) -> float | None:
    return None if rate is None else round(rate * PER_MINUTE, 3)
