"""The queue manager: from the store to the delivery agent and back.

It carries out what L{mta.queue.scheduler} decides, with timers, worker
threads and concurrency limits.  A bounded set of I{active} messages is in
memory (their envelopes, never their bytes); the rest waits on disk and in
a L{ReadyQueue} of queue IDs: new messages from the spool's commit
notifications (and, at start-up, the store's scan), deferred ones by the
time they are due, served by a single timer.

An active message's due recipients go out as L{DeliveryJob}s, one per
destination; jobs wait per destination and run within a per-destination
and a global concurrency limit, taking destinations in turn, and within
the limits traffic shaping learnt from the destination's replies
(L{mta.queue.traffic}, which every job's results feed).  Each job's
results are applied by the scheduler, logged in Postfix's shape
(L{mta.queue.resultlog}) and written to the progress journal
(L{mta.queue.progress}); when no job of the message runs any more, the
reports it owes are sent (L{mta.queue.reports}) and it is filed: C{done}
or C{deferred}.

Where each message is (ready, loading, active, or busy with an operator
action) is kept in L{mta.queue.bookkeeping}, through which operator
actions (L{mta.queue.operator}) reach messages too.  All store work runs
in the spool thread pool; a message's round ends once, and an operator
action on a message in delivery waits for that end, so the store work of
one message never overlaps.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.batch import Batcher, Runner
from mta.bounce import Classifier
from mta.config import QueueConfig
from mta.delivery.job import DeliveryJob, RecipientResult
from mta.delivery.routes import Router
from mta.envelope import Committed, Envelope, QueueScan, QueueState
from mta.interfaces import IDeliveryAgent, IQueueStore
from mta.metrics import Metrics
from mta.queue import scheduler
from mta.queue.bookkeeping import ActiveMessage, Bookkeeping, QueuedJob
from mta.queue.dispatch import Dispatcher, QueueLimits, Running
from mta.queue.operator import Operator
from mta.queue.progress import ProgressJournal
from mta.queue.reports import Reporter
from mta.queue.resultlog import ResultLog
from mta.queue.scheduler import Destinations, RetryPolicy, Suspension, no_jitter
from mta.queue.shaping import Shaper, ShapingPolicy
from mta.queue.traffic import TrafficShaping
from mta.spool.format import FormatError, MissingEnvelopeError

log = Logger(namespace="mta.queue")
RETRY_DELAY = 60.0  # seconds before trying again after a local (disk) error


class QueueManager(Service):
    """See the module docstring."""

    def __init__(
        self,
        store: IQueueStore,
        runner: Runner[Any],
        agent: IDeliveryAgent,
        router: Router,
        clock: IReactorTime,
        *,
        limits: QueueLimits | None = None,
        settings: QueueConfig | None = None,
        classifier: Classifier | None = None,
        jitter: Callable[[float], float] = no_jitter,
        reporter: Reporter | None = None,
        on_done: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        traffic: TrafficShaping | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.agent = agent
        self.router = router
        self.clock = clock
        self.limits = limits or QueueLimits()
        self.settings = settings or QueueConfig()
        self.classifier = classifier or Classifier()
        self.jitter = jitter
        self.reporter = reporter
        self.on_done = on_done
        self.metrics = metrics or Metrics()
        self.result_log = ResultLog(self.metrics)
        self.progress = ProgressJournal(store, clock)
        self.messages = Bookkeeping(self.limits.active)
        self.destinations = Destinations()
        self.operator = Operator(self)
        concurrency = self.limits.destination_concurrency
        self.traffic = traffic or TrafficShaping(
            Shaper(ShapingPolicy(max_concurrency=concurrency)), clock
        )
        self.dispatcher: Dispatcher[QueuedJob] = Dispatcher(
            self.limits, self.destinations, self.traffic.shaper
        )
        self._timer: IDelayedCall | None = None  # the next deferred message is due
        self._rescan: IDelayedCall | None = None  # after a failed start-up scan
        self._files: Batcher[tuple[Envelope, QueueState, float | None], None] = Batcher(
            runner, store.file
        )
        self._stopped = True
        self.idle_waiters: list[Deferred[None]] = []

    def configure(self, settings: QueueConfig, classifier: Classifier | None = None) -> None:
        """New settings (a reload): used from the next decision on."""
        self.settings = settings
        if classifier is not None:
            self.classifier = classifier

    # -- life cycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        self._start_scan()

    def _start_scan(self) -> None:
        self.runner(self.store.scan).addCallbacks(self._scanned, self._scan_failed)

    def _scanned(self, found: QueueScan) -> None:
        ready = self.messages.add_scan(found)
        log.info(
            "queue: {ready} messages ready, {deferred} deferred",
            ready=ready,
            deferred=len(found.deferred),
        )
        self.pump()

    def _scan_failed(self, failure: Failure) -> None:
        log.failure("cannot read the queue; trying again in a minute", failure)
        if not self._stopped:
            self._rescan = self.clock.callLater(RETRY_DELAY, self._start_scan)

    def stopService(self) -> None:
        self._stopped = True
        for call in [self._timer, self._rescan]:
            if call is not None and call.active():
                call.cancel()
        self.traffic.cancel_wake()
        super().stopService()  # type: ignore[no-untyped-call]

    def committed(self, notice: Committed) -> None:
        """Spool listener: a new message is in C{incoming}.

        With room in the active set it is taken up at once, with the
        envelope (and the bytes) the spool still has: no read, no thread.
        """
        queue_id, messages = notice.queue_id, self.messages
        if (
            not self._stopped
            and messages.has_room()
            and not messages.known(queue_id)
            and self.store.claim(queue_id)
        ):
            self._take(queue_id, notice.envelope, notice.data)
        else:
            messages.ready.add(queue_id)
        self.pump()

    def enqueue(self, queue_id: str) -> None:
        """A message in C{incoming} that the store has not told us of (C{mta-sendmail})."""
        self.messages.ready.add(queue_id)
        self.pump()

    # -- activation --------------------------------------------------------

    def pump(self) -> None:
        """Take messages into the active set while there is room."""
        if self._stopped:
            return
        now, messages = self.clock.seconds(), self.messages
        while (queue_id := messages.next_ready(now)) is not None:
            self._activate(queue_id)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        due = messages.ready.next_due()
        # When the active set is full, a finishing message pumps again.
        if due is not None and messages.has_room():
            self._timer = self.clock.callLater(max(0.0, due - now), self.pump)
        self._check_idle()

    def _activate(self, queue_id: str) -> None:
        messages = self.messages
        messages.loading.add(queue_id)

        def loaded(envelope: Envelope | None) -> None:
            messages.loading.discard(queue_id)
            if envelope is not None and not self._stopped:
                self._take(queue_id, envelope, None)
            else:
                messages.flushed.discard(queue_id)
            self.operator.loaded(queue_id)
            self.pump()

        def failed(failure: Failure) -> None:
            messages.loading.discard(queue_id)
            if failure.check(MissingEnvelopeError):
                log.error("{qid}: no envelope, moved to corrupt/", qid=queue_id)
                messages.flushed.discard(queue_id)
            elif failure.check(FormatError):
                log.error("{qid}: unreadable envelope, moved to corrupt/: {e}", qid=queue_id,
                          e=failure.value)  # fmt: skip
                messages.flushed.discard(queue_id)
            else:
                # An I/O error (e.g. out of file descriptors) must not make
                # the queue forget the message: look at it again in a minute.
                log.failure("{qid}: cannot activate; trying again in a minute", failure,
                            qid=queue_id)  # fmt: skip
                messages.ready.schedule(queue_id, self.clock.seconds() + RETRY_DELAY)
            self.operator.loaded(queue_id)
            self.pump()

        self.runner(partial(self.store.activate, queue_id)).addCallbacks(loaded, failed)

    def _take(self, queue_id: str, envelope: Envelope, data: bytes | None) -> None:
        """Make a message active and send out its due recipients."""
        message = ActiveMessage(envelope, self.clock.seconds())
        message.notices = scheduler.owed_notices(envelope)
        self.messages.take(queue_id, message, data)
        self._plan(message)

    # -- planning and dispatch -----------------------------------------------

    def _plan(self, message: ActiveMessage) -> None:
        env = message.envelope
        flushed = self.messages.pop_flushed(env.queue_id)
        plans = scheduler.plan(env, self.clock.seconds(), self.router.destination, flushed=flushed)
        if not plans:
            self._finish(message)
            return
        data = message.data
        opener: Callable[[], IO[bytes]] = (
            partial(io.BytesIO, data)
            if data is not None
            else partial(self.store.open_message, env.queue_id, QueueState.ACTIVE)
        )
        for p in plans:
            job = DeliveryJob(env, p.recipients, opener, p.destination, p.domain)
            item = QueuedJob(message, job)
            job.on_transaction = partial(self.progress.transaction, item)
            message.jobs += 1
            self.dispatcher.add(p.destination, item)
        self._dispatch()

    def _dispatch(self) -> None:
        wake = self.dispatcher.dispatch(self.clock.seconds, self._start, self._skip)
        if not self._stopped:
            self.traffic.wake(wake, self._dispatch)  # a destination held by its rate

    def _skip(self, item: QueuedJob, suspension: Suspension) -> None:
        """Defer a job's recipients without a connection: the destination rests."""
        results = scheduler.suspended_results(item.job.recipients, suspension)
        self._record(item, results, self.clock.seconds(), ran=False, resume=suspension.until)

    def _start(self, item: QueuedJob, running: Running) -> None:
        item.running = running
        started = self.clock.seconds()

        def crashed(failure: Failure) -> list[RecipientResult]:
            log.failure("{qid}: delivery crashed", failure, qid=item.job.envelope.queue_id)
            return scheduler.crashed_results(item.job.recipients)

        d = maybeDeferred(self.agent.deliver, item.job).addErrback(crashed)
        d.addCallback(lambda results: self._record(item, results, started))

    def withdraw(self, message: ActiveMessage) -> None:
        """Take a message's jobs that have not started out of the waiting queues."""
        removed = self.dispatcher.withdraw(lambda item: item.message is message)
        if removed:
            message.jobs -= removed
            if message.jobs == 0:
                self._finish(message)

    # -- results -------------------------------------------------------------

    def _record(
        self,
        item: QueuedJob,
        results: list[RecipientResult],
        started: float,
        *,
        ran: bool = True,
        resume: float = 0.0,
    ) -> None:
        """Apply one job's results (L{scheduler.apply}), log them, carry the decision out."""
        dest, message, now = item.job.destination, item.message, self.clock.seconds()
        if item.running is not None:
            self.dispatcher.finished(item.running)
            item.running = None
        env = message.envelope
        if ran:
            self.traffic.observe(dest, results, started)
        decision = scheduler.apply(
            env, item.job.recipients, results, now, settings=self.settings,
            classifier=self.classifier, jitter=self.jitter, ran=ran, resume=resume,
            spread=self.traffic.spread(dest),
        )  # fmt: skip
        self.result_log.job(env, decision, ran=ran, activated=message.activated, started=started,
                            now=now)  # fmt: skip
        self.progress.results(item, decision)
        message.notices.extend(decision.notices)
        rest = self.destinations.learn(dest, decision, now)
        if rest is not None:
            seconds, reason, why = rest
            log.info("{dest}: {why}; delivery suspended for {secs:.0f} s ({reason})",
                     dest=dest, why=why, secs=seconds, reason=str(reason))  # fmt: skip
        message.jobs -= 1
        if message.jobs == 0:
            self._finish(message)
        self._dispatch()

    # -- the end of a round ----------------------------------------------------

    def _finish(self, message: ActiveMessage) -> None:
        """No job of the message is running: notify, then file it."""
        env = message.envelope
        now = self.clock.seconds()
        message.notices += scheduler.delay_notices(env, now, self.settings.delay_warning_time)
        Deferred.fromCoroutine(self._file(message))

    async def _file(self, message: ActiveMessage) -> None:
        """End the message's round (L{_close}) until that succeeds, then let go of it.

        A step may fail (a full disk): then the message stays active in
        memory, as it is on disk, and the round's end is tried again a
        minute later — never dropped, never filed with a report marked sent
        that was not.
        """
        queue_id = message.envelope.queue_id
        while True:
            request = self.messages.requests.get(queue_id)
            try:
                state, when = await self._close(message, request)
                break
            except Exception:
                log.failure("{qid}: cannot file the message; trying again in a minute",
                            qid=queue_id)  # fmt: skip
                if self._stopped:
                    return  # it stays in active/ and is taken up at the next start
                await deferLater(self.clock, RETRY_DELAY, lambda: None)
        self._filed(message, state, when, request)

    async def _close(
        self, message: ActiveMessage, request: str | None
    ) -> tuple[QueueState | None, float]:
        """Apply the operator action that waited for the round to end
        (L{mta.queue.operator}), send the owed report, then file the message
        where L{scheduler.filing} says; returns where (None: removed) and its time.

        The envelope is filed as it is (nothing changes it meanwhile) in a
        group with other messages'.
        """
        env = message.envelope
        if request == "delete":
            await self.operator.remove(env.queue_id)
            return None, 0.0
        if request == "bounce":
            self.operator.expire(message)
        if message.notices:
            if self.reporter is not None:
                until = RetryPolicy.from_config(self.settings).expires_at(env.arrival)
                await self.reporter.send(env, message.notices, until)
            scheduler.notified(message.notices)
            message.notices = []
        state, when = scheduler.filing(
            env, self.clock.seconds(), flushed=env.queue_id in self.messages.flushed,
            hold=request == "hold",
        )  # fmt: skip
        await self._files.submit((env, state, when))
        return state, when

    def _filed(
        self, message: ActiveMessage, state: QueueState | None, when: float, request: str | None
    ) -> None:
        """The message is filed in C{state} (None: removed): let go of it."""
        queue_id = message.envelope.queue_id
        self.progress.release(message)
        self.messages.filed(message, state, when)
        if state == QueueState.DONE:
            log.info("{qid}: removed from the queue (all recipients done)", qid=queue_id)
            if self.on_done is not None:
                self.on_done(queue_id)
        self.operator.filed(queue_id, state, request)
        self.pump()

    # -- for metrics, tests and operations -----------------------------------------

    def _check_idle(self) -> None:
        if self.messages.idle and self.idle_waiters:
            waiters, self.idle_waiters = self.idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.idle_waiters.append(d)
        self._check_idle()
        return d
