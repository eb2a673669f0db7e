"""Upgrading a spool written by an older version, in place.

C{mta-spool/1} kept each message as a directory (C{STATE/ID/message} and
C{STATE/ID/envelope.json}) and had an C{active/} directory and a sent
journal.  C{mta-spool/2} keeps one file per message (L{mta.spool.fs}).  The
upgrade runs when the daemon (or C{mtactl spool upgrade}) opens an old
spool, before anything else touches it:

  1. the sent journal's deliveries are recorded in the envelopes of the
     messages left in C{active/} (as the old daemon would have at its
     start), and those messages become C{incoming};
  2. each message is written as one file in C{tmp/} (fsync'd, with the old
     directory's modification time: the due time of a deferred message,
     the time a finished one was done), the old directory is renamed
     aside (C{STATE/.ID.v1}), the new file renamed into place, and the
     old directory removed;
  3. half-received messages and the old journal are removed, and
     C{spool.json} says C{mta-spool/2}.

Every step can be interrupted (a crash, a full disk) and the upgrade run
again: C{spool.json} changes last, and a message set aside but not yet
replaced is found by its C{.ID.v1} name.  A message whose old envelope
cannot be read (or is missing) goes to C{corrupt/} with the old envelope's
text after the message, for a person to repair.

L{upgrade_v1} says what it did (L{Upgraded}, for C{mtactl spool upgrade});
L{from_v1} is the same for the daemon, which only logs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mta.envelope import ProgressRecord, QueueState
from mta.errors import StorageError
from mta.spool import format as envformat
from mta.spool import journal
from mta.spool.format import FormatError
from mta.spool.queueid import is_queue_id

if TYPE_CHECKING:
    from mta.spool.fs import FileStore

log = Logger(namespace="mta.spool")

FORMAT_V1 = "mta-spool/1"  # what this module upgrades from
FORMAT = "mta-spool/2"  # and to: L{mta.spool.fs.SPOOL_FORMAT} (fs imports this module)
V1_STATES = ("incoming", "active", "deferred", "hold", "corrupt", "done", "redacted")
_ASIDE = ".v1"


@dataclass
class Upgraded:
    """What an upgrade from C{mta-spool/1} did."""

    #: Messages converted, by the state they were in (C{active} ones are now C{incoming}).
    converted: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0  # of those, put in corrupt/: their old envelope did not parse
    deliveries: int = 0  # recipients of active messages marked sent from the sent journal
    incomplete: int = 0  # half-received messages removed from tmp/

    @property
    def total(self) -> int:
        return sum(self.converted.values())


def spool_format(root: str) -> object:
    """The format C{ROOT/spool.json} names (a string, or whatever else it holds);
    L{StorageError} when there is no spool there or the file cannot be read."""
    marker = os.path.join(root, "spool.json")
    if not os.path.isdir(root):
        raise StorageError(f"there is no spool at {root}")
    try:
        with open(marker, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise StorageError(f"{root} is not an mta spool (no spool.json)") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {marker}: {e}") from e
    return doc.get("format") if isinstance(doc, dict) else doc


def from_v1(store: FileStore) -> int:
    """Upgrade the spool of C{store} from C{mta-spool/1}; returns the messages converted."""
    return upgrade_v1(store).total


def upgrade_v1(store: FileStore) -> Upgraded:
    """Upgrade the spool of C{store} from C{mta-spool/1} (see the module docstring).

    The caller makes sure nothing else works on the spool meanwhile (the
    spool lock).  Raises L{OSError} when a file cannot be read or written;
    what was done stays done, and running it again finishes the rest.
    """
    root = store.root
    for name in ("tmp", *V1_STATES):
        os.makedirs(os.path.join(root, name), mode=0o700, exist_ok=True)
    sent = journal.read_sent(journal.directory(root))
    report = Upgraded()
    for state in V1_STATES:
        base = os.path.join(root, state)
        for name in sorted(os.listdir(base)):
            queue_id = name[1 : -len(_ASIDE)] if name.endswith(_ASIDE) else name
            if not is_queue_id(queue_id):
                continue
            if _convert(store, state, queue_id, sent.get(queue_id, []), report):
                report.converted[state] += 1
    report.incomplete = _clean(root)
    store.write_marker(FORMAT)
    log.info("spool {root} upgraded to mta-spool/2 ({n} messages)", root=root, n=report.total)
    return report


def _convert(
    store: FileStore, state: str, queue_id: str, sent: list[ProgressRecord], report: Upgraded
) -> bool:
    """Convert one message (see the module docstring); False if there was nothing to do."""
    root = store.root
    old = os.path.join(root, state, queue_id)
    aside = os.path.join(root, state, f".{queue_id}{_ASIDE}")
    tmp = os.path.join(root, "tmp", f"{queue_id}.v2")
    if os.path.isdir(old):
        source = old
    elif os.path.isdir(aside):
        source = aside
    else:
        return False  # already a file: converted before
    readable = _readable(source)
    moved = {"active": "incoming"}  # the only state that mta-spool/2 has no directory for
    target_state = moved.get(state, state) if readable else "corrupt"
    target = os.path.join(root, target_state, queue_id)
    if source == old:
        if os.path.isdir(aside):
            shutil.rmtree(aside)  # an earlier attempt's copy: start again
        report.deliveries += _write(store, old, tmp, sent, state)
        os.rename(old, aside)
    if not os.path.isfile(target):
        if not os.path.isfile(tmp):
            # Set aside, but the new file is gone: write it again from the old one.
            report.deliveries += _write(store, aside, tmp, sent, state)
        store.ops.rename(tmp, target)
    shutil.rmtree(aside)
    if not readable:
        report.unreadable += 1
    return True


def _readable(directory: str) -> bool:
    """Whether a v1 message directory has its message and an envelope that parses."""
    try:
        with open(os.path.join(directory, "envelope.json"), "rb") as f:
            envformat.loads(f.read())
    except (FileNotFoundError, FormatError):
        return False
    return os.path.isfile(os.path.join(directory, "message"))


def _write(
    store: FileStore, directory: str, tmp: str, sent: list[ProgressRecord], state: str
) -> int:
    """The C{mta-spool/2} file of a v1 message directory, in C{tmp}, fsync'd;
    returns the deliveries taken from the sent journal."""
    try:
        with open(os.path.join(directory, "message"), "rb") as f:
            message = f.read()
    except FileNotFoundError:
        message = b""  # only the envelope is left: kept in corrupt/ for a person
    try:
        with open(os.path.join(directory, "envelope.json"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raw = b""
    applied = 0
    try:
        envelope = envformat.loads(raw)
        if state == "active":
            applied = journal.apply(envelope, sent, sent_only=True)
        envelope.size = len(message)
        tail = envformat.full_record(envelope)
    except FormatError:
        # Kept for a person to repair: the old text on its own line(s).
        tail = raw.rstrip(b"\n") + b"\n"
    separator = b"" if not message or message.endswith(b"\n") else b"\n"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = store.ops.create(tmp)
    try:
        store.ops.write(fd, message + separator + tail)
        store.ops.fsync(fd)
    finally:
        store.ops.close(fd)
    when = os.stat(directory).st_mtime
    os.utime(tmp, (when, when))
    return applied


def _clean(root: str) -> int:
    """What mta-spool/2 has no use for: half-received v1 messages, the sent journal,
    the empty C{active/}; returns the half-received messages removed."""
    tmp = os.path.join(root, "tmp")
    removed = 0
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for segment in journal.segments(journal.directory(root), journal.SENT_SEGMENT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(root, QueueState.ACTIVE.value))
    return removed
