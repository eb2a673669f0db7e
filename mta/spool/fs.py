"""The on-disk spool: one file per message, moved between state directories.

Layout (C{docs/spool-format.md})::

    spool.json                 {"format": "mta-spool/2"}
    tmp/ID                     a message being received; never delivered
    incoming/ID                committed, not yet delivered
    deferred/ID                waiting for its next attempt (modification time: when)
    hold/ID corrupt/ID         set aside by the operator, or unreadable
    done/ID redacted/ID        finished (modification time: when)
    journal/progress-N.log     delivery results not yet in their files (L{journal})

A message file is the message exactly as stored, then its envelope as
records of one line of JSON each (L{mta.spool.format}): a full envelope at
the commit, and one record more each time the message is filed after a
delivery round or changed by the operator.  The message bytes are never
rewritten while the message is queued.

Durability (C{docs/decisions.md}): a message is committed by writing it
into a file in C{tmp/} (in the daemon, one of the empty files made ahead,
L{mta.spool.spares}), making the files of its group durable (one
syncfs(2) of the file system for the group, or with C{barrier = "fsync"}
one fsync per file, in worker threads at once), a rename into
C{incoming/}, and one fsync of C{incoming/} for the whole group.  Only
then does the client get its 250.
Nothing after that waits for the disk: results go to the progress journal
(group-committed, written in batches), and filing a message (appending a
record, renaming it) is not fsync'd, which on a journalling file system
(ext4, xfs) can at worst bring a message back after a power loss, never
lose or tear one.  C{sync = "strict"} fsyncs the filing too.

L{FileStore} is the queue on disk (L{mta.interfaces.IQueueStore}),
synchronous, shared with C{mtactl}.  L{Spool} is the daemon's way in
(L{mta.interfaces.ISpool}): messages are received into memory (only large
ones are written to C{tmp/} as they arrive, in the spool threads), and
committed in groups, one hand-off to the threads per group.  Nothing
outside L{mta.spool} knows this layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.batch import Batcher, Runner, run_now
from mta.envelope import Committed, Envelope, ProgressRecord, QueueScan, QueueState
from mta.errors import StorageError
from mta.interfaces import IQueueStore, ISpool, ISpoolTransaction
from mta.spool import format as envformat
from mta.spool import journal, upgrade
from mta.spool.format import FormatError, MissingEnvelopeError
from mta.spool.queueid import is_queue_id
from mta.spool.spares import SpareFiles

T = TypeVar("T")
U = TypeVar("U")

SPOOL_FORMAT = "mta-spool/2"
SPOOL_FORMAT_V1 = "mta-spool/1"
#: The state directories; C{active} is no directory: a message in delivery
#: stays where it was, and the daemon knows it is active.
DIRECTORIES = tuple(s for s in QueueState if s != QueueState.ACTIVE)
TMP = "tmp"
STATE = "state"  # small files of other parts (plugins, the MTA-STS cache)
MAX_GROUP = 256
SPILL = 256 * 1024  # a message larger than this is written to tmp/ as it arrives
HIGH_WATER = 4 * 1024 * 1024  # pause the client while this much waits to be written
TAIL = 64 * 1024  # read this much of a file's end to find its last record
COMMITTED_CACHE = 4096  # placements of new messages kept for the queue manager
SYNC_MODES = ("standard", "strict")
#: How a group commit makes its files durable: one syncfs(2) of the file
#: system for the whole group, or an fsync of each file.
BARRIERS = ("syncfs", "fsync")


def _find_syncfs() -> Callable[[int], int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call


_SYNCFS = _find_syncfs()
SYNCFS_AVAILABLE = _SYNCFS is not None
#: The barrier where none is configured: syncfs where the system has it (Linux).
DEFAULT_BARRIER = "syncfs" if SYNCFS_AVAILABLE else "fsync"

log = Logger(namespace="mta.spool")


def storage_error(action: str, e: BaseException) -> StorageError:
    """Wrap an OS error, marking out-of-space conditions."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    return StorageError(f"{action}: {e}", disk_full=full)


