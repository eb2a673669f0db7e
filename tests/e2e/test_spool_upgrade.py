"""End to end: an mta-spool/1 spool (tests/golden/spool-v1) upgraded by the real
mtactl, then served by a real daemon: what was delivered is not delivered
again, what waited is delivered, what was held stays held."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, mtactl, wait_for

pytestmark = pytest.mark.e2e

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "spool-v1")


class SpoolUpgradeEndToEnd(SynchronousTestCase):
    """The golden v1 spool upgraded by the real mtactl and served by a real
    daemon: what waited is delivered, nothing delivered or finished is sent again."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mta-upgrade-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.out = os.path.join(self.tmp, "sink")
        self.sink = Helper(["tests/e2e/sink.py", self.out], os.path.join(self.tmp, "s.log"))
        self.addCleanup(self.sink.stop)
        self.daemon = Daemon(
            os.path.join(self.tmp, "mta"), {"routes": {"*": f"[127.0.0.1]:{self.sink.port}"}}
        )
        self.addCleanup(self.daemon.stop)
        shutil.copytree(os.path.join(FIXTURE, "spool"), self.daemon.spool)
        with open(os.path.join(FIXTURE, "mtimes.json")) as f:
            for name, when in json.load(f).items():
                os.utime(os.path.join(self.daemon.spool, name), (when, when))

    def rcpts(self) -> str:
        try:
            with open(os.path.join(self.out, "rcpt.log"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def test_upgraded_offline_then_served(self) -> None:
        result = mtactl(["spool", "upgrade"], self.daemon.config)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("upgraded from mta-spool/1 to mta-spool/2: 9 messages\n", result.stdout)
        again = mtactl(["spool", "upgrade"], self.daemon.config)
        self.assertIn("already", again.stdout)
        self.daemon.start()
        # While it runs, mtactl says there is nothing to do (and does not need the lock).
        self.assertEqual(mtactl(["spool", "upgrade"], self.daemon.config).returncode, 0)
        # Waiting recipients are delivered: new (bob), the one left by the
        # killed delivery (judy), the deferred one now due (erin).
        for rcpt in ("bob@example.net", "judy@example.org", "erin@example.com"):
            wait_for(lambda rcpt=rcpt: f"<{rcpt}>" in self.rcpts(), 30, f"{rcpt} delivered")
        for queue_id in ("0S3MA0000000001", "0S3MA0000000003", "0S3MA0000000007"):
            wait_for(lambda q=queue_id: q in self.daemon.queued("done"), 30, f"{queue_id} done")
        # Delivered before the upgrade (also the one only the sent journal knew
        # of), held, finished: never sent.
        for rcpt in ("ivan@example.net", "dave@example.net", "frank@example.net",
                     "grace@example.net", "heidi@example.net"):  # fmt: skip
            self.assertNotIn(f"<{rcpt}>", self.rcpts())
        self.assertEqual(self.daemon.queued("hold"), ["0S3MA0000000004"])
        shown = mtactl(["queue", "show", "0S3MA0000000004", "--envelope-only"], self.daemon.config)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertTrue(shown.stdout.startswith("# state: hold\n"), shown.stdout)
        _, env = json.loads("[0," + shown.stdout[shown.stdout.index("{") :] + "]")
        self.assertEqual([r["state"] for r in env["recipients"]], ["pending"])
        judy = self.daemon.envelope("0S3MA0000000007")["recipients"]
        self.assertEqual([r["state"] for r in judy], ["sent", "sent"])
        self.assertEqual(judy[0]["reply"], "250 2.0.0 Ok", "ivan's result from the sent journal")
