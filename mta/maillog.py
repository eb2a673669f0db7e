"""One log line per recipient per delivery attempt, in Postfix's shape.

    QUEUEID: to=<rcpt>, relay=host[ip]:port, delay=S, delays=a/b/c/d,
             dsn=X.Y.Z, status=sent (250 2.0.0 Ok: queued as ...), tls=dane

C{delays} splits the time since arrival like Postfix: a = before the queue
manager took the message, b = waiting in the queue manager, c = connection
set-up (DNS, TCP, greeting, TLS, EHLO), d = sending the message.
C{tls} names the TLS policy that applied to the attempt (C{dane},
C{mta-sts}, C{verify}, C{encrypt}, C{may}, C{none}, see
L{mta.delivery.tlspolicy}); it comes after the reply so that parsers of
Postfix's fields find them where they expect them, and is left out when
no host was tried.
"""

from __future__ import annotations

from mta.errors import Reply


def _num(x: float) -> str:
    x = max(x, 0.0)
    if x >= 100:
        return str(round(x))
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def dsn_code(reply: Reply) -> str:
    """The enhanced status of a reply, or the class default (RFC 3463)."""
    return reply.enhanced or f"{str(reply.code)[0]}.0.0"


def delivery_line(
    queue_id: str,
    recipient: str,
    *,
    relay: str,
    status: str,
    reply: Reply,
    arrival: float,
    activated: float,
    started: float,
    setup: float,
    transfer: float,
    now: float,
    note: str = "",
    tls: str = "",
) -> str:
    delays = "/".join(
        _num(x)
        for x in (
            activated - arrival,
            started - activated,
            setup,
            transfer,
        )
    )
    text = str(reply).replace("\r", " ").replace("\n", " ")
    extra = (f", tls={tls}" if tls else "") + (f", {note}" if note else "")
    return (
        f"{queue_id}: to=<{recipient}>, relay={relay}, delay={_num(now - arrival)}, "
        f"delays={delays}, dsn={dsn_code(reply)}, status={status} ({text}){extra}"
    )
