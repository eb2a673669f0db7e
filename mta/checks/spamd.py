"""Spam check with SpamAssassin's spamd: the built-in C{spamd} plugin.

Protocol (the SPAMC/1.5 protocol of spamd(1p)): C{HEADERS SPAMC/1.5}, a
C{Content-length} header, an optional C{User}, an empty line, the
message; spamd answers C{SPAMD/1.1 0 EX_OK}, a C{Spam: True ; 7.1 / 5.0}
header, an empty line and the message's header section as SpamAssassin
rewrote it (its report: C{X-Spam-Status} with the rules that hit and the
autolearn result, C{X-Spam-Checker-Version}), then closes.  C{HEADERS}
is spamd's command for "the report, without the body" (SpamAssassin 3.4
and later).

A score at or above C{reject_score} → C{550 5.7.1}.  Below it the message
is accepted and delivered with SpamAssassin's verdict in its own header
shape::

    X-Spam-Checker-Version: SpamAssassin 4.0.1 (2024-03-25) on mx
    X-Spam-Score: 1.2
    X-Spam-Status: No, score=1.2 required=5.0 tests=HTML_MESSAGE,MIME_HTML_ONLY
            autolearn=no autolearn_force=no version=4.0.1

and, at or above C{mark_score}, C{X-Spam-Flag: YES} (with C{Yes} in
C{X-Spam-Status} and C{X-Spam-Level} stars), so that an operator can have
mail between the two scores marked for the recipient's filter instead of
refused.  C{required} is C{mark_score}: the score from which this server
calls a message spam.

The fields are written at delivery (an outbound hook), not into the
stored message, which the spool only appends to: the verdict is kept in
the envelope (L{mta.checks.MessageInfo.notes}) between the two.  Fields
of these names that the client sent are removed at receipt
(C{owned_fields}), before spamd sees the message, so that nobody can
forge a clean verdict.

spamd down or answering an error → C{451 4.7.1}.  Only the first
C{max_size} bytes are sent: spam is small and SpamAssassin is slow on
large messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mta.checks import CONTINUE, MessageInfo, PluginContext, SessionInfo, Verdict, reject, tempfail
from mta.checks.daemon import LimitedFile, endpoint, exchange, finish_scan, report_ping
from mta.config import option
from mta.envelope import Envelope
from mta.errors import ConfigError
from mta.interfaces import IMessageHook, IOutboundHook, IStartupHook

log = Logger(namespace="mta.checks.spamd")

_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (\S+)")
_SPAM = re.compile(rb"^Spam: *(\w+) *; *(\S+) */ *(\S+) *\r?$", re.M | re.I)
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?")
# SpamAssassin's X-Spam-Status: "No, score=1.2 required=5.0 tests=A,B autolearn=no ..."
_SA_STATUS = re.compile(r"(?:Yes|No), score=\S+ required=\S+ ?(.*)", re.S)
_TESTS = re.compile(r"\btests=(\S*)")
FOLD_AT = 78  # RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters
MAX_STARS = 50  # SpamAssassin's cap for X-Spam-Level

# Written by this plugin; the client's own are removed at receipt.
OWNED_FIELDS = (
    "X-Spam-Checker-Version",
    "X-Spam-Flag",
    "X-Spam-Level",
    "X-Spam-Report",
    "X-Spam-Score",
    "X-Spam-Status",
)


@dataclass(frozen=True)
class Options:
    address: str = "tcp:host=127.0.0.1:port=783"
    reject_score: float = 5.0
    mark_score: float = 5.0
    max_size: int = option(512 * 1024, minimum=1024)
    user: str = ""


class SpamdAnswerError(Exception):
    pass


@dataclass(frozen=True)
class SpamResult:
    """What spamd said: the score (as a number and as spamd wrote it), its
    own threshold, the rules that hit and its report fields (unfolded)."""

    score: float
    threshold: float
    rules: str
    score_text: str = ""
    fields: tuple[tuple[str, str], ...] = ()  # SpamAssassin's X-Spam-* (lower-case name, value)

    def field(self, name: str) -> str | None:
        return next((v for n, v in self.fields if n == name.lower()), None)


def _clean(value: str) -> str:
    """A header value as printable ASCII on one line (spamd is trusted, but
    what goes into a message must not break it)."""
    return "".join(c if " " <= c <= "~" else " " for c in value).strip()


def _report_fields(section: bytes) -> tuple[tuple[str, str], ...]:
    """The X-Spam-* fields of the header section in a HEADERS answer, unfolded."""
    out: list[tuple[str, str]] = []
    text = section.decode("ascii", "replace").replace("\r\n", "\n")
    for raw in re.split(r"\n(?![ \t])", text):
        name, colon, value = raw.partition(":")
        if colon and name.lower().startswith("x-spam-"):
            # SpamAssassin folds its tests list after a comma: that
            # whitespace is not part of the list.
            value = re.sub(r",[ \t]*\n[ \t]+", ",", value)
            value = re.sub(r"[ \t]*\n[ \t]+", " ", value)
            out.append((name.strip().lower(), _clean(value)))
    return tuple(out)


def parse_answer(answer: bytes) -> SpamResult:
    """The score, rules and report from a HEADERS (or SYMBOLS) answer;
    L{SpamdAnswerError} if it is not one."""
    status = _STATUS.match(answer)
    if status is None:
        raise SpamdAnswerError(f"not a spamd answer: {answer[:80]!r}")
    if status.group(1) != b"0":
        raise SpamdAnswerError(f"spamd error {status.group(1).decode()} {status.group(2).decode()}")
    head, _, body = answer.partition(b"\r\n\r\n")
    spam = _SPAM.search(head)
    if spam is None:
        raise SpamdAnswerError(f"no Spam: header in {head[:120]!r}")
    score, threshold = spam.group(2), spam.group(3)
    if not (_NUMBER.fullmatch(score) and _NUMBER.fullmatch(threshold)):
        raise SpamdAnswerError(f"not a spamd answer: bad score in {spam.group(0)[:120]!r}")
    fields = _report_fields(body)
    rules = body.decode("ascii", "replace").strip()
    sa_status = next((v for n, v in fields if n == "x-spam-status"), None)
    if fields or b":" in body:
        # A HEADERS answer: the rules are the status line's tests=.
        tests = _TESTS.search(sa_status or "")
        rules = tests.group(1) if tests else ""
    return SpamResult(float(score), float(threshold), rules[:500], score.decode("ascii"), fields)


def fold(name: str, value: str) -> bytes:
    """C{name: value} folded at spaces and after commas (RFC 5322 section
    2.2.3, as SpamAssassin folds its tests list), each line ending in CRLF."""
    pieces = [p for p in re.split(r"(?<=,)|(?= )", value) if p]
    lines = [f"{name}: {pieces[0].lstrip(' ')}" if pieces else f"{name}:"]
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) > FOLD_AT:
            lines.append("\t" + piece.lstrip(" "))
        else:
            lines[-1] += piece
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def report_fields(result: SpamResult, mark_score: float) -> bytes:
    """The header fields that carry the verdict, in SpamAssassin's shape."""
    flagged = result.score >= mark_score
    score = result.score_text or f"{result.score:.1f}"
    rest = ""
    sa_status = result.field("x-spam-status")
    if sa_status is not None:
        m = _SA_STATUS.match(sa_status)
        rest = m.group(1) if m else ""
    if not rest:
        rest = f"tests={result.rules or 'none'}"
    out = b""
    checker = result.field("x-spam-checker-version")
    if checker:
        out += fold("X-Spam-Checker-Version", checker)
    if flagged:
        out += fold("X-Spam-Flag", "YES")
        stars = "*" * min(MAX_STARS, max(0, int(result.score)))
        if stars:
            out += fold("X-Spam-Level", stars)
    out += fold("X-Spam-Score", score)
    yes_no = "Yes" if flagged else "No"
    out += fold("X-Spam-Status", f"{yes_no}, score={score} required={mark_score:.1f} {rest}")
    return out


