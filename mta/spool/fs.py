"""The on-disk spool: one directory per message, moved between state directories.

Layout (C{docs/spool-format.md})::

    spool.json                 {"format": "mta-spool/1"}
    tmp/ID/                    a message being received; never delivered
    incoming/ID/message        committed, not yet taken by the queue manager
    incoming/ID/envelope.json
    active/ deferred/ hold/ corrupt/ done/    the other states, same shape
    journal/sent-N.log         deliveries not yet in their envelopes (mta.spool.journal)

A message is committed by the maildir recipe: write C{message} and
C{envelope.json} in C{tmp/ID/}, fsync both files and the directory, rename
the directory into C{incoming/} (atomic: the message appears whole or not
at all), fsync C{incoming/}.  Renaming a whole directory keeps the message
and its envelope together through every state change.

L{FileStore} is the queue on disk (L{mta.interfaces.IQueueStore}),
synchronous, shared with C{mtactl}.  L{Spool} is the daemon's way in
(L{mta.interfaces.ISpool}): it runs the blocking parts in a thread and
commits concurrent messages in groups, one fsync of C{incoming/} for the
whole group.  Nothing outside L{mta.spool} knows this layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.batch import Batcher, Runner, run_now
from mta.envelope import Envelope, QueueScan, QueueState, SentRecord
from mta.errors import StorageError
from mta.interfaces import IQueueStore, ISpool, ISpoolTransaction
from mta.spool import format as envformat
from mta.spool import journal
from mta.spool.format import FormatError, MissingEnvelopeError
from mta.spool.queueid import is_queue_id

T = TypeVar("T")
U = TypeVar("U")

SPOOL_FORMAT = "mta-spool/1"
STATES = tuple(QueueState)
INCOMING = QueueState.INCOMING
MESSAGE = "message"
ENVELOPE = "envelope.json"
TMP = "tmp"
JOURNAL = "journal"  # the sent journal (mta.spool.journal)
MAX_GROUP = 256

log = Logger(namespace="mta.spool")


def storage_error(action: str, e: BaseException) -> StorageError:
    """Wrap an OS error, marking out-of-space conditions."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    return StorageError(f"{action}: {e}", disk_full=full)


