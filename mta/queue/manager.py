"""The queue manager: from the spool to the delivery agent and back.

It keeps a bounded set of I{active} messages in memory (their envelopes,
never their bytes).  Everything else stays on disk:

  - C{incoming/} messages wait in a FIFO of queue IDs, fed by the spool's
    commit notifications and, at start-up, by a directory listing;
  - C{deferred/} messages wait in a heap of (due time, queue ID), built at
    start-up from directory modification times (L{SpoolStore.settle}) and
    served by a single timer, so nothing is scanned on a tick.

An active message's due recipients are grouped by destination into
L{DeliveryJob}s; jobs wait per destination and run within a per-destination
and a global concurrency limit, taking destinations in turn.  Each result
is classified, logged in Postfix's shape and written to the envelope; when
no job of the message is running any more, the message moves to C{done/}
(nothing pending) or back to C{deferred/} (with its next due time).

A destination is suspended as a whole (its jobs are deferred without a
connection) when every connection to it failed (Postfix's dead-site
detection, for C{minimal_backoff_time}) or when it refused us as
blocklisted (for C{blocklist_rest_time}).

Delivery status notifications (L{mta.dsn}) are made when a message's
round ends: failures and "relayed" successes as they happen, a delay
notice once per recipient after C{delay_warning_time}.  A report is
committed to the spool, like any message, before the original is filed.

All file work happens in the spool thread pool; envelope writes of one
message are chained so they never overlap.
"""

from __future__ import annotations

import copy
import heapq
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta import dsn, maillog
from mta.address import domain_of
from mta.batch import Batcher
from mta.bounce import Classifier, Verdict
from mta.config import QueueConfig
from mta.delivery.relay import DeliveryJob, RecipientResult
from mta.delivery.routes import Router
from mta.envelope import Envelope, Recipient, RecipientState
from mta.errors import DeliveryError, Reply
from mta.interfaces import ISpool
from mta.metrics import Metrics
from mta.queue import control
from mta.queue.control import ControlError
from mta.queue.schedule import RetryPolicy, no_jitter
from mta.spool.format import FormatError
from mta.spool.fs import MESSAGE, SpoolStore
from mta.spool.journal import SentJournal, SentRecord
from mta.spool.queueid import arrival_of

log = Logger(namespace="mta.queue")
REPORT_READ_LIMIT = 1 << 20  # enough for any header section and a returned message
RETRY_DELAY = 60.0  # seconds before trying again after a local (disk) error
# A destination that answered an SMTP transaction counts as responsive this long;
# before that it gets UNPROVEN_CONCURRENCY connections.
PROVEN_TIME = 3600.0
UNPROVEN_CONCURRENCY = 2
maillog_log = Logger(namespace="mta.maillog")

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]


@dataclass
class QueueLimits:
    active: int = 1000
    destination_concurrency: int = 20
    connections: int = 100


@dataclass
class _Active:
    envelope: Envelope
    activated: float
    jobs: int = 0
    io: Deferred[Any] = field(default_factory=lambda: succeed(None))
    notices: list[dsn.Notice] = field(default_factory=list)
    journal: list[object] = field(default_factory=list)  # L{SentJournal} tokens


@dataclass(frozen=True)
class _Suspension:
    until: float
    reason: Reply
    why: str  # "unreachable" or "blocklisted"


@dataclass
class _Job:
    message: _Active
    job: DeliveryJob
    unproven: bool = False  # counted against the share of unproven destinations
    journaled: set[str] = field(default_factory=set)  # addresses in the sent journal


