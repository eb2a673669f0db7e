"""Operator actions on a running queue: what C{mtactl queue ...} asks the daemon.

What each action does to a message is in L{mta.queue.actions}; this module
applies it without racing the queue manager.  A message being delivered is
never changed under the delivery: its waiting jobs are withdrawn, the
connections in flight finish, and the action is applied when the round
ends, so a delete that races a delivery loses nothing and sends nothing
twice.  Any other message is taken out of the manager's bookkeeping while
its files change (C{busy}), and put back where the action leaves it.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta import dsn
from mta.envelope import QueueState
from mta.queue import actions, scheduler
from mta.queue.actions import ActionError
from mta.queue.bookkeeping import ActiveMessage

if TYPE_CHECKING:
    from mta.queue.manager import QueueManager

log = Logger(namespace="mta.queue")


class Operator:
    """Carries out operator actions on the messages of one L{QueueManager}."""

    def __init__(self, manager: QueueManager) -> None:
        self.m = manager
        # Actions asked for while the message was being loaded.
        self._after_load: dict[str, list[tuple[str, Deferred[str]]]] = {}

    def act(self, op: str, queue_id: str) -> Deferred[str]:
        """Apply an action (L{actions.OPERATIONS}); fires with a line to show."""
        m = self.m
        if op not in actions.OPERATIONS:
            return fail(ActionError(f"unknown action {op!r}"))
        if queue_id in m.messages.busy:
            return fail(ActionError(f"{queue_id}: another action on it is in progress"))
        if queue_id in m.messages.loading:
            waiting: Deferred[str] = Deferred()
            self._after_load.setdefault(queue_id, []).append((op, waiting))
            return waiting
        message = m.messages.active.get(queue_id)
        if message is not None:
            return maybeDeferred(self._request, op, queue_id, message)
        was_ready, was_due = m.messages.ready.take(queue_id)
        now = m.clock.seconds()
        if op == "flush" and (was_ready or was_due is not None):
            self._flush_one(queue_id, was_ready)
            m.pump()
            return succeed(f"{queue_id}: flushed")
        m.messages.busy.add(queue_id)

        def done(outcome: actions.Outcome) -> str:
            m.messages.busy.discard(queue_id)
            if op in ("delete", "hold", "bounce"):
                m.messages.flushed.discard(queue_id)
            if outcome.state == QueueState.INCOMING:
                m.messages.ready.add(queue_id, first=True)
            elif outcome.state == QueueState.DEFERRED and outcome.due is not None:
                m.messages.ready.schedule(queue_id, outcome.due)
            if outcome.envelope is not None:
                m.result_log.expired(outcome.envelope, outcome.expired, activated=now, now=now)
            self._log(op, queue_id)
            m.pump()
            return f"{queue_id}: {actions.DONE[op]}"

        def failed(failure: Failure) -> Failure:
            m.messages.busy.discard(queue_id)
            if was_ready:
                m.messages.ready.add(queue_id)
            if was_due is not None:
                m.messages.ready.schedule(queue_id, was_due)
            m.pump()
            return failure

        work = m.runner(lambda: actions.apply(m.store, op, queue_id, now))
        return work.addCallbacks(done, failed)

    @staticmethod
    def _log(op: str, queue_id: str) -> None:
        if op == "delete":
            log.info("{qid}: removed by the mail administrator", qid=queue_id)
        elif op == "hold":
            log.info("{qid}: put on hold by the mail administrator", qid=queue_id)
        elif op in ("release", "requeue"):
            log.info("{qid}: {op}d by the mail administrator", qid=queue_id, op=op)

    def _request(self, op: str, queue_id: str, message: ActiveMessage) -> str:
        """An action on a message in delivery: applied when its round ends."""
        if op == "release":
            raise ActionError(f"cannot release {queue_id}: it is not on hold")
        if op in ("flush", "requeue"):
            self.m.messages.flushed.add(queue_id)
            return f"{queue_id}: being delivered now; flushed"
        self.m.messages.requests[queue_id] = op
        self.m.withdraw(message)
        return f"{queue_id}: being delivered; {actions.DONE[op]} when the attempt in flight ends"

    def _flush_one(self, queue_id: str, ready: bool) -> None:
        """Make a waiting message due now, all of its pending recipients (the caller pumps)."""
        self.m.messages.flushed.add(queue_id)
        if ready:
            self.m.messages.ready.add(queue_id, first=True)
        else:
            self.m.messages.ready.schedule(queue_id, self.m.clock.seconds())

    def remove(self, queue_id: str) -> Deferred[None]:
        """C{delete} on a message whose round ends."""
        work = self.m.runner(partial(self.m.store.remove, queue_id, QueueState.ACTIVE))
        return work.addCallback(lambda _: self._log("delete", queue_id))

    def expire(self, message: ActiveMessage) -> None:
        """C{bounce} on a message whose round ends: fail what is pending, report it."""
        env = message.envelope
        now = self.m.clock.seconds()
        expired = scheduler.expire(env, now)
        for rcpt in expired:
            if dsn.needs_notice(env, rcpt, "failed"):
                message.notices.append(dsn.Notice(rcpt, "failed"))
        self.m.result_log.expired(env, expired, activated=message.activated, now=now)

    def flush(self, domain: str | None = None) -> Deferred[str]:
        """Retry now: every deferred message, or those with recipients at C{domain}.

        The suspension of the destinations concerned ends too.  Messages
        being delivered are left alone (they are being tried now).
        """
        m = self.m
        if domain is None:
            m.destinations.resume()
            ids = m.messages.ready.deferred()
            for queue_id in ids:
                self._flush_one(queue_id, False)
            m.pump()
            return succeed(f"flushed {len(ids)} deferred message(s)")
        m.destinations.resume(m.router.destination(domain.lower().rstrip(".")))
        candidates = m.messages.ready.deferred()

        def found(ids: list[str]) -> str:
            flushed = [q for q in ids if m.messages.ready.due(q) is not None]
            for queue_id in flushed:
                self._flush_one(queue_id, False)
            m.pump()
            return f"flushed {len(flushed)} deferred message(s) for {domain}"

        work = m.runner(lambda: actions.ids_for_domain(m.store, candidates, domain))
        return work.addCallback(found)

    def pickup(self, queue_id: str) -> str:
        """A message another process committed to C{incoming} (C{mta-sendmail})."""
        m = self.m
        if not m.messages.known(queue_id):
            try:
                state = m.store.locate(queue_id)
            except KeyError:
                state = None
            if state != QueueState.INCOMING:
                raise ActionError(f"no message {queue_id} in incoming/")
            m.enqueue(queue_id)
        return f"{queue_id}: queued"

    def shaping(self) -> str:
        """The traffic-shaping limits per destination, and why, as JSON
        (L{mta.queue.traffic.TrafficShaping.snapshot}; C{mtactl queue shaping})."""
        doc = self.m.traffic.snapshot()
        for row in doc["destinations"]:
            row["running"] = self.m.dispatcher.running(row["destination"])
            row["waiting"] = self.m.dispatcher.waiting(row["destination"])
        return json.dumps(doc)

    def reset_shaping(self, destination: str | None) -> str:
        """End the traffic-shaping limits of one destination (None: of all)."""
        ended = self.m.traffic.reset(destination)
        if destination is None:
            return f"ended the traffic-shaping limits of {ended} destination(s)"
        if not ended:
            raise ActionError(f"{destination}: no traffic-shaping limits to end")
        return f"{destination}: traffic-shaping limits ended"

    # -- called by the manager --------------------------------------------------

    def loaded(self, queue_id: str) -> None:
        """Actions that arrived while the message was loading, now that it is
        known where it is (in delivery, set aside as corrupt, gone ...)."""
        for op, waiting in self._after_load.pop(queue_id, []):
            self.act(op, queue_id).chainDeferred(waiting)

    def filed(self, queue_id: str, state: QueueState | None, request: str | None) -> None:
        """The round of a message ended and it was filed in C{state} (None:
        removed) after applying C{request}; an action asked for meanwhile
        is applied now."""
        late = self.m.messages.requests.pop(queue_id, None)
        if state == QueueState.HOLD:
            log.info("{qid}: put on hold by the mail administrator", qid=queue_id)
        if late is not None and late != request and state in (QueueState.DEFERRED, QueueState.HOLD):
            self.act(late, queue_id).addErrback(
                lambda f: log.error("{qid}: {op}: {e}", qid=queue_id, op=late, e=f.value)
            )
