"""mta-sendmail: the sendmail command line, for local programs and cron.

    mta-sendmail [-t] [-i] [-f SENDER] [-F NAME] [--config FILE] [RECIPIENT ...]

Reads one message on standard input and puts it in the spool the way the
SMTP server does: written to C{tmp/}, fsync'd, renamed into C{incoming/}
(L{mta.interfaces.IQueueStore.add}), so it keeps the spool's
guarantees; then it tells a running daemon through the control socket
(C{pickup}), and a daemon that is not running finds it at start-up.  Like
Postfix's C{postdrop}, it must be run by the spool's owner.

The input may end its lines with LF (as local programs do); they become
CRLF.  Without C{-i} a line holding only "." ends the input, as in
sendmail.  With C{-t} the recipients are read from To:, Cc: and Bcc:
(added to those on the command line) and Bcc: is removed.  A message
without From:, Date: or Message-ID: gets them.

Exit status as sendmail's (sysexits.h): 0 queued, 64 bad usage, 65 bad
message, 73 the spool cannot be written, 75 temporary failure, 78 bad
configuration.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, getaddresses
from typing import BinaryIO, NoReturn

from mta import config as configmod
from mta.address import parse_mailbox
from mta.controlsocket import ControlSocketError, DaemonNotRunningError
from mta.controlsocket import request as control_request
from mta.envelope import Envelope, Recipient
from mta.errors import ConfigError, SMTPReplyError, StorageError
from mta.smtp.message import field_value, missing_fields, split_fields
from mta.spool import open_store
from mta.spool.queueid import QueueIdGenerator

EX_USAGE, EX_DATAERR, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 64, 65, 73, 75, 78
_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
MAX_RECIPIENTS = 1000


class SendmailError(Exception):
    """Stops with a message on stderr and a sysexits status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _fail(status: int, text: str) -> NoReturn:
    raise SendmailError(status, text)


def read_message(stream: BinaryIO, *, dot_ends: bool, limit: int) -> bytes:
    """The input with CRLF line ends; stops at a lone "." line when C{dot_ends}.

    Reads at most C{limit} octets (plus one, to tell a larger message), so
    a huge input costs no more memory than the largest message allowed.
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        _fail(EX_DATAERR, f"the message is larger than the limit of {limit} bytes")
    data = _LINE_END.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if dot_ends:
        if data.startswith(b".\r\n"):
            return b""
        end = data.find(b"\r\n.\r\n")
        if end >= 0:
            data = data[: end + 2]
    if len(data) > limit:
        _fail(EX_DATAERR, f"the message is larger than the limit of {limit} bytes")
    return data


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """The header section and the body, as sendmail reads them.

    The header section ends at the empty line, or at the first line that
    is neither a header field nor a continuation: that line starts the
    body (so "echo text | sendmail addr" sends a message with body "text").
    """
    pos = 0
    seen_field = False
    while pos < len(message):
        end = message.find(b"\r\n", pos)
        if end < 0:
            end = len(message)
        line = message[pos:end]
        if not line:
            return message[:pos], message[end + 2 :]
        continuation = line[:1] in (b" ", b"\t") and seen_field
        if not continuation and not _FIELD.match(line):
            return message[:pos], message[pos:]
        seen_field = True
        pos = end + 2
    return message, b""


def _address(text: str, what: str) -> str:
    try:
        return str(parse_mailbox(text.strip().strip("<>"), utf8=True))
    except SMTPReplyError:
        _fail(EX_USAGE if what != "header" else EX_DATAERR, f"{text!r} is not a valid address")


def prepare(
    message: bytes,
    *,
    sender: str,
    full_name: str | None,
    recipients: list[str],
    extract: bool,
    hostname: str,
    queue_id: str,
    now: float,
    user: str,
) -> tuple[bytes, list[str]]:
    """Header work: the stored message and the final recipient list."""
    head, body = split_header(message)
    try:
        fields = split_fields(head)
    except SMTPReplyError as e:
        _fail(EX_DATAERR, e.reply.text)
    names = {name for name, _ in fields}
    rcpts = list(recipients)
    if extract:
        values = [field_value(raw) for name, raw in fields if name in (b"to", b"cc", b"bcc")]
        rcpts += [_address(a, "header") for _, a in getaddresses(values) if a]
    unique: dict[str, str] = {}  # one per address, ignoring case, in order
    for rcpt in rcpts:
        unique.setdefault(rcpt.lower(), rcpt)
    if not unique:
        _fail(EX_USAGE, "no recipients (give addresses, or -t to read them from the message)")
    if len(unique) > MAX_RECIPIENTS:
        _fail(EX_USAGE, f"more than {MAX_RECIPIENTS} recipients")
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    out = [
        f"Received: by {hostname} (mta-sendmail, from user {user}) id {queue_id};\r\n"
        f"\t{date}\r\n".encode()
    ]
    out += [raw for name, raw in fields if not (extract and name == b"bcc")]
    if b"from" not in names:
        # Printable characters only (no header injection through -F); a
        # non-ASCII name is encoded (RFC 2047) by formataddr.
        name = "".join(c for c in full_name or "" if c.isprintable())
        address = sender or f"{user}@{hostname}"
        try:
            value = formataddr((name, address))
        except UnicodeError:  # an internationalized address (SMTPUTF8): name left out
            value = address
        out.append(f"From: {value}\r\n".encode())
    out += missing_fields(names, queue_id, hostname, now)
    return b"".join(out) + b"\r\n" + body, list(unique.values())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mta-sendmail", description="Queue a message read on standard input."
    )
    p.add_argument("-c", "--config", help="TOML configuration file (default: embedded)")
    p.add_argument("-t", action="store_true", help="read recipients from To:, Cc:, Bcc:")
    p.add_argument("-f", dest="sender", help="envelope sender (default: USER@hostname)")
    p.add_argument("-F", dest="full_name", help="the sender's full name, for a From: added")
    p.add_argument("-i", action="store_true", help='a line with only "." does not end input')
    p.add_argument("-o", dest="options", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("-b", dest="mode", default="m", help=argparse.SUPPRESS)
    p.add_argument("recipients", nargs="*")
    return p


def _normalize(argv: Sequence[str]) -> list[str]:
    """sendmail's spellings: C{-oi} is C{-i}, C{-fADDR} and C{-bm} stay as they are."""
    return ["-i" if a == "-oi" else a for a in argv]


