"""Delivery status notifications: when one is owed, and the report itself.

A pure module (no reactor, no I/O, no clock): the queue manager decides
I{when} a recipient's fate is worth a report, asks L{needs_notice} whether
RFC 3461 and the sender's C{NOTIFY} call for one, collects the L{Notice}s
of one message and calls L{build_report}, then submits the bytes through
the spool with the null reverse-path (spec section 7).

The report is an RFC 6522 C{multipart/report; report-type=delivery-status}
with three parts:

  1. C{text/plain; charset=utf-8}: what happened, for a person who does
     not know SMTP -- which recipients, the remote reply or our own error
     text, what it probably means, "I will keep trying until ..." for a
     delay, and the queue ID for the postmaster.  Quoted-printable when it
     holds non-ASCII text, so that it never makes the report 8-bit.
  2. C{message/delivery-status} (RFC 3464 section 2): the per-message
     fields and one block of per-recipient fields for each notice, in the
     order of the RFC 3464 ABNF, folded at spaces (RFC 5322 section 2.2.3).
     The part is 7-bit as RFC 3464 section 2.1 requires: a non-ASCII
     address uses the RFC 6533 section 3 C{utf-8} address type in its
     7-bit C{utf-8-addr-xtext} form, and non-ASCII in a reply text becomes
     the same C{\\x{HEX}} escape.
  3. The original (RFC 3461 section 4.3, RFC 6522 section 3): the whole
     message for a failure unless C{RET=HDRS} or it is larger than
     C{full_limit}; otherwise only its header section.

8-bit originals.  The returned message is never re-encoded: a
C{message/rfc822} part may only be 7bit, 8bit or binary (RFC 2046 section
5.2.1), so an original with 8-bit octets is carried as it is and labelled
C{Content-Transfer-Encoding: 8bit}.  An original whose I{header section}
holds UTF-8 is an RFC 6532 internationalized message, which
C{message/rfc822} and C{text/rfc822-headers} cannot carry; it is returned
as C{message/global} (RFC 6532 section 3.7) or C{message/global-headers}
(RFC 6533 sections 4 and 6.3), also 8bit.  Such a report needs 8BITMIME (RFC 6152)
from the next hop, and SMTPUTF8 (RFC 6531) when its own header or a
returned header holds UTF-8 (a UTF-8 sender address puts UTF-8 in its
C{To:}); L{report_is_8bit} and L{report_needs_smtputf8} tell the queue
manager how to flag the report's envelope, and the delivery agent then
downgrades or refuses as for any other message.
"""

from __future__ import annotations

import hashlib
import quopri
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime
from typing import Protocol

from mta.address import xtext_encode
from mta.delivery.mime import header_section
from mta.envelope import Envelope, Recipient

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
# RFC 3464 section 2.3.3, worst first: the order of the human part's sections.
ACTIONS: tuple[str, ...] = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)
SUCCESS_ACTIONS = frozenset({DELIVERED, RELAYED, EXPANDED})

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"

# The status class each action must carry (RFC 3464 section 2.3.4, RFC 3463
# section 3.1) and the default when the recipient recorded none.
_DEFAULT_STATUS = {
    FAILED: "5.0.0",
    DELAYED: "4.0.0",
    DELIVERED: "2.0.0",
    RELAYED: "2.0.0",
    EXPANDED: "2.0.0",
}
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
# An SMTP reply as the queue manager records it: str(Reply), "550 5.1.1 text".
_REPLY_PREFIX = re.compile(r"\d{3}(?:[ -][245]\.\d{1,3}\.\d{1,3})?(?: |$)")
# The relay as the delivery agent records it: "host[ip]:port".
_RELAY = re.compile(r"(?P<host>[^\[\]\s]*)\[(?P<ip>[^\[\]\s]+)\](?::\d+)?")
# RFC 2046 section 5.1.1 bchars, without the space we never use.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")

_WIDTH = 78  # RFC 5322 section 2.1.1: SHOULD, where a line can be broken
_MAX_WORD = 900  # octets of an unbreakable word, so a line stays under 998


class _Para(Protocol):
    """The paragraph writer that L{_human_text} hands to L{_describe}."""

    def __call__(self, text: str, indent: int = 0) -> None: ...


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)  # fmt: skip

