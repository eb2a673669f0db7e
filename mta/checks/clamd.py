"""Virus scan with ClamAV's clamd: the built-in C{clamd} plugin.

Protocol (clamd(8)): commands prefixed with C{z} end with NUL, and so do
the answers.  C{zINSTREAM} is followed by chunks, each a 4-byte
big-endian length and that many bytes, and a zero length at the end;
the answer is C{stream: OK}, C{stream: NAME FOUND}, or C{... ERROR}
(C{INSTREAM size limit exceeded} when the stream passes clamd's
C{StreamMaxLength}).  C{zPING} answers C{PONG}; it is sent at start-up
so the log says at once whether clamd can be reached.

Verdicts: infected → C{554 5.7.1} naming the signature; clamd down or
answering an error → C{451 4.7.1} (the client tries again later, nothing
is queued); a message over C{max_size} → the C{oversize} option.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mta.checks import CONTINUE, MessageInfo, PluginContext, SessionInfo, Verdict, reject, tempfail
from mta.checks.daemon import endpoint, exchange, finish_scan, report_ping
from mta.config import option
from mta.interfaces import IMessageHook, IStartupHook

log = Logger(namespace="mta.checks.clamd")


@dataclass(frozen=True)
class Options:
    address: str = "unix:path=/run/clamav/clamd.ctl"
    max_size: int = option(25 * 1024 * 1024, minimum=1)
    oversize: str = option("reject", choices=("reject", "accept"))


def _chunk(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _nul_terminated(answer: bytes) -> bool:
    return b"\0" in answer


@implementer(IMessageHook, IStartupHook)
class ClamdCheck:
    name = "clamd"

    def __init__(self, options: Options, reactor: Any, where: str) -> None:
        self.options = options
        self.endpoint = endpoint(reactor, options.address, where)

    def ping(self) -> Deferred[bool]:
        """Whether clamd answers PING with PONG."""
        d = exchange(self.endpoint, b"zPING\0", complete=_nul_terminated)
        return d.addCallback(lambda answer: answer.split(b"\0")[0].strip() == b"PONG")

    def startup(self) -> Deferred[None]:
        return report_ping(self.ping(), "clamd", self.options.address, log)

    def _oversize(self, message: MessageInfo, why: str) -> Verdict:
        if self.options.oversize == "accept":
            log.warn("{qid}: not scanned for viruses: {why}", qid=message.queue_id, why=why)
            return CONTINUE
        log.info("{qid}: refused unscanned: {why}", qid=message.queue_id, why=why)
        return reject("Message too large to be scanned for viruses", 552, "5.3.4")

    def on_message(self, session: SessionInfo, message: MessageInfo) -> Verdict | Deferred[Verdict]:
        if message.size > self.options.max_size:
            return self._oversize(
                message, f"{message.size} bytes is over max_size {self.options.max_size}"
            )
        f = message.open()
        d = exchange(
            self.endpoint,
            b"zINSTREAM\0",
            f,
            _chunk(b""),
            transform=_chunk,
            complete=_nul_terminated,
        )

        def answered(answer: bytes) -> Verdict:
            text = answer.split(b"\0")[0].decode("utf-8", "replace").strip()
            if text.endswith(" FOUND"):
                signature = text.removeprefix("stream:").removesuffix(" FOUND").strip()
                log.info("{qid}: virus {sig} found", qid=message.queue_id, sig=signature)
                return reject(f"Message refused: virus found ({signature})", 554, "5.7.1")
            if text == "stream: OK":
                return CONTINUE
            if "size limit exceeded" in text:
                return self._oversize(message, f"over clamd's StreamMaxLength ({text})")
            log.error("{qid}: clamd answered {a!r}", qid=message.queue_id, a=text)
            return tempfail("Virus scanner error; try again later")

        return finish_scan(
            d, answered, f, name="clamd", address=self.options.address,
            queue_id=message.queue_id, text="Virus scanner unavailable; try again later",
        )  # fmt: skip


def make(options: Options, context: PluginContext) -> ClamdCheck:
    where = f"{context.source}: [plugins.clamd.options] address"
    return ClamdCheck(options, context.reactor, where)
