"""The sent journal: deliveries written ahead of the envelope.

When a next hop accepts a recipient (its reply to the end of data), the
queue manager appends one line per recipient to C{journal/sent-N.log} at
once, in the reactor thread, with a plain C{write()}.  The envelope is
rewritten and the message filed later, in a group commit (L{SpoolStore.settle_group});
until then a SIGKILL would lose the delivery and the message would be sent
again.  The journal line survives a SIGKILL (the kernel keeps the page
cache), so only a delivery whose reply had not yet been read can be sent
twice.

The journal is not fsync'd: a power loss may lose lines, which sends
those messages again, as before; a line is only ever true (written after
the reply), so keeping one can never lose a message.

Recovery (L{recover}) marks the recipients sent in the envelopes of the
messages still in C{active/} (the only place an unfiled delivery can be),
writes those envelopes durably, and removes the segments.  The daemon does
it at start-up, C{mtactl} before acting on the spool without a daemon.
Readers that must not write (C{mtactl queue list}/C{show}) overlay the
journal with L{read} and L{apply}.

A segment is removed while the daemon runs once every message with a line
in it has been filed (L{SentJournal.release}) and a newer segment has
taken over.  See C{docs/spool-format.md}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mta.batch import Runner, run_now
from mta.envelope import Envelope, QueueState, Recipient, RecipientState, SentRecord
from mta.spool.format import FormatError, format_time, parse_time
from mta.spool.queueid import is_queue_id

if TYPE_CHECKING:
    from mta.spool.fs import FileStore

log = Logger(namespace="mta.spool")

SEGMENT_BYTES = 1 << 20  # a new segment after this much
JOURNAL = "journal"  # the directory in the spool
_SEGMENT = re.compile(r"^sent-(\d{1,18})\.log$")


def line(record: SentRecord) -> bytes:
    """One journal line for a L{SentRecord}."""
    doc = {
        "id": record.queue_id,
        "rcpt": record.index,
        "address": record.address,
        "time": format_time(record.time),
        "reply": record.reply,
        "dsn": record.dsn,
        "relay": record.relay,
    }
    return json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_line(line: bytes) -> SentRecord | None:
    """A journal line, or None for one that is torn or not ours."""
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            return None
        queue_id, index, address = doc["id"], doc["rcpt"], doc["address"]
        reply, dsn, relay = doc["reply"], doc.get("dsn"), doc.get("relay")
        when = parse_time(doc["time"])
    except (ValueError, KeyError, TypeError, FormatError):
        return None
    if (
        not isinstance(queue_id, str)
        or not is_queue_id(queue_id)
        or not isinstance(index, int)
        or isinstance(index, bool)
        or index < 0
        or not isinstance(address, str)
        or not isinstance(reply, str)
        or not isinstance(dsn, str | None)
        or not isinstance(relay, str | None)
        or when is None
    ):
        return None
    return SentRecord(queue_id, index, address, when, reply, dsn, relay)


def directory(root: str) -> str:
    """The journal directory of the spool at C{root}."""
    return os.path.join(root, JOURNAL)


def segments(path: str) -> list[str]:
    """The segment files in the journal directory, oldest first (none if it is missing)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _SEGMENT.match(name))]
    return [os.path.join(path, name) for _, name in sorted(found)]


