"""Spam check with SpamAssassin's spamd: the built-in C{spamd} plugin.

Protocol (the SPAMC/1.5 protocol of spamd(1p)): C{SYMBOLS SPAMC/1.5}, a
C{Content-length} header, an optional C{User}, an empty line, the
message; spamd answers C{SPAMD/1.1 0 EX_OK}, a C{Spam: True ; 7.1 / 5.0}
header, an empty line and the names of the rules that hit, then closes.

A score at or above C{reject_score} → C{550 5.7.1}; spamd down or
answering an error → C{451 4.7.1}.  Only the first C{max_size} bytes
are sent: spam is small and SpamAssassin is slow on large messages.
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
from mta.errors import ConfigError
from mta.interfaces import IMessageHook, IStartupHook

log = Logger(namespace="mta.checks.spamd")

_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (\S+)")
_SPAM = re.compile(rb"^Spam: *(\w+) *; *(\S+) */ *(\S+) *\r?$", re.M | re.I)
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Options:
    address: str = "tcp:host=127.0.0.1:port=783"
    reject_score: float = 5.0
    max_size: int = option(512 * 1024, minimum=1024)
    user: str = ""


class SpamdAnswerError(Exception):
    pass


@dataclass(frozen=True)
class SpamResult:
    score: float
    threshold: float
    rules: str


def parse_answer(answer: bytes) -> SpamResult:
    """The score and rules from a SYMBOLS answer; L{SpamdAnswerError} if it is not one."""
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
    return SpamResult(
        float(score),
        float(threshold),
        body.decode("ascii", "replace").strip()[:500],
    )


@implementer(IMessageHook, IStartupHook)
class SpamdCheck:
    name = "spamd"

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
        head = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n" % length
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
            log.info(
                "{qid}: spam score {s} ({rules})",
                qid=message.queue_id,
                s=result.score,
                rules=result.rules,
            )
            if result.score >= self.options.reject_score:
                return reject(
                    f"Message refused as spam (score {result.score:.1f}, "
                    f"limit {self.options.reject_score:.1f})"
                )
            return CONTINUE

        return finish_scan(
            d, answered, f, name="spamd", address=self.options.address,
            queue_id=message.queue_id, text="Spam filter unavailable; try again later",
        )  # fmt: skip


def make(options: Options, context: PluginContext) -> SpamdCheck:
    where = f"{context.source}: [plugins.spamd.options] address"
    if "\r" in options.user or "\n" in options.user:
        raise ConfigError(f"{context.source}: [plugins.spamd.options] user: no line breaks")
    return SpamdCheck(options, context.reactor, where)
