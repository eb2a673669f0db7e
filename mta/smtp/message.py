"""What the submission server does to a message's header section.

L{MessageBuilder} sits between the DATA reader and the spool.  It holds back
the header section until it is complete, checks it (one From: address that
the login may use, not too many Received: fields), then writes the stored
form: a new C{Received:} field first, every original field byte for byte
except C{Bcc:} and the fields a check writes itself (C{X-Spam-Status:} when
the spam check is on: a client must not be able to forge a verdict),
C{Message-ID:} and C{Date:} when missing, then the body as received.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.utils import format_datetime
from typing import Any

from twisted.logger import Logger

from mta.address import valid_domain
from mta.errors import Reply, SMTPReplyError, StorageError
from mta.users import User

log = Logger(namespace="mta.smtpd")

_FIELD_NAME = re.compile(rb"[!-9;-~]+")
MAX_FROM = 2048  # characters of an unfolded From: value
# An addr-spec made of atoms (RFC 5322 dot-atom text, no quotes or comments).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM = re.compile(
    rf'({_ADDR})|(?:[A-Za-z0-9!#$%&\'*+/=?^_`{{|}}~. \t-]*|"[^"\\\r\n]*")[ \t]*<({_ADDR})>'
)


@dataclass(frozen=True)
class TraceInfo:
    """What the trace field records about the submission (RFC 5321 section 4.4)."""

    hostname: str
    queue_id: str
    helo: str
    client_address: str
    tls: str | None
    smtputf8: bool
    recipients: tuple[str, ...]
    when: float
    authenticated: bool = True
    encrypted: bool = True


def received_field(trace: TraceInfo) -> bytes:
    """The C{Received:} field this server prepends, folded, CRLF-terminated.

    The protocol is C{ESMTP} or C{UTF8SMTP} (RFC 6531) with C{S} for TLS
    and C{A} for AUTH (RFC 3848): C{ESMTPSA} for every authenticated
    submission.  The recipient is named only when there is exactly one,
    so that Bcc recipients stay private.
    """
    # A UTF-8 EHLO name only in a UTF-8 message: anything else must stay ASCII.
    helo = trace.helo if valid_domain(trace.helo, utf8=trace.smtputf8) else "unknown"
    if trace.helo.startswith("[") and valid_domain(trace.helo):
        helo = trace.helo
    proto = ("UTF8SMTP" if trace.smtputf8 else "ESMTP") + ("S" if trace.encrypted else "")
    proto += "A" if trace.authenticated else ""
    literal = trace.client_address
    literal = f"IPv6:{literal}" if ":" in literal else literal
    lines = [f"Received: from {helo} ([{literal}])"]
    if trace.tls:
        lines.append(f"\t(using {trace.tls})")
    lines.append(f"\tby {trace.hostname} (mta) with {proto} id {trace.queue_id}")
    if len(trace.recipients) == 1:
        lines.append(f"\tfor <{trace.recipients[0]}>")
    lines[-1] += ";"
    lines.append("\t" + format_datetime(datetime.fromtimestamp(trace.when, UTC)))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def missing_fields(names: set[bytes], queue_id: str, hostname: str, when: float) -> list[bytes]:
    """C{Message-ID:} and C{Date:} for a message that lacks them (RFC 5322 section 3.6),
    the ID made from the queue ID; C{names} are the lower-case field names present."""
    out = []
    if b"message-id" not in names:
        out.append(f"Message-ID: <{queue_id}@{hostname}>\r\n".encode())
    if b"date" not in names:
        out.append(f"Date: {format_datetime(datetime.fromtimestamp(when, UTC))}\r\n".encode())
    return out


def split_fields(section: bytes) -> list[tuple[bytes, bytes]]:
    """Split a header section into C{(lower-case name, raw field bytes)}.

    The raw bytes include continuation lines and the final CRLF, so writing
    them back unchanged reproduces the input.  A line that is neither a
    field nor a continuation makes the section invalid (RFC 5322 section
    2.2).
    """
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in section.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise SMTPReplyError(
                    Reply(550, "5.6.0", "Message header section starts with a continuation line")
                )
            fields[-1][1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(name):
            shown = line[:40].decode("utf-8", "replace")
            raise SMTPReplyError(Reply(550, "5.6.0", f"Malformed header line: {shown!r}"))
        fields.append((name.lower(), [line]))
    return [(name, b"".join(ln + b"\r\n" for ln in lines)) for name, lines in fields]


def field_value(raw: bytes) -> str:
    """The unfolded value of a raw field, decoded as UTF-8 (RFC 6532)."""
    value = raw.partition(b":")[2]
    text = value.decode("utf-8", "surrogateescape")
    return re.sub(r"\r\n(?=[ \t])", "", text).strip()


def from_address(raw_fields: list[bytes]) -> str:
    """The single address of the one C{From:} field, or a reply saying what is wrong."""
    if not raw_fields:
        raise SMTPReplyError(
            Reply(550, "5.6.0", "Message has no From: header; add one with your address")
        )
    if len(raw_fields) > 1:
        raise SMTPReplyError(Reply(550, "5.6.0", "Message has more than one From: header"))
    invalid = SMTPReplyError(
        Reply(550, "5.6.0", "The From: header must hold exactly one valid address")
    )
    value = field_value(raw_fields[0])
    # Python's address parser takes quadratic time on some inputs and can
    # crash on others; a From: this long is not a real one anyway.
    if len(value) > MAX_FROM:
        raise invalid
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple:
        # The common forms (a@b, Name <a@b>, "Name" <a@b>) without the cost
        # of the full RFC 5322 parser; anything else goes through it.
        return simple.group(1) or simple.group(2)
    try:
        header = policy.default.header_factory("from", value)
        addresses: tuple[Any, ...] = getattr(header, "addresses", ())
        groups: tuple[Any, ...] = getattr(header, "groups", ())
        defects = list(header.defects)
        address = str(addresses[0].addr_spec) if len(addresses) == 1 else ""
    except Exception:
        raise invalid from None
    if (
        not address
        or any(g.display_name is not None for g in groups)
        or "@" not in address
        or any(type(d).__name__ == "InvalidHeaderDefect" for d in defects)
    ):
        raise invalid
    return address


class MessageBuilder:
    """Receives the unstuffed message and writes its stored form to C{out}.

    Errors do not raise out of L{write} (the DATA reader must keep reading
    to the end of data); they are kept in C{error} and the rest is dropped.
    """

    def __init__(
        self,
        trace: TraceInfo,
        user: User | None,
        out: Callable[[bytes], None],
        *,
        max_received: int,
        max_header_size: int,
        removed: frozenset[bytes] = frozenset(),
    ) -> None:
        self._trace = trace
        # Lower-case names of fields dropped besides Bcc: (what checks write).
        self._removed = removed | {b"bcc"}
        self._user = user
        self._out = out
        self._max_received = max_received
        self._max_header_size = max_header_size
        self._head = bytearray()
        self._in_body = False
        self.error: Reply | None = None
        self.storage_error: StorageError | None = None
        self.message_id: str | None = None
        self.removed_fields: list[bytes] = []  # names of the fields removed, for the log

    def write(self, data: bytes) -> None:
        if self.error is not None or self.storage_error is not None:
            return
        if self._in_body:
            self._emit(data)
            return
        # A bytearray grows in place and only the new tail is searched, so
        # a header section sent in tiny pieces costs linear time.
        searched = max(0, len(self._head) - 3)
        self._head += data
        if self._head.startswith(b"\r\n"):
            end = 0
        else:
            end = self._head.find(b"\r\n\r\n", searched)
            end = end + 2 if end >= 0 else -1
        if end < 0:
            if len(self._head) > self._max_header_size:
                self.error = Reply(
                    552, "5.3.4", f"Header section exceeds {self._max_header_size} bytes"
                )
            return
        head, rest = bytes(self._head[:end]), bytes(self._head[end:])
        self._head = bytearray()
        self._in_body = True
        if len(head) > self._max_header_size:
            self.error = Reply(
                552, "5.3.4", f"Header section exceeds {self._max_header_size} bytes"
            )
            return
        self._header_section(head)
        if self.error is None and self.storage_error is None and rest:
            self._emit(rest)

    def _emit(self, data: bytes) -> None:
        try:
            self._out(data)
        except StorageError as e:
            self.storage_error = e

    def finish(self) -> None:
        """End of data: a message without an empty line is all header section."""
        if not self._in_body and self.error is None and self.storage_error is None:
            head, self._head = bytes(self._head), bytearray()
            self._in_body = True
            self._header_section(head)

    def _header_section(self, head: bytes) -> None:
        try:
            fields = split_fields(head)
            self._check(fields)
        except SMTPReplyError as e:
            self.error = e.reply
            return
        except Exception:
            # Never let hostile input escape as a crash of the session.
            log.failure("cannot check a header section")
            self.error = Reply(550, "5.6.0", "The message header section cannot be read")
            return
        names = {name for name, _ in fields}
        out = [received_field(self._trace)]
        out += [raw for name, raw in fields if name not in self._removed]
        self.removed_fields = [name for name, _ in fields if name in self._removed]
        trace = self._trace
        out += missing_fields(names, trace.queue_id, trace.hostname, trace.when)
        if b"message-id" not in names:
            self.message_id = f"<{trace.queue_id}@{trace.hostname}>"
        else:
            raw = next(raw for name, raw in fields if name == b"message-id")
            # For logs and the envelope only: printable ASCII, whatever was sent.
            value = field_value(raw)[:200]
            self.message_id = "".join(c if " " <= c <= "~" else "?" for c in value)
        self._emit(b"".join(out))

    def _check(self, fields: list[tuple[bytes, bytes]]) -> None:
        received = sum(1 for name, _ in fields if name == b"received")
        if received > self._max_received:
            raise SMTPReplyError(
                Reply(554, "5.4.6", f"Too many Received: headers ({received}); mail loop?")
            )
        sender = from_address([raw for name, raw in fields if name == b"from"])
        if self._user is not None and not self._user.may_send_as(sender):
            raise SMTPReplyError(
                Reply(
                    550,
                    "5.7.1",
                    f"From: header address <{sender}> does not belong to your login "
                    f"<{self._user.email}>; make sure your From address matches "
                    "your authenticated address",
                )
            )
