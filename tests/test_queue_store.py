"""The IQueueStore contract, for every implementation.

One suite of behaviour (L{QueueStoreContract}) runs against the file system
store and the memory store, so the queue manager's tests on the memory
store say something about the daemon on disk.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mta.envelope import Envelope, ProgressRecord, QueueState, Recipient, RecipientState
from mta.errors import StorageError
from mta.interfaces import IQueueStore
from mta.spool import FileStore
from mta.spool.format import FormatError
from mta.testing import MemoryStore, NoSyncOps, queue_message

T0 = 1_700_000_000.0
DATA = b"From: a@example.com\r\nSubject: contract\r\n\r\nbody line\r\n"


class QueueStoreContract:
    """What every L{IQueueStore} does; mixed into a TestCase with L{make_store}."""

    store: Any

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def add(self, *recipients: str, arrival: float = T0) -> str:
        return queue_message(
            self.store, "a@example.com", list(recipients or ["b@example.net"]), DATA,
            arrival=arrival,
        )  # fmt: skip

    def read(self, queue_id: str, state: QueueState | None = None) -> bytes:
        with self.store.open_message(queue_id, state) as f:
            data: bytes = f.read()
        return data

    # -- reading ----------------------------------------------------------------

    def test_provides_the_interface(self: Any) -> None:
        self.assertTrue(verifyObject(IQueueStore, self.store))

    def test_added_message_is_incoming_and_ready(self: Any) -> None:
        qid = self.add("b@example.net", "c@example.org")
        self.assertEqual(self.store.locate(qid), QueueState.INCOMING)
        state, env = self.store.load(qid)
        self.assertEqual(state, QueueState.INCOMING)
        self.assertEqual([r.address for r in env.recipients], ["b@example.net", "c@example.org"])
        self.assertEqual(env.arrival, T0)
        self.assertEqual(self.read(qid), DATA)
        self.assertEqual(list(self.store.ids(QueueState.INCOMING)), [qid])
        self.assertEqual(self.store.count(QueueState.INCOMING), 1)
        self.assertEqual(self.store.scan().ready, [qid])

    def test_unknown_message(self: Any) -> None:
        self.assertRaises(KeyError, self.store.locate, "0000000000Z0000")
        self.assertRaises(KeyError, self.store.load, "0000000000Z0000")
        self.assertRaises(StorageError, self.store.open_message, "0000000000Z0000")
        self.assertIsNone(self.store.activate("0000000000Z0000"))

    def test_load_in_the_wrong_state(self: Any) -> None:
        qid = self.add()
        self.assertRaises(KeyError, self.store.load, qid, QueueState.DEFERRED)

    def test_loaded_envelope_is_a_copy(self: Any) -> None:
        qid = self.add()
        _, env = self.store.load(qid)
        env.recipients[0].state = RecipientState.SENT
        _, again = self.store.load(qid)
        self.assertEqual(again.recipients[0].state, RecipientState.PENDING)

    # -- a delivery round -----------------------------------------------------------

    def test_activate_then_file_deferred(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        self.assertIsInstance(env, Envelope)
        self.assertEqual(self.store.locate(qid), QueueState.ACTIVE)
        self.assertEqual(self.read(qid, QueueState.ACTIVE), DATA)
        env.recipients[0].state = RecipientState.DEFERRED
        env.recipients[0].next_attempt = T0 + 300
        self.assertEqual(self.store.file([(env, QueueState.DEFERRED, T0 + 300)]), [None])
        state, stored = self.store.load(qid)
        self.assertEqual(state, QueueState.DEFERRED)
        self.assertEqual(stored.recipients[0].next_attempt, T0 + 300)
        scan = self.store.scan()
        self.assertEqual((scan.ready, scan.deferred), ([], [(T0 + 300, qid)]))

    def test_activate_a_deferred_message(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        self.store.file([(env, QueueState.DEFERRED, T0 + 300)])
        self.assertIsNotNone(self.store.activate(qid))
        self.assertEqual(self.store.locate(qid), QueueState.ACTIVE)

    def test_activate_refuses_what_does_not_wait(self: Any) -> None:
        qid = self.add()
        self.store.move(qid, QueueState.INCOMING, QueueState.HOLD)
        self.assertIsNone(self.store.activate(qid))
        self.assertEqual(self.store.locate(qid), QueueState.HOLD)

    def test_a_message_in_delivery_at_a_restart_is_ready_again(self: Any) -> None:
        first = self.add(arrival=T0 + 10)
        second = self.add(arrival=T0 + 20)
        self.store.activate(second)
        self.assertEqual(self.store.scan().ready, [first])
        self.recovered()
        self.assertEqual(self.store.scan().ready, [first, second])
        self.assertEqual(self.store.locate(second), QueueState.INCOMING)

    def test_a_deferred_message_in_delivery_at_a_restart_is_due(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        self.store.file([(env, QueueState.DEFERRED, T0 + 300)])
        self.store.activate(qid)
        self.assertEqual(self.store.scan().deferred, [])
        self.recovered()
        self.assertEqual(self.store.scan().deferred, [(T0 + 300, qid)])

    def test_claim_a_message_just_added(self: Any) -> None:
        qid = self.add()
        self.assertTrue(self.store.claim(qid))
        self.assertEqual(self.store.locate(qid), QueueState.ACTIVE)
        self.assertFalse(self.store.claim(qid), "claimed once")
        self.assertFalse(self.store.claim("0000000000Z0000"))
        _, env = self.store.load(qid)
        env.recipients[0].state = RecipientState.SENT
        self.assertEqual(self.store.file([(env, QueueState.DONE, T0)]), [None])
        self.assertEqual(self.store.locate(qid), QueueState.DONE)

    def test_a_message_activated_is_not_claimed(self: Any) -> None:
        qid = self.add()
        self.assertIsNotNone(self.store.activate(qid))
        self.assertFalse(self.store.claim(qid))
        self.assertIsNone(self.store.activate(qid), "already in delivery")

    def test_filed_again_and_again(self: Any) -> None:
        """Each round's results are kept; the state read back is the last one."""
        qid = self.add("b@example.net", "c@example.org")
        for attempt in range(1, 12):
            env = self.store.activate(qid)
            env.recipients[1].attempts = attempt
            env.recipients[1].reply = f"451 4.3.0 try {attempt}"
            self.store.file([(env, QueueState.DEFERRED, T0 + attempt)])
        _, env = self.store.load(qid)
        self.assertEqual(env.recipients[1].attempts, 11)
        self.assertEqual(env.recipients[1].reply, "451 4.3.0 try 11")
        self.assertEqual(env.recipients[0].attempts, 0)
        self.assertEqual(self.read(qid), DATA)

    def test_file_done_with_the_time_finished(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        env.recipients[0].state = RecipientState.SENT
        self.store.file([(env, QueueState.DONE, T0 + 5)])
        self.assertEqual(self.store.locate(qid), QueueState.DONE)
        self.assertEqual(self.store.finished_before(QueueState.DONE, T0 + 4), [])
        self.assertEqual(self.store.finished_before(QueueState.DONE, T0 + 5), [qid])
        self.assertEqual(self.read(qid), DATA)

    def test_file_a_group(self: Any) -> None:
        ids = [self.add(f"u{i}@example.net") for i in range(3)]
        envs = [self.store.activate(q) for q in ids]
        results = self.store.file(
            [(envs[0], QueueState.DONE, T0), (envs[1], QueueState.DEFERRED, T0 + 60),
             (envs[2], QueueState.HOLD, T0)]
        )  # fmt: skip
        self.assertEqual(results, [None, None, None])
        self.assertEqual(
            [self.store.locate(q) for q in ids],
            [QueueState.DONE, QueueState.DEFERRED, QueueState.HOLD],
        )

    def test_file_of_a_message_not_active_fails_alone(self: Any) -> None:
        active = self.add()
        idle = self.add()
        env = self.store.activate(active)
        _, other = self.store.load(idle)
        results = self.store.file([(other, QueueState.DONE, T0), (env, QueueState.DONE, T0)])
        self.assertIsInstance(results[0], StorageError)
        self.assertIsNone(results[1])
        self.assertEqual(self.store.locate(idle), QueueState.INCOMING)

    # -- operator actions and retention ----------------------------------------------

    def test_settle_moves_with_a_new_envelope(self: Any) -> None:
        qid = self.add()
        self.store.move(qid, QueueState.INCOMING, QueueState.HOLD)
        _, env = self.store.load(qid)
        env.recipients[0].next_attempt = T0 + 99
        self.store.settle(env, QueueState.HOLD, QueueState.DEFERRED, T0 + 99)
        state, stored = self.store.load(qid)
        self.assertEqual((state, stored.recipients[0].next_attempt), ("deferred", T0 + 99))
        self.assertEqual(self.store.scan().deferred, [(T0 + 99, qid)])

    def test_move_and_remove(self: Any) -> None:
        qid = self.add()
        self.store.move(qid, QueueState.INCOMING, QueueState.CORRUPT)
        self.assertEqual(self.store.count(QueueState.CORRUPT), 1)
        self.store.remove(qid, QueueState.CORRUPT)
        self.assertRaises(KeyError, self.store.locate, qid)
        self.assertEqual(self.store.count(QueueState.CORRUPT), 0)

    def test_remove_from_the_wrong_state(self: Any) -> None:
        qid = self.add()
        self.assertRaises((KeyError, StorageError), self.store.remove, qid, QueueState.HOLD)
        self.assertEqual(self.store.locate(qid), QueueState.INCOMING)

    def test_redact(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        self.store.file([(env, QueueState.DONE, T0)])
        self.assertTrue(self.store.redact(qid, lambda data: data[:10], T0 + 50))
        state, stored = self.store.load(qid)
        self.assertEqual((state, stored.redacted), (QueueState.REDACTED, T0 + 50))
        self.assertEqual(self.read(qid), DATA[:10])
        self.assertEqual(self.store.finished_before(QueueState.REDACTED, T0 + 50), [qid])
        self.assertFalse(self.store.redact(qid, lambda data: b"", T0 + 60), "only done/")

    def test_location_names_the_message(self: Any) -> None:
        qid = self.add()
        self.assertIn(qid, self.store.location(qid, QueueState.INCOMING))

    # -- the sent journal ------------------------------------------------------------

    def sent(self, queue_id: str, index: int = 0, address: str = "b@example.net") -> ProgressRecord:
        rcpt = Recipient(address, state=RecipientState.SENT, attempts=1, last_attempt=T0 + 1,
                         reply="250 2.0.0 Ok", dsn_status="2.0.0", relay="mx[x]:25")  # fmt: skip
        return ProgressRecord(queue_id, index, rcpt)

    def test_journal_shows_in_views_not_in_loads(self: Any) -> None:
        qid = self.add("b@example.net", "c@example.org")
        self.store.activate(qid)
        self.assertIsNotNone(self.store.journal([self.sent(qid)]))
        self.assertEqual(self.store.journaled(qid), [self.sent(qid)])
        _, loaded = self.store.load(qid)
        self.assertEqual(loaded.recipients[0].state, RecipientState.PENDING)
        _, seen = self.store.view(qid)
        self.assertEqual(seen.recipients[0].state, RecipientState.SENT)
        [(listed_id, state, listed)] = list(self.store.listing(list(QueueState)))
        self.assertEqual(listed_id, qid)
        self.assertIn(state, (QueueState.ACTIVE, QueueState.INCOMING))
        self.assertEqual(listed.recipients[0].state, RecipientState.SENT)

    def test_recover_applies_the_journal_to_messages_in_delivery(self: Any) -> None:
        qid = self.add("b@example.net", "c@example.org")
        self.store.activate(qid)
        self.store.journal([self.sent(qid, 1, "c@example.org")])
        self.store.close()
        found = self.recovered()
        self.assertEqual((found.recipients, found.messages), (1, 1))
        _, env = self.store.load(qid)
        self.assertEqual(
            [r.state for r in env.recipients], [RecipientState.PENDING, RecipientState.SENT]
        )
        self.assertEqual(env.recipients[1].reply, "250 2.0.0 Ok")
        self.assertEqual(self.store.journaled(qid), [])

    def test_released_records_are_not_needed_any_more(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        token = self.store.journal([self.sent(qid)])
        env.recipients[0].state = RecipientState.SENT
        self.store.file([(env, QueueState.DONE, T0)])
        self.store.release(token)
        self.store.close()
        self.assertEqual(self.recovered().recipients, 0)

    def test_nothing_to_journal(self: Any) -> None:
        self.assertIsNone(self.store.journal([]))

    def test_recover_keeps_a_later_state_than_the_journal(self: Any) -> None:
        qid = self.add()
        env = self.store.activate(qid)
        rcpt = Recipient("b@example.net", state=RecipientState.DEFERRED, attempts=1)
        old = ProgressRecord(qid, 0, rcpt)
        self.store.journal([old])
        env.recipients[0].state, env.recipients[0].attempts = RecipientState.DEFERRED, 2
        self.store.file([(env, QueueState.DEFERRED, T0)])
        self.store.close()
        self.assertEqual(self.recovered().recipients, 0)
        self.assertEqual(self.store.load(qid)[1].recipients[0].attempts, 2)

    def recovered(self) -> Any:
        return self.store.recover()

    # -- broken messages -------------------------------------------------------------

    def test_unreadable_envelope_is_set_aside_on_activation(self: Any) -> None:
        qid = self.add()
        self.break_envelope(qid)
        self.assertRaises(FormatError, self.store.activate, qid)
        self.assertEqual(self.store.locate(qid), QueueState.CORRUPT)
        [(listed_id, _, error)] = list(self.store.listing([QueueState.CORRUPT]))
        self.assertEqual(listed_id, qid)
        self.assertIsInstance(error, FormatError)

    def break_envelope(self, queue_id: str) -> None:
        raise NotImplementedError


class MemoryStoreTests(QueueStoreContract, SynchronousTestCase):
    """The contract on L{MemoryStore}."""

    def make_store(self) -> Any:
        return MemoryStore()

    def break_envelope(self, queue_id: str) -> None:
        self.store.unreadable.add(queue_id)


class FileStoreTests(QueueStoreContract, SynchronousTestCase):
    """The contract on L{FileStore}, in a temporary directory."""

    def make_store(self) -> Any:
        self.root = os.path.abspath(self.mktemp())
        store = FileStore(self.root, NoSyncOps())
        store.open()
        return store

    def recovered(self) -> Any:
        # A new process on the same spool, as after a restart.
        self.store = FileStore(self.root, NoSyncOps())
        return self.store.recover()

    def break_envelope(self, queue_id: str) -> None:
        with open(self.store.path(self.store.locate(queue_id), queue_id), "wb") as f:
            f.write(DATA + b'{"format":"mta-envelope/2","size":0,broken\n')


class RecipientCopyTests(SynchronousTestCase):
    """The memory store keeps what was given, not a reference to it."""

    def test_added_envelope_is_copied(self) -> None:
        store = MemoryStore()
        env = Envelope("0000000000Z0000", "a@example.com", [Recipient("b@example.net")], T0)
        store.add(env, DATA)
        env.recipients[0].state = RecipientState.SENT
        self.assertEqual(store.load(env.queue_id)[1].recipients[0].state, RecipientState.PENDING)