def read(path: str) -> dict[str, list[SentRecord]]:
    """Every record in the journal directory, by queue ID; unreadable lines are skipped."""
    records: dict[str, list[SentRecord]] = {}
    for segment in segments(path):
        try:
            with open(segment, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # removed meanwhile: its messages were filed
        for line in data.split(b"\n"):
            record = parse_line(line) if line.strip() else None
            if record is not None:
                records.setdefault(record.queue_id, []).append(record)
    return records


def mark_sent(
    rcpt: Recipient, *, when: float, reply: str, dsn: str | None, relay: str | None
) -> None:
    """What a successful delivery does to a recipient, as
    L{mta.queue.scheduler.apply} records it (same fields)."""
    rcpt.state = RecipientState.SENT
    rcpt.category = None
    rcpt.next_attempt = None
    rcpt.reply = reply
    rcpt.dsn_status = dsn
    rcpt.relay = relay
    rcpt.attempts += 1
    rcpt.last_attempt = when


def apply(envelope: Envelope, records: Iterable[SentRecord]) -> list[Recipient]:
    """Mark the journal's recipients sent; returns those that changed.

    A record counts only for the recipient at its position with its
    address, and only when that recipient is not final yet: once filed
    as sent (or failed), a recipient never changes again, so applying a
    record twice, or after the envelope was written, changes nothing.
    """
    changed = []
    for record in records:
        if record.queue_id != envelope.queue_id or record.index >= len(envelope.recipients):
            continue
        rcpt = envelope.recipients[record.index]
        if rcpt.address != record.address or rcpt.state.final:
            continue
        mark_sent(rcpt, when=record.time, reply=record.reply, dsn=record.dsn, relay=record.relay)
        changed.append(rcpt)
    return changed


@dataclass
class Recovery:
    recipients: int = 0  # marked sent
    messages: int = 0  # envelopes rewritten
    segments: int = 0  # segment files read
    kept: bool = False  # some could not be applied: the segments stay for the next time
    incomplete: int = 0  # messages whose reception never completed, removed


def recover(store: FileStore) -> Recovery:
    """Apply the journal to C{active/} and remove it (start-up, or C{mtactl} offline).

    Only the owner of the spool lock may call this.  Envelopes are written
    as the queue manager writes them (fsync'd, in one group).  When a
    message cannot be read or written because of an I/O error, the
    segments are kept, to be applied the next time; an envelope that is
    not valid is left to the queue manager (it moves it to C{corrupt/}).
    """
    path = directory(store.root)
    files = segments(path)
    result = Recovery(segments=len(files))
    if not files:
        return result
    updates: list[tuple[Envelope, QueueState, QueueState, float | None]] = []
    for queue_id, records in read(path).items():
        try:
            _, envelope = store.load(queue_id, QueueState.ACTIVE)
        except KeyError:
            continue  # not in active/: it was filed after its lines were written
        except FormatError as e:
            log.error("{qid}: journal not applied, unreadable envelope: {e}", qid=queue_id, e=e)
            continue
        except OSError as e:
            log.error("{qid}: journal not applied: {e}", qid=queue_id, e=e)
            result.kept = True
            continue
        changed = apply(envelope, records)
        if changed:
            updates.append((envelope, QueueState.ACTIVE, QueueState.ACTIVE, None))
            result.recipients += len(changed)
    for (envelope, _, _, _), error in zip(updates, store.settle_group(updates), strict=True):
        if error is None:
            result.messages += 1
        else:
            log.error("{qid}: journal not applied: {e}", qid=envelope.queue_id, e=str(error))
            result.kept = True
    if not result.kept:
        for segment in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)
    return result


class _Segment:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        self.size = 0
        self.pending = 0  # messages with a line here that are not filed yet
        self.removed = False


class SentJournal:
    """The daemon's writer (see the module docstring); used in the reactor thread only.

    L{record} never raises: a journal that cannot be written only means
    that a SIGKILL before the filing sends the message again, as without it.
    """

    def __init__(
        self,
        path: str,
        *,
        runner: Runner[None] = run_now,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.path = path
        self.runner = runner
        self.segment_bytes = segment_bytes
        self._current: _Segment | None = None
        self._next = 1
        self._failing = False  # an error was logged; say so once, not per line

    def record(self, records: list[SentRecord]) -> object | None:
        """Append lines now; a token for L{release} once their message is filed,
        or None when nothing was written."""
        if not records:
            return None
        data = b"".join(line(r) for r in records)
        segment = self._current
        try:
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._rotate()
            assert segment.fd is not None
            written = os.write(segment.fd, data)
            if written != len(data):
                raise OSError(f"short write to {segment.path} ({written} of {len(data)} bytes)")
        except OSError as e:
            # Give the segment up: the next line starts a new one rather than
            # follow a torn line or a broken descriptor.
            if segment is not None:
                self._close(segment)
            if not self._failing:
                log.error("cannot write the sent journal ({e}); going on without it", e=e)
            self._failing = True
            return None
        if self._failing:
            log.info("the sent journal is written again")
            self._failing = False
        segment.size += written
        segment.pending += 1
        return segment

    def release(self, token: object | None) -> None:
        """The message of an L{record} is filed: its lines are no longer needed."""
        if not isinstance(token, _Segment):
            return
        token.pending -= 1
        self._maybe_remove(token)

    def close(self) -> None:
        """At shutdown: close the current segment; remove it at once if nothing in
        it is owed (the runner may be gone), else it is recovered at the next start."""
        segment, self._current = self._current, None
        if segment is None:
            return
        if segment.fd is not None:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
            segment.fd = None
        if segment.pending <= 0 and not segment.removed:
            segment.removed = True
            with contextlib.suppress(OSError):
                os.unlink(segment.path)

    def _rotate(self) -> _Segment:
        if self._current is not None:
            self._close(self._current)
        while True:
            name = os.path.join(self.path, f"sent-{self._next}.log")
            self._next += 1
            try:
                fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
            except FileExistsError:
                continue  # left by an earlier run (kept by recovery)
            self._current = _Segment(name, fd)
            return self._current

    def _close(self, segment: _Segment) -> None:
        if segment is self._current:
            self._current = None
        if segment.fd is not None:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
            segment.fd = None
        self._maybe_remove(segment)

    def _maybe_remove(self, segment: _Segment) -> None:
        if segment.fd is not None or segment.pending > 0 or segment.removed:
            return
        segment.removed = True
        path = segment.path

        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        self.runner(unlink).addErrback(
            lambda f: log.error("cannot remove {path}: {e}", path=path, e=f.value)
        )
