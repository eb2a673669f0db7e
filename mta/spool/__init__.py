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
from mta.config import SpoolConfig
from mta.errors import StorageError
from mta.spool.fs import SYNCFS_AVAILABLE, FileOps, FileStore, Spool, SpoolLock


def open_store(
    root: str,
    *,
    create: bool = False,
    workers: int = 1,
    journal_runner: Runner[Any] = run_now,
    schedule: Callable[[Callable[[], None]], object] | None = None,
    call_later: Callable[[float, Callable[[], None]], object] | None = None,
    settings: SpoolConfig | None = None,
    spares: bool = False,
) -> FileStore:
    """The spool at C{root} (made if missing when C{create}, upgraded from an
    older format); L{mta.errors.StorageError} if this version cannot read it.

    C{journal_runner}, C{schedule} and C{call_later} are for the daemon:
    where the progress journal is written, how to run a function at the
    next turn of the reactor (lines are written once per turn) and after a
    delay (lines are synced within C{journal_sync_interval}), and C{spares} whether to
    keep files made ahead for commits (L{mta.spool.spares}).
    """
    settings = settings or SpoolConfig()
    if settings.barrier == "syncfs" and not SYNCFS_AVAILABLE:
        raise StorageError(
            '[spool] barrier = "syncfs": this system has no syncfs(2); use barrier = "fsync"'
        )
    store = FileStore(
        root,
        workers=workers,
        journal_runner=journal_runner,
        schedule=schedule,
        call_later=call_later,
        sync=settings.sync,
        journal_sync_interval=settings.journal_sync_interval,
        barrier=settings.barrier,
        spares=spares,
    )
    store.open(create=create)
    return store


def receiver(store: FileStore, runner: Runner[Any], new_id: Callable[[], str]) -> Spool:
    """The way into C{store} for received messages: commits in groups in C{runner}."""
    return Spool(store, runner, new_id)


__all__ = ["FileOps", "FileStore", "Spool", "SpoolLock", "open_store", "receiver"]