# What a bounce category (L{mta.bounce.CATEGORIES}) means, in plain words.
_MEANING = {
    "network": "the receiving mail server could not be reached, or the connection failed.",
    "dns": "the recipient's domain (the part after the @) could not be found or does "
    "not accept mail. Check it for typing mistakes.",
    "protocol": "the receiving mail server did not follow the mail protocol as expected.",
    "tls": "a secure (encrypted) connection to the receiving server could not be set up.",
    "blocklist": "the receiving server does not currently accept mail from this mail "
    "system (a block list). This is not a problem with your message; the postmaster "
    "here can get it lifted.",
    "greylist": "the receiving server asked to try again later, a common anti-spam "
    "measure. This usually sorts itself out.",
    "rate": "the receiving server is limiting how much mail it accepts from this mail "
    "system right now.",
    "capacity": "the recipient's mailbox is full, or the receiving server is short of space.",
    "recipient": "the address does not exist or cannot receive mail. Check it for typing mistakes.",
    "message": "the receiving server did not accept the message itself, for example "
    "because it is too large.",
    "spam": "the receiving server considered the message to be spam.",
    "virus": "the receiving server found a virus or other dangerous content in the message.",
    "policy": "the receiving server refused the message because of its own rules.",
    "dmarc": "the receiving server could not verify that the message really comes from "
    "your domain (SPF, DKIM or DMARC).",
    "auth": "this mail system could not log in to the server it has to pass the message to.",
    "envelope": "the receiving server refused the sender or recipient address.",
    "config": "a configuration problem on this mail system prevented delivery; the "
    "postmaster here can fix it.",
}

_HEADINGS = {
    FAILED: "Could not be delivered",
    DELAYED: "Delayed, still trying",
    DELIVERED: "Delivered",
    RELAYED: "Passed on, no further reports",
    EXPANDED: "Delivered to a mailing list or alias",
}


@dataclass(frozen=True)
class Notice:
    """One recipient to report on, and what happened (RFC 3464 section 2.3.3).

    The recipient's recorded last result (C{reply}, C{dsn_status}, C{relay},
    C{last_attempt}, C{category}) is what the report tells.
    """

    recipient: Recipient
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {self.action!r}")