@implementer(IMessageHook, IOutboundHook, IStartupHook)
class SpamdCheck:
    name = "spamd"
    owned_fields = OWNED_FIELDS

    def __init__(self, options: Options, reactor: Any, where: str) -> None:
        self.options = options
        self.endpoint = endpoint(reactor, options.address, where)

    def ping(self) -> Deferred[bool]:
        d = exchange(self.endpoint, b"PING SPAMC/1.5\r\n\r\n")
        return d.addCallback(lambda answer: b"PONG" in answer.split(b"\r\n")[0])

    def startup(self) -> Deferred[None]:
        return report_ping(self.ping(), "spamd", self.options.address, log)

    def on_message(self, session: SessionInfo, message: MessageInfo) -> Verdict | Deferred[Verdict]:
        length = min(message.size, self.options.max_size)
        head = b"HEADERS SPAMC/1.5\r\nContent-length: %d\r\n" % length
        if self.options.user:
            head += b"User: " + self.options.user.encode() + b"\r\n"
        f = message.open()
        body = LimitedFile(f, length)
        d = exchange(self.endpoint, head + b"\r\n", body, half_close=True)  # type: ignore[arg-type]

        def answered(answer: bytes) -> Verdict:
            try:
                result = parse_answer(answer)
            except SpamdAnswerError as e:
                log.error("{qid}: {e}", qid=message.queue_id, e=str(e))
                return tempfail("Spam filter error; try again later")
            flagged = result.score >= self.options.mark_score
            log.info(
                "{qid}: spam score {s} ({rules}){flag}",
                qid=message.queue_id,
                s=result.score,
                rules=result.rules,
                flag=", marked as spam" if flagged else "",
            )
            if result.score >= self.options.reject_score:
                return reject(
                    f"Message refused as spam (score {result.score:.1f}, "
                    f"limit {self.options.reject_score:.1f})"
                )
            fields = report_fields(result, self.options.mark_score)
            message.notes[self.name] = {"headers": fields.decode("ascii")}
            return CONTINUE

        return finish_scan(
            d, answered, f, name="spamd", address=self.options.address,
            queue_id=message.queue_id, text="Spam filter unavailable; try again later",
        )  # fmt: skip

    def on_outbound(self, envelope: Envelope, data: bytes) -> bytes:
        """The verdict's fields, in front of the message as it is sent."""
        notes = envelope.extra.get("plugins")
        mine = notes.get(self.name) if isinstance(notes, dict) else None
        headers = mine.get("headers") if isinstance(mine, dict) else None
        if not isinstance(headers, str) or not headers.isascii():
            return b""  # not checked by this plugin (queued before it was on, or a DSN)
        return headers.encode("ascii")


def make(options: Options, context: PluginContext) -> SpamdCheck:
    where = f"{context.source}: [plugins.spamd.options] address"
    if "\r" in options.user or "\n" in options.user:
        raise ConfigError(f"{context.source}: [plugins.spamd.options] user: no line breaks")
    return SpamdCheck(options, context.reactor, where)