def queue(args: argparse.Namespace, stdin: BinaryIO) -> str:
    if args.mode != "m":
        _fail(EX_USAGE, f"-b{args.mode} is not supported (only -bm, the default)")
    try:
        config = configmod.load(args.config or os.environ.get("MTA_CONFIG"))
    except ConfigError as e:
        _fail(EX_CONFIG, str(e))
    user = getpass.getuser()
    hostname = config.hostname
    if args.sender in ("", "<>"):
        sender = ""  # the null sender, e.g. for an auto-reply
    else:
        sender = _address(args.sender, "sender") if args.sender else f"{user}@{hostname}"
    recipients = [_address(r, "recipient") for r in args.recipients]
    message = read_message(stdin, dot_ends=not args.i, limit=config.limits.message_size)
    try:
        store = open_store(config.server.spool)
    except StorageError as e:
        _fail(EX_CANTCREAT, str(e))
    now = time.time()
    queue_id = QueueIdGenerator(time.time)()
    stored, rcpts = prepare(
        message,
        sender=sender,
        full_name=args.full_name,
        recipients=recipients,
        extract=args.t,
        hostname=hostname,
        queue_id=queue_id,
        now=now,
        user=user,
    )
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=[Recipient(r) for r in rcpts],
        arrival=now,
        size=len(stored),
        body="8BITMIME" if not stored.isascii() else "7BIT",
        smtputf8=not sender.isascii() or not all(r.isascii() for r in rcpts),
        client_helo=f"local user {user}",
        message_id=None,
    )
    try:
        store.add(envelope, stored)
    except StorageError as e:
        _fail(EX_TEMPFAIL if e.disk_full else EX_CANTCREAT, str(e))
    try:
        control_request(store.control_socket(), {"op": "pickup", "id": queue_id}, timeout=30)
    except DaemonNotRunningError:
        return f"{queue_id}: queued; no daemon is running, it is delivered when one starts"
    except ControlSocketError as e:
        return f"{queue_id}: queued; the daemon was not told ({e}), it finds it at its next start"
    return ""


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> int:
    args = parser().parse_args(_normalize(sys.argv[1:] if argv is None else argv))
    try:
        note = queue(args, stdin or sys.stdin.buffer)
    except SendmailError as e:
        sys.stderr.write(f"mta-sendmail: {e}\n")
        return e.status
    except KeyboardInterrupt:
        sys.stderr.write("mta-sendmail: interrupted; nothing was queued\n")
        return EX_TEMPFAIL
    if note:
        sys.stderr.write(f"mta-sendmail: {note}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
