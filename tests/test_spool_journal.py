"""The sent journal (L{mta.spool.journal}): lines, recovery and the daemon's writer."""

from __future__ import annotations

import errno
import json
import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.config import parse
from mta.envelope import Envelope, Recipient, RecipientState, SentRecord
from mta.service import MTAService
from mta.spool import journal
from mta.spool.fs import FileStore
from mta.spool.journal import JOURNAL, SentJournal, parse_line
from mta.testing import FailingOps, NoSyncOps, QueuedRunner, queue_message, write_users

T0 = 1_700_000_000.0


def record(queue_id: str, index: int = 0, address: str = "bob@example.net") -> SentRecord:
    return SentRecord(
        queue_id, index, address, T0 + 5, "250 2.0.0 Ok: queued as X", "2.0.0", "mx[192.0.2.1]:25"
    )


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = FileStore(os.path.abspath(self.mktemp()), NoSyncOps())
        self.store.open()
        self.dir = journal.directory(self.store.root)

    def active(self, *recipients: str) -> str:
        """A message in active/, as the queue manager leaves it while delivering."""
        queue_id = queue_message(self.store, "alice@example.com", list(recipients), arrival=T0)
        self.store.move(queue_id, "incoming", "active")
        return queue_id

    def write_segment(self, name: str, *lines: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(b"".join(lines))
        return path

    def recipients(self, queue_id: str) -> list[Recipient]:
        return self.store.load(queue_id)[1].recipients


class LineTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        rec = record("0RKM3JDN5AC4ZQ7", 2, "bøb@example.net")
        line = journal.line(rec)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(parse_line(line), rec)
        doc = json.loads(line)
        self.assertEqual(doc["time"], "2023-11-14T22:13:25.000000Z")

    def test_torn_and_foreign_lines_are_skipped(self) -> None:
        good = json.loads(journal.line(record("0RKM3JDN5AC4ZQ7")))
        bad = [
            journal.line(record("0RKM3JDN5AC4ZQ7"))[:40],  # torn by a crash
            b"\0\0\0\0",  # a block the file system never filled
            b"[1, 2]",
            b"not json",
            json.dumps({**good, "id": "../../etc"}).encode(),
            json.dumps({**good, "rcpt": -1}).encode(),
            json.dumps({**good, "rcpt": True}).encode(),
            json.dumps({**good, "rcpt": "0"}).encode(),
            json.dumps({**good, "address": None}).encode(),
            json.dumps({**good, "reply": 250}).encode(),
            json.dumps({**good, "relay": 1}).encode(),
            json.dumps({**good, "time": None}).encode(),
            json.dumps({**good, "time": "yesterday"}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "reply"}).encode(),
        ]
        for line in bad:
            self.assertIsNone(parse_line(line), line)


class ApplyTests(SynchronousTestCase):
    def envelope(self) -> Envelope:
        return Envelope(
            queue_id="0RKM3JDN5AC4ZQ7",
            sender="alice@example.com",
            recipients=[
                Recipient("bob@example.net", attempts=1, state=RecipientState.DEFERRED),
                Recipient("carol@example.net", state=RecipientState.FAILED),
            ],
            arrival=T0,
        )

    def test_marks_the_recipient_sent(self) -> None:
        env = self.envelope()
        env.recipients[0].category = "network"
        env.recipients[0].next_attempt = T0 + 300
        changed = journal.apply(env, [record(env.queue_id)])
        [bob] = changed
        self.assertIs(bob, env.recipients[0])
        self.assertEqual(bob.state, RecipientState.SENT)
        self.assertEqual(bob.attempts, 2)
        self.assertEqual(bob.last_attempt, T0 + 5)
        self.assertIsNone(bob.next_attempt)
        self.assertIsNone(bob.category)
        self.assertEqual(bob.reply, "250 2.0.0 Ok: queued as X")
        self.assertEqual(bob.dsn_status, "2.0.0")
        self.assertEqual(bob.relay, "mx[192.0.2.1]:25")

    def test_twice_changes_nothing_more(self) -> None:
        env = self.envelope()
        journal.apply(env, [record(env.queue_id)])
        self.assertEqual(journal.apply(env, [record(env.queue_id)]), [])
        self.assertEqual(env.recipients[0].attempts, 2)

    def test_only_the_recipient_at_its_place_and_never_a_final_one(self) -> None:
        env = self.envelope()
        ignored = [
            record("0RKM3JDN5AC4ZQ8"),  # another message
            record(env.queue_id, 0, "mallory@example.net"),  # another address there
            record(env.queue_id, 2, "bob@example.net"),  # no such position
            record(env.queue_id, 1, "carol@example.net"),  # failed: final
        ]
        self.assertEqual(journal.apply(env, ignored), [])
        self.assertEqual(
            [r.state for r in env.recipients], [RecipientState.DEFERRED, RecipientState.FAILED]
        )


