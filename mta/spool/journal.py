"""The progress journal: delivery results written ahead of the message files.

When a next hop answers about a recipient, the queue manager hands the
recipient's new state (sent, deferred, failed; attempts, last reply, next
attempt) to the journal at once.  The message file gets the results only
when the message's round ends and it is filed (an appended record, see
L{mta.spool.format}); until then a SIGKILL would lose them, and the message
would be sent again.  A journal line survives a SIGKILL (the kernel keeps
the page cache), so only a delivery whose reply had not yet been read can
be sent twice.

Lines are collected in the reactor thread and written in batches, one
write per reactor turn, in the spool thread pool; the segment is
C{fdatasync}'d at most every C{sync_interval} seconds (a group commit that
nothing waits for).  A power loss may lose the last lines, which sends
those messages again; a line is only ever true (written after the reply),
so keeping one never loses a message.

Recovery (L{read} and L{apply}, by the store at start-up) gives each
recipient that is not final yet in its message file its last state from
the journal, records that in the file, and removes the segments.  A
segment is also removed while the daemon runs, once every message with a
line in it has been filed (L{ProgressJournal.release}) and a newer segment
has taken over.  See C{docs/spool-format.md}.

An C{mta-spool/1} spool has a I{sent} journal (C{sent-N.log}: deliveries
only); L{read_sent} reads it once, when the spool is upgraded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from mta.batch import Runner, run_now
from mta.envelope import Envelope, ProgressRecord, Recipient, RecipientState
from mta.spool.format import FormatError, parse_time, recipient_from_json, recipient_to_json
from mta.spool.queueid import is_queue_id

log = Logger(namespace="mta.spool")

SEGMENT_BYTES = 1 << 20  # a new segment after this much
SYNC_INTERVAL = 0.1  # seconds between fdatasyncs of the segment being written
JOURNAL = "journal"  # the directory in the spool
_SEGMENT = re.compile(r"^progress-(\d{1,18})\.log$")
SENT_SEGMENT = re.compile(r"^sent-(\d{1,18})\.log$")  # mta-spool/1


def line(record: ProgressRecord) -> bytes:
    """One journal line for a L{ProgressRecord}."""
    doc = {
        "id": record.queue_id,
        "rcpt": record.index,
        "state": recipient_to_json(record.recipient),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_line(data: bytes) -> ProgressRecord | None:
    """A journal line, or None for one that is torn or not ours."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return None
        queue_id, index = doc["id"], doc["rcpt"]
        recipient = recipient_from_json(doc["state"])
    except (ValueError, KeyError, TypeError, FormatError):
        return None
    if (
        not isinstance(queue_id, str)
        or not is_queue_id(queue_id)
        or not isinstance(index, int)
        or isinstance(index, bool)
        or index < 0
    ):
        return None
    return ProgressRecord(queue_id, index, recipient)


def directory(root: str) -> str:
    """The journal directory of the spool at C{root}."""
    return os.path.join(root, JOURNAL)