def needs_notice(envelope: Envelope, recipient: Recipient, action: str) -> bool:
    """Whether RFC 3461 and our policy call for a notice.

    Never for the null reverse-path (RFC 5321 section 4.5.5: no
    notification loops) nor for a report this MTA generated (C{kind ==
    "dsn"}), and never with C{NOTIFY=NEVER}, which wins over anything it
    is (invalidly) combined with.  Without C{NOTIFY} the default is
    C{FAILURE,DELAY} (RFC 3461 section 4.1); C{"failed"} needs C{FAILURE},
    C{"delayed"} needs C{DELAY}, and the success actions C{"delivered"},
    C{"relayed"} (the next hop takes no responsibility for DSNs, RFC 3464
    section 2.3.3) and C{"expanded"} need an explicit C{SUCCESS}.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    if envelope.sender == "" or envelope.kind == "dsn":
        return False
    notify = None if recipient.notify is None else {n.upper() for n in recipient.notify}
    if notify is not None and "NEVER" in notify:
        return False
    if action == FAILED:
        return notify is None or "FAILURE" in notify
    if action == DELAYED:
        return notify is None or "DELAY" in notify
    return notify is not None and "SUCCESS" in notify


def build_report(
    envelope: Envelope,
    notices: list[Notice],
    message: bytes,
    *,
    hostname: str,
    now: float,
    retry_until: float | None,
    message_id: str,
    boundary: str | None = None,
    full_limit: int = 100_000,
) -> bytes:
    """The whole report as RFC 5322 bytes with CRLF line ends.

    C{message} is the stored original (header section and body, CRLF).
    One report covers all C{notices} of one message (spec section 7:
    combined).  The original is returned in full when some notice is
    C{"failed"}, C{RET} is not C{HDRS} and the message is at most
    C{full_limit} octets; otherwise its header section only (RFC 3461
    section 4.3: C{RET} governs failure reports, and delay and success
    reports carry headers only).  C{boundary} C{None} makes one from
    C{message_id}, so the same inputs always give the same bytes; an
    explicit boundary that occurs in the content is a C{ValueError}.

    The result is 8-bit only when the returned original is (see the module
    docstring); L{report_is_8bit} and L{report_needs_smtputf8} say what the
    next hop must offer.
    """
    if not notices:
        raise ValueError("a report needs at least one notice")
    actions = {n.action for n in notices}
    head = header_section(message)
    failed = FAILED in actions
    # The stored size too: a caller may hand over only the first part of a
    # large message, which must then not pass for the whole of it.
    too_big = max(len(message), envelope.size) > full_limit
    full = failed and (envelope.ret or "").upper() != "HDRS" and not too_big
    if full:
        returned = _returned_part(message, full=True, international=not head.isascii())
        attached = "Your message is attached as you sent it."
    else:
        returned = _returned_part(head, full=False, international=not head.isascii())
        attached = (
            "Your message was too large to send back in full; its header is attached."
            if failed and too_big and (envelope.ret or "").upper() != "HDRS"
            else "The header of your message is attached."
        )
    text = _human_text(
        envelope,
        notices,
        head,
        hostname=hostname,
        now=now,
        retry_until=retry_until,
        attached=attached,
    )
    parts = [
        _text_part(text),
        _status_part(envelope, notices, hostname=hostname, retry_until=retry_until),
        returned,
    ]
    chosen = _boundary(message_id, boundary, parts)
    fields = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{_clean(hostname)}>"),
        ("To", f"<{_clean(envelope.sender)}>"),
        ("Subject", _subject(actions)),
        ("Date", _rfc5322_date(now)),
        ("Message-ID", _message_id(message_id)),
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 section 5
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{chosen.decode()}"',
        ),
    ]
    delimiter = b"\r\n--" + chosen
    body = b"".join(delimiter + b"\r\n" + part for part in parts) + delimiter + b"--\r\n"
    if not body.isascii():
        # RFC 2045 section 6.4: a multipart entity with 8-bit content says so.
        fields.append(("Content-Transfer-Encoding", "8bit"))
    header = "".join(_field(name, value) for name, value in fields).encode("utf-8")
    preamble = b"This is a delivery status notification in MIME format (RFC 3464).\r\n"
    return header + b"\r\n" + preamble + body


def report_is_8bit(report: bytes) -> bool:
    """Whether a report has octets above 127 and so needs 8BITMIME (RFC 6152).

    The queue manager sets the report envelope's C{body} to C{"8BITMIME"}
    when this is true.
    """
    return not report.isascii()


def report_needs_smtputf8(report: bytes) -> bool:
    """Whether a report carries UTF-8 header fields (RFC 6531, RFC 6532).

    True when its own header section is not ASCII (a UTF-8 sender address
    in C{To:}) or when it returns an internationalized original as
    C{message/global} or C{message/global-headers} (RFC 6532 section 3.7,
    RFC 6533 section 6.3).  The queue manager sets the report envelope's
    C{smtputf8} flag from this.
    """
    if not header_section(report).isascii():
        return True
    parsed = BytesParser(policy=policy.compat32).parsebytes(report)
    payload = parsed.get_payload()
    if not isinstance(payload, list):
        return False
    return any(
        isinstance(part, Message)
        and part.get_content_type() in ("message/global", "message/global-headers")
        for part in payload
    )


def _rfc5322_date(when: float) -> str:
    """An RFC 5322 section 3.3 date-time in UTC: C{Tue, 14 Nov 2023 22:13:20 +0000}."""
    return format_datetime(datetime.fromtimestamp(int(when), UTC))


def _field(name: str, value: str) -> str:
    """One header field, folded at spaces, with its CRLF.

    RFC 5322 section 2.2.3: a fold is a CRLF before existing white space,
    so unfolding gives the value back.  Lines are kept to 78 characters
    where a space allows; a word longer than 900 octets is cut into pieces
    with a folding space between them (the value then gains a space, which
    only a pathological reply text can cause) so that no line passes the
    998-octet limit of RFC 5322 section 2.1.1.  C{value} must already be
    free of CR, LF and other control characters (L{_clean}).
    """
    words = [piece for word in value.split(" ") if word for piece in _pieces(word)]
    if not words:
        return f"{name}:\r\n"
    lines: list[str] = []
    line = f"{name}: {words[0]}"
    for word in words[1:]:
        if _octets(line) + 1 + _octets(word) <= _WIDTH:
            line += " " + word
        else:
            lines.append(line)
            line = " " + word
    lines.append(line)
    return "".join(f"{ln}\r\n" for ln in lines)


def utf8_addr_xtext(address: str) -> str:
    """An address in RFC 6533 section 3 C{utf-8-addr-xtext} form (7-bit).

    Every character that is not a QCHAR (printable ASCII except C{\\},
    C{+} and C{=}) becomes C{\\x{HEX}} with its code point in upper-case
    hex; control characters are escaped too, so nothing can break a line.
    """
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):02X}}}" for c in address
    )


def typed_address(addr_type: str, address: str) -> str:
    """C{address-type; address} for Final- and Original-Recipient (RFC 3464 2.3.1-2).

    Printable ASCII keeps its type (C{rfc822} for our addresses).  Anything
    else -- a UTF-8 address (RFC 6531) or control characters smuggled in
    through an xtext-encoded ORCPT -- takes the RFC 6533 C{utf-8} type in
    its 7-bit xtext form, which keeps the delivery-status part 7-bit and
    one field one line.
    """
    addr_type = _clean(addr_type).replace(" ", "") or "rfc822"
    if all(0x20 <= ord(c) <= 0x7E for c in address):
        return f"{addr_type}; {address}"
    if addr_type.lower() in ("rfc822", "utf-8"):
        addr_type = "utf-8"
    return f"{addr_type}; {utf8_addr_xtext(address)}"


def reply_is_remote(recipient: Recipient) -> bool:
    """Whether the recipient's recorded reply came from a remote server.

    The delivery agent records every result as an SMTP reply, its own
    errors included (C{451 4.4.1 connect to mx[192.0.2.1]:25: Connection
    refused}), and the envelope does not keep which it was.  A reply is
    the remote's when it has the form of one, a remote host answered
    (C{relay} is C{host[ip]:port}, not C{"none"}), and its text does not
    name that host -- our own error texts about a connection always do
    (L{mta.smtp.client}).  RFC 3464 section 2.3.6 types the remote's
    reply C{smtp} and ours C{X-mta}.
    """
    reply, relay = recipient.reply, recipient.relay
    if not reply or not relay or relay == "none" or not _REPLY_PREFIX.match(reply):
        return False
    return relay not in reply


# -- the parts ----------------------------------------------------------------


def _text_part(text: str) -> bytes:
    """Part 1: the human-readable text, 7bit if ASCII, else quoted-printable.

    Quoted-printable (RFC 2045 section 6.7) keeps a UTF-8 explanation from
    making the whole report 8-bit; its lines are at most 76 octets and it
    can never contain our boundary's C{=_} prefix.
    """
    data = text.encode("utf-8")
    headers = "Content-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n"
    if data.isascii():
        return headers.encode("ascii") + b"\r\n" + data.replace(b"\n", b"\r\n")
    encoded = quopri.encodestring(data).replace(b"\n", b"\r\n")
    headers += "Content-Transfer-Encoding: quoted-printable\r\n"
    return headers.encode("ascii") + b"\r\n" + encoded


def _status_part(
    envelope: Envelope,
    notices: list[Notice],
    *,
    hostname: str,
    retry_until: float | None,
) -> bytes:
    """Part 2: C{message/delivery-status} (RFC 3464 section 2), all 7-bit."""
    per_message: list[tuple[str, str]] = []
    if envelope.envid:
        # RFC 3464 section 2.2.1: the ENVID as it was given, in xtext.
        per_message.append(("Original-Envelope-Id", xtext_encode(envelope.envid)))
    per_message.append(("Reporting-MTA", f"dns; {_dns_name(hostname)}"))
    per_message.append(("Arrival-Date", _rfc5322_date(envelope.arrival)))
    blocks = [per_message]
    for notice in notices:
        blocks.append(_recipient_fields(notice, retry_until))
    text = "\r\n".join("".join(_field(n, v) for n, v in block) for block in blocks)
    headers = b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
    data = text.encode("ascii")
    return headers + b"\r\n" + data


def _recipient_fields(notice: Notice, retry_until: float | None) -> list[tuple[str, str]]:
    """One per-recipient block, in the order of the RFC 3464 section 2.3 ABNF."""
    rcpt, action = notice.recipient, notice.action
    fields: list[tuple[str, str]] = []
    if rcpt.orcpt:
        addr_type, _, address = rcpt.orcpt.partition(";")
        if not address:
            addr_type, address = "rfc822", rcpt.orcpt
        fields.append(("Original-Recipient", typed_address(addr_type, address)))
    fields.append(("Final-Recipient", typed_address("rfc822", rcpt.address)))
    fields.append(("Action", action))
    fields.append(("Status", status_for(rcpt, action)))
    remote = reply_is_remote(rcpt)
    host = _remote_host(rcpt.relay)
    if remote and host is not None:
        # RFC 3464 section 2.3.5: the MTA that reported the status; a host
        # we could not talk to (a timeout, a refused connection) reported none.
        fields.append(("Remote-MTA", f"dns; {_dns_name(host)}"))
    if rcpt.reply and remote:
        fields.append(("Diagnostic-Code", f"smtp; {_ascii(rcpt.reply)}"))
    elif rcpt.reply:
        fields.append(("Diagnostic-Code", f"X-mta; {_ascii(_local_text(rcpt.reply))}"))
    if rcpt.last_attempt is not None:
        fields.append(("Last-Attempt-Date", _rfc5322_date(rcpt.last_attempt)))
    if action == DELAYED and retry_until is not None:
        fields.append(("Will-Retry-Until", _rfc5322_date(retry_until)))
    return fields


def status_for(recipient: Recipient, action: str) -> str:
    """The RFC 3463 status for a notice, consistent with its action.

    The recorded status is kept when its class fits: 2 for the success
    actions, 4 for C{"delayed"}, 5 -- or 4, for a failure at expiry, as
    RFC 3463 section 3.5 describes X.4.7 "useful only as a persistent
    transient error" -- for C{"failed"}.  A C{"delayed"} notice for a 5xx
    that we retry (a block list, a full mailbox) keeps subject and detail
    in class 4.  Otherwise the class default C{5.0.0}/C{4.0.0}/C{2.0.0}.
    """
    default = _DEFAULT_STATUS[action]
    match = _STATUS.fullmatch(recipient.dsn_status or "")
    if match is None:
        return default
    klass = match.group(1)
    if action in SUCCESS_ACTIONS:
        return match.group(0) if klass == "2" else default
    if action == DELAYED:
        return match.group(0) if klass == "4" else f"4.{match.group(2)}.{match.group(3)}"
    return match.group(0) if klass in "45" else default


def _dns_name(host: str) -> str:
    """A host name for an C{mta-name} of type C{dns} (RFC 3464 section 2.1.2).

    A non-ASCII (U-label) name is given as its A-label (RFC 5890), which is
    what the DNS holds; a name IDNA cannot convert keeps its characters as
    C{\\x{HEX}} escapes so that the field stays 7-bit.
    """
    cleaned = _clean(host)
    if cleaned.isascii():
        return cleaned
    try:
        return cleaned.encode("idna").decode("ascii")
    except UnicodeError:
        return _ascii(cleaned)


def _remote_host(relay: str | None) -> str | None:
    """The host name in a recorded relay C{host[ip]:port}, or C{[ip]} without one.

    C{None} when no remote host was involved (C{relay} C{None} or C{"none"}).
    """
    if not relay or relay == "none":
        return None
    match = _RELAY.fullmatch(relay.strip())
    if match is None:
        return _clean(relay) or None
    return match.group("host") or f"[{match.group('ip')}]"


def _returned_part(content: bytes, *, full: bool, international: bool) -> bytes:
    """Part 3: the original or its header section, never re-encoded.

    RFC 2046 section 5.2.1 allows only 7bit, 8bit and binary on a
    C{message/rfc822}; 8-bit content is labelled 8bit.  UTF-8 in the
    header section makes it C{message/global} / C{message/global-headers}
    (RFC 6532 section 3.7, RFC 6533 section 6.3).
    """
    if full:
        kind = "message/global" if international else "message/rfc822"
        description = "Undelivered Message"
    else:
        kind = "message/global-headers" if international else "text/rfc822-headers"
        description = "Message Headers"
    headers = f"Content-Description: {description}\r\nContent-Type: {kind}\r\n"
    if not content.isascii():
        headers += "Content-Transfer-Encoding: 8bit\r\n"
    return headers.encode("ascii") + b"\r\n" + content


def _boundary(message_id: str, given: str | None, parts: list[bytes]) -> bytes:
    """The MIME boundary: C{given}, or one derived from the report's Message-ID.

    RFC 2046 section 5.1.1: it must not occur in any part.  The derived
    one starts with C{=_}, which quoted-printable text cannot contain, and
    takes a numeric suffix in the unlikely case that the returned message
    contains it.
    """

    def free(candidate: bytes) -> bool:
        return not any(b"--" + candidate in part for part in parts)

    if given is not None:
        if not _BOUNDARY.fullmatch(given):
            raise ValueError(f"not a usable MIME boundary: {given!r}")
        if not free(given.encode("ascii")):
            raise ValueError(f"the boundary {given!r} occurs in the report's content")
        return given.encode("ascii")
    base = "=_dsn_" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:24]
    candidate, n = base, 0
    while not free(candidate.encode("ascii")):
        n += 1
        candidate = f"{base}.{n}"
    return candidate.encode("ascii")


# -- the human part -----------------------------------------------------------


def _human_text(
    envelope: Envelope,
    notices: list[Notice],
    head: bytes,
    *,
    hostname: str,
    now: float,
    retry_until: float | None,
    attached: str,
) -> str:
    """The explanation for a person: short paragraphs, lines under 78."""
    out: list[str] = []

    def para(text: str, indent: int = 0) -> None:
        out.extend(_wrap(text, indent))

    by_action = {a: [n for n in notices if n.action == a] for a in ACTIONS}
    para(f"This is the mail system at {_clean(hostname)}.")
    out.append("")
    para(_summary(by_action))
    out.append("")
    subject = _original_subject(head)
    para("About your message:")
    if subject is not None:
        para(f"Subject: {subject}", 4)
    para(f"Sent: {_human_date(envelope.arrival)}", 4)
    for action in ACTIONS:
        group = by_action[action]
        if not group:
            continue
        out.append("")
        para(f"{_HEADINGS[action]}:")
        for notice in group:
            out.append("")
            _describe(envelope, notice, now - envelope.arrival, retry_until, para)
    out.append("")
    para(attached)
    para("A machine-readable report (RFC 3464) is attached as well.")
    out.append("")
    para(f"For the postmaster: queue ID {_clean(envelope.queue_id)} on {_clean(hostname)}.")
    return "\n".join(out) + "\n"


def _summary(by_action: dict[str, list[Notice]]) -> str:
    def count(n: int) -> str:
        return "one recipient" if n == 1 else f"{n} recipients"

    sentences = []
    if by_action[FAILED]:
        sentences.append(
            f"I could not deliver your message to {count(len(by_action[FAILED]))} "
            "and have given up."
        )
    if by_action[DELAYED]:
        sentences.append(
            f"Delivery to {count(len(by_action[DELAYED]))} is delayed. I am still trying; "
            "you do not need to send the message again."
        )
    done = sum(len(by_action[a]) for a in SUCCESS_ACTIONS)
    if done:
        sentences.append(
            f"You asked to be told about the delivery of your message; this report covers "
            f"{count(done)}."
        )
    return " ".join(sentences)


def _describe(
    envelope: Envelope,
    notice: Notice,
    age: float,
    retry_until: float | None,
    para: _Para,
) -> None:
    """One recipient: address, what the server said, what it means, what next."""
    rcpt, action = notice.recipient, notice.action
    para(f"<{_clean(rcpt.address)}>", 2)
    if rcpt.orcpt:
        original = rcpt.orcpt.partition(";")[2] or rcpt.orcpt
        if original.lower() != rcpt.address.lower():
            para(f"(you addressed it to <{_clean(original)}>)", 4)
    host = _remote_host(rcpt.relay)
    where = _server_name(rcpt.relay)
    if rcpt.reply and reply_is_remote(rcpt):
        if action in SUCCESS_ACTIONS:
            para(f"Accepted by {where}, which said:", 4)
        else:
            para(f"The receiving server {where} said:", 4)
        para(_clean(rcpt.reply), 8)
    elif rcpt.reply:
        para("The problem was:", 4)
        para(_clean(_local_text(rcpt.reply)), 8)
    elif action in SUCCESS_ACTIONS and host is not None:
        para(f"Accepted by {where}.", 4)
    elif action in (FAILED, DELAYED):
        para("No delivery attempt has finished yet.", 4)
    meaning = _MEANING.get(rcpt.category or "") if action in (FAILED, DELAYED) else None
    if meaning is not None:
        para(f"What this means: {meaning}", 4)
    if action == FAILED and status_for(rcpt, action).startswith("4."):
        para(
            f"I kept trying for {_human_duration(age)}, but the problem did not go away "
            "in the time allowed for delivery, so I gave up.",
            4,
        )
    elif action == DELAYED:
        if retry_until is not None:
            para(f"I will keep trying until {_human_date(retry_until)}.", 4)
        else:
            para("I will keep trying.", 4)
        if needs_notice(envelope, rcpt, FAILED):
            para("If I have to give up, I will tell you.", 4)
    elif action == RELAYED:
        para(
            "That server does not send delivery reports, so this is the last "
            "report you will get for this recipient.",
            4,
        )
    elif action == EXPANDED:
        para("It was passed on to the members of that list or alias.", 4)


def _server_name(relay: str | None) -> str:
    """C{mx.example.org (192.0.2.1)} from C{mx.example.org[192.0.2.1]:25}."""
    if not relay or relay == "none":
        return "(unknown)"
    match = _RELAY.fullmatch(relay.strip())
    if match is None:
        return _clean(relay)
    host, ip = match.group("host"), match.group("ip")
    return f"{host} ({ip})" if host and host != ip else ip


def _original_subject(head: bytes) -> str | None:
    """The original's Subject, decoded (RFC 2047), for the person to recognise it."""
    try:
        parsed = BytesHeaderParser(policy=policy.default).parsebytes(head)
        subject = parsed.get("Subject")
    except Exception:  # the stdlib parser can raise on hostile input; a subject is optional
        return None
    if subject is None:
        return None
    text = str(subject).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = _clean(text)
    if len(text) > 200:
        text = text[:197] + "..."
    return text or None


