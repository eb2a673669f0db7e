"""The progress journal (L{mta.spool.journal}): lines, recovery and the daemon's writer."""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.config import parse
from mta.envelope import Envelope, ProgressRecord, QueueState, Recipient, RecipientState
from mta.service import MTAService
from mta.spool import journal
from mta.spool.fs import FileStore
from mta.spool.journal import JOURNAL, ProgressJournal, parse_line
from mta.testing import FailingOps, NoSyncOps, QueuedRunner, queue_message, write_users

T0 = 1_700_000_000.0


def record(
    queue_id: str,
    index: int = 0,
    address: str = "bob@example.net",
    state: RecipientState = RecipientState.SENT,
    attempts: int = 1,
) -> ProgressRecord:
    rcpt = Recipient(address, state=state, attempts=attempts, last_attempt=T0 + 5,
                     reply="250 2.0.0 Ok: queued as X", dsn_status="2.0.0",
                     relay="mx[192.0.2.1]:25")  # fmt: skip
    return ProgressRecord(queue_id, index, rcpt)


class StoreTestCase(SynchronousTestCase):
    """Shared by the journal tests on a real spool directory (no fsync): a message waiting in
    incoming/, writing a journal segment by hand, and a message's recipients as recorded."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.store = FileStore(self.root, NoSyncOps())
        self.store.open()
        self.dir = journal.directory(self.root)

    def waiting(self, *recipients: str) -> str:
        """A message in incoming/, as a killed daemon may leave it while delivering."""
        return queue_message(self.store, "alice@example.com", list(recipients), arrival=T0)

    def write_segment(self, name: str, *lines: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(b"".join(lines))
        return path

    def recipients(self, queue_id: str) -> list[Recipient]:
        return self.store.load(queue_id)[1].recipients


class LineTests(SynchronousTestCase):
    """One JSON line per recipient state; anything else is skipped."""

    def test_round_trip(self) -> None:
        rec = record("0RKM3JDN5AC4ZQ7", 2, "bøb@example.net")
        line = journal.line(rec)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertIn("bøb".encode(), line)
        self.assertEqual(parse_line(line), rec)

    def test_torn_and_foreign_lines_are_skipped(self) -> None:
        good = json.loads(journal.line(record("0RKM3JDN5AC4ZQ7")))
        for bad in [
            journal.line(record("0RKM3JDN5AC4ZQ7"))[:40],  # torn by a crash
            b"not json",
            b"[]",
            json.dumps({**good, "id": "../etc"}).encode(),
            json.dumps({**good, "rcpt": -1}).encode(),
            json.dumps({**good, "rcpt": True}).encode(),
            json.dumps({**good, "state": {"address": "x"}}).encode(),
        ]:
            with self.subTest(line=bad):
                self.assertIsNone(parse_line(bad))


class ApplyTests(SynchronousTestCase):
    """A record gives its recipient its state, never going back."""

    def envelope(self) -> Envelope:
        return Envelope(
            "0RKM3JDN5AC4ZQ7", "a@example.com",
            [Recipient("bob@example.net"), Recipient("carol@example.net")], T0,
        )  # fmt: skip

    def test_gives_the_recipient_its_state(self) -> None:
        env = self.envelope()
        self.assertEqual(journal.apply(env, [record(env.queue_id)]), 1)
        bob = env.recipients[0]
        self.assertEqual((bob.state, bob.attempts, bob.reply),
                         (RecipientState.SENT, 1, "250 2.0.0 Ok: queued as X"))  # fmt: skip
        self.assertIsNot(bob, record(env.queue_id).recipient)

    def test_later_records_win_older_ones_do_not(self) -> None:
        env = self.envelope()
        deferred = record(env.queue_id, state=RecipientState.DEFERRED, attempts=1)
        sent = record(env.queue_id, attempts=2)
        journal.apply(env, [deferred, sent])
        self.assertEqual(env.recipients[0].state, RecipientState.SENT)
        env = self.envelope()
        env.recipients[0].attempts = 3
        self.assertEqual(journal.apply(env, [deferred]), 0, "older than the envelope")

    def test_only_the_recipient_at_its_place_and_never_a_final_one(self) -> None:
        env = self.envelope()
        env.recipients[1].state = RecipientState.FAILED
        self.assertEqual(
            journal.apply(env, [record(env.queue_id, 1, "carol@example.net"),
                                record(env.queue_id, 0, "carol@example.net"),
                                record(env.queue_id, 5), record("0RKM3JDN5AC4ZQ8")]),
            0,
        )  # fmt: skip

    def test_the_sent_journal_of_an_old_spool(self) -> None:
        env = self.envelope()
        env.recipients[0].notify = ("SUCCESS",)
        journal.apply(env, [record(env.queue_id, attempts=0)], sent_only=True)
        bob = env.recipients[0]
        self.assertEqual((bob.state, bob.attempts, bob.notify),
                         (RecipientState.SENT, 1, ("SUCCESS",)))  # fmt: skip


class ReadTests(StoreTestCase):
    """Segments are read oldest first; torn lines are skipped."""

    def test_no_directory_no_records(self) -> None:
        self.assertEqual(journal.read(os.path.join(self.dir, "missing")), {})

    def test_segments_in_order_and_torn_lines_skipped(self) -> None:
        a, b, c = record("0RKM3JDN5AC4ZQ7"), record("0RKM3JDN5AC4ZQ8"), record("0RKM3JDN5AC4ZQ9")
        self.write_segment("progress-10.log", journal.line(c), journal.line(a)[:30])
        self.write_segment("progress-9.log", journal.line(a), b"garbage\n", journal.line(b))
        self.write_segment("other.log", journal.line(a))
        found = journal.read(self.dir)
        self.assertEqual(found, {a.queue_id: [a], b.queue_id: [b], c.queue_id: [c]})


class RecoverTests(StoreTestCase):
    """At start-up the store records the journal in the message files, then removes it."""

    def test_nothing_to_do(self) -> None:
        self.assertEqual(self.store.recover(), journal.Recovery())

    def test_waiting_message_gets_its_results_and_the_journal_goes(self) -> None:
        qid = self.waiting("bob@example.net", "carol@example.net")
        done = self.waiting("dave@example.net")
        self.store.move(done, QueueState.INCOMING, QueueState.DONE)
        later = record(qid, 1, "carol@example.net", RecipientState.DEFERRED)
        self.write_segment(
            "progress-1.log",
            journal.line(record(qid)),
            journal.line(record(done, 0, "dave@example.net")),
            journal.line(later),
        )
        self.write_segment("progress-2.log", b'{"id": "torn')
        found = self.store.recover()
        self.assertEqual(found, journal.Recovery(recipients=2, messages=1, segments=2))
        self.assertEqual([r.state for r in self.recipients(qid)],
                         [RecipientState.SENT, RecipientState.DEFERRED])  # fmt: skip
        self.assertEqual(self.store.locate(qid), "incoming", "the queue manager files it")
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.recipients(done)[0].state, RecipientState.PENDING, "left alone")

    def test_unreadable_message_is_left_to_the_queue_manager(self) -> None:
        qid = self.waiting("bob@example.net")
        with open(self.store.path("incoming", qid), "wb") as f:
            f.write(b"half a message, no envelope")
        self.write_segment("progress-1.log", journal.line(record(qid)))
        found = self.store.recover()
        self.assertEqual((found.recipients, found.kept), (0, False))
        self.flushLoggedErrors()
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_file_that_cannot_be_written_keeps_the_journal(self) -> None:
        qid = self.waiting("bob@example.net")
        segment = self.write_segment("progress-1.log", journal.line(record(qid)))
        self.store.ops = FailingOps("append", errno.ENOSPC)
        found = self.store.recover()
        self.flushLoggedErrors()
        self.assertTrue(found.kept)
        self.assertTrue(os.path.exists(segment))
        # The next time it works.
        self.store.ops = NoSyncOps()
        found = self.store.recover()
        self.assertEqual((found.recipients, found.kept), (1, False))
        self.assertEqual(self.recipients(qid)[0].state, RecipientState.SENT)
        self.assertFalse(os.path.exists(segment))

    def test_spool_open_makes_the_directory(self) -> None:
        self.assertTrue(os.path.isdir(os.path.join(self.store.root, JOURNAL)))


class WriterTests(StoreTestCase):
    """Lines wait for the next reactor turn and are written in one batch in a thread."""

    def setUp(self) -> None:
        super().setUp()
        self.runner = QueuedRunner()
        self.turns: list[Callable[[], None]] = []
        self.journal = ProgressJournal(
            self.dir, runner=self.runner, schedule=self.turns.append, segment_bytes=600
        )

    def turn(self) -> None:
        """The reactor's next turn, then the spool thread."""
        turns = list(self.turns)
        self.turns.clear()
        for f in turns:
            f()
        self.runner.run_all()

    def test_lines_wait_for_the_next_turn_and_go_in_one_batch(self) -> None:
        a, b = record("0RKM3JDN5AC4ZQ7", 0), record("0RKM3JDN5AC4ZQ7", 1, "carol@example.net")
        token = self.journal.record([a])
        self.journal.record([b])
        self.assertIsNotNone(token)
        self.assertEqual(os.listdir(self.dir), [], "nothing written in the reactor thread")
        self.assertEqual(len(self.turns), 1, "one turn for both")
        self.turns.pop()()
        self.assertEqual(len(self.runner.queue), 1, "one batch for the thread")
        self.runner.run_all()
        self.assertEqual(journal.read(self.dir), {"0RKM3JDN5AC4ZQ7": [a, b]})

    def test_lines_during_a_batch_go_in_the_next(self) -> None:
        self.journal.record([record("0RKM3JDN5AC4ZQ7")])
        self.turns.pop()()
        self.journal.record([record("0RKM3JDN5AC4ZQ8")])
        self.assertEqual(self.turns, [], "the writer is busy: it goes on by itself")
        self.runner.run_next()
        self.turn()
        self.assertEqual(sorted(journal.read(self.dir)), ["0RKM3JDN5AC4ZQ7", "0RKM3JDN5AC4ZQ8"])

    def test_nothing_to_write(self) -> None:
        self.assertIsNone(self.journal.record([]))
        self.assertEqual((self.turns, os.listdir(self.dir)), ([], []))

    def test_segment_removed_when_superseded_and_everything_filed(self) -> None:
        first = self.journal.record([record("0RKM3JDN5AC4ZQ7")])
        second = self.journal.record([record("0RKM3JDN5AC4ZQ8")])
        self.turn()
        self.assertEqual(os.listdir(self.dir), ["progress-1.log"])
        third = self.journal.record([record("0RKM3JDN5AC4ZQ9")])  # past segment_bytes
        self.turn()
        self.assertEqual(sorted(os.listdir(self.dir)), ["progress-1.log", "progress-2.log"])
        self.journal.release(first)
        self.turn()
        self.assertIn("progress-1.log", os.listdir(self.dir), "one message of it is not filed")
        self.journal.release(second)
        self.journal.release(second)  # a second release changes nothing
        self.turn()
        self.assertEqual(os.listdir(self.dir), ["progress-2.log"])
        self.journal.release(third)  # the current segment stays while it is written to
        self.turn()
        self.assertEqual(os.listdir(self.dir), ["progress-2.log"])

    def test_close_writes_what_waits_and_keeps_what_is_owed(self) -> None:
        owed = record("0RKM3JDN5AC4ZQ7")
        self.journal.record([owed])
        self.journal.close()
        self.assertEqual(journal.read(self.dir), {owed.queue_id: [owed]})
        again = ProgressJournal(self.dir)
        again.release(again.record([record("0RKM3JDN5AC4ZQ8")]))
        again.close()
        self.assertEqual(os.listdir(self.dir), ["progress-1.log"], "only the owed one")

    def timed_writer(self, interval: float) -> tuple[list[int], Clock, ProgressJournal]:
        """A writer whose sync timer runs on a Clock, and the fdatasyncs it makes."""
        synced: list[int] = []
        self.patch(os, "fdatasync", synced.append)
        clock = Clock()
        writer = ProgressJournal(
            self.dir, runner=self.runner, schedule=self.turns.append,
            call_later=clock.callLater, sync_interval=interval,
        )  # fmt: skip
        return synced, clock, writer

    def test_lines_between_syncs_are_synced_within_the_interval(self) -> None:
        """A batch that comes too soon after a sync is not synced then, but at
        most C{sync_interval} later, even when no batch follows."""
        synced, clock, writer = self.timed_writer(0.1)
        writer.record([record("0RKM3JDN5AC4ZQ7")])
        self.turn()
        self.assertEqual(len(synced), 1, "the first batch: due")
        writer.record([record("0RKM3JDN5AC4ZQ8")])
        self.turn()
        self.assertEqual(len(synced), 1, "too soon after the last sync")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0.1)
        self.turn()
        self.assertEqual(len(synced), 2, "synced by the timer")
        self.assertEqual(clock.getDelayedCalls(), [])
        writer.close()
        self.assertEqual(len(synced), 2, "nothing left to sync at close")

    def test_close_syncs_and_stops_the_timer(self) -> None:
        synced, clock, writer = self.timed_writer(10)
        for qid in ("0RKM3JDN5AC4ZQ7", "0RKM3JDN5AC4ZQ8"):
            writer.record([record(qid)])
            self.turn()
        self.assertEqual(len(synced), 1)
        writer.close()
        self.assertEqual(len(synced), 2)
        self.assertEqual([c.active() for c in clock.getDelayedCalls()], [])

    def test_segments_left_by_an_earlier_run_are_not_reused(self) -> None:
        kept = self.write_segment("progress-1.log", journal.line(record("0RKM3JDN5AC4ZQ7")))
        self.journal.record([record("0RKM3JDN5AC4ZQ8")])
        self.turn()
        self.assertEqual(sorted(os.listdir(self.dir)), ["progress-1.log", "progress-2.log"])
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), journal.line(record("0RKM3JDN5AC4ZQ7")))

    def test_write_failure_is_logged_once_and_never_raised(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        missing = os.path.join(self.dir, "missing")
        broken = ProgressJournal(missing, segment_bytes=10)
        broken.record([record("0RKM3JDN5AC4ZQ7")])
        broken.record([record("0RKM3JDN5AC4ZQ8")])
        said = [e for e in events if e.get("log_namespace") == "mta.spool"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error])
        os.mkdir(missing)
        broken.record([record("0RKM3JDN5AC4ZQ9")])
        self.assertEqual(list(journal.read(missing)), ["0RKM3JDN5AC4ZQ9"])
        said = [e for e in events if e.get("log_namespace") == "mta.spool"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error, LogLevel.info])


