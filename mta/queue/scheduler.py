"""The queue's decisions, as plain functions and objects: no Twisted, no I/O.

The queue manager (L{mta.queue.manager}) owns timers, threads and
connections; everything it decides is decided here, so it can be tested
with tables and no reactor:

  - L{RetryPolicy}: Postfix's backoff and expiry;
  - L{ReadyQueue}: which message to take up next, new ones and due
    deferred ones in turn;
  - L{plan}: which recipients of a message are due, grouped by destination;
  - L{apply}: what a job's results mean: each recipient's new state, the
    notices owed to the sender, whether the destination rests;
  - L{Destinations}: which destinations rest (dead-site detection,
    blocklisting) and which have answered lately;
  - L{filing}: where a message goes when its round ends;
  - L{owed_notices}, L{delay_notices}, L{expire}: reports and
    administrative bounces.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from mta import dsn, maillog
from mta.address import domain_of
from mta.bounce import Classification, Classifier
from mta.config import QueueConfig
from mta.delivery.job import RecipientResult
from mta.envelope import Envelope, ProgressRecord, QueueState, Recipient, RecipientState
from mta.errors import DeliveryError, ErrorKind, Reply

#: A destination that answered an SMTP transaction counts as responsive this
#: long; until then it gets UNPROVEN_CONCURRENCY connections (tarpits).
PROVEN_TIME = 3600.0
UNPROVEN_CONCURRENCY = 2
#: What C{mtactl queue bounce} records for each recipient not yet final.
ADMIN_BOUNCE = Reply(550, "5.4.7", "delivery time expired: returned by the mail administrator")
#: What a delivery that raised records for each of its recipients.
INTERNAL_ERROR = Reply(451, "4.3.0", "internal error during delivery")


def no_jitter(delay: float) -> float:
    return delay


@dataclass(frozen=True)
class RetryPolicy:
    """Postfix's retry schedule: when to try again, and when to give up.

    After a failed attempt the next one is at C{now + clamp(time in queue,
    minimal_backoff_time, maximal_backoff_time)}, so the gaps double from
    the minimum (0, 5, 10, 20, 40, 80 minutes with the defaults) until they
    reach the maximum (about every 67 minutes); the message is given up
    after C{maximal_queue_lifetime}.  An injected C{jitter} spreads retries
    of messages that failed together.
    """

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    maximal_lifetime: float = 5 * 86400.0

    @classmethod
    def from_config(cls, queue: QueueConfig) -> RetryPolicy:
        return cls(
            minimal_backoff=queue.minimal_backoff_time,
            maximal_backoff=queue.maximal_backoff_time,
            maximal_lifetime=queue.maximal_queue_lifetime,
        )

    def backoff(self, arrival: float, now: float) -> float:
        return min(max(now - arrival, self.minimal_backoff), self.maximal_backoff)

    def expires_at(self, arrival: float) -> float:
        return arrival + self.maximal_lifetime

    def expired(self, arrival: float, now: float) -> bool:
        return now >= self.expires_at(arrival)

    def next_attempt(
        self, arrival: float, now: float, jitter: Callable[[float], float] = no_jitter
    ) -> float:
        """The time of the next attempt after one that failed at C{now}.

        Never later than the expiry time, so that the last attempt happens
        when the lifetime ends and the message is given up then.
        """
        return min(now + jitter(self.backoff(arrival, now)), self.expires_at(arrival))


class ReadyQueue:
    """Messages waiting to be taken up: new ones first come, first served;
    deferred ones by the time they are due.

    Both wait as queue IDs only (a heap entry costs no envelope read), and
    the two sources take turns when both have a message ready: taking new
    mail first always would starve retries (and their expiry and delay
    notices) under a steady inflow; Postfix alternates too.
    """

    def __init__(self) -> None:
        self._new: OrderedDict[str, None] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # the valid heap entry of each deferred ID
        self._turn = 0

    def add(self, queue_id: str, *, first: bool = False) -> None:
        """A message ready now (at the front with C{first})."""
        self._new[queue_id] = None
        if first:
            self._new.move_to_end(queue_id, last=False)

    def add_first(self, queue_ids: list[str]) -> None:
        """Messages ready now, in this order, before those already waiting."""
        for queue_id in reversed(queue_ids):
            self.add(queue_id, first=True)

    def schedule(self, queue_id: str, due: float) -> None:
        """A message due at C{due}; an earlier entry for it is void."""
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))

    def take(self, queue_id: str) -> tuple[bool, float | None]:
        """Take a message out wherever it waits: (whether it was new, when it was due)."""
        was_new = self._new.pop(queue_id, False) is None
        return was_new, self._due.pop(queue_id, None)

    def next(self, now: float) -> str | None:
        """The next message to take up at C{now}, or None."""
        self._drop_void()
        due = bool(self._heap) and self._heap[0][0] <= now
        self._turn += 1
        if self._new and (not due or self._turn % 2):
            return self._new.popitem(last=False)[0]
        if due:
            _, queue_id = heapq.heappop(self._heap)
            del self._due[queue_id]
            return queue_id
        return None

    def next_due(self) -> float | None:
        """When the first deferred message is due."""
        self._drop_void()
        return self._heap[0][0] if self._heap else None

    def _drop_void(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # rescheduled or taken out since

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._new or queue_id in self._due

    def deferred(self) -> list[str]:
        return list(self._due)

    def due(self, queue_id: str) -> float | None:
        """When a deferred message is due; None if it is not deferred here."""
        return self._due.get(queue_id)

    def __iter__(self) -> Iterator[str]:
        yield from self._new
        yield from self._due

    @property
    def new_count(self) -> int:
        return len(self._new)

    @property
    def deferred_count(self) -> int:
        return len(self._due)

    @property
    def has_new(self) -> bool:
        return bool(self._new)


@dataclass(frozen=True)
class Suspension:
    until: float
    reason: Reply
    why: str  # "unreachable" or "blocklisted"


class Destinations:
    """What the queue knows about each destination: whether it rests (its
    jobs are deferred without a connection) and whether it answered lately.

    A destination rests when every connection to it failed (Postfix's
    dead-site detection, for C{minimal_backoff_time}) or when it refused us
    as blocklisted (for C{blocklist_rest_time}).  One that has not answered
    a transaction within L{PROVEN_TIME} gets a small share of connections.
    """

    def __init__(self) -> None:
        self.suspended: dict[str, Suspension] = {}
        self._answered: dict[str, float] = {}
        self._next_prune = 0.0

    def suspension(self, dest: str, now: float) -> Suspension | None:
        suspension = self.suspended.get(dest)
        if suspension is not None and suspension.until <= now:
            del self.suspended[dest]
            return None
        return suspension

    def suspend(
        self, dest: str, seconds: float, reason: Reply, why: str, now: float
    ) -> Suspension | None:
        """Rest C{dest}; returns the new suspension, or None when it changed nothing."""
        if seconds <= 0:
            return None
        self.prune(now, force=True)
        until = now + seconds
        current = self.suspended.get(dest)
        if current is not None and current.until >= until:
            return None
        self.suspended[dest] = Suspension(until, reason, why)
        return self.suspended[dest]

    def resume(self, dest: str | None = None) -> None:
        """End the rest of one destination, or of all (C{mtactl queue flush})."""
        if dest is None:
            self.suspended.clear()
        else:
            self.suspended.pop(dest, None)

    def answered(self, dest: str, now: float) -> None:
        self._answered[dest] = now

    def learn(self, dest: str, decision: Decision, now: float) -> tuple[float, Reply, str] | None:
        """What one job's results (L{apply}) tell of its destination: whether
        it answered, and whether it rests.  Returns C{decision.suspend} when
        the destination now rests longer than before (to log), else None."""
        if decision.answered:
            self.answered(dest, now)
        rest = decision.suspend
        if rest is not None and self.suspend(dest, *rest, now) is None:
            rest = None
        self.prune(now)
        return rest

    def proven(self, dest: str, now: float) -> bool:
        when = self._answered.get(dest)
        return when is not None and when > now - PROVEN_TIME

    def prune(self, now: float, *, force: bool = False) -> None:
        """Forget rests and answers that have ended (at most once a minute unless forced)."""
        if not self.suspended or (not force and now < self._next_prune):
            return
        self._next_prune = now + 60
        for name in [d for d, s in self.suspended.items() if s.until <= now]:
            del self.suspended[name]
        for name in [d for d, t in self._answered.items() if t <= now - PROVEN_TIME]:
            del self._answered[name]


# -- planning -------------------------------------------------------------------


@dataclass
class JobPlan:
    """Recipients of one message that go to one destination together."""

    destination: str
    domain: str
    recipients: list[Recipient]


def plan(
    envelope: Envelope, now: float, destination_of: Callable[[str], str], *, flushed: bool = False
) -> list[JobPlan]:
    """The due recipients (all pending ones when C{flushed}), grouped by
    destination and domain, in the envelope's order."""
    groups: dict[tuple[str, str], JobPlan] = {}
    for rcpt in envelope.recipients:
        if rcpt.state.final:
            continue
        if not (flushed or rcpt.next_attempt is None or rcpt.next_attempt <= now):
            continue
        domain = domain_of(rcpt.address)
        dest = destination_of(domain)
        job = groups.get((dest, domain))
        if job is None:
            job = groups[(dest, domain)] = JobPlan(dest, domain, [])
        job.recipients.append(rcpt)
    return list(groups.values())


