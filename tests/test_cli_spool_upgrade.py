"""mtactl spool upgrade: an mta-spool/1 spool (tests/golden/spool-v1) converted offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mta.cli import main
from mta.envelope import QueueState
from mta.spool import FileStore, upgrade
from mta.spool.fs import SpoolLock
from mta.testing import FailingOps
from tests.test_cli import CLITestCase, write_config
from tests.test_spool_upgrade import old_spool

REPORT = """\
spool {root} upgraded from mta-spool/1 to mta-spool/2: 9 messages
  incoming:  3
  active:    1 (now incoming: they were being delivered)
  deferred:  1
  hold:      1
  corrupt:   1
  done:      1
  redacted:  1
unreadable envelopes, kept in corrupt/: 1
deliveries recorded from the sent journal: 1
half-received messages removed from tmp/: 1
"""


class UpgradeTestCase(CLITestCase):
    """A copy of the golden mta-spool/1 spool and a configuration naming it."""

    def setUp(self) -> None:
        super().setUp()
        self.spool_path = old_spool(self)
        write_config(self.config, self.spool_path, self.users_path)

    def marker(self) -> object:
        return upgrade.spool_format(self.spool_path)

    def unchanged(self) -> None:
        self.assertEqual(self.marker(), "mta-spool/1")
        self.assertTrue(os.path.isdir(os.path.join(self.spool_path, "incoming", "0S3MA0000000001")))
        self.assertTrue(os.path.isdir(os.path.join(self.spool_path, "active", "0S3MA0000000007")))


class UpgradeTests(UpgradeTestCase):
    """mtactl spool upgrade converts the v1 spool, says what it converted, and
    leaves a spool the other commands and a daemon can use."""

    def test_upgrade_says_what_it_converted(self) -> None:
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual((code, out, self.err.getvalue()), (0, REPORT.format(root=self.spool_path),
                                                           ""))  # fmt: skip
        self.assertEqual(self.marker(), "mta-spool/2")
        self.assertFalse(os.path.exists(os.path.join(self.spool_path, "active")))
        lock = SpoolLock(self.spool_path)
        lock.acquire()  # released: a daemon can start
        lock.release()

    def test_queue_show_and_list_work_afterwards(self) -> None:
        self.assertEqual(self.mtactl("spool", "upgrade")[0], 0)
        code, out = self.mtactl("queue", "show", "0S3MA0000000003")
        self.assertEqual(code, 0)
        path = os.path.join(self.spool_path, "deferred", "0S3MA0000000003")
        self.assertTrue(out.startswith(f"# state: deferred\n# envelope: {path}\n"), out)
        shown = json.loads(out[out.index("{") : out.index("\n}\n") + 2])
        self.assertEqual(shown["format"], "mta-envelope/2")
        self.assertEqual(
            [(r["address"], r["state"]) for r in shown["recipients"]],
            [("dave@example.net", "sent"), ("erin@example.com", "deferred")],
        )
        self.assertIn("# message\n", out)
        for queue_id, state in [("0S3MA0000000004", "hold"), ("0S3MA0000000005", "done"),
                                ("0S3MA0000000006", "redacted"),
                                ("0S3MA0000000007", "incoming")]:  # fmt: skip
            code, out = self.mtactl("queue", "show", queue_id, "--envelope-only")
            self.assertEqual(code, 0, queue_id)
            self.assertTrue(out.startswith(f"# state: {state}\n"), out)
        code, out = self.mtactl("queue", "list", "--all", "--json")
        rows = {row["id"]: row for row in json.loads(out)}
        self.assertEqual(rows["0S3MA0000000007"]["state"], "incoming")
        self.assertEqual([r["state"] for r in rows["0S3MA0000000007"]["recipients"]],
                         ["sent", "pending"], "the sent journal's delivery is kept")  # fmt: skip
        self.assertEqual([r["state"] for r in rows["0S3MA0000000005"]["recipients"]], ["sent"])
        self.assertEqual(rows["0S3MA0000000004"]["state"], "hold")
        self.assertIn("error", rows["0S3MA0000000008"])
        store = FileStore(self.spool_path)
        self.assertEqual(store.scan().deferred, [(1_700_000_310.0, "0S3MA0000000003")],
                         "the due time is kept")  # fmt: skip

    def test_the_spool_option(self) -> None:
        write_config(self.config, os.path.join(self.base, "elsewhere"), self.users_path)
        code, out = self.mtactl("spool", "upgrade", "--spool", self.spool_path)
        self.assertEqual((code, out), (0, REPORT.format(root=self.spool_path)))

    def test_a_relative_spool_option(self) -> None:
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(os.path.dirname(self.spool_path))
        code, out = self.mtactl("spool", "upgrade", "--spool", "spool")
        self.assertEqual((code, out), (0, REPORT.format(root=self.spool_path)))

    def test_twice(self) -> None:
        self.mtactl("spool", "upgrade")
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual(
            (code, out), (0, f"spool {self.spool_path} is mta-spool/2 already: nothing to do\n")
        )

    def test_an_interrupted_upgrade_is_resumed(self) -> None:
        # The disk fails after three messages were converted (the fourth is set aside).
        store = FileStore(self.spool_path, FailingOps("rename", after=3))
        self.assertRaises(OSError, upgrade.upgrade_v1, store)
        self.assertEqual(self.marker(), "mta-spool/1")
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual(code, 0)
        self.assertIn("upgraded from mta-spool/1 to mta-spool/2: 6 messages\n", out)
        self.assertEqual(self.marker(), "mta-spool/2")
        store = FileStore(self.spool_path)
        store.open()
        found = {s: sorted(store.ids(s)) for s in QueueState if s != QueueState.ACTIVE}
        self.assertEqual(sum(len(ids) for ids in found.values()), 9)
        self.assertEqual(found[QueueState.HOLD], ["0S3MA0000000004"])
        self.assertEqual(found[QueueState.DONE], ["0S3MA0000000005"])
        self.assertEqual(store.load("0S3MA0000000007")[1].recipients[0].state, "sent")
        for state in upgrade.V1_STATES:
            path = os.path.join(self.spool_path, state)
            if os.path.isdir(path):
                self.assertEqual([n for n in os.listdir(path) if n.startswith(".")], [], state)


class RefusalTests(UpgradeTestCase):
    """mtactl spool upgrade refuses, in one line and leaving the spool as it was,
    when a process holds the lock or the format is unknown or missing."""

    def test_refused_while_another_process_holds_the_lock(self) -> None:
        lock = SpoolLock(self.spool_path)
        lock.acquire()
        self.addCleanup(lock.release)
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(self.spool_path, "in use", f"PID {os.getpid()}", "stop")
        self.unchanged()

    def test_unknown_format(self) -> None:
        with open(os.path.join(self.spool_path, "spool.json"), "w") as f:
            f.write('{"format": "mta-spool/3"}\n')
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("'mta-spool/3'", "mta-spool/1", "mta-spool/2")
        self.assertTrue(os.path.isdir(os.path.join(self.spool_path, "incoming", "0S3MA0000000001")))

    def test_unreadable_marker(self) -> None:
        with open(os.path.join(self.spool_path, "spool.json"), "w") as f:
            f.write("mta-spool/1\n")
        code, _ = self.mtactl("spool", "upgrade")
        self.assertEqual(code, 1)
        self.assert_one_line_error("spool.json")

    def test_not_a_spool(self) -> None:
        empty = os.path.join(self.base, "empty")
        os.makedirs(empty)
        code, _ = self.mtactl("spool", "upgrade", "--spool", empty)
        self.assertEqual(code, 1)
        self.assert_one_line_error(empty, "not an mta spool")
        self.assertEqual(os.listdir(empty), [])

    def test_no_directory(self) -> None:
        missing = os.path.join(self.base, "missing")
        code, _ = self.mtactl("spool", "upgrade", "--spool", missing)
        self.assertEqual(code, 1)
        self.assert_one_line_error(missing)
        self.assertFalse(os.path.exists(missing))

    def test_a_failure_is_one_line_and_can_be_resumed(self) -> None:
        tmp = os.path.join(self.spool_path, "tmp")
        os.rename(tmp, tmp + ".aside")
        with open(tmp, "w") as f:
            f.write("a file where a directory belongs\n")
        code, out = self.mtactl("spool", "upgrade")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("the upgrade of", "stopped", "again")
        self.unchanged()
        os.unlink(tmp)
        os.rename(tmp + ".aside", tmp)
        self.assertEqual(self.mtactl("spool", "upgrade"), (0, REPORT.format(root=self.spool_path)))

    def test_usage(self) -> None:
        for argv in (["spool"], ["spool", "upgrade", "extra"], ["spool", "downgrade"]):
            e = self.assertRaises(SystemExit, main, argv, io.StringIO())
            self.assertEqual(e.code, 2, argv)


class QueueCommandsOnAnOldSpoolTests(UpgradeTestCase):
    """The other commands upgrade an old spool when they open it, but only
    while no other process holds it (an old daemon would lose its spool)."""

    def test_refused_while_another_process_holds_the_lock(self) -> None:
        lock = SpoolLock(self.spool_path)
        lock.acquire()
        self.addCleanup(lock.release)
        for argv in (("queue", "list"), ("queue", "show", "0S3MA0000000003")):
            self.err.truncate(0)
            self.err.seek(0)
            code, out = self.mtactl(*argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assert_one_line_error("mta-spool/1", "in use", "stop the daemon")
        self.unchanged()

    def test_upgraded_otherwise(self) -> None:
        code, out = self.mtactl("queue", "list", "--state", "hold")
        self.assertEqual(code, 0)
        self.assertIn("0S3MA0000000004", out)
        self.assertEqual(
            self.err.getvalue(), f"mtactl: upgraded spool {self.spool_path} to mta-spool/2\n"
        )
        self.assertEqual(self.marker(), "mta-spool/2")


class ExecutableTests(SynchronousTestCase):
    """The installed command, with the lock held by another real process."""

    def setUp(self) -> None:
        self.root = old_spool(self)
        self.mtactl = os.path.join(os.path.dirname(sys.executable), "mtactl")
        self.env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}

    def run_mtactl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.mtactl, *argv], capture_output=True, text=True,
                              env=self.env, timeout=60, check=False)  # fmt: skip

    def test_refused_then_done(self) -> None:
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from mta.spool.fs import SpoolLock; SpoolLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); sys.stdin.read()", self.root],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.addCleanup(holder.wait, 30)
        assert holder.stdin is not None
        assert holder.stdout is not None
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline(), "locked\n")
        result = self.run_mtactl("spool", "upgrade", "--spool", self.root)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn(f"in use by another mta process (PID {holder.pid})", result.stderr)
        self.assertEqual(upgrade.spool_format(self.root), "mta-spool/1")
        holder.stdin.close()
        holder.wait(30)
        result = self.run_mtactl("spool", "upgrade", "--spool", self.root)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, REPORT.format(root=self.root))
