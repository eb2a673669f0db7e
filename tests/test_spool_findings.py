"""Faults found in the spool code while documenting mta-spool/2 (issue 14, item 6).

Each test states what the code should do and fails on the code as it is:
they are marked C{xfail(strict=True)}, so the suite stays green and a fix
shows up as an unexpected pass (then remove the mark).  Where the fix
belongs (C{mta/spool/fs.py}, C{journal.py}, C{mta/service.py}) is the
throughput work's; see each docstring.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import replace

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from mta.config import parse
from mta.envelope import ProgressRecord, QueueState, RecipientState
from mta.errors import StorageError
from mta.service import MTAService
from mta.spool import upgrade
from mta.spool.fs import FileStore, SpoolLock
from mta.testing import NoSyncOps, queue_message, write_users
from tests.test_spool_upgrade import old_spool

T0 = 1_700_000_000.0


class ShortWriteOps(NoSyncOps):
    """The disk fills in the middle of the next write: half of it is written
    (write(2) returns a short count), then ENOSPC."""

    armed = False

    def write(self, fd: int, data: bytes) -> None:
        if self.armed:
            self.armed = False
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(fd, data)


class TornRecordTests(SynchronousTestCase):
    """A record appended after a torn one."""

    @pytest.mark.xfail(strict=True, reason="fs.py: a record is appended after a torn one")
    def test_a_filing_tried_again_after_a_full_disk_is_read(self) -> None:
        """A filing that failed half-way (ENOSPC after a short write) is tried
        again by the queue manager a minute later.  The second record is
        appended right after the torn bytes of the first, on the same line,
        so it does not parse either: the file goes on saying the state of its
        last good record (here: both recipients pending), and the recipient
        that was delivered is delivered again at the next attempt.

        Fix (in C{FileStore._append}): start the record on a new line when the
        file does not end in one, or truncate the file back on a failed write.
        """
        ops = ShortWriteOps()
        store = FileStore(os.path.abspath(self.mktemp()), ops)
        store.open()
        qid = queue_message(store, "alice@example.com", ["bob@example.net", "carol@example.org"])
        env = store.activate(qid)
        assert env is not None
        bob, carol = env.recipients
        bob.state, bob.attempts, bob.reply = RecipientState.SENT, 1, "250 2.0.0 Ok"
        carol.state, carol.attempts, carol.next_attempt = RecipientState.DEFERRED, 1, T0 + 300
        ops.armed = True
        [error] = store.file([(env, QueueState.DEFERRED, T0 + 300)])
        self.assertIsInstance(error, StorageError)
        self.assertEqual(store.file([(env, QueueState.DEFERRED, T0 + 300)]), [None])
        state, again = FileStore(store.root).load(qid)
        self.assertEqual(state, QueueState.DEFERRED)
        self.assertEqual(
            [r.state for r in again.recipients], [RecipientState.SENT, RecipientState.DEFERRED]
        )


class ReplayTests(SynchronousTestCase):
    """The journal of a running daemon keeps the lines of messages it has
    filed until the segment is superseded (1 MB) and all of them are filed;
    a SIGKILL in that time replays them at the next start."""

    def setUp(self) -> None:
        self.store = FileStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.qid = queue_message(self.store, "alice@example.com", ["bob@example.net"])
        env = self.store.activate(self.qid)
        assert env is not None
        self.env = env
        rcpt = env.recipients[0]
        rcpt.state, rcpt.attempts, rcpt.last_attempt = RecipientState.DEFERRED, 3, T0 + 14_500
        rcpt.next_attempt, rcpt.reply = T0 + 16_000, "451 4.7.1 Greylisted"
        self.store.journal([ProgressRecord(self.qid, 0, replace(rcpt))])

    @pytest.mark.xfail(strict=True, reason="journal.apply: an equal record undoes later changes")
    def test_a_replayed_line_does_not_undo_the_delay_notice(self) -> None:
        """The round's result is journaled before its notices are sent; the
        delay notice then marks the recipient C{delay_notified} and the
        message is filed.  After a SIGKILL, recovery applies the journal line
        again (same attempts, not final: C{journal.apply} takes it) and the
        flag is lost, so the sender gets a second delay notice.  The journal
        module says that applying a line "after the message was filed changes
        nothing"; an operator's change after the filing (flush, release,
        requeue: a new next attempt) is undone the same way.

        Fix (in C{journal.apply} or C{FileStore.recover}): a line counts only
        when it is newer than the file's state (more attempts, or the same
        attempts and a later C{last_attempt} than the file has), or recover
        only the messages that were active (not filed since the line).
        """
        self.env.recipients[0].delay_notified = True
        self.assertEqual(self.store.file([(self.env, QueueState.DEFERRED, T0 + 16_000)]), [None])
        FileStore(self.store.root).recover()  # the next start after a SIGKILL
        _, env = FileStore(self.store.root).load(self.qid)
        self.assertTrue(env.recipients[0].delay_notified)

    @pytest.mark.xfail(strict=True, reason="journal.apply counts lines that change nothing")
    def test_lines_already_in_the_files_are_not_counted(self) -> None:
        """The daemon logs "recorded N deliveries of M messages from the sent
        journal" from L{journal.Recovery}; after a SIGKILL with everything
        filed it says so for lines that changed nothing (and calls deferrals
        deliveries, and the journal "sent": its v1 name, in mta/service.py)."""
        self.assertEqual(self.store.file([(self.env, QueueState.DEFERRED, T0 + 16_000)]), [None])
        found = FileStore(self.store.root).recover()
        self.assertEqual((found.recipients, found.messages), (0, 0))


class UpgradeLockTests(SynchronousTestCase):
    """The daemon and a spool another process holds."""

    @pytest.mark.xfail(strict=True, reason="service.py: the spool is opened before it is locked")
    def test_the_daemon_does_not_upgrade_a_spool_in_use(self) -> None:
        """Starting the daemon by mistake beside a running one of the old
        version: C{MTAService.__init__} opens the spool (which upgrades it)
        and only C{startService} takes the lock and refuses to run, so the
        old daemon goes on with a spool it cannot read.  Found by running the
        code of d9310d0 on the v1 fixture and starting this version beside it.

        Fix: take the lock before C{open_store} (C{mta/service.py}), or have
        C{FileStore.open} upgrade only under the lock.  (C{mtactl} checks the
        lock before it lets the spool be upgraded.)
        """
        root = old_spool(self)
        base = os.path.dirname(root)
        write_users(os.path.join(base, "users.json"), {})
        lock = SpoolLock(root)
        lock.acquire()  # the old daemon
        self.addCleanup(lock.release)
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "tls": {"selfsigned_dir": os.path.join(base, "selfsigned")},
            "listen": {"submissions": [], "submission": []},
            "routes": {"*": "[127.0.0.1]:9"},
        }
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        try:
            service = MTAService(parse(doc, "test.toml", base), reactor)
            try:
                service.startService()
            except SystemExit:
                pass
            else:
                self.addCleanup(service.stopService)
        except StorageError:
            pass
        self.assertEqual(upgrade.spool_format(root), "mta-spool/1")
