"""RESP2, the Redis serialization protocol: commands out, replies in.

Pure functions and a pure incremental parser (no I/O, no Twisted), shared
by the Twisted client of the daemon (L{mta.cluster.client}) and the
blocking one of C{mtactl} (L{mta.cluster.blocking}).  See the protocol
specification, https://redis.io/docs/reference/protocol-spec/ ("RESP
protocol description"): a command is an array of bulk strings; a reply
is a simple string (C{+}), an error (C{-}), an integer (C{:}), a bulk
string (C{$}, length-prefixed, C{$-1} is nil) or an array (C{*}) of replies.

Replies are bounded: a bulk string longer than C{MAX_BULK} or an array
longer than C{MAX_ARRAY} is a protocol error, so that a broken or hostile
peer cannot make the daemon buffer without end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CRLF = b"\r\n"
MAX_BULK = 64 * 1024 * 1024
MAX_ARRAY = 1024 * 1024
MAX_LINE = 64 * 1024

Arg = bytes | str | int | float


class RESPProtocolError(Exception):
    """The peer sent something that is not RESP2 (or is beyond our bounds)."""


@dataclass(frozen=True)
class ErrorReply:
    """An error reply (C{-ERR ...}): a value, so that one command fails, not the stream."""

    message: str

    @property
    def kind(self) -> str:
        """The first word, by Redis convention the error's kind (ERR, NOSCRIPT, LOADING...)."""
        return self.message.split(" ", 1)[0]


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("a Redis argument cannot be a bool")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return repr(float(value)).encode("ascii")


def encode_command(*args: Arg) -> bytes:
    """One command as an array of bulk strings (binary-safe)."""
    if not args:
        raise ValueError("a Redis command needs a name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):  # noqa: N818 - control flow, not an error
    pass


class ReplyParser:
    """Feed it bytes; it returns the replies completed so far, in order.

    Bulk strings come back as C{bytes} (nil as None), simple strings as
    C{str}, integers as C{int}, arrays as lists, errors as L{ErrorReply}.
    Raises L{RESPProtocolError} on anything else; the connection is then
    unusable (replies could no longer be matched to commands).
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        replies: list[Any] = []
        while self._buffer:
            try:
                reply, end = self._parse(0)
            except _Incomplete:
                if self._buffer.find(CRLF) < 0 and len(self._buffer) > MAX_LINE:
                    raise RESPProtocolError("a reply line is too long") from None
                break
            replies.append(reply)
            self._buffer = self._buffer[end:]
        return replies

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(CRLF, start)
        if end < 0:
            raise _Incomplete
        if end - start > MAX_LINE:
            raise RESPProtocolError("a reply line is too long")
        return self._buffer[start:end], end + 2

    @staticmethod
    def _int(text: bytes) -> int:
        if not text or not text.lstrip(b"-").isdigit() or len(text) > 20:
            raise RESPProtocolError(f"not an integer: {text[:40]!r}")
        return int(text)

    def _parse(self, start: int) -> tuple[Any, int]:
        line, after = self._line(start)
        if not line:
            raise RESPProtocolError("an empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace"), after
        if kind == b"-":
            return ErrorReply(rest.decode("utf-8", "replace")), after
        if kind == b":":
            return self._int(rest), after
        if kind == b"$":
            size = self._int(rest)
            if size == -1:
                return None, after
            if size < 0 or size > MAX_BULK:
                raise RESPProtocolError(f"bad bulk length {size}")
            end = after + size
            if len(self._buffer) < end + 2:
                raise _Incomplete
            if self._buffer[end : end + 2] != CRLF:
                raise RESPProtocolError("a bulk string does not end with CRLF")
            return self._buffer[after:end], end + 2
        if kind == b"*":
            count = self._int(rest)
            if count == -1:
                return None, after
            if count < 0 or count > MAX_ARRAY:
                raise RESPProtocolError(f"bad array length {count}")
            items = []
            for _ in range(count):
                item, after = self._parse(after)
                items.append(item)
            return items, after
        raise RESPProtocolError(f"unknown reply type {kind!r}")
