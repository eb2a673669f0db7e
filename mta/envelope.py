"""The message envelope: who sent it, to whom, and each recipient's state.

An L{Envelope} is what the spool stores beside the raw message (see
C{docs/spool-format.md}); L{mta.spool.format} turns it into JSON and back.
L{QueueState} names where in the queue a message is, and L{ProgressRecord}
is one recipient's result written ahead of the message file (the journal).  This module
is the shared model: it imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class QueueState(StrEnum):
    """Where a message is in the queue (C{docs/spool-format.md}).

    A message waits (incoming, deferred), is delivered (active), is set
    aside by the operator (hold) or because it cannot be read (corrupt),
    or is finished and retained (done, then redacted).
    """

    INCOMING = "incoming"  # committed, not yet taken for delivery
    ACTIVE = "active"  # being delivered
    DEFERRED = "deferred"  # waiting for its next attempt
    HOLD = "hold"  # not delivered until released
    CORRUPT = "corrupt"  # unreadable; kept for the operator
    DONE = "done"  # every recipient final; content retained
    REDACTED = "redacted"  # finished, content removed

    @property
    def waiting(self) -> bool:
        """Whether the queue will deliver a message in this state."""
        return self in (QueueState.INCOMING, QueueState.ACTIVE, QueueState.DEFERRED)

    @property
    def finished(self) -> bool:
        return self in (QueueState.DONE, QueueState.REDACTED)


class RecipientState(StrEnum):
    """Delivery state of one recipient."""

    PENDING = "pending"  # not yet tried, or due for another try
    DEFERRED = "deferred"  # temporary failure; waiting for next_attempt
    SENT = "sent"  # accepted by the next hop
    FAILED = "failed"  # permanent failure or expired; a DSN may be owed

    @property
    def final(self) -> bool:
        return self in (RecipientState.SENT, RecipientState.FAILED)


@dataclass
class Recipient:
    """One envelope recipient with its RFC 3461 parameters and delivery state."""

    address: str
    notify: tuple[str, ...] | None = None  # None: not given (FAILURE,DELAY implied)
    orcpt: str | None = None  # "rfc822;user@example.com"
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_attempt: float | None = None
    next_attempt: float | None = None
    reply: str | None = None  # last remote reply or local error text
    dsn_status: str | None = None  # enhanced status of the last result, "5.1.1"
    relay: str | None = None  # host[ip]:port that gave the last result
    delay_notified: bool = False  # a delay DSN was sent for this recipient
    final_notified: bool = False  # a failure or success DSN was sent
    category: str | None = None  # bounce classification of the last failure


@dataclass
class Envelope:
    """Everything about a message except its bytes."""

    queue_id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    arrival: float  # POSIX seconds
    size: int = 0  # octets of the stored message
    body: str | None = None  # BODY= parameter: "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # RET=FULL|HDRS
    envid: str | None = None  # ENVID, xtext-decoded
    auth_user: str | None = None
    client_address: str | None = None
    client_helo: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    message_id: str | None = None
    kind: str = "message"  # "message" or "dsn" (a report this MTA generated)
    redacted: float | None = None  # when the content was removed (retention)
    extra: dict[str, object] = field(default_factory=dict)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.state.final]

    @property
    def done(self) -> bool:
        return all(r.state.final for r in self.recipients)


@dataclass(frozen=True)
class ProgressRecord:
    """A recipient's state after a delivery result, written (to the progress
    journal) before the message file is.

    C{index} is the recipient's position in the envelope; a record counts
    only for the recipient at that position with the same address.
    C{recipient} is a copy, never the envelope's own object.
    """

    queue_id: str
    index: int
    recipient: Recipient


@dataclass
class QueueScan:
    """What a start-up scan of the queue found (L{mta.interfaces.IQueueStore.scan})."""

    ready: list[str] = field(default_factory=list)  # to deliver now, in this order
    deferred: list[tuple[float, str]] = field(default_factory=list)  # (due time hint, ID)


@dataclass
class Committed:
    """A message the spool has just made durable (what its listeners are told).

    C{data} is the message's bytes when the spool still has them in memory
    (small messages), so the first delivery need not read them back.
    """

    queue_id: str
    envelope: Envelope
    data: bytes | None = None
