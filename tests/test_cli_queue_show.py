"""mtactl queue show on a spool a daemon is using: the journal's lines that the file has already."""

from __future__ import annotations

from dataclasses import replace

from mta.envelope import ProgressRecord, QueueState, RecipientState
from mta.spool.fs import FileStore
from mta.testing import NoSyncOps
from tests.test_cli import SpoolTestCase

T0 = 1_700_000_000.0


class ShowWithTheJournalTests(SpoolTestCase):
    """The daemon journals a result, then files the message; the segment stays
    while the daemon runs (until a newer one takes over and everything in
    it is filed)."""

    def setUp(self) -> None:
        super().setUp()
        self.daemon = FileStore(self.spool_path, NoSyncOps())
        self.queue_id = self.commit("bob@example.net", "carol@example.org")
        env = self.daemon.activate(self.queue_id)
        assert env is not None
        self.env = env
        self.result(0, RecipientState.DEFERRED, 1, "451 4.7.1 Greylisted")
        self.result(1, RecipientState.SENT, 1, "250 2.0.0 Ok")

    def result(self, index: int, state: RecipientState, attempts: int, reply: str) -> None:
        rcpt = self.env.recipients[index]
        rcpt.state, rcpt.attempts, rcpt.reply = state, attempts, reply
        rcpt.last_attempt = T0 + 60 * attempts
        rcpt.next_attempt = T0 + 360 * attempts if state == RecipientState.DEFERRED else None
        self.daemon.journal([ProgressRecord(self.queue_id, index, replace(rcpt))])

    def show(self) -> str:
        code, out = self.mtactl("queue", "show", self.queue_id, "--envelope-only")
        self.assertEqual(code, 0)
        return out

    def test_lines_of_a_filed_message_are_not_shown(self) -> None:
        self.assertEqual(self.daemon.file([(self.env, QueueState.DEFERRED, T0 + 360)]), [None])
        out = self.show()
        self.assertNotIn("# journal:", out)
        self.assertTrue(out.startswith("# state: deferred\n# envelope: "), out)

    def test_lines_not_yet_filed_are_shown(self) -> None:
        out = self.show()
        self.assertIn("# journal: bob@example.net deferred at 2023-11-14T22:14:20.000000Z "
                      "(451 4.7.1 Greylisted), not yet in the message file\n", out)  # fmt: skip
        self.assertIn("# journal: carol@example.org sent at 2023-11-14T22:14:20.000000Z "
                      "(250 2.0.0 Ok), not yet in the message file\n", out)  # fmt: skip

    def test_only_what_came_after_the_filing(self) -> None:
        self.assertEqual(self.daemon.file([(self.env, QueueState.DEFERRED, T0 + 360)]), [None])
        env = self.daemon.activate(self.queue_id)
        assert env is not None
        self.env = env
        self.result(0, RecipientState.DEFERRED, 2, "451 4.7.1 Still greylisted")
        out = self.show()
        self.assertEqual(out.count("# journal:"), 1, out)
        self.assertIn(
            "# journal: bob@example.net deferred at 2023-11-14T22:15:20.000000Z "
            "(451 4.7.1 Still greylisted), not yet in the message file\n",
            out,
        )