# -- results --------------------------------------------------------------------


@dataclass
class Outcome:
    """One recipient's result and the status it got (for the log line)."""

    recipient: Recipient
    result: RecipientResult
    status: str  # "sent", "deferred", "bounced" or "expired"


@dataclass
class Decision:
    """What one job's results mean (see L{apply})."""

    outcomes: list[Outcome] = field(default_factory=list)
    notices: list[dsn.Notice] = field(default_factory=list)
    # (seconds, reason, why) when the destination should rest
    suspend: tuple[float, Reply, str] | None = None
    answered: bool = False  # the destination answered a transaction


def classify(result: RecipientResult, classifier: Classifier) -> Classification:
    """Retry or bounce, and why (L{mta.bounce})."""
    return classifier.classify_error(DeliveryError(result.reply, result.kind, remote=result.relay))


def apply(
    envelope: Envelope,
    recipients: list[Recipient],
    results: list[RecipientResult],
    now: float,
    *,
    settings: QueueConfig,
    classifier: Classifier,
    jitter: Callable[[float], float] = no_jitter,
    ran: bool = True,
    resume: float = 0.0,
    spread: Callable[[float], float] | None = None,
) -> Decision:
    """Record a job's results in its recipients (of C{envelope}), and decide.

    Each recipient becomes sent, deferred (with its next attempt) or
    failed (a permanent failure, or a temporary one past the queue
    lifetime).  C{ran} is False for a job skipped because its destination
    rests: that is no attempt, and C{resume} is the earliest time to retry.
    C{spread} may move the retry time later (L{Spread}: traffic shaping).
    Notices: "failed" for each failure, "relayed" for a success the sender
    asked to hear of when the next hop did not take the DSN parameters.
    """
    policy = RetryPolicy.from_config(settings)
    by_address = {r.address: r for r in recipients}
    decision = Decision()
    verdicts: list[Classification | None] = []
    later = Spread(spread, policy.expires_at(envelope.arrival))
    for result in results:
        rcpt = by_address[result.address]
        verdict = None if result.ok else classify(result, classifier)
        verdicts.append(verdict)
        if ran:
            rcpt.attempts += 1
            rcpt.last_attempt = now
        rcpt.reply = str(result.reply)
        rcpt.dsn_status = maillog.dsn_code(result.reply)
        rcpt.relay = result.relay
        rcpt.category = verdict.category if verdict is not None else None
        if verdict is None:
            rcpt.state, rcpt.next_attempt, status = RecipientState.SENT, None, "sent"
            if not result.dsn_passed and dsn.needs_notice(envelope, rcpt, "relayed"):
                decision.notices.append(dsn.Notice(rcpt, "relayed"))
        elif verdict.temporary and not policy.expired(envelope.arrival, now):
            rcpt.state, status = RecipientState.DEFERRED, "deferred"
            retry = max(
                policy.next_attempt(envelope.arrival, now, jitter), min(resume, later.expiry)
            )
            rcpt.next_attempt = later(retry)
        else:
            rcpt.state, rcpt.next_attempt = RecipientState.FAILED, None
            status = "expired" if verdict.temporary else "bounced"
            if dsn.needs_notice(envelope, rcpt, "failed"):
                decision.notices.append(dsn.Notice(rcpt, "failed"))
        decision.outcomes.append(Outcome(rcpt, result, status))
    if ran:
        decision.answered = any(r.kind == ErrorKind.REMOTE for r in results)
        decision.suspend = _rest(results, verdicts, policy, settings)
    return decision


