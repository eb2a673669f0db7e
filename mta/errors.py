"""SMTP replies and the errors that carry them.

Every decision the server makes ends as a L{Reply}: a three-digit code, an
RFC 3463 enhanced status code and a short human text.  Code that refuses
something raises L{SMTPReplyError} with the reply to send, so that the
session layer is the only place that writes to the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HT; CR is handled first


#: The (code, enhanced code) pairs that passed L{_check_codes}; bounded,
#: since codes read from receivers' replies reach it too.
_CHECKED: set[tuple[int, str | None]] = set()
_CHECKED_MAX = 4096


def _check_codes(code: int, enhanced: str | None) -> None:
    if not 200 <= code <= 599:
        raise ValueError(f"bad SMTP reply code {code}")
    if enhanced is not None:
        if not _ENHANCED.fullmatch(enhanced):
            raise ValueError(f"bad enhanced status code {enhanced!r}")
        if enhanced[0] != str(code)[0]:
            raise ValueError(f"enhanced code {enhanced} does not match {code}")
    if len(_CHECKED) < _CHECKED_MAX:
        _CHECKED.add((code, enhanced))


@dataclass(frozen=True)
class Reply:
    """One SMTP reply (RFC 5321 section 4.2), possibly multi-line.

    C{enhanced} is the RFC 3463 status code (C{"2.0.0"}), or C{None} for the
    greeting and the replies that RFC 2034 exempts.  C{text} may contain
    newlines; each line becomes one reply line.
    """

    code: int
    enhanced: str | None
    text: str

    def __post_init__(self) -> None:
        # A dozen replies are made per message, nearly all with a code pair
        # seen before: a set lookup instead of the checks.
        if (self.code, self.enhanced) not in _CHECKED:
            _check_codes(self.code, self.enhanced)

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply's lines without the code, enhanced code prefixed to each."""
        texts = self.text.split("\n") or [""]
        if self.enhanced is None:
            return texts
        return [f"{self.enhanced} {t}" if t else self.enhanced for t in texts]

    @property
    def wire(self) -> bytes:
        """L{encode}, remembered for the replies sent again and again."""
        return _wire(self)

    def encode(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated.

        Any CR or LF inside a line is replaced so that no text can inject an
        extra reply line, and other control characters (a NUL or an escape
        echoed from a client's command) by "?" (RFC 5321 C{textstring}).
        """
        lines = [_CONTROL.sub("?", ln.replace("\r", " ")) for ln in self.lines()]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return " ".join([str(self.code), *self.lines()])


class SMTPReplyError(Exception):
    """Raised where processing must stop with a given reply to the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class StorageError(Exception):
    """The spool could not store or update a message.

    C{disk_full} distinguishes ENOSPC/EDQUOT, which the submission server
    reports as C{452 4.3.1}, from every other failure (C{451 4.3.0}).
    """

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class ConfigError(Exception):
    """A configuration file or value is wrong; the text names file and key."""


class SharedStateError(Exception):
    """The state the instances of a cluster share (Redis) could not be read or
    changed in time: unreachable, too slow, restarting, or it refused the
    command.  The checks that depend on it fail closed with a temporary reply
    (SPEC section 9); the text says what went wrong, for the log.
    """


class ErrorKind(StrEnum):
    """Where a delivery result came from, for the classifier and the logs.

    C{REMOTE}: the reply is the next hop's own answer about the recipient
    (or the transaction).  The others are failures of the attempt as a
    whole, described by a reply made here (C{451 4.4.1 connection refused}).
    """

    REMOTE = "remote"
    NETWORK = "network"  # refused, reset, unreachable, lost connection
    TIMEOUT = "timeout"
    TLS = "tls"
    DNS = "dns"
    PROTOCOL = "protocol"  # the server broke the SMTP protocol
    CONFIG = "config"  # a route or setting of ours is wrong
    AUTH = "auth"  # a relay refused our credentials
    MESSAGE = "message"  # our own check: the next hop cannot take this message (SIZE)
    LOCAL = "local"  # a problem here: the queued message cannot be read, a crash
    SUSPENDED = "suspended"  # not tried: the destination rests (dead site, blocklist)


class DeliveryError(Exception):
    """A failure to deliver that is not one recipient's reply.

    Raised by next-hop lookup and the outbound client for things that apply
    to a whole attempt: DNS failures, refused connections, timeouts, TLS
    failures, a server that rejects the greeting or MAIL.  C{reply} is the
    remote reply when there was one, or a locally made reply that describes
    the error in SMTP terms (C{451 4.4.1 connection refused}); C{kind} (an
    L{ErrorKind}) says where it came from.  C{remote} names the host that
    gave the reply, C{host[ip]:port}.

    As in maddy and chasquid, whether to try again is a property of the
    error itself: C{DeliveryError(reply, kind)} makes a L{TemporaryError}
    for a 4xx reply and a L{PermanentError} for a 5xx one, so callers can
    catch either, or test C{temporary}.
    """

    temporary: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> DeliveryError:
        reply = args[0] if args else kwargs.get("reply")
        kind: type[DeliveryError] = cls
        if cls is DeliveryError and isinstance(reply, Reply):
            kind = TemporaryError if reply.code < 500 else PermanentError
        return super().__new__(kind)

    def __init__(self, reply: Reply, kind: ErrorKind | str, *, remote: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.kind = ErrorKind(kind)
        self.remote = remote

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reply, self.kind), {"remote": self.remote})


class TemporaryError(DeliveryError):
    """A failure worth trying again later (a 4xx reply)."""

    temporary = True


class PermanentError(DeliveryError):
    """A failure that will not go away by trying again (a 5xx reply)."""

    temporary = False


@lru_cache(maxsize=1024)
def _wire(reply: Reply) -> bytes:
    return reply.encode()