class FileOps:
    """The file system calls that make durability; injectable for fault tests."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o700)

    def open_new(self, path: str) -> IO[bytes]:
        return open(path, "xb", buffering=65536)

    def fsync(self, f: IO[bytes]) -> None:
        f.flush()
        os.fsync(f.fileno())

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


@implementer(IQueueStore)
class FileStore:
    """The queue on disk (L{IQueueStore}); every write is durable.

    Synchronous: the daemon calls it in its spool threads, C{mtactl} and
    C{mta-sendmail} directly.  The sent journal's writer (L{journal},
    L{release}) is used in the daemon's reactor thread.
    """

    def __init__(
        self,
        root: str,
        ops: FileOps | None = None,
        *,
        workers: int = 1,
        journal_runner: Runner[Any] = run_now,
    ) -> None:
        self.root = os.path.abspath(root)
        self.ops = ops or FileOps()
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._journal_runner = journal_runner
        self._writer: journal.SentJournal | None = None

    def _each(self, work: Callable[[T], U], items: Sequence[T]) -> list[U]:
        """C{work} on every item; with C{workers} > 1, several at once.

        A group's messages are independent until the shared directory
        fsync; doing their own fsyncs concurrently lets the file system
        put them in one journal commit instead of one commit after another.
        """
        if self._workers < 2 or len(items) < 2:
            return [work(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="spool-sync")
        return list(self._executor.map(work, items))

    # -- layout ------------------------------------------------------------

    def path(self, state: str, queue_id: str | None = None, name: str | None = None) -> str:
        if state not in STATES and state != TMP:
            raise ValueError(f"unknown spool state {state!r}")
        parts = [self.root, state]
        if queue_id is not None:
            parts.append(queue_id)
        if name is not None:
            parts.append(name)
        return os.path.join(*parts)

    def open(self, *, create: bool = True) -> None:
        """Check (and if needed create) the layout; raise L{StorageError} if unusable."""
        marker = os.path.join(self.root, "spool.json")
        try:
            if create:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
                for state in (TMP, *STATES):
                    os.makedirs(self.path(state), mode=0o700, exist_ok=True)
                os.makedirs(os.path.join(self.root, JOURNAL), mode=0o700, exist_ok=True)
            if not os.path.exists(marker):
                if not create:
                    raise StorageError(f"{self.root} is not an mta spool (no spool.json)")
                self._write_json_atomic(marker, {"format": SPOOL_FORMAT})
            with open(marker, "rb") as f:
                doc = json.load(f)
            found = doc.get("format") if isinstance(doc, dict) else doc
        except (OSError, ValueError) as e:
            raise storage_error(f"cannot open spool {self.root}", e) from e
        if found != SPOOL_FORMAT:
            raise StorageError(
                f"spool {self.root} has format {found!r}; this version reads {SPOOL_FORMAT}"
            )

    def state_dir(self, name: str) -> str:
        """A directory in the spool for a part's own files (C{state/NAME}), made if missing."""
        path = os.path.join(self.root, "state", name) if name else os.path.join(self.root, "state")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def control_socket(self) -> str:
        """The daemon's control socket: C{SPOOL/control.sock}."""
        return os.path.join(self.root, "control.sock")

    def lock(self) -> SpoolLock:
        return SpoolLock(self.root)

    def clean_tmp(self) -> int:
        """Remove messages whose reception never completed; returns how many."""
        removed = 0
        for name in os.listdir(self.path(TMP)):
            self.ops.rmtree(self.path(TMP, name))
            removed += 1
        return removed

    def recover(self, *, incomplete: bool = True) -> journal.Recovery:
        result = journal.recover(self)
        if incomplete:
            result.incomplete = self.clean_tmp()
        return result

    def writable(self) -> bool:
        return os.access(self.path(TMP), os.W_OK | os.X_OK)

    def _write_json_atomic(self, path: str, doc: Any) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(doc).encode() + b"\n")
            self.ops.fsync(f)
        self.ops.rename(tmp, path)
        self.ops.fsync_dir(os.path.dirname(path))

    # -- receiving ---------------------------------------------------------

    def create_tmp(self, queue_id: str) -> IO[bytes]:
        """Make C{tmp/ID/} and open its message file for writing."""
        self.ops.mkdir(self.path(TMP, queue_id))
        try:
            return self.ops.open_new(self.path(TMP, queue_id, MESSAGE))
        except BaseException:
            self.ops.rmtree(self.path(TMP, queue_id))
            raise

    def discard_tmp(self, queue_id: str) -> None:
        self.ops.rmtree(self.path(TMP, queue_id))

    def commit_group(self, items: list[tuple[str, IO[bytes], bytes]]) -> list[StorageError | None]:
        """Commit several received messages with one fsync of C{incoming/}.

        C{items} are C{(queue_id, open message file, envelope bytes)}.  Each
        result is C{None} (committed) or the error that kept that message
        out of the queue; a failed message leaves nothing in C{incoming/}.
        """

        def one(item: tuple[str, IO[bytes], bytes]) -> StorageError | None:
            queue_id, message, envelope = item
            try:
                try:
                    self.ops.fsync(message)
                finally:
                    message.close()
                with self.ops.open_new(self.path(TMP, queue_id, ENVELOPE)) as f:
                    f.write(envelope)
                    self.ops.fsync(f)
                self.ops.fsync_dir(self.path(TMP, queue_id))
                self.ops.rename(self.path(TMP, queue_id), self.path(INCOMING, queue_id))
                return None
            except Exception as e:
                self.ops.rmtree(self.path(TMP, queue_id))
                return storage_error(f"cannot commit {queue_id}", e)

        results = self._each(one, items)
        moved = [i for i, error in enumerate(results) if error is None]
        if moved:
            try:
                self.ops.fsync_dir(self.path(INCOMING))
            except Exception as e:
                # The entries may not survive a crash, so the client must not
                # get 250; take them out again rather than risk a duplicate.
                for i in moved:
                    queue_id = items[i][0]
                    results[i] = storage_error(f"cannot commit {queue_id}", e)
                    self.ops.rmtree(self.path(INCOMING, queue_id))
        return results

    def add(self, envelope: Envelope, data: bytes) -> None:
        """Commit one whole message at once (C{mta-sendmail}, tests).

        The same steps as a received message: C{tmp/}, fsync, rename into
        C{incoming/}, fsync.  Raises L{StorageError}; nothing is left behind then.
        """
        queue_id = envelope.queue_id
        try:
            message = self.create_tmp(queue_id)
        except OSError as e:
            raise storage_error(f"cannot start {queue_id}", e) from e
        try:
            message.write(data)
            envelope_bytes = envformat.dumps(envelope)
        except Exception as e:
            message.close()
            self.discard_tmp(queue_id)
            raise storage_error(f"cannot write {queue_id}", e) from e
        [error] = self.commit_group([(queue_id, message, envelope_bytes)])
        if error is not None:
            raise error

    # -- reading -----------------------------------------------------------

    def ids(self, state: QueueState) -> Iterator[str]:
        with os.scandir(self.path(state)) as it:
            for entry in it:
                if is_queue_id(entry.name):
                    yield entry.name

    def count(self, state: QueueState) -> int:
        try:
            with os.scandir(self.path(state)) as it:
                return sum(1 for _ in it)
        except OSError:
            return 0

    def locate(self, queue_id: str) -> QueueState:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        for state in QueueState:
            if os.path.isdir(self.path(state, queue_id)):
                return state
        raise KeyError(queue_id)

    def load(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        state = QueueState(state) if state is not None else self.locate(queue_id)
        try:
            with open(self.path(state, queue_id, ENVELOPE), "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise KeyError(queue_id) from e
        return state, envformat.loads(data)

    def journaled(self, queue_id: str) -> list[SentRecord]:
        return journal.read(journal.directory(self.root)).get(queue_id, [])

    def view(self, queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        state, envelope = self.load(queue_id, state)
        if state == QueueState.ACTIVE:
            journal.apply(envelope, self.journaled(queue_id))
        return state, envelope

    def listing(self, states: Sequence[QueueState]) -> Iterator[tuple[str, QueueState, Any]]:
        sent = journal.read(journal.directory(self.root)) if QueueState.ACTIVE in states else {}
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
                if state == QueueState.ACTIVE and queue_id in sent:
                    journal.apply(envelope, sent[queue_id])
                yield queue_id, state, envelope

    def location(self, queue_id: str, state: QueueState) -> str:
        return self.path(state, queue_id, ENVELOPE)

    def open_message(self, queue_id: str, state: QueueState | None = None) -> IO[bytes]:
        for _ in range(3):  # it may move between locate and open
            try:
                found = QueueState(state) if state is not None else self.locate(queue_id)
            except KeyError:
                break
            try:
                return open(self.path(found, queue_id, MESSAGE), "rb")
            except FileNotFoundError:
                state = None
                continue
            except OSError as e:
                raise storage_error(f"cannot read {queue_id}", e) from e
        raise StorageError(f"{queue_id} is no longer in the spool")

    def scan(self) -> QueueScan:
        # Messages left in active/ by a crash go first: they were already due.
        ready = sorted(self.ids(QueueState.ACTIVE)) + sorted(self.ids(QueueState.INCOMING))
        return QueueScan(ready, self._due_times(QueueState.DEFERRED))

    def _due_times(self, state: QueueState) -> list[tuple[float, str]]:
        """(due time hint, queue ID) for every message in a state, from stat only."""
        out = []
        with os.scandir(self.path(state)) as it:
            for entry in it:
                if is_queue_id(entry.name):
                    try:
                        out.append((entry.stat().st_mtime, entry.name))
                    except FileNotFoundError:
                        continue
        return out

    def finished_before(self, state: QueueState, when: float) -> list[str]:
        return [queue_id for due, queue_id in self._due_times(state) if due <= when]

    # -- changing ----------------------------------------------------------

    def activate(self, queue_id: str) -> Envelope | None:
        try:
            found, envelope = self.load(queue_id)
        except KeyError:
            try:
                found = self.locate(queue_id)
            except KeyError:
                return None  # delivered or deleted meanwhile
            if found.waiting:
                self.move(queue_id, found, QueueState.CORRUPT)
                raise MissingEnvelopeError(f"{queue_id} has no envelope") from None
            return None
        except FormatError:
            self.move(queue_id, self.locate(queue_id), QueueState.CORRUPT)
            raise
        if not found.waiting:
            return None  # e.g. put on hold, or finished, meanwhile
        if found != QueueState.ACTIVE:
            # Not durable: after a crash, incoming/ and active/ are both delivered.
            self.move(queue_id, found, QueueState.ACTIVE, durable=False)
        return envelope

    def record(self, envelope: Envelope) -> None:
        self.write_envelope(QueueState.ACTIVE, envelope)

    def write_envelope(self, state: str, envelope: Envelope) -> None:
        """Replace a message's envelope atomically and durably."""
        target = self.path(state, envelope.queue_id, ENVELOPE)
        tmp = target + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(envformat.dumps(envelope))
                self.ops.fsync(f)
            self.ops.rename(tmp, target)
            self.ops.fsync_dir(self.path(state, envelope.queue_id))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(f"cannot update {envelope.queue_id}", e) from e

    def move(
        self, queue_id: str, src: QueueState, dst: QueueState, *, durable: bool = True
    ) -> None:
        """Move a message to another state directory.

        C{durable=False} skips the directory fsyncs, for moves whose loss
        in a crash is harmless (C{incoming} to C{active}: both are
        delivered at start-up).
        """
        try:
            self.ops.rename(self.path(src, queue_id), self.path(dst, queue_id))
            if durable:
                self.ops.fsync_dir(self.path(dst))
                self.ops.fsync_dir(self.path(src))
        except OSError as e:
            raise storage_error(f"cannot move {queue_id} from {src} to {dst}", e) from e

    def settle(
        self, envelope: Envelope, src: QueueState, dst: QueueState, due: float | None = None
    ) -> None:
        """Record an envelope and move its message to C{dst}: L{settle_group} of one."""
        [error] = self.settle_group([(envelope, src, dst, due)])
        if error is not None:
            raise error

    def file(
        self, items: Sequence[tuple[Envelope, QueueState, float | None]]
    ) -> list[StorageError | None]:
        return self.settle_group([(env, QueueState.ACTIVE, dst, due) for env, dst, due in items])

    def settle_group(
        self, items: Sequence[tuple[Envelope, QueueState, QueueState, float | None]]
    ) -> list[StorageError | None]:
        """Record envelopes and move their messages, one fsync per target directory.

        Each new envelope is written to a temporary file, fsync'd and
        renamed over the old one, and the message directory is fsync'd (so
        the new envelope is durable before the message changes state);
        then the message directory is renamed into C{dst}.  Both renames
        are atomic, so after a crash a message has its old or its new
        envelope, never a torn one, and never its old envelope in its new
        state.  One fsync of each source and target directory at the end
        makes the group's moves durable.  C{due} becomes the message
        directory's modification time, so that start-up can index the
        deferred queue (and retention the finished one) from C{stat}
        alone, without reading every envelope (Postfix does the same with
        its queue files); the envelope stays the truth, the time is a hint.
        """

        def one(item: tuple[Envelope, QueueState, QueueState, float | None]) -> StorageError | None:
            envelope, src, dst, due = item
            queue_id = envelope.queue_id
            try:
                self.write_envelope(src, envelope)
                if dst != src:
                    self.ops.rename(self.path(src, queue_id), self.path(dst, queue_id))
                if due is not None:
                    os.utime(self.path(dst, queue_id), (due, due))
                return None
            except StorageError as e:
                return e
            except OSError as e:
                return storage_error(f"cannot record {queue_id}", e)

        results = self._each(one, items)
        targets = {state for _, src, dst, _ in items for state in (src, dst)}
        for state in sorted(targets):
            try:
                self.ops.fsync_dir(self.path(state))
            except OSError as e:
                for i, (envelope, _, dst, _) in enumerate(items):
                    if dst == state and results[i] is None:
                        results[i] = storage_error(f"cannot record {envelope.queue_id}", e)
        return results

    def remove(self, queue_id: str, state: QueueState) -> None:
        """Take a message out of the queue: one rename, then delete at leisure."""
        graveyard = self.path(TMP, f"removed-{queue_id}")
        try:
            self.ops.rename(self.path(state, queue_id), graveyard)
            self.ops.fsync_dir(self.path(state))
        except OSError as e:
            raise storage_error(f"cannot remove {queue_id}", e) from e
        self.ops.rmtree(graveyard)

    def redact(self, queue_id: str, transform: Callable[[bytes], bytes], when: float) -> bool:
        try:
            _, envelope = self.load(queue_id, QueueState.DONE)
        except KeyError:
            return False
        message = self.path(QueueState.DONE, queue_id, MESSAGE)
        tmp = message + ".tmp"
        try:
            with open(message, "rb") as f:
                original = f.read()
            with open(tmp, "wb") as f:
                f.write(transform(original))
                self.ops.fsync(f)
            self.ops.rename(tmp, message)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(f"cannot redact {queue_id}", e) from e
        envelope.redacted = when
        self.settle(envelope, QueueState.DONE, QueueState.REDACTED, when)
        return True

    # -- the sent journal (reactor thread) ------------------------------------

    def journal(self, records: list[SentRecord]) -> object | None:
        if self._writer is None:
            self._writer = journal.SentJournal(
                journal.directory(self.root), runner=self._journal_runner
            )
        return self._writer.record(records)

    def release(self, token: object | None) -> None:
        if self._writer is not None:
            self._writer.release(token)

    def close(self) -> None:
        """At shutdown: close the sent journal (L{journal.SentJournal.close})."""
        if self._writer is not None:
            self._writer.close()


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
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@implementer(ISpoolTransaction)
class _Transaction:
    def __init__(self, spool: Spool, queue_id: str) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.size = 0
        self._file: IO[bytes] | None = spool.store.create_tmp(queue_id)
        self._error: StorageError | None = None
        self._committed = False

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._file is None:
            raise StorageError("transaction is closed")
        try:
            self._file.write(data)
        except OSError as e:
            self._error = storage_error(f"cannot write {self.queue_id}", e)
            raise self._error from e
        self.size += len(data)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        if self._error is not None or self._file is None:
            self.abort()
            return fail(self._error or StorageError("transaction is closed"))
        envelope.queue_id = self.queue_id
        try:
            data = envformat.dumps(envelope)
        except Exception as e:  # e.g. text that is not valid UTF-8
            self.abort()
            return fail(StorageError(f"cannot write the envelope of {self.queue_id}: {e}"))
        message, self._file = self._file, None
        self._committed = True
        return self._spool.commit(self.queue_id, message, data)

    def open_written(self) -> IO[bytes]:
        if self._error is not None:
            raise self._error
        if self._committed:
            return self._spool.store.open_message(self.queue_id)
        if self._file is None:
            raise StorageError("transaction is closed")
        try:
            self._file.flush()
            return open(self._spool.store.path(TMP, self.queue_id, MESSAGE), "rb")
        except OSError as e:
            raise storage_error(f"cannot read back {self.queue_id}", e) from e

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            self._spool.store.discard_tmp(self.queue_id)


@implementer(ISpool)
class Spool:
    """The daemon's spool: blocking work in a thread, commits in groups."""

    def __init__(
        self,
        store: FileStore,
        runner: Runner[Any],
        new_id: Callable[[], str],
    ) -> None:
        self.store = store
        self._new_id = new_id
        self._listeners: list[Callable[[str, str], None]] = []
        self._commits: Batcher[tuple[str, IO[bytes], bytes], str] = Batcher(
            runner, self._commit_group, MAX_GROUP
        )

    def begin(self) -> ISpoolTransaction:
        for _ in range(5):
            queue_id = self._new_id()
            try:
                return _Transaction(self, queue_id)
            except FileExistsError:
                continue
            except OSError as e:
                raise storage_error("cannot start a message", e) from e
        raise StorageError("cannot allocate a unique queue ID")

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)

    def _commit_group(self, items: list[tuple[str, IO[bytes], bytes]]) -> list[str | StorageError]:
        results = self.store.commit_group(items)
        return [
            item[0] if error is None else error for item, error in zip(items, results, strict=True)
        ]

    def commit(self, queue_id: str, message: IO[bytes], envelope: bytes) -> Deferred[str]:
        """Commit a received message; concurrent commits share one group."""

        def committed(queue_id: str) -> str:
            for listener in self._listeners:
                try:
                    listener(queue_id, "incoming")
                except Exception:
                    log.failure("spool listener failed for {id}", id=queue_id)
            return queue_id

        def failed(failure: Failure) -> Failure:
            if not failure.check(StorageError):
                # Not a per-message error: the runner itself broke.  Leave no
                # trace of the message, since the client will not get 250.
                log.failure("group commit failed", failure)
                with contextlib.suppress(OSError):
                    message.close()
                self.store.discard_tmp(queue_id)
                self.store.ops.rmtree(self.store.path(INCOMING, queue_id))
                return Failure(storage_error("cannot commit", failure.value or Exception()))
            log.error("{error}", error=str(failure.value))
            return failure

        d = self._commits.submit((queue_id, message, envelope))
        return d.addCallbacks(committed, failed)
