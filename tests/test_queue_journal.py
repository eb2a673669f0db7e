"""The queue manager writes results to the progress journal before filing them.

A daemon killed between a next hop's 250 and the filing of the message
(an appended record, in a group) must not send it again: the journal line
is written first, and recovery at the next start records it.  Here the
manager's spool thread is a L{QueuedRunner}, so the filing can be left "in
flight" when the daemon is "killed"; the journal's lines are written at
once (they reach the page cache, which a SIGKILL does not lose).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from mta.delivery.job import RecipientResult
from mta.envelope import ProgressRecord, RecipientState
from mta.interfaces import IQueueStore
from mta.queue.manager import QueueManager
from mta.spool import FileStore, journal
from mta.testing import FailingOps, NoSyncOps, QueuedRunner, queue_message, run_inline
from tests.queue_support import LATER, NO_USER, OK, T0, QueueTestCase


class JournalTestCase(QueueTestCase):
    """The manager on a file system store whose thread pool is a L{QueuedRunner}."""

    def setUp(self) -> None:
        self.runner = QueuedRunner()
        super().setUp()
        self.dir = journal.directory(self.store.root)

    def make_store(self) -> IQueueStore:
        root = getattr(self, "root", None) or os.path.abspath(self.mktemp())
        self.root = root
        store = FileStore(root, NoSyncOps(), journal_runner=run_inline)
        store.open()
        return store

    def manager(self, runner: Any = None, *, agent: Any = None, **limits: int) -> QueueManager:
        qm = super().manager(runner or self.runner, agent=agent, **limits)
        self.runner.run_all()  # the scan and the loading of the messages
        return qm

    def lines(self) -> dict[str, list[ProgressRecord]]:
        return journal.read(self.dir)

    def restart(self) -> QueueManager:
        """After a SIGKILL: a new process recovers, then runs a new queue manager
        (work in flight is lost)."""
        self.runner.queue.clear()
        self.spy.calls.clear()
        self.store = self.make_store()
        self.store.recover()
        return self.manager()


class WriteAheadTests(JournalTestCase):
    """Results are in the journal before the message is filed, and recovery uses them."""

    def test_killed_before_filing_is_not_sent_again(self) -> None:
        qid = self.queue("bob@example.net", "carol@example.net")
        self.manager()
        self.spy.answer_each(0, [OK, LATER])
        # The results are in the journal at once; the filing waits for the thread.
        sent, deferred = self.lines()[qid]
        bob = sent.recipient
        self.assertEqual((sent.index, bob.address, bob.state), (0, "bob@example.net", "sent"))
        self.assertEqual((bob.reply, bob.dsn_status, bob.relay, bob.last_attempt),
                         (str(OK), "2.0.0", "mx.test[192.0.2.1]:25", T0))  # fmt: skip
        self.assertEqual((deferred.index, deferred.recipient.state), (1, "deferred"))
        self.assertEqual(deferred.recipient.next_attempt, T0 + 300)
        self.assertNotEqual(self.runner.queue, [])
        self.assertEqual(self.store.load(qid)[1].recipients[0].state, RecipientState.PENDING)

        self.restart()
        self.assertEqual(self.spy.calls, [], "carol waits for her retry, bob was sent")
        self.assertEqual(os.listdir(self.dir), [], "recovery removed the old journal")
        self.clock.advance(300)
        self.runner.run_all()
        [job] = self.spy.waiting
        self.assertEqual([r.address for r in job.recipients], ["carol@example.net"])
        bob = job.envelope.recipients[0]
        self.assertEqual((bob.state, bob.attempts, bob.reply), (RecipientState.SENT, 1, str(OK)))
        self.assertEqual(job.envelope.recipients[1].attempts, 1, "the attempt counts")

    def test_a_transaction_is_journaled_before_its_job_ends(self) -> None:
        # A job of several transactions (over 50 recipients, or another MX
        # host for the rest): the first one's 250s are written when that
        # transaction ends, so a kill during the second sends them only once.
        qid = self.queue("bob@example.net", "carol@example.net")
        self.manager()
        [job] = self.spy.waiting
        assert job.on_transaction is not None
        job.on_transaction(
            [RecipientResult("bob@example.net", OK, "remote", "mx.test[192.0.2.1]:25")]
        )
        [line] = self.lines()[qid]
        self.assertEqual(line.recipient.address, "bob@example.net")

        self.restart()  # killed before the job ended
        [job] = self.spy.waiting
        self.assertEqual([r.address for r in job.recipients], ["carol@example.net"])
        self.assertEqual(job.envelope.recipients[0].state, RecipientState.SENT)

    def test_a_delivery_is_journaled_once(self) -> None:
        qid = self.queue("bob@example.net", "carol@example.net")
        self.manager()
        [job] = self.spy.waiting
        job.on_transaction(
            [RecipientResult("bob@example.net", OK, "remote", "mx.test[192.0.2.1]:25")]
        )
        # The job ends: its results again, with carol's from a later transaction.
        self.spy.answer_each(0, [OK, OK])
        self.assertEqual(
            [r.recipient.address for r in self.lines()[qid]],
            ["bob@example.net", "carol@example.net"],
        )
        self.runner.run_all()
        self.assertEqual(self.envelope(qid)[0], "done")
        self.store.close()
        self.assertEqual(os.listdir(self.dir), [], "both writes let go once filed")

    def test_every_recipient_sent_means_done_at_restart(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        self.spy.answer(0, OK)
        self.restart()
        self.assertEqual(self.spy.calls, [])
        state, env = self.envelope(qid)
        self.assertEqual((state, env.recipients[0].state), ("done", RecipientState.SENT))

    def test_a_failure_is_not_bounced_twice(self) -> None:
        qid = self.queue("bob@example.net", "carol@example.net")
        self.manager()
        self.spy.answer_each(0, [NO_USER, LATER])
        self.assertEqual(
            [r.recipient.state for r in self.lines()[qid]],
            [RecipientState.FAILED, RecipientState.DEFERRED],
        )
        self.restart()
        _, env = self.envelope(qid)
        self.assertEqual(env.recipients[0].state, RecipientState.FAILED)
        self.assertEqual(self.spy.calls, [], "nothing due: the failure is recorded")

    def test_recipient_owed_a_relayed_notice_is_not_journaled(self) -> None:
        # Recovery could not send the notice: such a recipient is sent again
        # after a crash rather than lose it.
        qid = queue_message(
            self.store, "sender@example.com", ["bob@example.net", "carol@example.net"], arrival=T0
        )
        _, env = self.store.load(qid)
        env.recipients[0].notify = ("SUCCESS",)
        env.recipients[1].notify = ("SUCCESS",)
        self.store.settle(env, "incoming", "incoming")
        self.manager()
        [(_, d)] = self.spy.calls
        d.callback(
            [
                RecipientResult("bob@example.net", OK, "remote", dsn_passed=False),
                RecipientResult("carol@example.net", OK, "remote", dsn_passed=True),
            ]
        )
        self.assertEqual([r.recipient.address for r in self.lines()[qid]], ["carol@example.net"])

    def test_lines_are_let_go_once_filed(self) -> None:
        self.queue("bob@example.net")
        self.manager()
        self.spy.answer(0, OK)
        self.runner.run_all()
        self.store.close()
        self.assertEqual(os.listdir(self.dir), [], "nothing owed: the segment is gone")

    def test_lines_kept_while_the_filing_fails(self) -> None:
        qid = self.queue("bob@example.net")
        self.manager()
        self.store.ops = FailingOps("append", errno.ENOSPC)
        self.spy.answer(0, OK)
        self.runner.run_all()
        self.flushLoggedErrors()
        self.assertEqual(self.store.locate(qid), "active")
        self.store.close()
        self.assertEqual(len(os.listdir(self.dir)), 1, "owed: kept for recovery")
        # The disk has room again, and the daemon restarts.
        self.restart()
        self.assertEqual(self.spy.calls, [])
        self.assertEqual(self.store.locate(qid), "done")