class FileOps:
    """The file system calls that make durability; injectable for fault tests."""

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self, path: str) -> None:
        """Make everything written to the file system of C{path} durable:
        Linux's syncfs(2), one call (and one flush of the device's cache)
        for any number of files.  Since Linux 5.8 it reports write errors."""
        if _SYNCFS is None:
            raise OSError(errno.ENOSYS, "syncfs(2) is not available on this system")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _SYNCFS(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def close(self, fd: int) -> None:
        os.close(fd)


@dataclass
class Placement:
    """Where a message's file is and how its records end (this process's notes)."""

    state: QueueState  # the directory the file is in
    size: int  # message octets: where the records begin
    full_len: int  # length of the last full record
    since: int = 0  # bytes of update records after it
    recipients: list[str] = field(default_factory=list)  # as last recorded


class _Bounded(io.RawIOBase):
    """The first C{size} bytes of a file: the message, without its records."""

    def __init__(self, raw: IO[bytes], size: int) -> None:
        self._raw = raw
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(b)[: self._left]
        n = self._raw.readinto(view)  # type: ignore[attr-defined]
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _message_reader(path: str, size: int) -> IO[bytes]:
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes the reader
    return io.BufferedReader(_Bounded(raw, size), 65536)


def read_records(fd: int, end: int) -> tuple[Envelope, Placement]:
    """The envelope at the end of an open message file, and how its records lie.

    The last line that is a record names the message size, where the
    records begin; they are read from there and folded (L{envformat.fold}).
    A torn last line (a power loss while appending) is passed over.
    """
    want = min(TAIL, end)
    size = None
    while size is None:
        start = end - want
        chunk = os.pread(fd, want, start)
        lines = chunk.split(b"\n")
        offset = end
        # lines[0] may be cut (unless the chunk starts the file); lines[-1] follows the last LF.
        for i in range(len(lines) - 1, 0 if start else -1, -1):
            text = lines[i]
            offset -= len(text) + (1 if i < len(lines) - 1 else 0)
            doc = envformat.parse_record(text) if text else None
            if doc is not None and doc["size"] <= offset:
                size = doc["size"]
                break
        if size is None:
            if want >= end:
                last = chunk.rstrip(b"\n").rpartition(b"\n")[2]
                if last.startswith(b'{"format"'):
                    raise FormatError("its envelope record is not valid")
                raise MissingEnvelopeError("no envelope record in the message file")
            want = min(end, want * 4)
    region = os.pread(fd, end - size, size)
    records = []
    full_len = since = 0
    for text in region.split(b"\n"):
        doc = envformat.parse_record(text) if text.strip() else None
        if doc is None:
            continue
        records.append(doc)
        if "update" in doc:
            since += len(text) + 1
        else:
            full_len, since = len(text) + 1, 0
    env = envformat.fold(records)
    texts = [envformat.recipient_text(r) for r in env.recipients]
    return env, Placement(QueueState.INCOMING, size, full_len, since, texts)


@implementer(IQueueStore)
class FileStore:
    """The queue on disk (L{IQueueStore}).

    Synchronous: the daemon calls it in its spool threads, C{mtactl} and
    C{mta-sendmail} directly.  The progress journal (L{journal},
    L{release}) and L{claim} are used in the daemon's reactor thread and
    do no I/O there.  The messages this process has taken for delivery
    are C{active}: their files stay where they were.
    """

    def __init__(
        self,
        root: str,
        ops: FileOps | None = None,
        *,
        workers: int = 1,
        journal_runner: Runner[Any] = run_now,
        schedule: Callable[[Callable[[], None]], object] | None = None,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        sync: str = "standard",
        journal_sync_interval: float = journal.SYNC_INTERVAL,
        barrier: str = DEFAULT_BARRIER,
        spares: bool = False,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {sync!r}")
        if barrier not in BARRIERS:
            raise ValueError(f"unknown barrier {barrier!r}")
        self.root = os.path.abspath(root)
        self.ops = ops or FileOps()
        self.sync = sync
        self.barrier = barrier
        #: Files made ahead for commits (the daemon's; L{mta.spool.spares}).
        self.spares = (
            SpareFiles(self.path(TMP), self.ops.create, self.ops.close) if spares else None
        )
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._journal_runner = journal_runner
        self._schedule = schedule
        self._call_later = call_later
        self._journal_sync = 0.0 if sync == "strict" else journal_sync_interval
        self._writer: journal.ProgressJournal | None = None
        self._active: dict[str, Placement] = {}
        self._committed: OrderedDict[str, Placement] = OrderedDict()

    def _each(self, work: Callable[[T], U], items: Sequence[T]) -> list[U]:
        """C{work} on every item; with C{workers} > 1, several at once.

        A group's messages are independent until the shared directory
        fsync; with the C{fsync} barrier, doing their own fsyncs
        concurrently lets the file system put them in one journal commit
        instead of one commit after another.
        """
        if self._workers < 2 or len(items) < 2:
            return [work(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="spool-sync")
        return list(self._executor.map(work, items))

    # -- layout ------------------------------------------------------------

    def path(self, state: str, queue_id: str | None = None) -> str:
        if state not in DIRECTORIES and state != TMP:
            raise ValueError(f"unknown spool directory {state!r}")
        if queue_id is None:
            return os.path.join(self.root, state)
        return os.path.join(self.root, state, queue_id)

    def open(self, *, create: bool = True) -> None:
        """Check (and if needed create or upgrade) the layout; L{StorageError} if unusable."""
        marker = os.path.join(self.root, "spool.json")
        try:
            if create:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            found = self._format(marker, create)
            if found == SPOOL_FORMAT_V1:
                self._upgrade()
                found = SPOOL_FORMAT
            if create:
                for name in (TMP, *DIRECTORIES, journal.JOURNAL, STATE):
                    os.makedirs(os.path.join(self.root, name), mode=0o700, exist_ok=True)
        except (OSError, ValueError) as e:
            raise storage_error(f"cannot open spool {self.root}", e) from e
        if found != SPOOL_FORMAT:
            raise StorageError(
                f"spool {self.root} has format {found!r}; this version reads {SPOOL_FORMAT}"
            )

    def _upgrade(self) -> None:
        """Upgrade an C{mta-spool/1} spool, holding its lock meanwhile: a
        daemon of the old version that works on it must not lose it."""
        lock = self.lock()
        try:
            lock.acquire()
        except StorageError as e:
            raise StorageError(
                f"{e}, and it is in the old format {SPOOL_FORMAT_V1}: stop the daemon first "
                f"(this version upgrades the spool when it opens it)"
            ) from None
        try:
            upgrade.from_v1(self)
        finally:
            lock.release()

    def _format(self, marker: str, create: bool) -> object:
        if not os.path.exists(marker):
            if not create:
                raise StorageError(f"{self.root} is not an mta spool (no spool.json)")
            self.write_marker(SPOOL_FORMAT)
        with open(marker, "rb") as f:
            doc = json.load(f)
        return doc.get("format") if isinstance(doc, dict) else doc

    def write_marker(self, version: str) -> None:
        marker = os.path.join(self.root, "spool.json")
        tmp = marker + ".tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps({"format": version}).encode() + b"\n")
            f.flush()
            self.ops.fsync(f.fileno())
        self.ops.rename(tmp, marker)
        self.ops.fsync_dir(self.root)

    def state_dir(self, name: str) -> str:
        """A directory in the spool for a part's own files (C{state/NAME}), made if missing."""
        path = os.path.join(self.root, STATE, name) if name else os.path.join(self.root, STATE)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def control_socket(self) -> str:
        """The daemon's control socket: C{SPOOL/control.sock}."""
        return os.path.join(self.root, "control.sock")

    def lock(self) -> SpoolLock:
        return SpoolLock(self.root)

    def clean_tmp(self) -> int:
        """Remove messages whose reception never completed, and spare files
        of an earlier run; returns how many."""
        removed = 0
        mine = self.spares.prefix if self.spares is not None else None
        for name in os.listdir(self.path(TMP)):
            if mine is not None and name.startswith(mine):
                continue
            with contextlib.suppress(FileNotFoundError):
                self.ops.unlink(self.path(TMP, name))
                removed += 1
        return removed

    def writable(self) -> bool:
        return os.access(self.path(TMP), os.W_OK | os.X_OK)

    # -- reading -----------------------------------------------------------

    def _read(self, state: QueueState, queue_id: str) -> tuple[Envelope, Placement]:
        fd = os.open(self.path(state, queue_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            env, place = read_records(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        place.state = state
        return env, place

    def ids(self, state: QueueState) -> Iterator[str]:
        if state == QueueState.ACTIVE:
            yield from list(self._active)
            return
        with os.scandir(self.path(state)) as it:
            for entry in it:
                if is_queue_id(entry.name) and entry.name not in self._active:
                    yield entry.name

    def count(self, state: QueueState) -> int:
        try:
            return sum(1 for _ in self.ids(state))
        except OSError:
            return 0

    def locate(self, queue_id: str) -> QueueState:
        if queue_id in self._active:
            return QueueState.ACTIVE
        return self._on_disk(queue_id)

    def _on_disk(self, queue_id: str) -> QueueState:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        for state in DIRECTORIES:
            if os.path.isfile(self.path(state, queue_id)):
                return state
        raise KeyError(queue_id)

    def _where(self, queue_id: str, state: QueueState | None) -> QueueState:
        """The directory of a message said to be in C{state} (or wherever it is)."""
        if state is None:
            state = self.locate(queue_id)
        if state == QueueState.ACTIVE:
            place = self._active.get(queue_id)
            if place is None:
                raise KeyError(queue_id)
            return place.state
        return QueueState(state)

    def load(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        state = QueueState(state) if state is not None else self.locate(queue_id)
        try:
            env, _ = self._read(self._where(queue_id, state), queue_id)
        except FileNotFoundError as e:
            raise KeyError(queue_id) from e
        return state, env

    def journaled(self, queue_id: str) -> list[ProgressRecord]:
        return journal.read(journal.directory(self.root)).get(queue_id, [])

    def view(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        state, envelope = self.load(queue_id, state)
        if state.waiting:
            journal.apply(envelope, self.journaled(queue_id))
        return state, envelope

    def listing(self, states: Sequence[QueueState]) -> Iterator[tuple[str, QueueState, Any]]:
        progress = journal.read(journal.directory(self.root))
        for state in QueueState:
            if state not in states:
                continue
            for queue_id in sorted(self.ids(state)):
                try:
                    _, envelope = self.load(queue_id, state)
                except KeyError:
                    continue  # moved or removed while we looked
                except FormatError as e:
                    yield queue_id, state, e
                    continue
                if state.waiting and queue_id in progress:
                    journal.apply(envelope, progress[queue_id])
                yield queue_id, state, envelope

    def location(self, queue_id: str, state: QueueState) -> str:
        try:
            return self.path(self._where(queue_id, state), queue_id)
        except KeyError:
            return self.path(QueueState(state), queue_id) if state != QueueState.ACTIVE else ""

    def open_message(self, queue_id: str, state: QueueState | None = None) -> IO[bytes]:
        for _ in range(3):  # it may move between locate and open
            try:
                where = self._where(queue_id, state)
                place = self._active.get(queue_id)
                if place is not None and place.state == where:
                    size = place.size
                else:
                    _, found = self._read(where, queue_id)
                    size = found.size
                return _message_reader(self.path(where, queue_id), size)
            except (KeyError, FileNotFoundError):
                state = None
                continue
            except FormatError as e:
                raise StorageError(f"cannot read {queue_id}: {e}") from e
            except OSError as e:
                raise storage_error(f"cannot read {queue_id}", e) from e
        raise StorageError(f"{queue_id} is no longer in the spool")

    def scan(self) -> QueueScan:
        ready = sorted(q for q in self.ids(QueueState.INCOMING))
        return QueueScan(ready, self._times(QueueState.DEFERRED))

    def _times(self, state: QueueState) -> list[tuple[float, str]]:
        """(time kept beside it, queue ID) of every message in a state, from stat only."""
        out = []
        with os.scandir(self.path(state)) as it:
            for entry in it:
                if is_queue_id(entry.name) and entry.name not in self._active:
                    try:
                        out.append((entry.stat().st_mtime, entry.name))
                    except FileNotFoundError:
                        continue
        return out

    def finished_before(self, state: QueueState, when: float) -> list[str]:
        return [queue_id for due, queue_id in self._times(state) if due <= when]

    # -- receiving ---------------------------------------------------------

    def commit_group(self, items: list[_Commit]) -> list[StorageError | None]:
        """Commit received messages, and say for each whether it failed.

        Each is written into a file in C{tmp/} (a spare made ahead when one
        is ready); the files are made durable, with one syncfs(2) for the
        group or, with the C{fsync} barrier, an fsync of each file (in
        worker threads, concurrently); each is renamed into C{incoming/}
        under its queue ID; then one fsync of C{incoming/} for the group.
        A failed message leaves nothing in C{incoming/}.
        """
        results: list[StorageError | None] = [None] * len(items)
        per_file = self.barrier == "fsync"
        if per_file:
            written = self._each(lambda item: self._write_one(item, sync=True), items)
        else:  # into the page cache: no wait worth a thread
            written = [self._write_one(item, sync=False) for item in items]
        paths: list[str | None] = []
        for i, outcome in enumerate(written):
            if isinstance(outcome, StorageError):
                results[i] = outcome
                paths.append(None)
            else:
                paths.append(outcome)
        if not per_file and any(paths):
            try:
                self.ops.syncfs(self.path(TMP))
            except OSError as e:
                for i, item in enumerate(items):
                    if paths[i] is not None:
                        results[i] = storage_error(f"cannot commit {item.queue_id}", e)
        moved = self._move_in(items, paths, results)
        self._sync_incoming(items, moved, results)
        for item, error in zip(items, results, strict=True):
            if error is None and item.placement is not None:
                self._remember(item.queue_id, item.placement)
        return results

    def _write_one(self, item: _Commit, *, sync: bool) -> str | StorageError:
        """Write the rest of a message into its file in C{tmp/} and close it
        (fsync'd first when C{sync}); its path, or the error (nothing left)."""
        fd = item.fd
        if fd is not None:
            path = self.path(TMP, item.queue_id)
        elif self.spares is not None and (spare := self.spares.take()) is not None:
            path, fd = spare
        else:
            path = self.path(TMP, item.queue_id)
        try:
            if fd is None:
                fd = self.ops.create(path)
            self.ops.write(fd, item.data)
            if sync:
                self.ops.fsync(fd)
            self.ops.close(fd)
            return path
        except Exception as e:
            if fd is not None:
                with contextlib.suppress(OSError):
                    self.ops.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return storage_error(f"cannot commit {item.queue_id}", e)

    def _move_in(
        self, items: list[_Commit], paths: list[str | None], results: list[StorageError | None]
    ) -> list[int]:
        """Rename the durable files into C{incoming/}; the indexes moved."""
        moved = []
        for i, (item, path) in enumerate(zip(items, paths, strict=True)):
            if path is None:
                continue
            if results[i] is None:
                try:
                    self.ops.rename(path, self.path(QueueState.INCOMING, item.queue_id))
                    moved.append(i)
                    continue
                except Exception as e:
                    results[i] = storage_error(f"cannot commit {item.queue_id}", e)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return moved

    def _sync_incoming(
        self, items: list[_Commit], moved: list[int], results: list[StorageError | None]
    ) -> None:
        if not moved:
            return
        try:
            self.ops.fsync_dir(self.path(QueueState.INCOMING))
        except Exception as e:
            # The entries may not survive a crash, so the client must not
            # get 250; take them out again rather than risk a duplicate.
            for i in moved:
                queue_id = items[i].queue_id
                results[i] = storage_error(f"cannot commit {queue_id}", e)
                with contextlib.suppress(OSError):
                    os.unlink(self.path(QueueState.INCOMING, queue_id))

    def _remember(self, queue_id: str, place: Placement) -> None:
        self._committed[queue_id] = place
        while len(self._committed) > COMMITTED_CACHE:
            self._committed.popitem(last=False)

    def add(self, envelope: Envelope, data: bytes) -> None:
        """Commit one whole message at once (C{mta-sendmail}, reports, tests)."""
        item = _Commit.of(envelope, data)
        [error] = self.commit_group([item])
        if error is not None:
            raise error

    # -- changing ----------------------------------------------------------

    def claim(self, queue_id: str) -> bool:
        committed = self._committed.pop(queue_id, None)
        if committed is None:
            return False
        self._active[queue_id] = committed
        return True

    def activate(self, queue_id: str) -> Envelope | None:
        if queue_id in self._active:
            return None
        try:
            state = self._on_disk(queue_id)
        except KeyError:
            return None  # delivered or deleted meanwhile
        if not state.waiting:
            return None  # e.g. put on hold, or finished, meanwhile
        try:
            env, place = self._read(state, queue_id)
        except FileNotFoundError:
            return None
        except FormatError:
            self.move(queue_id, state, QueueState.CORRUPT)
            raise
        self._committed.pop(queue_id, None)
        self._active[queue_id] = place
        return env

    def _record_for(self, env: Envelope, place: Placement) -> tuple[bytes, Placement]:
        """The record that brings the file up to C{env} (b"" if nothing changed),
        and what the placement is once it is written."""
        texts = [envformat.recipient_text(r) for r in env.recipients]
        old = place.recipients
        changed = {i: t for i, t in enumerate(texts) if i >= len(old) or t != old[i]}
        after = replace(place, recipients=texts)
        if not changed:
            return b"", after
        update = envformat.update_record(env.queue_id, place.size, changed)
        if len(changed) == len(texts) or place.since + len(update) > place.full_len:
            env.size = place.size
            record = envformat.full_record(env, texts)
            after.full_len, after.since = len(record), 0
            return record, after
        after.since += len(update)
        return update, after

    def _append(self, path: str, record: bytes, *, sync: bool) -> None:
        """Append a record.  One that fails half-way (a disk full after a
        short write) is cut off again, so that the next record, when the
        filing is tried again, starts on a line of its own."""
        fd = self.ops.append(path)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                self.ops.write(fd, record)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
            if sync:
                self.ops.fsync(fd)
        finally:
            self.ops.close(fd)

    def _file_one(
        self, env: Envelope, place: Placement, dst: QueueState, when: float | None, sync: bool
    ) -> None:
        queue_id = env.queue_id
        record, after = self._record_for(env, place)
        src = self.path(place.state, queue_id)
        if record:
            self._append(src, record, sync=sync)
        place.recipients, place.full_len, place.since = (
            after.recipients,
            after.full_len,
            after.since,
        )
        target = self.path(dst, queue_id)
        if dst != place.state:
            self.ops.rename(src, target)
            place.state = dst
        if when is not None:
            os.utime(target, (when, when))

    def file(
        self, items: Sequence[tuple[Envelope, QueueState, float | None]]
    ) -> list[StorageError | None]:
        strict = self.sync == "strict"
        results: list[StorageError | None] = []
        dirs: set[QueueState] = set()
        for env, dst, when in items:
            place = self._active.get(env.queue_id)
            if place is None:
                results.append(StorageError(f"{env.queue_id} is not being delivered"))
                continue
            dirs |= {place.state, QueueState(dst)}
            try:
                self._file_one(env, place, QueueState(dst), when, strict)
            except OSError as e:
                results.append(storage_error(f"cannot file {env.queue_id}", e))
                continue
            del self._active[env.queue_id]
            results.append(None)
        if strict:
            self._sync_dirs(dirs, items, results)
        return results

    def _sync_dirs(
        self, dirs: set[QueueState], items: Sequence[tuple[Envelope, Any, Any]], results: list[Any]
    ) -> None:
        for state in sorted(dirs):
            try:
                self.ops.fsync_dir(self.path(state))
            except OSError as e:
                for i, (env, *_) in enumerate(items):
                    if results[i] is None:
                        results[i] = storage_error(f"cannot record {env.queue_id}", e)

    def settle(
        self, envelope: Envelope, src: QueueState, dst: QueueState, due: float | None = None
    ) -> None:
        """Record an envelope and move its message, durably (operator actions)."""
        queue_id = envelope.queue_id
        try:
            if src == QueueState.ACTIVE:
                raise StorageError(f"{queue_id} is being delivered")
            _, place = self._read(QueueState(src), queue_id)
            self._file_one(envelope, place, QueueState(dst), due, True)
            for state in sorted({QueueState(src), QueueState(dst)}):
                self.ops.fsync_dir(self.path(state))
        except FileNotFoundError as e:
            raise KeyError(queue_id) from e
        except OSError as e:
            raise storage_error(f"cannot record {queue_id}", e) from e

    def move(self, queue_id: str, src: QueueState, dst: QueueState) -> None:
        """Move a message to another state without changing its envelope."""
        try:
            where = self._where(queue_id, src)
            self.ops.rename(self.path(where, queue_id), self.path(dst, queue_id))
            self._active.pop(queue_id, None)
            self.ops.fsync_dir(self.path(dst))
            self.ops.fsync_dir(self.path(where))
        except OSError as e:
            raise storage_error(f"cannot move {queue_id} from {src} to {dst}", e) from e

    def remove(self, queue_id: str, state: QueueState) -> None:
        """Take a message out of the spool."""
        where = self._where(queue_id, state)
        try:
            self.ops.unlink(self.path(where, queue_id))
            self._active.pop(queue_id, None)
            self.ops.fsync_dir(self.path(where))
        except FileNotFoundError as e:
            raise KeyError(queue_id) from e
        except OSError as e:
            raise storage_error(f"cannot remove {queue_id}", e) from e

    def redact(self, queue_id: str, transform: Callable[[bytes], bytes], when: float) -> bool:
        """Write the transformed message and its envelope into C{redacted/} (a new
        file, fsync'd), then remove the one in C{done/}."""
        try:
            envelope, place = self._read(QueueState.DONE, queue_id)
        except FileNotFoundError:
            return False
        done = self.path(QueueState.DONE, queue_id)
        tmp = self.path(TMP, f"{queue_id}.redacted")
        target = self.path(QueueState.REDACTED, queue_id)
        try:
            with open(done, "rb") as f:
                data = transform(f.read(place.size))
            envelope.redacted = when
            envelope.size = len(data)
            fd = self.ops.create(tmp)
            try:
                self.ops.write(fd, data + _separator(data) + envformat.full_record(envelope))
                self.ops.fsync(fd)
            finally:
                self.ops.close(fd)
            os.utime(tmp, (when, when))
            self.ops.rename(tmp, target)
            self.ops.unlink(done)
            self.ops.fsync_dir(self.path(QueueState.REDACTED))
            self.ops.fsync_dir(self.path(QueueState.DONE))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(f"cannot redact {queue_id}", e) from e
        return True

    # -- start-up ------------------------------------------------------------

    def recover(self, *, incomplete: bool = True) -> journal.Recovery:
        """Apply the progress journal to the messages it names, then remove it."""
        path = journal.directory(self.root)
        files = journal.segments(path)
        result = journal.Recovery(segments=len(files))
        for queue_id, records in journal.read(path).items():
            try:
                self._recover_one(queue_id, records, result)
            except FormatError as e:
                log.error("{qid}: journal not applied, unreadable envelope: {e}", qid=queue_id,
                          e=e)  # fmt: skip
            except OSError as e:
                log.error("{qid}: journal not applied: {e}", qid=queue_id, e=e)
                result.kept = True
        if not result.kept:
            for segment in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment)
        if incomplete:
            result.incomplete = self.clean_tmp()
        return result

    def _recover_one(
        self, queue_id: str, records: list[ProgressRecord], result: journal.Recovery
    ) -> None:
        try:
            state = self._on_disk(queue_id)
        except KeyError:
            return  # removed since
        if not state.waiting and state != QueueState.HOLD:
            return  # finished: its file has its results
        envelope, place = self._read(state, queue_id)
        changed = journal.apply(envelope, records)
        if changed:
            record, _ = self._record_for(envelope, place)
            if record:
                self._append(self.path(state, queue_id), record, sync=True)
            result.recipients += changed
            result.messages += 1

    # -- the progress journal (reactor thread) ------------------------------------

    def journal(self, records: list[ProgressRecord]) -> object | None:
        if self._writer is None:
            self._writer = journal.ProgressJournal(
                journal.directory(self.root),
                runner=self._journal_runner,
                schedule=self._schedule,
                call_later=self._call_later,
                sync_interval=self._journal_sync,
            )
        return self._writer.record(records)

    def release(self, token: object | None) -> None:
        if self._writer is not None:
            self._writer.release(token)

    def close(self) -> None:
        """At shutdown: write and close the progress journal."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self.spares is not None:
            self.spares.close()


def _separator(data: bytes) -> bytes:
    """A line end before the first record when the message has none at its end."""
    return b"" if not data or data.endswith(b"\n") else b"\n"


@dataclass
class _Commit:
    """One message of a group commit: its bytes not yet written, ending in its record."""

    queue_id: str
    data: bytes
    fd: int | None = None  # tmp/ID already open (a large message written as it came)
    placement: Placement | None = None

    @classmethod
    def of(
        cls, envelope: Envelope, rest: bytes, fd: int | None = None, last: bytes | None = None
    ) -> _Commit:
        """The rest of a message's file: C{rest}, the bytes of the message not
        written yet (the whole message unless it is partly in C{fd}, whose
        last byte is C{last}), then its first record."""
        texts = [envformat.recipient_text(r) for r in envelope.recipients]
        record = envformat.full_record(envelope, texts)
        end = rest[-1:] or (last or b"")
        separator = b"" if not end or end == b"\n" else b"\n"
        place = Placement(QueueState.INCOMING, envelope.size, len(record), 0, texts)
        return cls(envelope.queue_id, rest + separator + record, fd, place)


class SpoolLock:
    """An exclusive lock so that only one daemon works on a spool."""

    def __init__(self, root: str) -> None:
        self._path = os.path.join(root, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(
                f"spool {os.path.dirname(self._path)} is in use by another mta process"
                f"{self.holder()}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> str:
        """The holder's PID as the lock file has it, as " (PID n)"; "" if it does not say."""
        try:
            with open(self._path) as f:
                return f" (PID {int(f.read().split()[0])})"
        except (OSError, ValueError, IndexError):
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Concat(io.RawIOBase):
    """Several byte sources read one after the other (a message half on disk)."""

    def __init__(self, parts: list[IO[bytes]]) -> None:
        self._parts = parts

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._parts:
            n = self._parts[0].readinto(b)  # type: ignore[attr-defined]
            if n:
                return int(n)
            self._parts.pop(0).close()
        return 0

    def close(self) -> None:
        for part in self._parts:
            part.close()
        self._parts = []
        super().close()


@implementer(ISpoolTransaction)
class _Transaction:
    """A message being received: in memory, and once it is large in C{tmp/ID}
    too, written there by the spool threads while more arrives.

    While more than L{HIGH_WATER} waits to be written, the client is paused
    (C{producer}, the session's transport, when it has set one).
    """

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.size = 0
        self.producer: Any = None
        self._buffer = bytearray()
        self._in_flight = b""  # being written to tmp/ID now
        self._written = 0  # bytes in tmp/ID
        self._last = b""  # the last byte of those
        self._fd: int | None = None
        self._spilling: Deferred[None] | None = None
        self._paused = False
        self._error: StorageError | None = None
        self._closed = False
        self._committed = False

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StorageError("transaction is closed")
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= SPILL:
            self._spill()

    def _spill(self) -> None:
        if self._spilling is not None:
            if len(self._buffer) >= HIGH_WATER and not self._paused and self.producer:
                self._paused = True
                self.producer.pauseProducing()
            return
        chunk, self._buffer = bytes(self._buffer), bytearray()
        self._in_flight = chunk
        self._last = chunk[-1:]
        store = self._spool.store
        tmp = store.path(TMP, self.queue_id)

        def write() -> None:
            if self._fd is None:
                self._fd = store.ops.create(tmp)
            store.ops.write(self._fd, chunk)

        def done(_: object) -> None:
            self._spilling = None
            self._written += len(chunk)
            self._in_flight = b""
            if self._paused and len(self._buffer) < HIGH_WATER:
                self._paused = False
                self.producer.resumeProducing()
            if self._closed and not self._committed:
                self._discard()
            elif not self._closed and len(self._buffer) >= SPILL:
                self._spill()

        def failed(failure: Failure) -> None:
            self._spilling = None
            error = failure.value or OSError("write failed")
            self._error = storage_error(f"cannot write {self.queue_id}", error)
            if self._paused:
                self._paused = False
                self.producer.resumeProducing()
            self._discard()

        self._spilling = self._spool.runner(write).addCallbacks(done, failed)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        if self._error is not None or self._closed:
            error = self._error or StorageError("transaction is closed")
            self.abort()
            return fail(error)
        envelope.queue_id = self.queue_id
        envelope.size = self.size
        self._closed = self._committed = True
        if self._spilling is not None:
            waiting = self._spilling
            return waiting.addCallback(lambda _: self._commit(envelope))
        return self._commit(envelope)

    def _commit(self, envelope: Envelope) -> Deferred[str]:
        if self._error is not None:
            return fail(self._error)
        rest = bytes(self._buffer)
        try:
            item = _Commit.of(envelope, rest, self._fd, self._last)
        except Exception as e:  # e.g. text that is not valid UTF-8
            self._committed = False
            self._discard()
            return fail(StorageError(f"cannot write the envelope of {self.queue_id}: {e}"))
        data = None if self._written else rest
        self._fd = None
        self._buffer = bytearray()
        return self._spool.commit(item, envelope, data)

    def open_written(self) -> IO[bytes]:
        if self._error is not None:
            raise self._error
        if self._committed and not self._buffer and self._spilling is None:
            return self._spool.store.open_message(self.queue_id)
        if self._closed and not self._committed:
            raise StorageError("transaction is closed")
        parts: list[IO[bytes]] = []
        if self._written:
            try:
                parts.append(_message_reader(self._spool.store.path(TMP, self.queue_id),
                                             self._written))  # fmt: skip
            except OSError as e:
                raise storage_error(f"cannot read back {self.queue_id}", e) from e
        parts += [io.BytesIO(self._in_flight), io.BytesIO(bytes(self._buffer))]
        return io.BufferedReader(_Concat(parts))

    def abort(self) -> None:
        if self._closed and self._committed:
            return
        if not self._closed:
            self._closed = True
            if self._spilling is None:
                self._discard()

    def _discard(self) -> None:
        """Forget what was received, closing and removing tmp/ID in the spool threads."""
        self._buffer = bytearray()
        fd, self._fd = self._fd, None
        if fd is None and not self._written:
            return
        store, tmp = self._spool.store, self._spool.store.path(TMP, self.queue_id)

        def remove() -> None:
            if fd is not None:
                with contextlib.suppress(OSError):
                    store.ops.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

        self._spool.runner(remove).addErrback(lambda f: None)


@implementer(ISpool)
class Spool:
    """The daemon's spool: messages received into memory, committed in groups."""

    def __init__(
        self,
        store: FileStore,
        runner: Runner[Any],
        new_id: Callable[[], str],
    ) -> None:
        self.store = store
        self.runner = runner
        self._new_id = new_id
        self._listeners: list[Callable[[Committed], None]] = []
        self._commits: Batcher[_Commit, str] = Batcher(runner, self._commit_group, MAX_GROUP)

    def begin(self) -> ISpoolTransaction:
        """A new transaction; no file is made until there is something to keep."""
        return _Transaction(self, self._new_id())

    def add_listener(self, listener: Callable[[Committed], None]) -> None:
        self._listeners.append(listener)

    def _commit_group(self, items: list[_Commit]) -> list[str | StorageError]:
        results = self.store.commit_group(items)
        return [
            item.queue_id if error is None else error
            for item, error in zip(items, results, strict=True)
        ]

    def _top_up(self) -> None:
        """Make spare files for the next commits, in a spool thread, unless
        enough are ready or that is being done."""
        spares = self.store.spares
        if spares is not None and spares.wanted():
            self.runner(spares.refill).addErrback(
                lambda f: log.failure("cannot make spare files", f)
            )

    def commit(self, item: _Commit, envelope: Envelope, data: bytes | None) -> Deferred[str]:
        """Commit a received message; concurrent commits share one group."""

        def committed(queue_id: str) -> str:
            self._top_up()
            notice = Committed(queue_id, envelope, data)
            for listener in self._listeners:
                try:
                    listener(notice)
                except Exception:
                    log.failure("spool listener failed for {id}", id=queue_id)
            return queue_id

        def failed(failure: Failure) -> Failure:
            if not failure.check(StorageError):
                # Not a per-message error: the runner itself broke.  Leave no
                # trace of the message, since the client will not get 250.
                log.failure("group commit failed", failure)
                store = self.store
                for path in (store.path(TMP, item.queue_id),
                             store.path(QueueState.INCOMING, item.queue_id)):  # fmt: skip
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                return Failure(storage_error("cannot commit", failure.value or Exception()))
            log.error("{error}", error=str(failure.value))
            return failure

        return self._commits.submit(item).addCallbacks(committed, failed)
