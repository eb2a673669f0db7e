"""Operator actions on queued messages: hold, release, delete, bounce, requeue, flush.

What an action does to a stored message lives here, as functions of an
L{IQueueStore}, so that the daemon and C{mtactl} do exactly the same.  The
daemon runs them in its spool thread after the queue manager has taken the
message out of its own bookkeeping (L{mta.queue.operator.Operator.act});
C{mtactl} runs them directly only when no daemon is running, holding the
spool lock.

What each action means (Postfix's C{postsuper}/C{postqueue} in brackets):

  - C{hold} (C{-h}): the message moves to C{hold/} and is not delivered until
    released; it still expires when its lifetime ends after the release.
  - C{release} (C{-H}): back to C{deferred/}, due at its next attempt time.
  - C{delete} (C{-d}): the message is removed; no report is sent.
  - C{bounce} (C{-e}, then a delivery attempt): every recipient not yet
    delivered fails with C{5.4.7}; the sender gets one failure report.
  - C{requeue} (C{-r}): a deferred, held or (repaired) corrupt message goes
    back to C{incoming/}, every pending recipient due now.
  - C{flush} (C{postqueue -f}/C{-i}): pending recipients are due now and the
    destination's suspension ends; the retry schedule stays tied to the
    message's age, as in Postfix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mta.address import ascii_lower, domain_of
from mta.envelope import Envelope, QueueState, Recipient
from mta.interfaces import IQueueStore
from mta.queue.scheduler import expire, make_due
from mta.spool.format import FormatError
from mta.spool.queueid import is_queue_id

OPERATIONS = ("flush", "hold", "release", "delete", "bounce", "requeue")
_WAITING = (QueueState.INCOMING, QueueState.DEFERRED, QueueState.ACTIVE)
#: Where an action may start from.  Finished messages (done/redacted) belong to retention.
ALLOWED = {
    "flush": _WAITING,
    "hold": _WAITING,
    "release": (QueueState.HOLD,),
    "delete": (*_WAITING, QueueState.HOLD, QueueState.CORRUPT),
    "bounce": (*_WAITING, QueueState.HOLD),
    "requeue": (*_WAITING, QueueState.HOLD, QueueState.CORRUPT),
}
#: What each action did, for the operator ("ID: deleted").
DONE = {
    "flush": "flushed",
    "hold": "put on hold",
    "release": "released",
    "delete": "deleted",
    "bounce": "bounced to the sender",
    "requeue": "requeued",
}


class ActionError(Exception):
    """An action that cannot be done; the text is one line for the operator."""


def locate(store: IQueueStore, queue_id: str, op: str) -> QueueState:
    """The state of a message an action may apply to, or L{ActionError}."""
    if not is_queue_id(queue_id):
        raise ActionError(f"{queue_id!r} is not a queue ID")
    try:
        state = store.locate(queue_id)
    except KeyError:
        raise ActionError(f"no message {queue_id} in the queue") from None
    if state not in ALLOWED[op]:
        raise ActionError(f"cannot {op} {queue_id}: {_describe(state)}")
    return state


def _describe(state: QueueState) -> str:
    return {
        QueueState.HOLD: "it is on hold (release it first)",
        QueueState.CORRUPT: "its envelope is unreadable (repair it, then requeue)",
        QueueState.DONE: "it is finished",
        QueueState.REDACTED: "it is finished",
    }.get(state, f"it is {state}")


def _load(store: IQueueStore, queue_id: str, state: QueueState) -> Envelope:
    try:
        return store.load(queue_id, state)[1]
    except KeyError:
        raise ActionError(f"no message {queue_id} in the queue") from None
    except FormatError as e:
        raise ActionError(f"{queue_id} has an unreadable envelope: {e}") from None


@dataclass
class Outcome:
    """Where an action left a message."""

    state: QueueState | None  # None once deleted
    due: float | None = None  # for deferred/
    expired: list[Recipient] = field(default_factory=list)  # failed by "bounce"
    envelope: Envelope | None = None


def apply(store: IQueueStore, op: str, queue_id: str, now: float) -> Outcome:
    """Do C{op} to a message that nobody else is working on.

    Raises L{ActionError} for an action that does not apply and
    L{mta.errors.StorageError} when the files cannot be changed.  After
    C{bounce} the message is in C{incoming/} with its failures recorded;
    the queue manager sends the report when it takes the message up.
    """
    state = locate(store, queue_id, op)
    if op == "delete":
        store.remove(queue_id, state)
        return Outcome(None)
    if op == "hold":
        store.move(queue_id, state, QueueState.HOLD)
        return Outcome(QueueState.HOLD)
    envelope = _load(store, queue_id, state)
    if op == "release":
        due = _due(envelope, now)
        store.settle(envelope, state, QueueState.DEFERRED, due)
        return Outcome(QueueState.DEFERRED, due, envelope=envelope)
    if op == "bounce":
        expired = expire(envelope, now)
        store.settle(envelope, state, QueueState.INCOMING)
        return Outcome(QueueState.INCOMING, expired=expired, envelope=envelope)
    make_due(envelope, now)
    if op == "requeue":
        store.settle(envelope, state, QueueState.INCOMING)
        return Outcome(QueueState.INCOMING, envelope=envelope)
    store.settle(envelope, state, QueueState.DEFERRED, now)  # flush
    return Outcome(QueueState.DEFERRED, now, envelope=envelope)


def _due(envelope: Envelope, now: float) -> float:
    waiting = [r.next_attempt or now for r in envelope.recipients if not r.state.final]
    return max(min(waiting), now) if waiting else now


def matches_domain(envelope: Envelope, domain: str) -> bool:
    """Whether a pending recipient of the message is at C{domain}."""
    domain = ascii_lower(domain).rstrip(".")
    return any(
        not rcpt.state.final and domain_of(rcpt.address) == domain for rcpt in envelope.recipients
    )


def ids_for_domain(store: IQueueStore, ids: list[str], domain: str) -> list[str]:
    """Those of C{ids} (deferred) with a pending recipient at C{domain}."""
    out = []
    for queue_id in ids:
        try:
            _, envelope = store.load(queue_id, QueueState.DEFERRED)
        except (KeyError, FormatError, OSError):
            continue
        if matches_domain(envelope, domain):
            out.append(queue_id)
    return out