class ReadTests(StoreTestCase):
    def test_no_directory_no_records(self) -> None:
        self.assertEqual(journal.read(os.path.join(self.dir, "missing")), {})
        self.assertEqual(journal.segments(os.path.join(self.dir, "missing")), [])

    def test_segments_in_order_and_torn_lines_skipped(self) -> None:
        a, b = record("0RKM3JDN5AC4ZQ7", 0), record("0RKM3JDN5AC4ZQ7", 1, "carol@example.net")
        c = record("0RKM3JDN5AC4ZQ8")
        self.write_segment("sent-10.log", journal.line(c), journal.line(a)[:30])
        self.write_segment("sent-9.log", journal.line(a), b"garbage\n", journal.line(b))
        self.write_segment("other.log", journal.line(record("0RKM3JDN5AC4ZQ9")))
        self.assertEqual(
            [os.path.basename(p) for p in journal.segments(self.dir)],
            ["sent-9.log", "sent-10.log"],
        )
        self.assertEqual(
            journal.read(self.dir), {"0RKM3JDN5AC4ZQ7": [a, b], "0RKM3JDN5AC4ZQ8": [c]}
        )


class RecoverTests(StoreTestCase):
    def test_nothing_to_do(self) -> None:
        self.assertEqual(journal.recover(self.store), journal.Recovery())

    def test_active_message_gets_its_deliveries_and_the_journal_goes(self) -> None:
        qid = self.active("bob@example.net", "carol@example.net")
        done = self.active("dave@example.net")
        self.store.settle(self.store.load(done)[1], "active", "done")
        self.write_segment(
            "sent-1.log",
            journal.line(record(qid)),
            journal.line(record(done, 0, "dave@example.net")),
        )
        self.write_segment("sent-2.log", b'{"id": "torn')
        found = journal.recover(self.store)
        self.assertEqual(found, journal.Recovery(recipients=1, messages=1, segments=2))
        self.assertEqual(
            [r.state for r in self.recipients(qid)], [RecipientState.SENT, RecipientState.PENDING]
        )
        self.assertEqual(self.store.locate(qid), "active", "the queue manager files it")
        self.assertEqual(os.listdir(self.dir), [])
        # Done messages are not touched.
        self.assertEqual(self.recipients(done)[0].state, RecipientState.PENDING)

    def test_unreadable_envelope_is_left_to_the_queue_manager(self) -> None:
        qid = self.active("bob@example.net")
        with open(self.store.path("active", qid, "envelope.json"), "wb") as f:
            f.write(b"{")
        self.write_segment("sent-1.log", journal.line(record(qid)))
        found = journal.recover(self.store)
        self.assertEqual((found.recipients, found.kept), (0, False))
        self.assertEqual(os.listdir(self.dir), [])

    def test_envelope_that_cannot_be_written_keeps_the_journal(self) -> None:
        qid = self.active("bob@example.net")
        segment = self.write_segment("sent-1.log", journal.line(record(qid)))
        self.store.ops = FailingOps("fsync", errno.ENOSPC)
        found = journal.recover(self.store)
        self.assertTrue(found.kept)
        self.assertEqual(found.messages, 0)
        self.assertTrue(os.path.exists(segment))
        self.assertEqual(self.recipients(qid)[0].state, RecipientState.PENDING)
        # The next time it works.
        self.store.ops = NoSyncOps()
        found = journal.recover(self.store)
        self.assertEqual((found.recipients, found.kept), (1, False))
        self.assertEqual(self.recipients(qid)[0].state, RecipientState.SENT)
        self.assertFalse(os.path.exists(segment))

    def test_spool_open_makes_the_directory(self) -> None:
        self.assertTrue(os.path.isdir(os.path.join(self.store.root, JOURNAL)))


class WriterTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.runner = QueuedRunner()
        self.journal = SentJournal(self.dir, runner=self.runner, segment_bytes=300)

    def test_lines_are_written_at_once(self) -> None:
        a, b = record("0RKM3JDN5AC4ZQ7", 0), record("0RKM3JDN5AC4ZQ7", 1, "carol@example.net")
        token = self.journal.record([a, b])
        self.assertIsNotNone(token)
        self.assertEqual(journal.read(self.dir), {"0RKM3JDN5AC4ZQ7": [a, b]})
        self.assertEqual(self.runner.queue, [], "no thread involved")

    def test_nothing_to_write(self) -> None:
        self.assertIsNone(self.journal.record([]))
        self.assertEqual(os.listdir(self.dir), [])

    def test_segment_removed_when_superseded_and_everything_filed(self) -> None:
        first = self.journal.record([record("0RKM3JDN5AC4ZQ7")])
        second = self.journal.record([record("0RKM3JDN5AC4ZQ8")])
        self.assertEqual(os.listdir(self.dir), ["sent-1.log"])
        # Past segment_bytes: the next line opens a new segment.
        third = self.journal.record([record("0RKM3JDN5AC4ZQ9")])
        self.assertEqual(sorted(os.listdir(self.dir)), ["sent-1.log", "sent-2.log"])
        self.journal.release(first)
        self.runner.run_all()
        self.assertIn("sent-1.log", os.listdir(self.dir), "one message of it is not filed")
        self.journal.release(second)
        self.journal.release(second)  # a second release changes nothing
        self.runner.run_all()
        self.assertEqual(os.listdir(self.dir), ["sent-2.log"])
        # The current segment stays while it is written to.
        self.journal.release(third)
        self.runner.run_all()
        self.assertEqual(os.listdir(self.dir), ["sent-2.log"])

    def test_close_removes_the_current_segment_unless_something_is_owed(self) -> None:
        token = self.journal.record([record("0RKM3JDN5AC4ZQ7")])
        self.journal.close()
        self.assertEqual(os.listdir(self.dir), ["sent-1.log"], "for recovery at the next start")
        self.journal.release(token)
        self.assertEqual(os.listdir(self.dir), ["sent-1.log"])
        self.runner.run_all()
        self.assertEqual(os.listdir(self.dir), [])
        again = SentJournal(self.dir)
        self.journal.release(again.record([record("0RKM3JDN5AC4ZQ7")]))
        again.release(again.record([record("0RKM3JDN5AC4ZQ8")]))
        again.close()
        self.assertEqual(os.listdir(self.dir), [])

    def test_segments_left_by_an_earlier_run_are_not_reused(self) -> None:
        kept = self.write_segment("sent-1.log", journal.line(record("0RKM3JDN5AC4ZQ7")))
        self.journal.record([record("0RKM3JDN5AC4ZQ8")])
        self.assertEqual(sorted(os.listdir(self.dir)), ["sent-1.log", "sent-2.log"])
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), journal.line(record("0RKM3JDN5AC4ZQ7")))

    def test_write_failure_is_logged_once_and_never_raised(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        missing = os.path.join(self.dir, "missing")
        broken = SentJournal(missing)
        self.assertIsNone(broken.record([record("0RKM3JDN5AC4ZQ7")]))
        self.assertIsNone(broken.record([record("0RKM3JDN5AC4ZQ8")]))
        said = [e for e in events if e.get("log_namespace") == "mta.spool"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error])
        os.mkdir(missing)
        self.assertIsNotNone(broken.record([record("0RKM3JDN5AC4ZQ9")]))
        self.assertEqual(list(journal.read(missing)), ["0RKM3JDN5AC4ZQ9"])
        said = [e for e in events if e.get("log_namespace") == "mta.spool"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error, LogLevel.info])

    def test_a_segment_that_fails_is_given_up(self) -> None:
        owed = self.journal.record([record("0RKM3JDN5AC4ZQ7")])
        segment = self.journal._current
        assert segment is not None
        assert segment.fd is not None
        os.close(segment.fd)
        segment.fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail (EBADF)
        self.assertIsNone(self.journal.record([record("0RKM3JDN5AC4ZQ8")]))
        self.assertIsNone(segment.fd, "closed")
        self.assertIsNotNone(self.journal.record([record("0RKM3JDN5AC4ZQ9")]))
        self.assertEqual(sorted(os.listdir(self.dir)), ["sent-1.log", "sent-2.log"])
        self.assertEqual(sorted(journal.read(self.dir)), ["0RKM3JDN5AC4ZQ7", "0RKM3JDN5AC4ZQ9"])
        self.journal.release(owed)
        self.runner.run_all()
        self.assertEqual(os.listdir(self.dir), ["sent-2.log"])


class DaemonStartTests(TestCase):
    """The daemon applies the journal at start-up, before the queue manager looks."""

    def test_start_records_the_journal(self) -> Any:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        write_users(os.path.join(base, "users.json"), {})
        store = FileStore(os.path.join(base, "spool"))
        store.open()
        qid = queue_message(store, "alice@example.com", ["bob@example.net"], arrival=T0)
        store.move(qid, "incoming", "active")
        segment = os.path.join(journal.directory(store.root), "sent-7.log")
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
        _, env = store.load(qid)
        self.assertEqual(env.recipients[0].state, RecipientState.SENT)

        def filed() -> Any:
            if store.locate(qid) != "done":
                return deferLater(reactor, 0.05, filed)
            return None

        return filed()
