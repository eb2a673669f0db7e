"""Upgrading a spool written by the mta-spool/1 code (tests/golden/spool-v1).

The fixture was written by the last code that wrote that format, with a
message in every state, a sent journal and a half-received message; the
upgrade must keep every message, its state, its envelope, its due time and
its bytes, and it must survive being interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from mta.config import parse
from mta.envelope import QueueState, RecipientState
from mta.errors import StorageError
from mta.service import MTAService
from mta.spool import FileStore, SpoolLock, fs, open_store, upgrade
from mta.spool.format import FormatError
from mta.testing import FailingOps, write_users

FIXTURE = os.path.join(os.path.dirname(__file__), "golden", "spool-v1")
T0 = 1_700_000_000.0


def old_spool(case: SynchronousTestCase) -> str:
    root = os.path.join(os.path.abspath(case.mktemp()), "spool")
    shutil.copytree(os.path.join(FIXTURE, "spool"), root)
    with open(os.path.join(FIXTURE, "mtimes.json")) as f:
        for name, when in json.load(f).items():
            os.utime(os.path.join(root, name), (when, when))
    return root


def v1_message(name: str) -> bytes:
    with open(os.path.join(FIXTURE, "spool", name, "message"), "rb") as f:
        return f.read()


class UpgradeTests(SynchronousTestCase):
    """Every message of the old spool is where it was, as it was."""

    def setUp(self) -> None:
        self.root = old_spool(self)

    def upgraded(self) -> FileStore:
        store = open_store(self.root, create=True)
        with open(os.path.join(self.root, "spool.json")) as f:
            self.assertEqual(json.load(f), {"format": "mta-spool/2"})
        return store

    def test_states_after_the_upgrade(self) -> None:
        store = self.upgraded()
        states = {s: sorted(store.ids(s)) for s in QueueState}
        self.assertEqual(
            states,
            {
                QueueState.INCOMING: ["0S3MA0000000001", "0S3MA0000000002", "0S3MA0000000007",
                                      "0S3MA0000000009"],
                QueueState.ACTIVE: [],
                QueueState.DEFERRED: ["0S3MA0000000003"],
                QueueState.HOLD: ["0S3MA0000000004"],
                QueueState.CORRUPT: ["0S3MA0000000008"],
                QueueState.DONE: ["0S3MA0000000005"],
                QueueState.REDACTED: ["0S3MA0000000006"],
            },
        )  # fmt: skip
        self.assertFalse(os.path.exists(os.path.join(self.root, "active")))
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [], "half-received: gone")
        self.assertEqual(os.listdir(os.path.join(self.root, "journal")), [], "applied, then gone")

    def test_bytes_and_envelopes_are_kept(self) -> None:
        store = self.upgraded()
        for state, queue_id in [("incoming", "0S3MA0000000001"), ("incoming", "0S3MA0000000002"),
                                ("deferred", "0S3MA0000000003"), ("hold", "0S3MA0000000004"),
                                ("done", "0S3MA0000000005"), ("redacted", "0S3MA0000000006"),
                                ("active", "0S3MA0000000007")]:  # fmt: skip
            with self.subTest(queue_id=queue_id):
                with store.open_message(queue_id) as f:
                    self.assertEqual(f.read(), v1_message(f"{state}/{queue_id}"))
                _, env = store.load(queue_id)
                self.assertEqual(env.queue_id, queue_id)
                self.assertEqual(env.size, len(v1_message(f"{state}/{queue_id}")))
                self.assertEqual(env.auth_user, "alice@example.com")
        _, utf8 = store.load("0S3MA0000000002")
        self.assertEqual((utf8.smtputf8, utf8.ret, utf8.envid, utf8.body),
                         (True, "HDRS", "env-2", "8BITMIME"))  # fmt: skip
        self.assertEqual(utf8.recipients[0].address, "bøb@exämple.net")
        self.assertEqual(utf8.recipients[1].notify, ("SUCCESS", "FAILURE"))
        self.assertEqual(utf8.recipients[1].orcpt, "rfc822;carol@example.org")

    def test_results_and_times_are_kept(self) -> None:
        store = self.upgraded()
        _, deferred = store.load("0S3MA0000000003")
        sent, waiting = deferred.recipients
        self.assertEqual((sent.state, sent.relay), (RecipientState.SENT,
                                                     "mx.example.net[192.0.2.1]:25"))  # fmt: skip
        self.assertEqual((waiting.state, waiting.next_attempt, waiting.category),
                         (RecipientState.DEFERRED, T0 + 310, "greylist"))  # fmt: skip
        self.assertEqual(store.scan().deferred, [(T0 + 310, "0S3MA0000000003")])
        self.assertEqual(store.finished_before(QueueState.DONE, T0 + 20), ["0S3MA0000000005"])
        self.assertEqual(store.finished_before(QueueState.REDACTED, T0 + 40),
                         ["0S3MA0000000006"])  # fmt: skip
        _, redacted = store.load("0S3MA0000000006")
        self.assertEqual(redacted.redacted, T0 + 40)
        _, failed = store.load("0S3MA0000000009")
        self.assertEqual(failed.recipients[0].state, RecipientState.FAILED)
        self.assertFalse(failed.recipients[0].final_notified, "the report is still owed")

    def test_the_sent_journal_is_applied_to_the_active_message(self) -> None:
        store = self.upgraded()
        _, env = store.load("0S3MA0000000007")
        ivan, judy = env.recipients
        self.assertEqual((ivan.state, ivan.attempts, ivan.reply, ivan.last_attempt),
                         (RecipientState.SENT, 1, "250 2.0.0 Ok", T0 + 50))  # fmt: skip
        self.assertEqual(judy.state, RecipientState.PENDING)

    def test_an_unreadable_envelope_stays_corrupt_with_its_text(self) -> None:
        store = self.upgraded()
        self.assertRaises(FormatError, store.load, "0S3MA0000000008")
        with open(os.path.join(self.root, "corrupt", "0S3MA0000000008"), "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(v1_message("corrupt/0S3MA0000000008")))
        self.assertIn(b'"id": "0S3MA0000000008", broken', data)

    def test_an_interrupted_upgrade_is_finished_by_the_next(self) -> None:
        # The disk fills after some messages were converted.
        store = FileStore(self.root, FailingOps("rename", after=3))
        self.assertRaises(StorageError, store.open)
        with open(os.path.join(self.root, "spool.json")) as f:
            self.assertEqual(json.load(f)["format"], "mta-spool/1", "not done yet")
        self.test_states_after_the_upgrade()
        self.test_bytes_and_envelopes_are_kept()
        self.test_the_sent_journal_is_applied_to_the_active_message()

    def test_a_message_set_aside_but_not_replaced(self) -> None:
        """Killed between renaming the old directory aside and the new file in."""
        base = os.path.join(self.root, "hold")
        os.rename(os.path.join(base, "0S3MA0000000004"), os.path.join(base, ".0S3MA0000000004.v1"))
        store = self.upgraded()
        self.assertEqual(store.locate("0S3MA0000000004"), QueueState.HOLD)
        with store.open_message("0S3MA0000000004") as f:
            self.assertEqual(f.read(), v1_message("hold/0S3MA0000000004"))
        self.assertEqual(sorted(os.listdir(base)), ["0S3MA0000000004"])

    def test_without_create_the_upgrade_runs_too(self) -> None:
        store = open_store(self.root)
        self.assertEqual(store.locate("0S3MA0000000005"), QueueState.DONE)

    def test_count(self) -> None:
        self.assertEqual(upgrade.from_v1(FileStore(self.root)), 9)
        self.assertEqual(upgrade.from_v1(FileStore(self.root)), 0, "twice changes nothing")

    def record(self, queue_id: str, state: str) -> Any:
        with open(os.path.join(self.root, state, queue_id), "rb") as f:
            return json.loads(f.read().rstrip(b"\n").rsplit(b"\n", 1)[1])

    def test_the_files_read_with_tail_and_jq(self) -> None:
        self.upgraded()
        doc = self.record("0S3MA0000000003", "deferred")
        self.assertEqual((doc["format"], doc["id"]), ("mta-envelope/2", "0S3MA0000000003"))
        self.assertEqual(doc["recipients"][1]["state"], "deferred")


class ReportTests(SynchronousTestCase):
    """L{upgrade.upgrade_v1} says what it converted (for C{mtactl spool upgrade})."""

    def setUp(self) -> None:
        self.root = old_spool(self)

    def test_counts_by_state(self) -> None:
        report = upgrade.upgrade_v1(FileStore(self.root))
        self.assertEqual(
            dict(report.converted),
            {"incoming": 3, "active": 1, "deferred": 1, "hold": 1, "corrupt": 1, "done": 1,
             "redacted": 1},
        )  # fmt: skip
        self.assertEqual(report.total, 9)
        self.assertEqual((report.unreadable, report.deliveries, report.incomplete), (1, 1, 1))
        again = upgrade.upgrade_v1(FileStore(self.root))
        self.assertEqual((again.total, again.deliveries, again.incomplete), (0, 0, 0))

    def test_an_unreadable_envelope_in_another_state_goes_to_corrupt(self) -> None:
        path = os.path.join(self.root, "deferred", "0S3MA0000000003", "envelope.json")
        with open(path, "wb") as f:
            f.write(b'{"format": "mta-envelope/1", "id": "0S3MA0000000003", cut')
        report = upgrade.upgrade_v1(FileStore(self.root))
        self.assertEqual(report.unreadable, 2)
        store = open_store(self.root)
        self.assertEqual(store.locate("0S3MA0000000003"), QueueState.CORRUPT)
        with open(os.path.join(self.root, "corrupt", "0S3MA0000000003"), "rb") as f:
            data = f.read()
        self.assertEqual(data, v1_message("deferred/0S3MA0000000003") + b'{"format": '
                         b'"mta-envelope/1", "id": "0S3MA0000000003", cut\n')  # fmt: skip
        self.assertEqual(os.listdir(os.path.join(self.root, "deferred")), [])

    def test_a_message_without_its_message_file_goes_to_corrupt(self) -> None:
        os.unlink(os.path.join(self.root, "hold", "0S3MA0000000004", "message"))
        upgrade.upgrade_v1(FileStore(self.root))
        store = open_store(self.root)
        self.assertEqual(store.locate("0S3MA0000000004"), QueueState.CORRUPT)
        _, env = store.load("0S3MA0000000004")
        self.assertEqual((env.size, env.recipients[0].address), (0, "frank@example.net"))

    def test_an_unreadable_message_set_aside_goes_to_corrupt_when_resumed(self) -> None:
        base = os.path.join(self.root, "incoming")
        with open(os.path.join(base, "0S3MA0000000001", "envelope.json"), "wb") as f:
            f.write(b"not json\n")
        os.rename(os.path.join(base, "0S3MA0000000001"), os.path.join(base, ".0S3MA0000000001.v1"))
        upgrade.upgrade_v1(FileStore(self.root))
        self.assertEqual(open_store(self.root).locate("0S3MA0000000001"), QueueState.CORRUPT)
        self.assertNotIn("0S3MA0000000001", os.listdir(base))


class FormatTests(SynchronousTestCase):
    """The format names the upgrade knows agree with the store's, and
    spool.json is read as the store reads it."""

    def test_the_names_agree_with_the_store(self) -> None:
        self.assertEqual((upgrade.FORMAT, upgrade.FORMAT_V1),
                         (fs.SPOOL_FORMAT, fs.SPOOL_FORMAT_V1))  # fmt: skip

    def test_spool_format(self) -> None:
        root = old_spool(self)
        self.assertEqual(upgrade.spool_format(root), "mta-spool/1")
        with open(os.path.join(root, "spool.json"), "w") as f:
            f.write('"mta-spool/9"\n')
        self.assertEqual(upgrade.spool_format(root), "mta-spool/9")
        with open(os.path.join(root, "spool.json"), "w") as f:
            f.write("{not json")
        e = self.assertRaises(StorageError, upgrade.spool_format, root)
        self.assertIn("spool.json", str(e))
        os.unlink(os.path.join(root, "spool.json"))
        e = self.assertRaises(StorageError, upgrade.spool_format, root)
        self.assertIn("not an mta spool", str(e))
        e = self.assertRaises(StorageError, upgrade.spool_format, root + "-missing")
        self.assertIn("no spool at", str(e))


class UpgradeLockTests(SynchronousTestCase):
    """An old spool is upgraded only under its lock (found while documenting
    mta-spool/2)."""

    def test_the_daemon_does_not_upgrade_a_spool_in_use(self) -> None:
        """Starting the daemon by mistake beside a running one of the old
        version: the spool is opened (and would be upgraded) before
        C{startService} takes the lock, so the upgrade itself takes the lock,
        and the old daemon keeps a spool it can read.
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
