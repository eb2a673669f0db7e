"""Operator actions on queued messages: hold, release, delete, bounce, requeue, flush.

The file steps live here, as functions of a L{SpoolStore}, so that the daemon
and C{mtactl} do exactly the same thing to the files.  The daemon runs them
in its spool thread after the queue manager has taken the message out of its
own bookkeeping (L{mta.queue.manager.QueueManager.control}); C{mtactl} runs
them directly only when no daemon is running, holding the spool lock.

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

import os
from dataclasses import dataclass, field

from mta.address import ascii_lower, domain_of
from mta.envelope import Envelope, Recipient, RecipientState
from mta.errors import Reply
from mta.spool.format import FormatError
from mta.spool.fs import SpoolStore
from mta.spool.queueid import is_queue_id

OPERATIONS = ("flush", "hold", "release", "delete", "bounce", "requeue")
#: Where an action may start from.  Finished messages (done/redacted) belong to retention.
ALLOWED = {
    "flush": ("incoming", "deferred", "active"),
    "hold": ("incoming", "deferred", "active"),
    "release": ("hold",),
    "delete": ("incoming", "deferred", "active", "hold", "corrupt"),
    "bounce": ("incoming", "deferred", "active", "hold"),
    "requeue": ("incoming", "deferred", "active", "hold", "corrupt"),
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
ADMIN_BOUNCE = Reply(550, "5.4.7", "delivery time expired: returned by the mail administrator")


class ControlError(Exception):
    """An action that cannot be done; the text is one line for the operator."""


def expire(envelope: Envelope, now: float) -> list[Recipient]:
    """Fail every recipient not yet finished; returns them (for reports and logs)."""
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


def locate(store: SpoolStore, queue_id: str, op: str) -> str:
    """The state of a message an action may apply to, or L{ControlError}."""
    if not is_queue_id(queue_id):
        raise ControlError(f"{queue_id!r} is not a queue ID")
    try:
        state = store.find(queue_id)
    except KeyError:
        raise ControlError(f"no message {queue_id} in the queue") from None
    if state not in ALLOWED[op]:
        raise ControlError(f"cannot {op} {queue_id}: {_describe(state)}")
    return state


def _describe(state: str) -> str:
    return {
        "hold": "it is on hold (release it first)",
        "corrupt": "its envelope is unreadable (repair it, then requeue)",
        "done": "it is finished",
        "redacted": "it is finished",
    }.get(state, f"it is {state}")


def _load(store: SpoolStore, queue_id: str, state: str) -> Envelope:
    try:
        return store.load(queue_id, state)[1]
    except KeyError:
        raise ControlError(f"no message {queue_id} in the queue") from None
    except FormatError as e:
        raise ControlError(f"{queue_id} has an unreadable envelope: {e}") from None


@dataclass
class Outcome:
    """Where an action left a message."""

    state: str  # "" once deleted
    due: float | None = None  # for deferred/
    expired: list[Recipient] = field(default_factory=list)  # failed by "bounce"
    envelope: Envelope | None = None


def apply(store: SpoolStore, op: str, queue_id: str, now: float) -> Outcome:
    """Do C{op} to a message that nobody else is working on.

    Raises L{ControlError} for an action that does not apply and
    L{mta.errors.StorageError} when the files cannot be changed.  After
    C{bounce} the message is in C{incoming/} with its failures recorded;
    the queue manager sends the report when it takes the message up.
    """
    state = locate(store, queue_id, op)
    if op == "delete":
        store.remove(queue_id, state)
        return Outcome("")
    if op == "hold":
        store.move(queue_id, state, "hold")
        return Outcome("hold")
    envelope = _load(store, queue_id, state)
    if op == "release":
        due = _due(envelope, now)
        store.settle(envelope, state, "deferred", due)
        return Outcome("deferred", due, envelope=envelope)
    if op == "bounce":
        expired = expire(envelope, now)
        store.settle(envelope, state, "incoming")
        return Outcome("incoming", expired=expired, envelope=envelope)
    make_due(envelope, now)
    if op == "requeue":
        store.settle(envelope, state, "incoming")
        return Outcome("incoming", envelope=envelope)
    store.settle(envelope, state, "deferred", now)  # flush
    return Outcome("deferred", now, envelope=envelope)


def _due(envelope: Envelope, now: float) -> float:
    waiting = [r.next_attempt or now for r in envelope.recipients if not r.state.final]
    return max(min(waiting), now) if waiting else now


def matches_domain(envelope: Envelope, domain: str) -> bool:
    """Whether a pending recipient of the message is at C{domain}."""
    domain = ascii_lower(domain).rstrip(".")
    return any(
        not rcpt.state.final and domain_of(rcpt.address) == domain for rcpt in envelope.recipients
    )


def ids_for_domain(store: SpoolStore, ids: list[str], domain: str) -> list[str]:
    """Those of C{ids} (deferred) with a pending recipient at C{domain}."""
    out = []
    for queue_id in ids:
        try:
            _, envelope = store.load(queue_id, "deferred")
        except (KeyError, FormatError, OSError):
            continue
        if matches_domain(envelope, domain):
            out.append(queue_id)
    return out


def control_socket(store: SpoolStore) -> str:
    """The daemon's control socket: C{SPOOL/control.sock}."""
    return os.path.join(store.root, "control.sock")


def socket_address(path: str) -> tuple[str, int | None]:
    """A name for C{path} that fits in a UNIX socket address, and a descriptor to close.

    Socket addresses hold about 107 bytes; a deeper spool is reached
    through its open directory (C{/proc/self/fd/N/control.sock}, Linux),
    which must stay open while the name is used.
    """
    if len(path.encode()) <= 100:
        return path, None
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd
