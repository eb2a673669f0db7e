"""The message body readers: DATA (dot-terminated) and BDAT (counted chunks).

Both are pure and incremental: feed them the bytes of the body in pieces
of any size and they pass the stored form of the message (every line
ending in CRLF) to a sink, check it, and count it.

L{DataReader} reads what follows the C{354} reply.  It finds the end of
data, undoes the dot-stuffing, and tells the caller which bytes came after
the end (pipelined commands).  L{ChunkReader} reads the chunks of BDAT
(RFC 3030): their bytes are the message itself, with no end marker and
no dot-stuffing; the session counts the octets of each chunk.

The end of data is only C{CRLF "." CRLF} (RFC 5321 section 4.1.1.4):
never C{LF "." LF}, C{LF "." CRLF}, C{CRLF "." LF}, C{CR "." CR} or any
other form.  The differences in how servers read those forms are what
SMTP smuggling exploits (CVE-2023-51764, -51765, -51766): a message that
hides a false end would be split in two by a server that takes it for
the end, so no such form may end the data here.

What a line that ends in a bare LF (an LF with no CR before it) does is
the C{bare_newline} setting, as Postfix 3.9's C{smtpd_forbid_bare_newline}:

  - C{"normalize"} (the default): the line is taken as if it ended in
    CRLF and stored so.  Clients that hand over LF-terminated text
    (Python's C{msg.as_bytes()}, a shell script piping a file) work.  The
    end of data still needs a real CRLF on both sides of the dot, so a
    dot line next to a bare LF is message content: it is kept as a line
    of one dot (and dot-stuffed again when the message is relayed).
  - C{"reject"}: the message is refused with C{550 5.6.11}.

A bare CR (a CR not followed by LF) is never a line end, and a message
that has one is refused (C{550 5.6.11}) whatever the setting: passed on,
it would be read as a line end by the receivers that the C{CR "." CR}
form of smuggling targets, and there is no faithful repair.

A NUL octet is refused too (C{550 5.6.0}; RFC 5322 section 3.5 and RFC
5321 section 4.5.2 leave no place for it): receivers that drop NULs would
read C{CRLF NUL "." CRLF}, passed on unchanged, as the end of data.

A refused message is still read to its real end, so the session stays
in step with the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mta.errors import Reply

MAX_LINE = 1000  # octets including CRLF, RFC 5321 section 4.5.3.1.6
BARE_NEWLINE_MODES = ("normalize", "reject")

BARE_NEWLINE = Reply(550, "5.6.11", "Message contains a bare CR or LF; lines must end with CRLF")
BARE_CR = Reply(
    550, "5.6.11", "Message contains a bare CR (a CR not followed by LF); lines must end with CRLF"
)
NUL_OCTET = Reply(550, "5.6.0", "Message contains a NUL character, which mail may not carry")
LINE_TOO_LONG = Reply(
    550, "5.6.0", f"Message has a line longer than {MAX_LINE - 2} characters (RFC 5321 4.5.3.1.6)"
)

# The first dot of a line that starts with one, unless the line is only
# that dot: such a line never ends the data where it is content (it stands
# next to a bare LF), so its dot is not a transparency dot.
_STUFFED_DOT = re.compile(rb"(?m)^\.(?!\r\n)")


def _rank(reply: Reply) -> int:
    return {BARE_NEWLINE: 3, BARE_CR: 3, NUL_OCTET: 2, LINE_TOO_LONG: 1}.get(reply, 0)


def too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message exceeds the size limit of {limit} bytes")


class BodyReader:
    """What both readers share: complete lines checked, normalized, passed on.

    @param sink: receives the stored form of the message, CRLF line ends.
        It is not called again once the reader has found an error.
    @param max_size: octets of stored message allowed.
    @param bare_newline: C{"normalize"} or C{"reject"} (see the module).
    """

    _unstuff = False

    def __init__(
        self, sink: Callable[[bytes], None], max_size: int, *, bare_newline: str = "normalize"
    ) -> None:
        if bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline must be one of {BARE_NEWLINE_MODES}")
        self._sink = sink
        self._max_size = max_size
        self._normalize = bare_newline == "normalize"
        # In reject mode the one reply covers both kinds of bare line end,
        # so the reply never depends on which came first.
        self._bare_cr = BARE_CR if self._normalize else BARE_NEWLINE
        self._partial = b""  # the incomplete line at the end of the last piece
        self._after_crlf = True  # the last complete line ended in CRLF
        self.size = 0
        self.eight_bit = False  # some octet above 127 was seen
        self.bare_lf = 0  # lines that ended in a bare LF (normalized or refused)
        self.error: Reply | None = None

    def _fail(self, reply: Reply) -> None:
        # Reading goes on after an error, and the graver error wins, so
        # the reply does not depend on how the input was split into
        # packets (bare line ends, then NULs, then long lines, then size).
        if self.error is None or _rank(reply) > _rank(self.error):
            self.error = reply

    def _split(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Complete lines (ending at LF) and the rest, or None (kept as partial)."""
        buf = self._partial + data
        last = buf.rfind(b"\n")
        if last < 0:
            self._keep_partial(buf)
            return None
        return buf[: last + 1], buf[last + 1 :]

    def _keep_partial(self, partial: bytes) -> None:
        # What a partial line already shows is an error now, not when the
        # line ends, so the reply to a BDAT chunk does not depend on where
        # the packets were cut: a NUL, a CR with no LF after it (only a
        # final CR may yet be half of a CRLF), a line longer than any legal
        # line.  Of an over-long line only its last octet is kept (the CR
        # that may start the CRLF to come), behind a placeholder so that a
        # kept "." is not taken for a line of its own.
        if b"\x00" in partial:
            self._fail(NUL_OCTET)
        if b"\r" in partial[:-1]:
            self._fail(self._bare_cr)
        if len(partial) > MAX_LINE:
            self._fail(LINE_TOO_LONG)
            partial = b"X" + partial[-1:]
        self._partial = partial

    def _lines(self, block: bytes) -> None:
        """Check and pass on a run of complete lines (each ends at LF)."""
        if not block:
            return
        after_crlf, self._after_crlf = self._after_crlf, block.endswith(b"\r\n")
        if self.error is not None and _rank(self.error) == 3:
            return  # refused already for its line ends; nothing more to learn
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf:
            self._fail(self._bare_cr)
            return
        bare_lf = block.count(b"\n") - crlf
        if bare_lf:
            self.bare_lf += bare_lf
            if not self._normalize:
                self._fail(BARE_NEWLINE)
                return
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if b"\x00" in block:
            self._fail(NUL_OCTET)
        if self._unstuff:
            # RFC 5321 section 4.5.2: remove the first dot of every line
            # that starts with one.
            if bare_lf or not after_crlf:
                # A line of one dot here is content (see _STUFFED_DOT).
                block = _STUFFED_DOT.sub(b"", block)
            elif block.startswith(b".") or b"\r\n." in block:
                # Only CRLF line ends, so no line of one dot: it would have
                # been the end of data.  Occurrences of CRLF "." cannot overlap.
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


class DataReader(BodyReader):
    """Reads one DATA body, up to and including its C{CRLF "." CRLF}."""

    _unstuff = True

    def __init__(
        self, sink: Callable[[bytes], None], max_size: int, *, bare_newline: str = "normalize"
    ) -> None:
        super().__init__(sink, max_size, bare_newline=bare_newline)
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        """Consume a piece; returns the bytes after the end of data once found."""
        if self.done:
            raise RuntimeError("DATA already ended")
        split = self._split(data)
        if split is None:
            return None
        # Each block starts at a line start.  The data ends at a line of one
        # dot that ends in CRLF after a line that ended in CRLF (the DATA
        # command's own CRLF counts for the first line).
        block, rest = split
        if self._after_crlf and block.startswith(b".\r\n"):
            end = 0
        else:
            end = block.find(b"\r\n.\r\n")
            end = end + 2 if end >= 0 else -1
        if end >= 0:
            self._lines(block[:end])
            self.done = True
            self._partial = b""
            return block[end + 3 :] + rest
        self._lines(block)
        self._keep_partial(rest)
        return None


class ChunkReader(BodyReader):
    """Reads the chunks of one BDAT message (RFC 3030), octets taken as they are.

    No dot is removed and nothing ends the message but L{finish} (the
    session calls it after the chunk marked LAST).  The line checks,
    the normalization of bare LF and the size limit are those of DATA.
    """

    def feed(self, data: bytes) -> None:
        """Consume octets of a chunk; a line may continue in the next chunk."""
        split = self._split(data)
        if split is not None:
            block, rest = split
            self._lines(block)
            self._keep_partial(rest)

    def finish(self) -> None:
        """The last chunk has been read: an unterminated last line gets its CRLF
        (the stored message is made of whole lines, as a DATA message is)."""
        partial, self._partial = self._partial, b""
        if partial:
            # A CR at its very end is bare too (no LF follows, ever).
            self._lines(partial + b"\r\n")
