"""Traffic shaping in the running daemon: the pure L{Shaper} with a clock,
a log, metrics and, in a cluster, the other instances.

The queue manager hands every job's results to L{TrafficShaping.observe},
asks it for the retry spreading of a destination (L{TrafficShaping.spread})
and has it wake the dispatcher when a destination held by its rate may
start again (L{TrafficShaping.wake}).  Each change of a destination's limits
is logged (which destination, the limits before and after, the reply and
the rule that caused it) and counted in the metrics.

With C{[cluster] redis}, the limits are the cluster's
(L{mta.interfaces.ISharedState}): every change is written with a
compare-and-set on the state it was made from; an instance that loses the
race takes the stored state and applies its event to that again (a second
reply of the same round then changes nothing), and every C{sync_interval}
each instance takes the stored states and the number of instances, whose
share of each limit it applies.  When Redis cannot be reached, delivery goes
on with this instance's own limits (SPEC section 9), and the next sync
brings the cluster's back: the stored state wins over changes made
meanwhile, except for destinations it does not know, which are written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.cluster import SharedLimits
from mta.delivery.job import RecipientResult
from mta.errors import SharedStateError
from mta.interfaces import ISharedState
from mta.metrics import Metrics
from mta.queue.shaping import PER_MINUTE, Change, Event, Shaper, ShapingPolicy

log = Logger(namespace="mta.shaping")
#: Seconds between looks for destinations to release, without a cluster.
PRUNE_INTERVAL = 10.0
#: Times a change is applied again after losing a race with another instance.
MAX_RACES = 3


def show_rate(rate: float | None) -> str:
    """A rate for people: messages per minute."""
    return "no limit" if rate is None else f"{rate * PER_MINUTE:.4g}/min"


class TrafficShaping(Service):
    """See the module docstring."""

    def __init__(
        self,
        shaper: Shaper,
        clock: IReactorTime,
        *,
        metrics: Metrics | None = None,
        shared: ISharedState | None = None,
        instance: str = "",
        sync_interval: float = 2.0,
    ) -> None:
        self.shaper = shaper
        self.clock = clock
        self.metrics = metrics
        self.shared = shared
        self.instance = instance
        self.sync_interval = sync_interval
        self._wake: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._pushing: Counter[str] = Counter()  # changes written and not yet answered
        self._unshared: set[str] = set()  # changed while the cluster could not be told
        self._syncing = False
        if metrics is not None:
            metrics.watch_shaping(self.gauges)

    def configure(self, policy: ShapingPolicy) -> None:
        """New settings (a reload): used from the next decision on; the limits stay."""
        self.shaper.policy = policy

    # -- the queue manager's side ------------------------------------------------

    def observe(self, dest: str, results: Sequence[RecipientResult], started: float) -> None:
        """A job's results (of a delivery that started at C{started})."""
        change = self.shaper.observe(dest, results, started, self.clock.seconds())
        if change is not None:
            self._report(change)

    def spread(self, dest: str) -> Callable[[float], float] | None:
        """How to spread the retries of a job to C{dest} (None: not shaped)."""
        if dest not in self.shaper.limits:
            return None
        return partial(self.shaper.retry_at, dest)

    def wake(self, at: float | None, action: Callable[[], object]) -> None:
        """Call C{action} at C{at} (None: no need), or earlier if asked before."""
        if at is None:
            return
        call = self._wake
        if call is not None and call.active():
            if call.getTime() <= at:
                return
            call.cancel()
        self._wake = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._woken, action)

    def _woken(self, action: Callable[[], object]) -> None:
        self._wake = None
        action()

    def cancel_wake(self) -> None:
        """At the manager's stop: no dispatch after it."""
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None

    # -- the operator's side ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every shaped destination's limits and why (C{mtactl queue shaping})."""
        shaper, now = self.shaper, self.clock.seconds()
        policy = shaper.policy
        return {
            "enabled": policy.enabled,
            "now": now,
            "instances": shaper.instances,
            "max_concurrency": policy.max_concurrency,
            "max_rate_per_minute": policy.max_rate * PER_MINUTE if policy.max_rate else None,
            "destinations": [shaper.describe(dest, now) for dest in sorted(shaper.limits)],
        }

    def reset(self, dest: str | None) -> int:
        """End the limits of one destination, or of all; returns how many ended."""
        changes = self.shaper.reset(dest, self.clock.seconds())
        for change in changes:
            self._report(change)
        return len(changes)

    def gauges(self) -> list[tuple[str, int, float | None]]:
        """For the metrics: each shaped destination's concurrency and rate."""
        shaper = self.shaper
        return [(dest, *shaper.effective(dest)) for dest in sorted(shaper.limits)]

    # -- changes: the log, the metrics, the cluster ---------------------------------

    def _report(self, change: Change, *, share: bool = True, attempt: int = 0) -> None:
        _log_change(change)
        if change.kind == "decrease" and self.metrics is not None and change.reason is not None:
            self.metrics.shaping_decreases.labels(change.reason.rule).inc()
        if share and self.shared is not None:
            self._push(change.destination, change.base, change.event, attempt)

    def _push(self, dest: str, base: str, event: Event | None, attempt: int) -> None:
        assert self.shared is not None
        self._pushing[dest] += 1
        d = self.shared.destination_change(dest, self.shaper.export(dest), base)
        d.addCallbacks(partial(self._pushed, dest, event, attempt), partial(self._not_pushed, dest))

    def _done_pushing(self, dest: str) -> None:
        self._pushing[dest] -= 1
        if self._pushing[dest] <= 0:
            del self._pushing[dest]

    def _pushed(
        self, dest: str, event: Event | None, attempt: int, answer: tuple[bool, Any]
    ) -> None:
        self._done_pushing(dest)
        accepted, stored = answer
        if accepted:
            self._unshared.discard(dest)
            return
        # Another instance changed it first: its state, then this event on it.
        now = self.clock.seconds()
        self._adopt(dest, stored, now, repair=False)
        if event is None or attempt >= MAX_RACES:
            return
        again = self.shaper.apply(dest, event, now)
        if again is not None:
            self._report(again, attempt=attempt + 1)

    def _not_pushed(self, dest: str, failure: Failure) -> None:
        self._done_pushing(dest)
        self._unshared.add(dest)
        if not failure.check(SharedStateError):
            log.failure("cannot share the traffic-shaping limits of {dest}", failure, dest=dest)
        # Redis away: this instance goes on with its own limits (the client logs it once).

    def _adopt(self, dest: str, doc: object, now: float, *, repair: bool = True) -> None:
        """Take the cluster's state of C{dest}; with C{repair}, replace one
        that is not a shaping document with this instance's."""
        try:
            change = self.shaper.adopt(dest, doc, now)
        except ValueError as e:
            log.error("ignoring the cluster's traffic-shaping state of {dest}: {e}",
                      dest=dest, e=str(e))  # fmt: skip
            if repair and dest in self.shaper.limits and not self._pushing[dest]:
                token = doc.get("token") if isinstance(doc, dict) else None
                self._push(dest, token if isinstance(token, str) else "", None, MAX_RACES)
            return
        if change is not None:
            self._report(change, share=False)

    # -- the service: upkeep and the cluster's state ---------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        policy = self.shaper.policy
        if policy.enabled:
            operator = sum(1 for rule in policy.rules if rule.origin)
            log.info(
                "traffic shaping: {rules} rules ({operator} from the configuration); "
                "at most {c} connections and {r} per destination",
                rules=len(policy.rules), operator=operator, c=policy.max_concurrency,
                r=show_rate(policy.max_rate or None),
            )  # fmt: skip
        interval = self.sync_interval if self.shared is not None else PRUNE_INTERVAL
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(interval, now=self.shared is not None).addErrback(
            lambda f: log.failure("traffic shaping upkeep stopped", f)
        )

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.cancel_wake()
        super().stopService()  # type: ignore[no-untyped-call]

    def tick(self) -> None:
        """Release idle destinations; in a cluster, take the shared state."""
        for change in self.shaper.prune(self.clock.seconds()):
            self._report(change)
        if self.shared is not None and not self._syncing:
            self._syncing = True
            window = 3 * self.sync_interval
            d = self.shared.destination_limits(self.instance, self.clock.seconds(), window)
            d.addCallbacks(self._synced, self._sync_failed)

    def _synced(self, shared: SharedLimits) -> None:
        self._syncing = False
        shaper, now = self.shaper, self.clock.seconds()
        if shared.instances != shaper.instances:
            log.info("{n} instances share the traffic-shaping limits", n=shared.instances)
            shaper.instances = max(1, shared.instances)
        for dest, doc in shared.limits.items():
            if not self._pushing[dest]:
                self._unshared.discard(dest)  # the cluster's state wins
                self._adopt(dest, doc, now)
        self._unshared &= set(shaper.limits)  # an end nobody heard of: nothing to write
        for dest in [d for d in shaper.limits if d not in shared.limits]:
            if self._pushing[dest]:
                continue
            if dest in self._unshared:
                self._push(dest, "", None, MAX_RACES)  # learnt while Redis was away
            else:
                self._adopt(dest, None, now)

    def _sync_failed(self, failure: Failure) -> None:
        self._syncing = False
        if not failure.check(SharedStateError):
            log.failure("cannot read the cluster's traffic-shaping limits", failure)


def _log_change(change: Change) -> None:
    """One line per change: the destination, old -> new, and the reply behind it."""
    (c0, r0), (c1, r1) = change.before, change.after
    fields: dict[str, Any] = {
        "destination": change.destination, "change": change.kind,
        "old_concurrency": c0, "new_concurrency": c1, "old_rate": show_rate(r0),
        "new_rate": show_rate(r1), "why": change.why,
        "reply": change.reason.reply if change.reason is not None else "",
        "rule": change.reason.rule if change.reason is not None else "",
    }  # fmt: skip
    limits = "concurrency {old_concurrency} -> {new_concurrency}, rate {old_rate} -> {new_rate}"
    if change.kind == "decrease":
        log.warn(
            "{destination}: traffic shaping: " + limits + " for at least {hold:.0f} s, "
            "after {reply} (rule {why})", hold=change.hold, **fields,
        )  # fmt: skip
    elif change.kind == "shared":
        log.info("{destination}: traffic shaping from another instance: " + limits
                 + " (after {reply}, rule {rule})", **fields)  # fmt: skip
    elif change.kind == "end":
        log.info("{destination}: traffic shaping ended ({why}): " + limits, **fields)
    else:
        log.info("{destination}: traffic shaping: " + limits + " ({why})", **fields)
