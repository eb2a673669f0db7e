"""The DATA reader: strict CRLF, dot-unstuffing, size and line limits.

Pure and incremental: feed it the bytes after the C{354} reply in chunks of
any size and it passes the unstuffed message to a sink, finds the end of
data, and tells the caller which bytes came after it (pipelined commands).

Lines end only at CRLF (RFC 5321 section 2.3.8).  The end of data is only
C{CRLF "." CRLF}; a bare LF or bare CR anywhere makes the message refused
(C{550 5.6.11}) rather than repaired, because the differences in how
servers read such input are what SMTP smuggling exploits (CVE-2023-51764,
-51765, -51766).  A refused message is still read to its real end, so the
session stays in step with the client.

A NUL octet is refused too (C{550 5.6.0}; RFC 5322 section 3.5 and RFC
5321 section 4.5.2 leave no place for it): receivers that drop NULs would
read C{CRLF NUL "." CRLF}, passed on unchanged, as the end of data.
"""

from __future__ import annotations

from collections.abc import Callable

from mta.errors import Reply

MAX_LINE = 1000  # octets including CRLF, RFC 5321 section 4.5.3.1.6

BARE_NEWLINE = Reply(550, "5.6.11", "Message contains a bare CR or LF; lines must end with CRLF")
NUL_OCTET = Reply(550, "5.6.0", "Message contains a NUL character, which mail may not carry")
LINE_TOO_LONG = Reply(
    550, "5.6.0", f"Message has a line longer than {MAX_LINE - 2} characters (RFC 5321 4.5.3.1.6)"
)


def _rank(reply: Reply) -> int:
    return {BARE_NEWLINE: 3, NUL_OCTET: 2, LINE_TOO_LONG: 1}.get(reply, 0)


def too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message exceeds the size limit of {limit} bytes")


class DataReader:
    """Reads one DATA body.

    @param sink: receives unstuffed message bytes, CRLF line ends kept.
        It is not called again once the reader has found an error.
    @param max_size: octets of unstuffed message allowed.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self._sink = sink
        self._max_size = max_size
        self._partial = b""  # the incomplete line at the end of the last chunk
        self.size = 0
        self.eight_bit = False  # some octet above 127 was seen
        self.error: Reply | None = None
        self.done = False

    def _fail(self, reply: Reply) -> None:
        # Reading goes on after an error, and the graver error wins, so
        # the reply does not depend on how the input was split into
        # packets (bare line ends, then NULs, then long lines, then size).
        if self.error is None or _rank(reply) > _rank(self.error):
            self.error = reply

    def feed(self, data: bytes) -> bytes | None:
        """Consume a chunk; returns the bytes after the end of data once found."""
        if self.done:
            raise RuntimeError("DATA already ended")
        buf = self._partial + data
        # Only complete lines are examined; each block starts at a line start.
        last = buf.rfind(b"\r\n")
        if last < 0:
            self._keep_partial(buf)
            return None
        block, rest = buf[: last + 2], buf[last + 2 :]
        if block.startswith(b".\r\n"):
            end = 0
        else:
            end = block.find(b"\r\n.\r\n")
            end = end + 2 if end >= 0 else -1
        if end >= 0:
            self._lines(block[:end])
            self.done = True
            self._partial = b""
            return buf[end + 3 :]
        self._lines(block)
        self._keep_partial(rest)
        return None

    def _keep_partial(self, partial: bytes) -> None:
        # A partial line longer than any legal line is already an error; keep
        # only its last octet (a CR that may start the CRLF we look for),
        # behind a placeholder so that a kept "." is not taken for a line
        # of its own.
        if len(partial) > MAX_LINE:
            # What is dropped here is checked here (a final CR may yet be
            # half of the CRLF).
            if b"\n" in partial or b"\r" in partial[:-1]:
                self._fail(BARE_NEWLINE)
            if b"\x00" in partial:
                self._fail(NUL_OCTET)
            self._fail(LINE_TOO_LONG)
            partial = b"X" + partial[-1:]
        self._partial = partial

    def _lines(self, block: bytes) -> None:
        """Check and pass on a run of complete CRLF-terminated lines."""
        if not block or self.error is BARE_NEWLINE:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self._fail(BARE_NEWLINE)
            return
        if b"\x00" in block:
            self._fail(NUL_OCTET)
        if block.startswith(b".") or b"\r\n." in block:
            # RFC 5321 section 4.5.2: remove the first dot of every line
            # that starts with one.  Occurrences of CRLF "." cannot overlap.
            block = (b"\r\n" + block).replace(b"\r\n.", b"\r\n")[2:]
        # Measured after unstuffing: the transparency dot does not count
        # (RFC 5321 section 4.5.3.1.6).
        if len(block) > MAX_LINE and max(map(len, block.split(b"\r\n"))) > MAX_LINE - 2:
            self._fail(LINE_TOO_LONG)
        self.size += len(block)
        if not self.eight_bit and not block.isascii():
            self.eight_bit = True
        if self.size > self._max_size:
            self._fail(too_big(self._max_size))
        if self.error is None:
            self._sink(block)
