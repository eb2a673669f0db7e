"""What the queue hands the delivery agent, and what it gets back.

A L{DeliveryJob} is one message and those of its recipients that share a
destination; the agent (L{mta.interfaces.IDeliveryAgent}) answers with one
L{RecipientResult} per recipient.  These are the shared model between the
queue (L{mta.queue}) and delivery (L{mta.delivery.relay}), so neither has
to import the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from mta.envelope import Envelope, Recipient
from mta.errors import ErrorKind, Reply


@dataclass
class RecipientResult:
    """What happened to one recipient in one attempt.

    C{kind} is L{ErrorKind.REMOTE} when C{reply} is the server's answer
    about this recipient, otherwise the kind of failure that hit the whole
    attempt.  C{dsn_passed} is whether the next hop took the DSN
    parameters (RFC 3461 section 4), which decides "relayed" vs
    "delivered" in a success notice.  C{connected} is whether the attempt
    got an SMTP session with any host at all: only an attempt that never
    did makes a destination look dead.  C{tls} is the TLS policy that
    applied (C{"dane"}, C{"mta-sts"}, C{"may"}, ...; see
    L{mta.delivery.tlspolicy}), "" when no host was tried.
    """

    address: str
    reply: Reply
    kind: ErrorKind | str
    relay: str = "none"
    dsn_passed: bool = False
    setup_time: float = 0.0
    transfer_time: float = 0.0
    connected: bool = False
    tls: str = ""

    def __post_init__(self) -> None:
        self.kind = ErrorKind(self.kind)

    @property
    def ok(self) -> bool:
        return self.reply.code < 400


@dataclass
class DeliveryJob:
    """A message and those of its recipients that share one destination.

    C{open_message} opens the queued message's bytes (exactly the message,
    whatever the spool's layout); it blocks, so the agent calls it in a
    worker thread.
    """

    envelope: Envelope
    recipients: list[Recipient]
    open_message: Callable[[], IO[bytes]]
    destination: str  # the grouping key (L{mta.delivery.routes.Router.destination})
    domain: str  # the recipients' domain
    # Told each transaction's results as soon as the next hop has answered,
    # before the job ends (the queue manager journals the accepted ones).
    on_transaction: Callable[[list[RecipientResult]], None] | None = field(
        default=None, compare=False, repr=False
    )