def _human_date(when: float) -> str:
    """A date a person reads easily: C{Friday 17 November 2023, 22:13 UTC}."""
    t = datetime.fromtimestamp(int(when), UTC)
    return (
        f"{_WEEKDAYS[t.weekday()]} {t.day} {_MONTHS[t.month - 1]} {t.year}, "
        f"{t.hour:02d}:{t.minute:02d} UTC"
    )


def _human_duration(seconds: float) -> str:
    """C{5 days}, C{4 hours}, C{1 minute}: the largest unit that gives at least 2."""
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}s"
    minutes = max(1, round(seconds / 60))
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def _wrap(text: str, indent: int) -> list[str]:
    """Wrap to 76 columns; long words are broken so that no line is long."""
    pad = " " * indent
    return textwrap.wrap(
        text,
        width=76,
        initial_indent=pad,
        subsequent_indent=pad,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [pad.rstrip()]


# -- text hygiene -------------------------------------------------------------


def _clean(text: str) -> str:
    """Text with every control or line-break character made a space, runs collapsed.

    CR and LF above all: a reply or address must never start a header
    field or a line of its own (no header injection).  C{str.split}
    without arguments also splits at the Unicode line and paragraph
    separators.
    """
    return " ".join("".join(_scrub(c) for c in text).split())


def _scrub(c: str) -> str:
    code = ord(c)
    if code < 0x20 or 0x7F <= code < 0xA0:  # C0, DEL, C1 (NEL among them)
        return " "
    if 0xD800 <= code < 0xE000:  # a lone surrogate cannot be encoded
        return "\ufffd"
    return c


def _ascii(text: str) -> str:
    """L{_clean}, then non-ASCII as C{\\x{HEX}} (RFC 3464 section 2.1: 7-bit)."""
    return "".join(c if ord(c) < 0x80 else f"\\x{{{ord(c):X}}}" for c in _clean(text))


def _local_text(reply: str) -> str:
    """Our own error text without the SMTP code we dressed it in."""
    match = _REPLY_PREFIX.match(reply)
    return reply[match.end() :] if match else reply


def _message_id(message_id: str) -> str:
    cleaned = _clean(message_id).replace(" ", "")
    return cleaned if cleaned.startswith("<") else f"<{cleaned}>"


def _subject(actions: set[str]) -> str:
    if FAILED in actions:
        return SUBJECT_FAILED
    if DELAYED in actions:
        return SUBJECT_DELAYED
    return SUBJECT_SUCCESS


def _pieces(word: str) -> list[str]:
    """A word cut into pieces of at most L{_MAX_WORD} octets."""
    if _octets(word) <= _MAX_WORD:
        return [word]
    pieces, current = [], ""
    for c in word:
        if _octets(current) + _octets(c) > _MAX_WORD:
            pieces.append(current)
            current = ""
        current += c
    pieces.append(current)
    return pieces


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))
