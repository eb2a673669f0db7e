"""End to end: retries, bounces, blocklists and expiry with a scripted sink.

One mta process with a short schedule (backoff 1-2 s, lifetime 8 s).
Mail for example.test goes to sink 1, whose script answers per
recipient; mail for example.com (the senders' domain) goes to sink 2,
which therefore receives the delivery status notifications.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from email import message_from_bytes, policy
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, wait_for

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
PASSWORD = "retry-test-password"
LIFETIME = 8.0

SCRIPT = {
    "rcpt": {
        "greylist@example.test": ["451 4.7.1 Greylisted, please try again later", "250 2.1.5 Ok"],
        "nobody@example.test": [
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
        ],
        "listed@example.test": [
            "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
            "zen.spamhaus.org; https://www.spamhaus.org/query/ip/127.0.0.1"
        ],
        "never@example.test": ["451 4.3.0 Try again later"],
    }
}


class RetryEndToEnd(SynchronousTestCase):
    """Retries against a scripted sink on a short schedule: greylisting deferred then delivered, an
    unknown user bounced to the sender, a blocklist reply retried rather than bounced, and a
    recipient never accepted that expires with a failure report."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-retry-")
        script = os.path.join(cls.tmp, "script.json")
        with open(script, "w", encoding="utf-8") as f:
            json.dump(SCRIPT, f)
        cls.out1 = os.path.join(cls.tmp, "sink1")
        cls.out2 = os.path.join(cls.tmp, "sink2")
        cls.sink1 = Helper(
            ["tests/e2e/sink.py", cls.out1, "--script", script], os.path.join(cls.tmp, "s1.log")
        )
        cls.sink2 = Helper(["tests/e2e/sink.py", cls.out2], os.path.join(cls.tmp, "s2.log"))
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "routes": {
                    "example.test": f"[127.0.0.1]:{cls.sink1.port}",
                    "example.com": f"[127.0.0.1]:{cls.sink2.port}",
                },
                "queue": {
                    "minimal_backoff_time": 1,
                    "maximal_backoff_time": 2,
                    "maximal_queue_lifetime": LIFETIME,
                    "delay_warning_time": 0,
                    "blocklist_rest_time": 1,
                },
                "delivery": {"connection_cache_time": 0},
            },
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink1.stop()
        cls.sink2.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def submit(self, rcpt: str) -> str:
        message = f"From: {LOGIN}\r\nTo: {rcpt}\r\nSubject: retry test for {rcpt}\r\n\r\nHello.\r\n"
        return self.daemon.submit(LOGIN, PASSWORD, message, [rcpt])

    def envelope(self, queue_id: str) -> dict[str, Any]:
        return self.daemon.envelope(queue_id)

    def attempts_at_sink(self, rcpt: str) -> int:
        try:
            with open(os.path.join(self.out1, "rcpt.log"), encoding="utf-8") as f:
                return sum(1 for line in f if f"<{rcpt}>" in line)
        except FileNotFoundError:
            return 0

    def reports_for(self, rcpt: str) -> list[bytes]:
        """Reports that reached sink 2 about C{rcpt}."""
        if not os.path.isdir(self.out2):
            return []
        found = []
        for name in sorted(os.listdir(self.out2)):
            if name.endswith(".eml"):
                with open(os.path.join(self.out2, name), "rb") as f:
                    data = f.read()
                if f"Final-Recipient: rfc822; {rcpt}".encode() in data:
                    found.append(data)
        return found

    def test_greylisted_then_delivered(self) -> None:
        queue_id = self.submit("greylist@example.test")
        wait_for(lambda: queue_id in self.daemon.queued("done"), 20, "delivery after the retry")
        env = self.envelope(queue_id)
        [rcpt] = env["recipients"]
        self.assertEqual((rcpt["state"], rcpt["attempts"]), ("sent", 2))
        self.assertEqual(self.attempts_at_sink("greylist@example.test"), 2)
        log = self.daemon.log()
        self.assertIn(f"{queue_id}: to=<greylist@example.test>", log)
        self.assertIn("status=deferred (451 4.7.1 Greylisted", log)
        self.assertEqual(self.reports_for("greylist@example.test"), [])

    def test_unknown_user_bounces_to_the_sender(self) -> None:
        queue_id = self.submit("nobody@example.test")
        [report] = wait_for(lambda: self.reports_for("nobody@example.test"), 20, "a report")
        env = self.envelope(queue_id)
        self.assertEqual(env["recipients"][0]["state"], "failed")
        self.assertEqual(env["recipients"][0]["attempts"], 1)
        with open(os.path.join(self.out2, "rcpt.log"), encoding="utf-8") as f:
            self.assertIn(f"RCPT TO:<{LOGIN}>", f.read())
        parsed = message_from_bytes(report, policy=policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertIn("MAILER-DAEMON@localhost", str(parsed["From"]))
        # Unfold folded fields and wrapped lines before looking for the reply.
        text = " ".join(report.decode("utf-8", "replace").split())
        self.assertIn("Action: failed", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("Recipient address rejected: User unknown", text)
        # The report's own envelope sender is the null path.
        mails = []
        for name in os.listdir(self.out2):
            if name.endswith(".json"):
                with open(os.path.join(self.out2, name), encoding="utf-8") as f:
                    mails.append(json.load(f)["mail"])
        self.assertTrue(any(m.startswith("MAIL FROM:<>") for m in mails), mails)

    def test_blocklist_is_retried_not_bounced(self) -> None:
        queue_id = self.submit("listed@example.test")
        wait_for(lambda: self.attempts_at_sink("listed@example.test") >= 2, 20, "a second try")
        env = self.envelope(queue_id)
        [rcpt] = env["recipients"]
        self.assertIn(rcpt["state"], ("deferred", "pending"))
        self.assertEqual(rcpt["category"], "blocklist")
        self.assertEqual(self.reports_for("listed@example.test"), [])

    def test_never_accepted_expires_and_bounces(self) -> None:
        start = time.monotonic()
        queue_id = self.submit("never@example.test")
        [report] = wait_for(
            lambda: self.reports_for("never@example.test"), LIFETIME + 20, "the expiry report"
        )
        self.assertGreaterEqual(time.monotonic() - start, LIFETIME - 1)
        env = self.envelope(queue_id)
        [rcpt] = env["recipients"]
        self.assertEqual(rcpt["state"], "failed")
        self.assertGreaterEqual(rcpt["attempts"], 3)
        self.assertIn(b"Action: failed", report)
        self.assertIn(f"{queue_id}: to=<never@example.test>".encode(), self.daemon.log().encode())
        self.assertIn("status=expired", self.daemon.log())