class Spread:
    """A job's retry times, moved later by C{spread} (traffic shaping spaces
    the retries of a shaped destination, L{mta.queue.shaping.Shaper.retry_at}).

    C{spread} is asked once per job, for its first deferred recipient; the
    others move as far.  Never past C{expiry}, never earlier.
    """

    def __init__(self, spread: Callable[[float], float] | None, expiry: float) -> None:
        self.spread = spread
        self.expiry = expiry
        self.offset: float | None = None

    def __call__(self, when: float) -> float:
        if self.spread is None:
            return when
        if self.offset is None:
            self.offset = max(0.0, self.spread(when) - when)
        return max(when, min(when + self.offset, self.expiry))


def _rest(
    results: list[RecipientResult],
    verdicts: list[Classification | None],
    policy: RetryPolicy,
    settings: QueueConfig,
) -> tuple[float, Reply, str] | None:
    """Dead-site detection and blocklist rest (see L{Destinations})."""
    dead = (ErrorKind.NETWORK, ErrorKind.TIMEOUT)
    if results and all(not r.connected and r.kind in dead for r in results):
        return policy.minimal_backoff, results[0].reply, "unreachable"
    for result, verdict in zip(results, verdicts, strict=True):
        if verdict is not None and verdict.category == "blocklist":
            return settings.blocklist_rest_time, result.reply, "blocklisted"
    return None