class QueueManager(Service):
    """See the module docstring."""

    def __init__(
        self,
        store: SpoolStore,
        runner: Runner[Any],
        deliver: Callable[[DeliveryJob], Deferred[list[RecipientResult]]],
        router: Router,
        clock: IReactorTime,
        *,
        limits: QueueLimits | None = None,
        settings: Callable[[], QueueConfig] = QueueConfig,
        classifier: Classifier | None = None,
        jitter: Callable[[float], float] = no_jitter,
        reports: ISpool | None = None,
        hostname: str = "localhost",
        on_done: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        journal: SentJournal | None = None,
    ) -> None:
        self.store = store
        self.journal = journal
        self.metrics = metrics or Metrics()
        self.runner = runner
        self.deliver = deliver
        self.router = router
        self.clock = clock
        self.limits = limits or QueueLimits()
        self.settings = settings
        self.classifier = classifier or Classifier()
        self.jitter = jitter
        self.reports = reports
        self.hostname = hostname
        self.on_done = on_done
        self.suspended: dict[str, _Suspension] = {}
        # Destinations that answered a transaction lately (time of the last
        # answer).  The others get UNPROVEN_CONCURRENCY connections each and
        # at most half of all together, so that next hops that accept and
        # never speak (tarpits) cannot take every connection.
        self._proven: dict[str, float] = {}
        self._unproven_running = 0
        self._next_prune = 0.0
        self.incoming: deque[str] = deque()  # queue IDs ready now
        self.deferred: list[tuple[float, str]] = []  # heap of (due, queue ID)
        self._due: dict[str, float] = {}  # the valid heap entry of each deferred ID
        self.active: dict[str, _Active] = {}
        self._loading: set[str] = set()
        self._turn = 0  # alternates the sources _pump takes from
        self._dispatching = False
        self._dispatch_again = False
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._running: Counter[str] = Counter()
        self._running_total = 0
        self._timer: IDelayedCall | None = None
        self._settles: Batcher[tuple[Envelope, str, str, float | None], None] = Batcher(
            runner, store.settle_group
        )
        self._stopped = True
        self._retries: list[IDelayedCall] = []
        self.idle_waiters: list[Deferred[None]] = []
        # Operator actions (L{control}): those waiting for an active
        # message's round to end, the messages whose files an action is
        # changing right now (nobody else touches them), and the messages
        # flushed, whose pending recipients are all due at their next plan.
        self._requests: dict[str, str] = {}
        self._controlling: set[str] = set()
        self._flushed: set[str] = set()
        self._load_waiters: dict[str, list[tuple[str, Deferred[str]]]] = {}

    # -- life cycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        self._start_scan()

    def _start_scan(self) -> None:
        self.runner(self._scan).addCallbacks(self._scanned, self._scan_failed)

    def _scan(self) -> tuple[list[str], list[tuple[float, str]]]:
        # Messages left in active/ by a crash go first: they were already due.
        ready = sorted(self.store.ids("active")) + sorted(self.store.ids("incoming"))
        return ready, self.store.due_times("deferred")

    def _scanned(self, found: tuple[list[str], list[tuple[float, str]]]) -> None:
        ready, due = found
        # Messages committed while the scan ran are already known.
        known = (
            set(self.incoming) | set(self.active) | self._loading | set(self._due)
        ) | self._controlling
        fresh = [qid for qid in ready if qid not in known]
        self.incoming.extendleft(reversed(fresh))
        for when, queue_id in due:
            if queue_id not in known:
                self._schedule(queue_id, when)
        log.info(
            "queue: {ready} messages ready, {deferred} deferred",
            ready=len(fresh),
            deferred=len(due),
        )
        self._pump()

    def _scan_failed(self, failure: Failure) -> None:
        log.failure("cannot read the queue; trying again in a minute", failure)
        self._later(RETRY_DELAY, self._start_scan)

    def _later(self, delay: float, action: Callable[[], object]) -> None:
        """Run C{action} after C{delay} unless stopped; for recovery from errors."""
        if self._stopped:
            return

        def run() -> None:
            self._retries = [c for c in self._retries if c.active()]
            if not self._stopped:
                action()

        self._retries.append(self.clock.callLater(delay, run))

    def _schedule(self, queue_id: str, due: float) -> None:
        """Put a message in the deferred heap; an older entry for it is void."""
        self._due[queue_id] = due
        heapq.heappush(self.deferred, (due, queue_id))

    def stopService(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for call in self._retries:
            if call.active():
                call.cancel()
        self._retries = []
        super().stopService()  # type: ignore[no-untyped-call]

    def committed(self, queue_id: str, state: str) -> None:
        """Spool listener: a new message is in C{incoming/}."""
        self.incoming.append(queue_id)
        self._pump()

    # -- activation --------------------------------------------------------

    def _pump(self) -> None:
        """Take messages into the active set while there is room."""
        if self._stopped:
            return
        now = self.clock.seconds()
        while len(self.active) + len(self._loading) < self.limits.active:
            queue_id = self._next_ready(now)
            if queue_id is None:
                break
            if queue_id in self.active or queue_id in self._loading:
                continue
            self._activate(queue_id)
        self._arm()
        self._check_idle()

    def _next_ready(self, now: float) -> str | None:
        """The next message to activate: new and due deferred ones take turns.

        Taking new mail first always would starve retries (and their expiry
        and delay notices) under a steady inflow; Postfix alternates too.
        """
        while self.deferred and self._due.get(self.deferred[0][1]) != self.deferred[0][0]:
            heapq.heappop(self.deferred)  # void: rescheduled or activated since
        due = bool(self.deferred) and self.deferred[0][0] <= now
        self._turn += 1
        if self.incoming and (not due or self._turn % 2):
            return self.incoming.popleft()
        if due:
            _, queue_id = heapq.heappop(self.deferred)
            del self._due[queue_id]
            return queue_id
        return None

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        full = len(self.active) + len(self._loading) >= self.limits.active
        # When the active set is full, a finishing message calls _pump.
        if self.deferred and not self._stopped and not full:
            delay = max(0.0, self.deferred[0][0] - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._pump)

    def _activate(self, queue_id: str) -> None:
        """Load a message and move it to C{active/} (the caller made sure it is
        neither active nor loading in this process)."""
        self._loading.add(queue_id)

        def load() -> Envelope | None:
            try:
                found, envelope = self.store.load(queue_id)
            except KeyError:
                try:
                    found = self.store.find(queue_id)
                except KeyError:
                    return None  # delivered or deleted meanwhile
                if found in ("incoming", "deferred", "active"):
                    # The directory is there but its envelope is not.
                    log.error("{qid}: no envelope, moved to corrupt/", qid=queue_id)
                    self.store.move(queue_id, found, "corrupt")
                return None
            except FormatError as e:
                log.error("{qid}: unreadable envelope, moved to corrupt/: {e}", qid=queue_id, e=e)
                self.store.move(queue_id, self.store.find(queue_id), "corrupt")
                return None
            if found not in ("incoming", "deferred", "active"):
                return None  # e.g. put on hold, or finished, meanwhile
            if found != "active":
                self.store.move(queue_id, found, "active", durable=False)
            return envelope

        def loaded(envelope: Envelope | None) -> None:
            self._loading.discard(queue_id)
            if envelope is not None and not self._stopped:
                message = _Active(envelope, self.clock.seconds())
                # Reports owed from before a crash, or from "mtactl queue bounce".
                message.notices = [
                    dsn.Notice(r, "failed")
                    for r in envelope.recipients
                    if r.state == RecipientState.FAILED
                    and not r.final_notified
                    and dsn.needs_notice(envelope, r, "failed")
                ]
                self.active[queue_id] = message
                self._plan(message)
            else:
                self._flushed.discard(queue_id)
            self._after_load(queue_id)
            self._pump()

        def failed(failure: Failure) -> None:
            # An I/O error (e.g. out of file descriptors) must not make the
            # queue forget the message: look at it again in a minute.
            self._loading.discard(queue_id)
            log.failure("{qid}: cannot activate; trying again in a minute", failure, qid=queue_id)
            self._schedule(queue_id, self.clock.seconds() + RETRY_DELAY)
            self._after_load(queue_id)
            self._pump()

        self.runner(load).addCallbacks(loaded, failed)

    def _after_load(self, queue_id: str) -> None:
        """Operator actions that arrived while the message was loading, now that
        it is known where it is (in delivery, set aside as corrupt, gone ...)."""
        for op, waiting in self._load_waiters.pop(queue_id, []):
            self.control(op, queue_id).chainDeferred(waiting)

    # -- planning and dispatch -----------------------------------------------

    def _plan(self, message: _Active) -> None:
        env = message.envelope
        now = self.clock.seconds()
        flushed = env.queue_id in self._flushed
        self._flushed.discard(env.queue_id)
        due = [
            r
            for r in env.recipients
            if not r.state.final and (flushed or r.next_attempt is None or r.next_attempt <= now)
        ]
        groups: dict[str, list[Recipient]] = {}
        domains: dict[str, str] = {}
        for rcpt in due:
            domain = domain_of(rcpt.address)
            dest = self.router.destination(domain)
            key = f"{dest}\0{domain}"
            groups.setdefault(key, []).append(rcpt)
            domains[key] = domain
        if not groups:
            self._finish(message)
            return
        path = self.store.path("active", env.queue_id, MESSAGE)
        for key, recipients in groups.items():
            dest = key.split("\0", 1)[0]
            item = _Job(message, DeliveryJob(env, recipients, path, dest, domains[key]))
            if self.journal is not None:
                item.job.on_transaction = partial(self._journal, item)
            message.jobs += 1
            self._queues.setdefault(dest, deque()).append(item)
        self._dispatch()

    def _dispatch(self) -> None:
        """Start waiting jobs within the limits, destinations in turn.

        Not re-entrant: a job that completes at once (a cached DNS failure,
        a suspended destination) calls back here; that call only asks the
        running loop to go round again, so the stack stays flat however
        many jobs wait.
        """
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._dispatch_round()
        finally:
            self._dispatching = False

    def _dispatch_round(self) -> None:
        for dest in list(self._queues):
            if self._running_total >= self.limits.connections:
                return
            waiting = self._queues.get(dest)
            if not waiting or self._running[dest] >= self.limits.destination_concurrency:
                continue
            if (
                not self._is_proven(dest)
                and (
                    self._running[dest] >= UNPROVEN_CONCURRENCY
                    or self._unproven_running >= max(1, self.limits.connections // 2)
                )
                and self._suspension(dest) is None
            ):
                continue  # not heard from yet: a small share until it answers
            item = waiting.popleft()
            if not waiting:
                del self._queues[dest]
            else:
                self._queues.move_to_end(dest)
            suspension = self._suspension(dest)
            if suspension is not None:
                self._skip(item, suspension)
            else:
                self._start(item)
            self._dispatch_again = True

    def _is_proven(self, dest: str) -> bool:
        when = self._proven.get(dest)
        return when is not None and when > self.clock.seconds() - PROVEN_TIME

    def _suspension(self, dest: str) -> _Suspension | None:
        suspension = self.suspended.get(dest)
        if suspension is not None and suspension.until <= self.clock.seconds():
            del self.suspended[dest]
            return None
        return suspension

    def _prune_suspensions(self, *, force: bool = False) -> None:
        """Forget suspensions that have ended (at most once a minute unless forced)."""
        now = self.clock.seconds()
        if not self.suspended or (not force and now < self._next_prune):
            return
        self._next_prune = now + 60
        for name in [d for d, s in self.suspended.items() if s.until <= now]:
            del self.suspended[name]
        for name in [d for d, t in self._proven.items() if t <= now - PROVEN_TIME]:
            del self._proven[name]

    def _suspend(self, dest: str, seconds: float, reason: Reply, why: str) -> None:
        if seconds <= 0:
            return
        now = self.clock.seconds()
        self._prune_suspensions(force=True)
        until = now + seconds
        current = self.suspended.get(dest)
        if current is None or current.until < until:
            self.suspended[dest] = _Suspension(until, reason, why)
            log.info(
                "{dest}: {why}; delivery suspended for {secs:.0f} s ({reason})",
                dest=dest,
                why=why,
                secs=seconds,
                reason=str(reason),
            )

    def _skip(self, item: _Job, suspension: _Suspension) -> None:
        """Defer a job's recipients without a connection: the destination rests."""
        reason = suspension.reason
        reply = Reply(
            451,
            reason.enhanced if reason.enhanced and reason.code < 500 else "4.4.1",
            f"delivery temporarily suspended ({suspension.why}): {reason}",
        )
        results = [RecipientResult(r.address, reply, "suspended") for r in item.job.recipients]
        self._record(item, results, self.clock.seconds(), ran=False, resume=suspension.until)

    def _start(self, item: _Job) -> None:
        dest = item.job.destination
        self._running[dest] += 1
        self._running_total += 1
        if not self._is_proven(dest):
            item.unproven = True
            self._unproven_running += 1
        started = self.clock.seconds()

        def done(results: list[RecipientResult]) -> None:
            self._record(item, results, started)

        def crashed(failure: Failure) -> None:
            log.failure("{qid}: delivery crashed", failure, qid=item.job.envelope.queue_id)
            reply = Reply(451, "4.3.0", "internal error during delivery")
            self._record(
                item,
                [RecipientResult(r.address, reply, "local") for r in item.job.recipients],
                started,
            )

        self.deliver(item.job).addCallbacks(done, crashed)

    # -- results -------------------------------------------------------------

    def _record(
        self,
        item: _Job,
        results: list[RecipientResult],
        started: float,
        *,
        ran: bool = True,
        resume: float = 0.0,
    ) -> None:
        """Apply one job's results to the envelope, log them, decide what next.

        C{ran} is False for a job skipped because its destination rests:
        that is no attempt, and C{resume} is the earliest time to retry.
        """
        if ran and self.journal is not None:
            self._journal(item, results)
        dest = item.job.destination
        if ran:
            self._running[dest] -= 1
            if self._running[dest] <= 0:
                del self._running[dest]
            self._running_total -= 1
            if item.unproven:
                self._unproven_running -= 1
            if any(r.kind == "remote" for r in results):
                self._proven[dest] = self.clock.seconds()
        message = item.message
        env = message.envelope
        now = self.clock.seconds()
        settings = self.settings()
        policy = RetryPolicy.from_config(settings)
        by_address = {r.address: r for r in item.job.recipients}
        verdicts = []
        for result in results:
            rcpt = by_address[result.address]
            verdict = None if result.ok else self.classify(result)
            verdicts.append(verdict)
            if ran:
                rcpt.attempts += 1
                rcpt.last_attempt = now
                self.metrics.attempts.inc()
            rcpt.reply = str(result.reply)
            rcpt.dsn_status = maillog.dsn_code(result.reply)
            rcpt.relay = result.relay
            if verdict is None:
                rcpt.state = RecipientState.SENT
                rcpt.category = None
                rcpt.next_attempt = None
                status = "sent"
                if not result.dsn_passed and dsn.needs_notice(env, rcpt, "relayed"):
                    message.notices.append(dsn.Notice(rcpt, "relayed"))
                self.metrics.delivery_latency.observe(max(0.0, now - env.arrival))
            elif verdict.temporary and not policy.expired(env.arrival, now):
                rcpt.state = RecipientState.DEFERRED
                rcpt.category = verdict.category
                rcpt.next_attempt = max(
                    policy.next_attempt(env.arrival, now, self.jitter),
                    min(resume, policy.expires_at(env.arrival)),
                )
                status = "deferred"
            else:
                rcpt.state = RecipientState.FAILED
                rcpt.category = verdict.category
                rcpt.next_attempt = None
                status = "expired" if verdict.temporary else "bounced"
                if dsn.needs_notice(env, rcpt, "failed"):
                    message.notices.append(dsn.Notice(rcpt, "failed"))
            self._log_result(
                env, rcpt, status, reply=result.reply, relay=result.relay,
                activated=message.activated, started=started, now=now,
                setup=result.setup_time, transfer=result.transfer_time,
            )  # fmt: skip
        if ran:
            self._watch_destination(dest, results, verdicts, policy, settings)
        self._prune_suspensions()
        message.jobs -= 1
        if message.jobs == 0:
            self._finish(message)
        else:
            snapshot = copy.deepcopy(env)
            self._write(message, lambda: self.store.write_envelope("active", snapshot))
        self._dispatch()

    def _journal(self, item: _Job, results: list[RecipientResult]) -> None:
        """Write the job's deliveries ahead of the envelope (L{mta.spool.journal}).

        This runs as soon as each transaction's replies are read (the
        agent's C{on_transaction}), and again for the whole job when it
        ends, for agents that do not report transactions; a recipient is
        written once.  So a SIGKILL before the message is filed does not
        send it again, even when the kill comes during a later transaction
        of the same job (more than 50 recipients, or another MX host for
        the rest).  A recipient owed a "relayed" notice is left out:
        recovery could not send the notice, so a crash delivers it again
        rather than lose the notice.
        """
        assert self.journal is not None
        accepted = [r for r in results if r.ok and r.address not in item.journaled]
        if not accepted:
            return  # the usual end of a job: every transaction was written as it ended
        env = item.message.envelope
        now = self.clock.seconds()
        position = {id(r): n for n, r in enumerate(env.recipients)}
        by_address = {r.address: r for r in item.job.recipients}
        records = []
        for result in accepted:
            rcpt = by_address[result.address]
            if id(rcpt) not in position:
                continue
            if not result.dsn_passed and dsn.needs_notice(env, rcpt, "relayed"):
                continue
            records.append(
                SentRecord(
                    env.queue_id,
                    position[id(rcpt)],
                    rcpt.address,
                    now,
                    str(result.reply),
                    maillog.dsn_code(result.reply),
                    result.relay,
                )
            )
        token = self.journal.record(records)
        if token is not None:
            item.message.journal.append(token)
            item.journaled.update(r.address for r in records)

    def _release_journal(self, message: _Active) -> None:
        """The message is filed (or removed): its journal lines are not needed any more."""
        if self.journal is not None:
            for token in message.journal:
                self.journal.release(token)
        message.journal = []

    def _watch_destination(
        self,
        dest: str,
        results: list[RecipientResult],
        verdicts: list[Verdict | None],
        policy: RetryPolicy,
        settings: QueueConfig,
    ) -> None:
        """Dead-site detection and blocklist rest (see the module docstring)."""
        if results and all(not r.connected and r.kind in ("network", "timeout") for r in results):
            self._suspend(dest, policy.minimal_backoff, results[0].reply, "unreachable")
            return
        for result, verdict in zip(results, verdicts, strict=True):
            if verdict is not None and verdict.category == "blocklist":
                self._suspend(dest, settings.blocklist_rest_time, result.reply, "blocklisted")
                return

    def classify(self, result: RecipientResult) -> Verdict:
        """Retry or bounce, and why (L{mta.bounce})."""
        return self.classifier.classify_error(
            DeliveryError(result.reply, result.kind, remote=result.relay)
        )

    def _write(self, message: _Active, work: Callable[[], None]) -> Deferred[Any]:
        """Run spool work for a message after any earlier work for it."""

        def run(_: object) -> Deferred[None]:
            return self.runner(work)

        message.io = message.io.addCallback(run).addErrback(self._io_failed, message)
        return message.io

    @staticmethod
    def _io_failed(failure: Failure, message: _Active) -> None:
        log.failure("{qid}: cannot record delivery results", failure, qid=message.envelope.queue_id)

    def _finish(self, message: _Active) -> None:
        """No job of the message is running: notify, then file it as done or deferred."""
        self._delay_notices(message)
        message.io = message.io.addCallback(lambda _: Deferred.fromCoroutine(self._file(message)))

    async def _file(self, message: _Active) -> None:
        """Send the owed report, then record the envelope and move the message.

        Either step may fail (a full disk): then the message stays active in
        memory, as it is on disk, and the step is tried again a minute later
        — never dropped, never filed with a report marked sent that was not.
        The envelope is copied in the reactor thread and written in a group
        with other messages' (one directory fsync per group).

        An operator action that waited for the round to end is applied
        here: C{delete} removes the message, C{bounce} fails its pending
        recipients (and the report goes out), C{hold} files it in C{hold/},
        C{flush} makes it due again at once.
        """
        env = message.envelope
        queue_id = env.queue_id
        while True:
            request = self._requests.get(queue_id)
            try:
                if request == "delete":
                    await self.runner(lambda: self.store.remove(queue_id, "active"))
                    log.info("{qid}: removed by the mail administrator", qid=queue_id)
                    state, due = "", None
                    break
                if request == "bounce":
                    self._expire(message)
                if message.notices:
                    await self._send_report(env, message.notices)
                    for notice in message.notices:
                        if notice.action == "delayed":
                            notice.recipient.delay_notified = True
                        else:
                            notice.recipient.final_notified = True
                    message.notices = []
                waiting = [r.next_attempt for r in env.recipients if not r.state.final]
                now = self.clock.seconds()
                due = min(t if t is not None else now for t in waiting) if waiting else None
                if waiting and queue_id in self._flushed:
                    due = now
                state = "deferred" if waiting else "done"
                if waiting and request == "hold":
                    state, due = "hold", None
                await self._settles.submit(
                    (copy.deepcopy(env), "active", state, now if due is None else due)
                )
                break
            except Exception:
                log.failure("{qid}: cannot file the message; trying again in a minute",
                            qid=queue_id)  # fmt: skip
                if self._stopped:
                    return  # it stays in active/ and is taken up at the next start
                await deferLater(self.clock, RETRY_DELAY, lambda: None)
        self._release_journal(message)
        self.active.pop(queue_id, None)
        late = self._requests.pop(queue_id, None)
        if state == "deferred" and due is not None:
            self._schedule(queue_id, due)
        elif state == "hold":
            log.info("{qid}: put on hold by the mail administrator", qid=queue_id)
        if state != "deferred":
            self._flushed.discard(queue_id)
        if state == "done":
            log.info("{qid}: removed from the queue (all recipients done)", qid=queue_id)
            if self.on_done is not None:
                self.on_done(queue_id)
        if late is not None and late != request and state in ("deferred", "hold"):
            # Asked for while the message was being filed: apply it now.
            self.control(late, queue_id).addErrback(
                lambda f: log.error("{qid}: {op}: {e}", qid=queue_id, op=late, e=f.value)
            )
        self._pump()

    def _expire(self, message: _Active) -> None:
        """C{mtactl queue bounce} on an active message: fail what is pending, report it."""
        env = message.envelope
        now = self.clock.seconds()
        for rcpt in control.expire(env, now):
            if dsn.needs_notice(env, rcpt, "failed"):
                message.notices.append(dsn.Notice(rcpt, "failed"))
            self._log_result(
                env, rcpt, "expired", reply=control.ADMIN_BOUNCE, relay="none",
                activated=message.activated, started=now, now=now,
            )  # fmt: skip

    def _log_result(
        self, env: Envelope, rcpt: Recipient, status: str, *, reply: Reply, relay: str,
        activated: float, started: float, now: float, setup: float = 0.0,
        transfer: float = 0.0,
    ) -> None:  # fmt: skip
        """Count a recipient's result and log it in Postfix's shape, with its fields."""
        self.metrics.deliveries.labels(status, rcpt.category or "").inc()
        maillog_log.info(
            "{line}",
            queue_id=env.queue_id,
            recipient=rcpt.address,
            relay=relay,
            status=status,
            dsn=rcpt.dsn_status,
            reply=rcpt.reply,
            line=maillog.delivery_line(
                env.queue_id,
                rcpt.address,
                relay=relay,
                status=status,
                reply=reply,
                arrival=env.arrival,
                activated=activated,
                started=started,
                setup=setup,
                transfer=transfer,
                now=now,
            ),
        )

    def _delay_notices(self, message: _Active) -> None:
        """A delay notice, once per recipient, after C{delay_warning_time} (RFC 3461)."""
        env = message.envelope
        warn_after = self.settings().delay_warning_time
        if warn_after <= 0 or self.clock.seconds() - env.arrival < warn_after:
            return
        for rcpt in env.recipients:
            if (
                rcpt.state == RecipientState.DEFERRED
                and not rcpt.delay_notified
                and dsn.needs_notice(env, rcpt, "delayed")
            ):
                message.notices.append(dsn.Notice(rcpt, "delayed"))

    def _send_report(self, env: Envelope, notices: list[dsn.Notice]) -> Deferred[Any]:
        """Build a report from the stored message and commit it to the spool.

        Fails when the report could not be committed, so that the caller
        keeps the notices owed and tries again.
        """
        if self.reports is None:
            return succeed(None)
        reports = self.reports
        path = self.store.path("active", env.queue_id, MESSAGE)
        now = self.clock.seconds()
        retry_until = RetryPolicy.from_config(self.settings()).expires_at(env.arrival)
        snapshot = copy.deepcopy(env)
        notices = [dsn.Notice(copy.deepcopy(n.recipient), n.action) for n in notices]

        def build() -> bytes:
            with open(path, "rb") as f:
                original = f.read(REPORT_READ_LIMIT)
            return dsn.build_report(
                snapshot,
                notices,
                original,
                hostname=self.hostname,
                now=now,
                retry_until=retry_until,
                message_id=f"<{env.queue_id}.{int(now)}.dsn@{self.hostname}>",
            )

        def commit(report: bytes) -> Deferred[str]:
            txn = reports.begin()
            try:
                txn.write(report)
            except BaseException:
                txn.abort()
                raise
            report_env = Envelope(
                queue_id=txn.queue_id,
                sender="",
                recipients=[Recipient(env.sender, notify=("NEVER",))],
                arrival=now,
                size=len(report),
                body="8BITMIME" if dsn.report_is_8bit(report) else None,
                smtputf8=not env.sender.isascii() or dsn.report_needs_smtputf8(report),
                kind="dsn",
            )
            return txn.commit(report_env)

        def sent(queue_id: str) -> None:
            log.info(
                "{qid}: sender notification: {report} ({actions})",
                qid=env.queue_id,
                report=queue_id,
                actions=", ".join(f"{n.recipient.address} {n.action}" for n in notices),
            )

        return self.runner(build).addCallback(commit).addCallback(sent)

    # -- operator actions ----------------------------------------------------

    def control(self, op: str, queue_id: str) -> Deferred[str]:
        """Apply an operator action (L{mta.queue.control}); fires with a line to show.

        A message being delivered is never changed under the delivery: its
        waiting jobs are withdrawn, the connections in flight finish, and
        the action is applied when the round ends (L{_file}), so a delete
        that races a delivery loses nothing and sends nothing twice.  Any
        other message is taken out of the manager's bookkeeping while its
        files change, and put back where the action leaves it.
        """
        if op not in control.OPERATIONS:
            return fail(ControlError(f"unknown action {op!r}"))
        if queue_id in self._controlling:
            return fail(ControlError(f"{queue_id}: another action on it is in progress"))
        if queue_id in self._loading:
            waiting: Deferred[str] = Deferred()
            self._load_waiters.setdefault(queue_id, []).append((op, waiting))
            return waiting
        message = self.active.get(queue_id)
        if message is not None:
            return maybeDeferred(self._request, op, queue_id, message)
        was_ready = queue_id in self.incoming
        was_due = self._due.pop(queue_id, None)
        if was_ready:
            self.incoming = deque(q for q in self.incoming if q != queue_id)
        self._controlling.add(queue_id)
        now = self.clock.seconds()
        if op == "flush" and (was_ready or was_due is not None):
            self._controlling.discard(queue_id)
            self._flush_one(queue_id, was_ready)
            self._pump()
            return succeed(f"{queue_id}: flushed")

        def done(outcome: control.Outcome) -> str:
            self._controlling.discard(queue_id)
            if op in ("delete", "hold", "bounce"):
                self._flushed.discard(queue_id)
            if outcome.state == "incoming":
                self.incoming.appendleft(queue_id)
            elif outcome.state == "deferred" and outcome.due is not None:
                self._schedule(queue_id, outcome.due)
            if outcome.envelope is not None:
                for rcpt in outcome.expired:
                    self._log_result(
                        outcome.envelope, rcpt, "expired", reply=control.ADMIN_BOUNCE,
                        relay="none", activated=now, started=now, now=now,
                    )  # fmt: skip
            if op == "delete":
                log.info("{qid}: removed by the mail administrator", qid=queue_id)
            elif op == "hold":
                log.info("{qid}: put on hold by the mail administrator", qid=queue_id)
            elif op in ("release", "requeue"):
                log.info("{qid}: {op}d by the mail administrator", qid=queue_id, op=op)
            self._pump()
            return f"{queue_id}: {control.DONE[op]}"

        def failed(failure: Failure) -> Failure:
            self._controlling.discard(queue_id)
            if was_ready:
                self.incoming.append(queue_id)
            if was_due is not None:
                self._schedule(queue_id, was_due)
            self._pump()
            return failure

        return self.runner(lambda: control.apply(self.store, op, queue_id, now)).addCallbacks(
            done, failed
        )

    def _request(self, op: str, queue_id: str, message: _Active) -> str:
        """An action on a message in delivery: applied when its round ends."""
        if op == "release":
            raise ControlError(f"cannot release {queue_id}: it is not on hold")
        if op in ("flush", "requeue"):
            self._flushed.add(queue_id)
            return f"{queue_id}: being delivered now; flushed"
        self._requests[queue_id] = op
        self._withdraw(message)
        return f"{queue_id}: being delivered; {control.DONE[op]} when the attempt in flight ends"

    def _withdraw(self, message: _Active) -> None:
        """Take a message's jobs that have not started out of the waiting queues."""
        removed = 0
        for dest in list(self._queues):
            waiting = self._queues[dest]
            keep = deque(item for item in waiting if item.message is not message)
            removed += len(waiting) - len(keep)
            if keep:
                self._queues[dest] = keep
            else:
                del self._queues[dest]
        if removed:
            message.jobs -= removed
            if message.jobs == 0:
                self._finish(message)

    def _flush_one(self, queue_id: str, ready: bool) -> None:
        """Make a waiting message due now, all of its pending recipients (the caller pumps)."""
        self._flushed.add(queue_id)
        if not ready:
            self._schedule(queue_id, self.clock.seconds())
        else:
            self.incoming.appendleft(queue_id)

    def flush(self, domain: str | None = None) -> Deferred[str]:
        """Retry now: every deferred message, or those with recipients at C{domain}.

        The suspension of the destinations concerned ends too.  Messages
        being delivered are left alone (they are being tried now).
        """
        if domain is None:
            self.suspended.clear()
            ids = list(self._due)
            for queue_id in ids:
                self._flush_one(queue_id, False)
            self._pump()
            return succeed(f"flushed {len(ids)} deferred message(s)")
        dest = self.router.destination(domain.lower().rstrip("."))
        self.suspended.pop(dest, None)
        candidates = list(self._due)

        def found(ids: list[str]) -> str:
            flushed = [q for q in ids if q in self._due]
            for queue_id in flushed:
                self._flush_one(queue_id, False)
            self._pump()
            return f"flushed {len(flushed)} deferred message(s) for {domain}"

        return self.runner(
            lambda: control.ids_for_domain(self.store, candidates, domain)
        ).addCallback(found)

    def pickup(self, queue_id: str) -> str:
        """A message another process committed to C{incoming/} (C{mta-sendmail})."""
        known = (
            queue_id in self.active
            or queue_id in self._loading
            or queue_id in self._due
            or queue_id in self._controlling
            or queue_id in self.incoming
        )
        if not known:
            if not os.path.isdir(self.store.path("incoming", queue_id)):
                raise ControlError(f"no message {queue_id} in incoming/")
            self.committed(queue_id, "incoming")
        return f"{queue_id}: queued"

    def counts(self) -> dict[str, int]:
        """Messages by state as the manager sees them (for metrics)."""
        return {
            "incoming": len(self.incoming),
            "active": len(self.active) + len(self._loading),
            "deferred": len(self._due),
        }

    def oldest_arrival(self) -> float | None:
        """Arrival time of the oldest message waiting or in delivery."""
        ids = [*self.incoming, *self.active, *self._loading]
        oldest = min(ids, default=None)
        if self._due:
            first = min(self._due)
            oldest = first if oldest is None else min(oldest, first)
        return None if oldest is None else arrival_of(oldest)

    # -- tests and operations ------------------------------------------------

    def _check_idle(self) -> None:
        if self.idle and self.idle_waiters:
            waiters, self.idle_waiters = self.idle_waiters, []
            for d in waiters:
                d.callback(None)

    @property
    def idle(self) -> bool:
        """Nothing active, loading or ready (deferred messages may wait)."""
        return not self.active and not self._loading and not self.incoming

    def when_idle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.idle_waiters.append(d)
        self._check_idle()
        return d
