"""End to end: steering the queue of a running daemon, metrics, logs, mta-sendmail.

One mta process, one scripted sink for example.test (the recipients) and
example.com (the senders, who get the reports).  Retries are slow (10
minutes), so a message that was deferred stays deferred until a test acts
on it with the real C{mtactl}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from email import message_from_bytes, policy
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import BIN, Daemon, Helper, free_port, mtactl, wait_for

pytestmark = pytest.mark.e2e

LOGIN = "ops@example.com"
PASSWORD = "operations-test-password"


class OperationsEndToEnd(SynchronousTestCase):
    """The real mtactl against a running daemon: list, hold, release and flush; delete racing a
    delivery (delivered once) and a failing one; bounce with its report; a corrupt envelope set
    aside; mtactl's errors; /metrics, /health and the JSON log; mta-sendmail's message picked up
    at once."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-ops-")
        cls.script = os.path.join(cls.tmp, "script.json")
        cls.set_script({})
        cls.out = os.path.join(cls.tmp, "sink")
        cls.sink = Helper(
            ["tests/e2e/sink.py", cls.out, "--script", cls.script], os.path.join(cls.tmp, "s.log")
        )
        cls.metrics_port = free_port()
        cls.json_log = os.path.join(cls.tmp, "mta.jsonl")
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "routes": {
                    "example.test": f"[127.0.0.1]:{cls.sink.port}",
                    "example.com": f"[127.0.0.1]:{cls.sink.port}",
                },
                "queue": {"minimal_backoff_time": 600, "maximal_backoff_time": 600},
                "delivery": {"connection_cache_time": 0},
                "metrics": {"listen": [f"tcp:{cls.metrics_port}:interface=127.0.0.1"]},
                "log": {"json_file": cls.json_log},
            },
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def set_script(cls, script: dict[str, Any]) -> None:
        tmp = cls.script + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(script, f)
        os.replace(tmp, cls.script)

    def setUp(self) -> None:
        self.set_script({})

    # -- helpers -------------------------------------------------------------

    def submit(self, rcpt: str, subject: str) -> str:
        message = f"From: {LOGIN}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
        return self.daemon.submit(LOGIN, PASSWORD, message, [rcpt])

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return mtactl(args, self.daemon.config)

    def state(self, queue_id: str) -> str | None:
        for state in ("incoming", "deferred", "hold", "corrupt", "done", "redacted"):
            if queue_id in self.daemon.queued(state):
                return state
        return None

    def wait_state(self, queue_id: str, state: str | None) -> None:
        wait_for(lambda: self.state(queue_id) == state, 30, f"{queue_id} in {state}")

    def received(self, subject: str) -> list[bytes]:
        found = []
        for name in sorted(os.listdir(self.out)) if os.path.isdir(self.out) else []:
            if name.endswith(".eml"):
                with open(os.path.join(self.out, name), "rb") as f:
                    data = f.read()
                if f"Subject: {subject}".encode() in data:
                    found.append(data)
        return found

    def rcpt_attempts(self, rcpt: str) -> int:
        try:
            with open(os.path.join(self.out, "rcpt.log"), encoding="utf-8") as f:
                return sum(1 for line in f if f"<{rcpt}>" in line)
        except FileNotFoundError:
            return 0

    def deferred_message(self, rcpt: str, subject: str) -> str:
        """A message whose first attempt got 451 (and the retry is 10 minutes away)."""
        with open(self.script, encoding="utf-8") as f:
            script = json.load(f)
        script.setdefault("rcpt", {})[rcpt] = ["451 4.3.0 Try again later", "250 2.1.5 Ok"]
        self.set_script(script)
        queue_id = self.submit(rcpt, subject)
        self.wait_state(queue_id, "deferred")
        return queue_id

    def scrape(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    # -- tests ---------------------------------------------------------------

    def test_list_hold_release_flush(self) -> None:
        queue_id = self.deferred_message("later@example.test", "held then flushed")
        listed = self.ctl("queue", "list", "--state", "deferred", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        [row] = [r for r in json.loads(listed.stdout) if r["id"] == queue_id]
        self.assertEqual(row["recipients"][0]["reply"], "451 4.3.0 Try again later")
        self.assertIsNotNone(row["recipients"][0]["next_attempt"])
        text = self.ctl("queue", "list").stdout
        self.assertIn("later@example.test [deferred, 1 attempt, next ", text)

        held = self.ctl("queue", "hold", queue_id)
        self.assertEqual((held.returncode, held.stdout), (0, f"{queue_id}: put on hold\n"))
        self.assertEqual(self.state(queue_id), "hold")
        refused = self.ctl("queue", "flush", queue_id)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("on hold", refused.stderr)
        self.assertEqual(self.ctl("queue", "release", queue_id).returncode, 0)
        self.assertEqual(self.state(queue_id), "deferred")
        flushed = self.ctl("queue", "flush", queue_id)
        self.assertEqual((flushed.returncode, flushed.stdout), (0, f"{queue_id}: flushed\n"))
        self.wait_state(queue_id, "done")
        self.assertEqual(len(self.received("held then flushed")), 1)

    def test_delete_racing_a_delivery(self) -> None:
        """Deleted while the sink holds the end of data: delivered once, then gone."""
        self.set_script({"message_delay": 3})
        queue_id = self.submit("race@example.test", "delete race")
        wait_for(lambda: self.rcpt_attempts("race@example.test") == 1, 30, "delivery started")
        deleted = self.ctl("queue", "delete", queue_id)
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        self.assertIn("being delivered", deleted.stdout)
        self.wait_state(queue_id, None)
        self.set_script({})
        self.assertEqual(self.ctl("queue", "flush", "--all").returncode, 0)
        time.sleep(1)
        self.assertEqual(len(self.received("delete race")), 1)
        self.assertEqual(self.rcpt_attempts("race@example.test"), 1)
        self.assertIn(f"{queue_id}: removed by the mail administrator", self.daemon.log())

    def test_delete_racing_a_failing_delivery(self) -> None:
        self.set_script({"message_delay": 2, "message": ["451 4.3.0 Not now"]})
        queue_id = self.submit("race2@example.test", "delete race 2")
        wait_for(lambda: self.rcpt_attempts("race2@example.test") == 1, 30, "delivery started")
        self.assertEqual(self.ctl("queue", "delete", queue_id).returncode, 0)
        self.wait_state(queue_id, None)
        self.set_script({})
        self.ctl("queue", "flush", "--all")
        time.sleep(1)
        self.assertEqual(self.rcpt_attempts("race2@example.test"), 1, "retried after delete")
        self.assertEqual(self.received("delete race 2"), [])

    def test_bounce_sends_a_report(self) -> None:
        queue_id = self.deferred_message("gone@example.test", "bounced by hand")
        result = self.ctl("queue", "bounce", queue_id)
        self.assertEqual(result.stdout, f"{queue_id}: bounced to the sender\n")
        self.wait_state(queue_id, "done")
        reports = wait_for(lambda: self.received("Undelivered Mail Returned to Sender"), 30)
        mine = [r for r in reports if b"gone@example.test" in r]
        self.assertEqual(len(mine), 1)
        report = message_from_bytes(mine[0], policy=policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn(b"Status: 5.4.7", mine[0])
        self.assertIn("status=expired", self.daemon.log())

    def test_corrupt_envelope_is_set_aside(self) -> None:
        queue_id = self.deferred_message("corrupt@example.test", "corrupt envelope")
        path = os.path.join(self.daemon.spool, "deferred", queue_id)
        with open(path, "rb") as f:
            message = f.read().split(b'\n{"format":"mta-envelope/2"', 1)[0]
        with open(path, "wb") as f:
            f.write(message + b'\n{"format": "mta-envelope/2", "id": \n')
        self.assertEqual(self.ctl("queue", "flush", queue_id).returncode, 0)
        self.wait_state(queue_id, "corrupt")
        self.assertIn(f"{queue_id}: unreadable envelope, moved to corrupt/", self.daemon.log())
        listed = self.ctl("queue", "list", "--state", "corrupt")
        self.assertIn("unreadable envelope", listed.stdout)
        shown = self.ctl("queue", "show", queue_id)
        self.assertEqual(shown.returncode, 1)
        self.assertEqual(shown.stderr.count("\n"), 1, shown.stderr)
        self.assertNotIn("Traceback", shown.stderr)
        # The daemon keeps serving.
        other = self.submit("fine@example.test", "after the corrupt one")
        self.wait_state(other, "done")

    def test_mtactl_errors(self) -> None:
        for args, words in [
            (("queue", "delete", "0000000000Z0000"), "no message"),
            (("queue", "hold", "../../etc"), "not a queue ID"),
            (("queue", "release", "0000000000Z0000"), "no message"),
        ]:
            result = self.ctl(*args)
            self.assertEqual(result.returncode, 1, args)
            self.assertIn(words, result.stderr)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)

    def test_metrics_health_and_json_log(self) -> None:
        queue_id = self.submit("metrics@example.test", "counted")
        self.wait_state(queue_id, "done")
        status, text = self.scrape("/metrics")
        self.assertEqual(status, 200)
        values = {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        self.assertGreaterEqual(values['mta_deliveries_total{category="",status="sent"}'], 1)
        self.assertGreaterEqual(values['mta_connections_in_total{listener="submissions"}'], 1)
        self.assertGreaterEqual(values['mta_tls_sessions_in_total{protocol="TLSv1.3"}'], 1)
        self.assertGreaterEqual(values['mta_connections_out_total{tls="no"}'], 1)
        self.assertGreaterEqual(values["mta_messages_accepted_total"], 1)
        self.assertGreaterEqual(values["mta_submission_latency_seconds_count"], 1)
        self.assertIn('mta_queue_messages{state="deferred"}', values)
        self.assertIn('mta_queue_messages{state="hold"}', values)
        self.assertIn("mta_queue_oldest_message_age_seconds", values)
        status, body = self.scrape("/health")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["status"], "ok")
        self.assertEqual(self.scrape("/nothing")[0], 404)

        events = []
        with open(self.json_log, encoding="utf-8") as f:
            for line in f:
                events.append(json.loads(line))
        sent = [e for e in events if e.get("queue_id") == queue_id and e.get("status") == "sent"]
        self.assertEqual(len(sent), 1)
        self.assertEqual(sent[0]["recipient"], "metrics@example.test")
        queued = [e for e in events if e.get("qid") == queue_id and "(queued)" in e["log_format"]]
        self.assertEqual([(e["login"], e["n"]) for e in queued], [(LOGIN, 1)])

    def test_sendmail_is_picked_up_at_once(self) -> None:
        message = b"From: cron@example.com\nTo: local@example.test\nSubject: from cron\n\nDone.\n"
        result = subprocess.run(
            [os.path.join(BIN, "mta-sendmail"), "--config", self.daemon.config, "-t", "-oi",
             "-f", "cron@example.com"],
            input=message, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        [data] = wait_for(lambda: self.received("from cron"), 30, "delivery of the cron mail")
        self.assertIn(b"(mta-sendmail, from user ", data)