def segments(path: str, pattern: re.Pattern[str] = _SEGMENT) -> list[str]:
    """The segment files in the journal directory, oldest first (none if it is missing)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return [os.path.join(path, name) for _, name in sorted(found)]


def read(path: str) -> dict[str, list[ProgressRecord]]:
    """Every record in the journal directory, by queue ID, in the order written;
    unreadable lines are skipped."""
    records: dict[str, list[ProgressRecord]] = {}
    for segment in segments(path):
        try:
            with open(segment, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # removed meanwhile: its messages were filed
        for text in data.split(b"\n"):
            record = parse_line(text) if text.strip() else None
            if record is not None:
                records.setdefault(record.queue_id, []).append(record)
    return records


def read_sent(path: str) -> dict[str, list[ProgressRecord]]:
    """The deliveries in the sent journal of an C{mta-spool/1} spool, as progress
    records (without the recipient's other fields, which L{apply} keeps)."""
    records: dict[str, list[ProgressRecord]] = {}
    for segment in segments(path, SENT_SEGMENT):
        with open(segment, "rb") as f:
            data = f.read()
        for text in data.split(b"\n"):
            try:
                doc = json.loads(text) if text.strip() else None
                if not isinstance(doc, dict) or not is_queue_id(doc.get("id", "")):
                    continue
                when = parse_time(doc["time"])
                rcpt = Recipient(doc["address"], state=RecipientState.SENT, last_attempt=when,
                                 reply=doc["reply"], dsn_status=doc.get("dsn"),
                                 relay=doc.get("relay"))  # fmt: skip
                index = doc["rcpt"]
            except (ValueError, KeyError, TypeError, FormatError):
                continue
            if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
                records.setdefault(doc["id"], []).append(ProgressRecord(doc["id"], index, rcpt))
    return records


def apply(envelope: Envelope, records: Iterable[ProgressRecord], *, sent_only: bool = False) -> int:
    """Give the recipients their journaled states; returns how many changed.

    A record counts only for the recipient at its position with its
    address, only while that recipient is not final (once filed as sent or
    failed a recipient never changes again), and only when it is newer
    than what the envelope has (more attempts: each record is the result
    of one attempt, and the message is filed after it is journaled, so a
    file with as many attempts already says that result, and what was done
    after it: a delay notice sent, an operator's flush or release).  So
    applying a record twice, or after the message was filed, changes
    nothing.  C{sent_only}
    (the sent journal of an C{mta-spool/1} spool) marks the recipient sent
    and keeps the rest of what the envelope says.
    """
    changed = 0
    for record in records:
        if record.queue_id != envelope.queue_id or record.index >= len(envelope.recipients):
            continue
        rcpt = envelope.recipients[record.index]
        new = record.recipient
        if rcpt.address != new.address or rcpt.state.final:
            continue
        if sent_only:
            new = Recipient(**{**vars(rcpt), "state": RecipientState.SENT, "category": None,
                               "next_attempt": None, "reply": new.reply,
                               "dsn_status": new.dsn_status, "relay": new.relay,
                               "attempts": rcpt.attempts + 1,
                               "last_attempt": new.last_attempt})  # fmt: skip
        elif new.attempts <= rcpt.attempts:
            continue
        envelope.recipients[record.index] = Recipient(**vars(new))
        changed += 1
    return changed


@dataclass
class Recovery:
    recipients: int = 0  # given their journaled state
    messages: int = 0  # message files that got a record
    segments: int = 0  # segment files read
    kept: bool = False  # some could not be applied: the segments stay for the next time
    incomplete: int = 0  # messages whose reception never completed, removed


@dataclass(eq=False)
class _Segment:
    """One journal file, and the messages with lines in it not filed yet."""

    number: int
    size: int = 0  # bytes given to it
    pending: int = 0
    superseded: bool = False
    removed: bool = False
    fd: int | None = None  # in the writer thread
    path: str = ""
    failed: bool = False


@dataclass
class _Batch:
    writes: list[tuple[_Segment, bytes]] = field(default_factory=list)
    removals: list[_Segment] = field(default_factory=list)
    close: bool = False
    sync: bool = False  # sync what earlier batches left unsynced, due or not


class ProgressJournal:
    """The daemon's writer (see the module docstring).

    L{record} and L{release} are called in the reactor thread and do no
    I/O there: lines wait until the next turn of the reactor (C{schedule}
    runs a function then; the default runs it at once), and are written in
    one batch in C{runner}.  Nothing here raises: a journal that cannot be
    written only means that a SIGKILL before the filing sends the message
    again.
    """

    def __init__(
        self,
        path: str,
        *,
        runner: Runner[Any] = run_now,
        schedule: Callable[[Callable[[], None]], object] | None = None,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        segment_bytes: int = SEGMENT_BYTES,
        sync_interval: float = SYNC_INTERVAL,
    ) -> None:
        self.path = path
        self.runner = runner
        self.schedule = schedule
        #: Runs a function after a delay (the reactor's callLater): a batch
        #: written between syncs is synced at most C{sync_interval} later
        #: even when no other batch follows.  Without it, the next batch or
        #: L{close} syncs it.
        self.call_later = call_later
        self._sync_timer: object | None = None
        self._unsynced: set[_Segment] = set()  # the writer thread's
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self._current: _Segment | None = None
        self._next = 1
        self._batch = _Batch()
        self._scheduled = False
        self._busy = False  # a batch is being written
        self._failing = False  # an error was logged; say so once, not per batch
        self._last_sync = 0.0

    # -- the reactor thread ------------------------------------------------------

    def record(self, records: list[ProgressRecord]) -> object | None:
        """Queue lines; a token for L{release} once their message is filed,
        or None when there was nothing to write."""
        if not records:
            return None
        data = b"".join(line(r) for r in records)
        segment = self._current
        if segment is None or segment.size >= self.segment_bytes:
            if segment is not None:
                segment.superseded = True
                self._maybe_remove(segment)
            segment = self._current = _Segment(self._next)
            self._next += 1
        segment.size += len(data)
        segment.pending += 1
        self._batch.writes.append((segment, data))
        self._kick()
        return segment

    def release(self, token: object | None) -> None:
        """The message of a L{record} is filed: its lines are no longer needed."""
        if isinstance(token, _Segment):
            token.pending -= 1
            self._maybe_remove(token)

    def close(self) -> None:
        """At shutdown: write what waits (in this thread: the pool may be gone) and
        close the segment; one with nothing owed is removed, the rest is
        recovered at the next start."""
        segment, self._current = self._current, None
        if segment is not None:
            segment.superseded = True
            self._maybe_remove(segment)
        batch, self._batch = self._batch, _Batch()
        batch.close = True
        self._write(batch)
        timer, self._sync_timer = self._sync_timer, None
        if timer is not None:
            with contextlib.suppress(Exception):  # already run or cancelled
                timer.cancel()  # type: ignore[attr-defined]

    def _maybe_remove(self, segment: _Segment) -> None:
        if segment.superseded and segment.pending <= 0 and not segment.removed:
            segment.removed = True
            self._batch.removals.append(segment)
            self._kick()

    def _kick(self) -> None:
        if self._scheduled or self._busy:
            return
        self._scheduled = True
        if self.schedule is None:
            self._flush()
        else:
            self.schedule(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, _Batch()
        if not (batch.writes or batch.removals or batch.sync):
            return
        self._busy = True

        def done(unsynced: object) -> None:
            self._busy = False
            if unsynced is True:
                self._sync_later()
            if self._batch.writes or self._batch.removals or self._batch.sync:
                self._kick()

        self.runner(lambda: self._write(batch)).addErrback(
            lambda f: log.failure("the progress journal's writer failed", f)
        ).addBoth(done)

    def _sync_later(self) -> None:
        """Lines were written but not synced: sync them within the interval."""
        if self.call_later is None or self._sync_timer is not None:
            return

        def due() -> None:
            self._sync_timer = None
            self._batch.sync = True
            self._kick()

        self._sync_timer = self.call_later(self.sync_interval, due)

    # -- the spool thread ----------------------------------------------------------

    def _write(self, batch: _Batch) -> bool:
        """Write a batch (one thread at a time: batches never overlap); whether
        lines are left unsynced."""
        written: list[_Segment] = []
        for segment, data in batch.writes:
            if segment.failed or (segment.removed and segment.fd is None):
                continue
            try:
                fd = self._fd(segment)
                os.write(fd, data)
                if segment not in written:
                    written.append(segment)
            except OSError as e:
                segment.failed = True
                self._close_fd(segment)
                if not self._failing:
                    log.error("cannot write the progress journal ({e}); going on without it", e=e)
                self._failing = True
        if written and self._failing:
            log.info("the progress journal is written again")
            self._failing = False
        self._unsynced.update(written)
        now = time.monotonic()
        due = batch.close or batch.sync or now - self._last_sync >= self.sync_interval
        if self._unsynced and due:
            self._last_sync = now
            for segment in self._unsynced:
                if segment.fd is not None:
                    with contextlib.suppress(OSError):
                        os.fdatasync(segment.fd)
            self._unsynced.clear()
        for segment in batch.removals:
            self._unsynced.discard(segment)
            self._close_fd(segment)
            if segment.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment.path)
        if batch.close:
            for segment in written:
                self._close_fd(segment)
        return bool(self._unsynced)

    def _fd(self, segment: _Segment) -> int:
        if segment.fd is not None:
            return segment.fd
        number = segment.number
        while True:
            name = os.path.join(self.path, f"progress-{number}.log")
            try:
                segment.fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
            except FileExistsError:
                number += 1  # left by an earlier run (kept by recovery)
                continue
            segment.path = name
            return segment.fd

    @staticmethod
    def _close_fd(segment: _Segment) -> None:
        if segment.fd is not None:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
            segment.fd = None