def suspended_results(recipients: list[Recipient], suspension: Suspension) -> list[RecipientResult]:
    """The results of a job not tried because its destination rests."""
    reason = suspension.reason
    reply = Reply(
        451,
        reason.enhanced if reason.enhanced and reason.code < 500 else "4.4.1",
        f"delivery temporarily suspended ({suspension.why}): {reason}",
    )
    return [RecipientResult(r.address, reply, ErrorKind.SUSPENDED) for r in recipients]


def crashed_results(recipients: list[Recipient]) -> list[RecipientResult]:
    """The results of a job whose delivery raised (a bug): try again later."""
    return [RecipientResult(r.address, INTERNAL_ERROR, ErrorKind.LOCAL) for r in recipients]


def _owes_relayed(envelope: Envelope, rcpt: Recipient, result: RecipientResult) -> bool:
    return not result.dsn_passed and dsn.needs_notice(envelope, rcpt, "relayed")


def sent_records(
    envelope: Envelope,
    recipients: list[Recipient],
    results: list[RecipientResult],
    now: float,
    *,
    written: set[str],
) -> list[ProgressRecord]:
    """The deliveries of one transaction, to journal before the job ends.

    Each is the recipient as L{apply} will record it (sent, one attempt
    more).  Recipients already C{written} are left out, and so is one owed a
    "relayed" notice: recovery could not send the notice, so a crash
    delivers it again rather than lose the notice.
    """
    position = {id(r): n for n, r in enumerate(envelope.recipients)}
    by_address = {r.address: r for r in recipients}
    records = []
    for result in results:
        if not result.ok or result.address in written:
            continue
        rcpt = by_address[result.address]
        if id(rcpt) not in position or _owes_relayed(envelope, rcpt, result):
            continue
        sent = replace(
            rcpt, state=RecipientState.SENT, attempts=rcpt.attempts + 1, last_attempt=now,
            next_attempt=None, reply=str(result.reply), dsn_status=maillog.dsn_code(result.reply),
            relay=result.relay, category=None,
        )  # fmt: skip
        records.append(ProgressRecord(envelope.queue_id, position[id(rcpt)], sent))
    return records


