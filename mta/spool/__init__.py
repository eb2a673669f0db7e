"""The durable, maildir-style message spool.

The rest of the package reaches the spool only through these functions and
the interfaces they return (L{mta.interfaces.IQueueStore} for the queued
messages, L{mta.interfaces.ISpool} for receiving new ones): the layout on
disk is L{mta.spool.fs}'s alone (C{docs/spool-format.md}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mta.batch import Runner, run_now
from mta.spool.fs import FileOps, FileStore, Spool, SpoolLock


def open_store(
    root: str, *, create: bool = False, workers: int = 1, journal_runner: Runner[Any] = run_now
) -> FileStore:
    """The spool at C{root} (made if missing when C{create}); L{mta.errors.StorageError}
    if it is not a spool this version can read."""
    store = FileStore(root, workers=workers, journal_runner=journal_runner)
    store.open(create=create)
    return store


def receiver(store: FileStore, runner: Runner[Any], new_id: Callable[[], str]) -> Spool:
    """The way into C{store} for received messages: commits in groups in C{runner}."""
    return Spool(store, runner, new_id)


__all__ = ["FileOps", "FileStore", "Spool", "SpoolLock", "open_store", "receiver"]
