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
cannot be read goes to C{corrupt/} with the old envelope's text after the
message, for a person to repair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mta.envelope import ProgressRecord, QueueState
from mta.spool import format as envformat
from mta.spool import journal
from mta.spool.format import FormatError
from mta.spool.queueid import is_queue_id

if TYPE_CHECKING:
    from mta.spool.fs import FileStore

log = Logger(namespace="mta.spool")

V1_STATES = ("incoming", "active", "deferred", "hold", "corrupt", "done", "redacted")
_ASIDE = ".v1"


def from_v1(store: FileStore) -> int:
    """Upgrade the spool of C{store} from C{mta-spool/1}; returns the messages converted."""
    root = store.root
    for name in ("tmp", *V1_STATES):
        os.makedirs(os.path.join(root, name), mode=0o700, exist_ok=True)
    sent = journal.read_sent(journal.directory(root))
    converted = 0
    for state in V1_STATES:
        base = os.path.join(root, state)
        for name in sorted(os.listdir(base)):
            queue_id = name[1 : -len(_ASIDE)] if name.endswith(_ASIDE) else name
            if not is_queue_id(queue_id):
                continue
            if _convert(store, state, queue_id, sent.get(queue_id, [])):
                converted += 1
    _clean(root)
    store.write_marker("mta-spool/2")
    log.info("spool {root} upgraded to mta-spool/2 ({n} messages)", root=root, n=converted)
    return converted


def _convert(store: FileStore, state: str, queue_id: str, sent: list[ProgressRecord]) -> bool:
    """Convert one message (see the module docstring); False if there was nothing to do."""
    root = store.root
    old = os.path.join(root, state, queue_id)
    aside = os.path.join(root, state, f".{queue_id}{_ASIDE}")
    tmp = os.path.join(root, "tmp", f"{queue_id}.v2")
    target_state = "incoming" if state == "active" else state
    target = os.path.join(root, target_state, queue_id)
    if os.path.isdir(old):
        if os.path.isdir(aside):
            shutil.rmtree(aside)  # an earlier attempt's copy: start again
        _write(store, old, tmp, sent, state)
        os.rename(old, aside)
    elif not os.path.isdir(aside):
        return False  # already a file: converted before
    if not os.path.isfile(target):
        if not os.path.isfile(tmp):
            # Set aside, but the new file is gone: write it again from the old one.
            _write(store, aside, tmp, sent, state)
        store.ops.rename(tmp, target)
    shutil.rmtree(aside)
    return True


def _write(
    store: FileStore, directory: str, tmp: str, sent: list[ProgressRecord], state: str
) -> None:
    """The C{mta-spool/2} file of a v1 message directory, in C{tmp}, fsync'd."""
    with open(os.path.join(directory, "message"), "rb") as f:
        message = f.read()
    try:
        with open(os.path.join(directory, "envelope.json"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raw = b""
    try:
        envelope = envformat.loads(raw)
        if state == "active":
            journal.apply(envelope, sent, sent_only=True)
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


def _clean(root: str) -> None:
    """What mta-spool/2 has no use for: half-received v1 messages, the sent journal,
    the empty C{active/}."""
    tmp = os.path.join(root, "tmp")
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for segment in journal.segments(journal.directory(root), journal.SENT_SEGMENT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(root, QueueState.ACTIVE.value))