class DaemonStartTests(TestCase):
    """The daemon applies the journal at start-up, before the queue manager looks."""

    def test_start_records_the_journal(self) -> Any:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        write_users(os.path.join(base, "users.json"), {})
        store = FileStore(os.path.join(base, "spool"))
        store.open()
        qid = queue_message(store, "alice@example.com", ["bob@example.net"], arrival=T0)
        segment = os.path.join(journal.directory(store.root), "progress-7.log")
        with open(segment, "wb") as f:
            f.write(journal.line(record(qid)))
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {"submissions": [], "submission": []},
            # Nothing leaves the machine: a closed loopback port.
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": 9, "dns_timeout": 1},
            "routes": {"*": "[127.0.0.1]:9"},
        }
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        service = MTAService(parse(doc, "test.toml", base), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse(os.path.exists(segment))
        _, env = FileStore(store.root).load(qid)
        self.assertEqual(env.recipients[0].state, RecipientState.SENT)

        def filed() -> Any:
            if FileStore(store.root).locate(qid) != "done":
                return deferLater(reactor, 0.05, filed)
            return None

        return filed()


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
        rcpt.state, rcpt.attempts, rcpt.last_attempt = (
            RecipientState.DEFERRED,
            3,
            T0 + 14_500,
        )
        rcpt.next_attempt, rcpt.reply = T0 + 16_000, "451 4.7.1 Greylisted"
        self.store.journal([ProgressRecord(self.qid, 0, replace(rcpt))])

    def test_a_replayed_line_does_not_undo_the_delay_notice(self) -> None:
        """The round's result is journaled before its notices are sent; the
        delay notice then marks the recipient C{delay_notified} and the
        message is filed.  After a SIGKILL, recovery reads the journal line
        again: it has no more attempts than the file, so it is not applied,
        and the flag (or an operator's flush or release after the filing)
        stays.
        """
        self.env.recipients[0].delay_notified = True
        self.assertEqual(self.store.file([(self.env, QueueState.DEFERRED, T0 + 16_000)]), [None])
        FileStore(self.store.root).recover()  # the next start after a SIGKILL
        _, env = FileStore(self.store.root).load(self.qid)
        self.assertTrue(env.recipients[0].delay_notified)

    def test_lines_already_in_the_files_are_not_counted(self) -> None:
        """The daemon logs what L{journal.Recovery} counts; after a SIGKILL
        with everything filed there is nothing to count."""
        self.assertEqual(self.store.file([(self.env, QueueState.DEFERRED, T0 + 16_000)]), [None])
        found = FileStore(self.store.root).recover()
        self.assertEqual((found.recipients, found.messages), (0, 0))