def progress_records(
    envelope: Envelope, decision: Decision, *, written: set[str]
) -> list[ProgressRecord]:
    """The recipients as a job's results left them (L{apply}), to journal.

    Those already C{written} (by L{sent_records}) are left out, and so are
    deliveries owed a "relayed" notice (see L{sent_records}).
    """
    position = {id(r): n for n, r in enumerate(envelope.recipients)}
    records = []
    for o in decision.outcomes:
        rcpt = o.recipient
        if rcpt.address in written or id(rcpt) not in position:
            continue
        if o.status == "sent" and _owes_relayed(envelope, rcpt, o.result):
            continue
        records.append(ProgressRecord(envelope.queue_id, position[id(rcpt)], replace(rcpt)))
    return records


# -- the end of a round -----------------------------------------------------------


def filing(
    envelope: Envelope, now: float, *, flushed: bool = False, hold: bool = False
) -> tuple[QueueState, float]:
    """Where a message goes when no job of it runs any more, and its time.

    C{done} (finished now) when no recipient is pending; otherwise
    C{deferred} until its first pending recipient is due (now when
    C{flushed}), or C{hold} when the operator asked for it.
    """
    waiting = [r.next_attempt for r in envelope.recipients if not r.state.final]
    if not waiting:
        return QueueState.DONE, now
    if hold:
        return QueueState.HOLD, now
    if flushed:
        return QueueState.DEFERRED, now
    return QueueState.DEFERRED, min(t if t is not None else now for t in waiting)


def owed_notices(envelope: Envelope) -> list[dsn.Notice]:
    """Failure reports owed from before a crash, or from C{mtactl queue bounce}."""
    return [
        dsn.Notice(r, "failed")
        for r in envelope.recipients
        if r.state == RecipientState.FAILED
        and not r.final_notified
        and dsn.needs_notice(envelope, r, "failed")
    ]


def delay_notices(envelope: Envelope, now: float, warn_after: float) -> list[dsn.Notice]:
    """A delay notice, once per recipient, after C{delay_warning_time} (RFC 3461)."""
    if warn_after <= 0 or now - envelope.arrival < warn_after:
        return []
    return [
        dsn.Notice(rcpt, "delayed")
        for rcpt in envelope.recipients
        if rcpt.state == RecipientState.DEFERRED
        and not rcpt.delay_notified
        and dsn.needs_notice(envelope, rcpt, "delayed")
    ]


def notified(notices: list[dsn.Notice]) -> None:
    """The report with these notices was committed: they are not owed any more."""
    for notice in notices:
        if notice.action == "delayed":
            notice.recipient.delay_notified = True
        else:
            notice.recipient.final_notified = True


def expire(envelope: Envelope, now: float) -> list[Recipient]:
    """Fail every recipient not yet finished (C{mtactl queue bounce}); returns them."""
    failed = []
    for rcpt in envelope.recipients:
        if rcpt.state.final:
            continue
        if rcpt.reply:
            rcpt.reply = f"{ADMIN_BOUNCE} (last attempt: {rcpt.reply})"
        else:
            rcpt.reply = str(ADMIN_BOUNCE)
        rcpt.state = RecipientState.FAILED
        rcpt.dsn_status = ADMIN_BOUNCE.enhanced
        rcpt.category = "other"
        rcpt.next_attempt = None
        rcpt.last_attempt = now
        failed.append(rcpt)
    return failed


def make_due(envelope: Envelope, now: float) -> None:
    """Make every pending recipient due at C{now}."""
    for rcpt in envelope.recipients:
        if not rcpt.state.final:
            rcpt.next_attempt = now
