"""End to end: traffic shaping against a receiver that starts rate-limiting.

A real mta process delivers a backlog of messages to a scripted receiver on
loopback (tests/e2e/ratesink.py) that takes the first messages, then answers
Gmail's C{421 4.7.28} rate limit for a few seconds, then takes everything
again.  The queue must lower the destination's rate within one round of
replies (the receiver sees far fewer attempts while it refuses), raise it
again step by step once deliveries succeed, and lose nothing: every message
is delivered exactly once and no sender gets a failure report.  Durations
are small ([shaping] hold_time 2 s, a step every 0.5 s, [shaping] max_rate
1200/min for a known starting rate) so that it all takes well under a
minute.  The figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import ssl
import tempfile
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, free_port, mtactl, wait_for

pytestmark = pytest.mark.e2e

LOGIN = "bulk@example.com"
PASSWORD = "shaping-test-password"
MESSAGES = 180
ACCEPT_FIRST = 40
REFUSE_FOR = 3.0
MAX_RATE = 20.0  # per second: [shaping] max_rate 1200/min
BIN = 1.0  # seconds per bin of the receiver's timeline


class ShapingEndToEnd(SynchronousTestCase):
    """A real daemon against a receiver that answers 421 4.7.28 for a while:
    the delivered rate drops within a round and climbs back, every message
    is delivered once and nothing is bounced."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-shaping-")
        cls.out = os.path.join(cls.tmp, "receiver")
        cls.receiver = Helper(
            ["tests/e2e/ratesink.py", cls.out, "--accept", str(ACCEPT_FIRST),
             "--refuse-for", str(REFUSE_FOR)],
            os.path.join(cls.tmp, "receiver.log"),
        )  # fmt: skip
        cls.reports = os.path.join(cls.tmp, "reports")
        cls.report_sink = Helper(
            ["tests/e2e/sink.py", cls.reports], os.path.join(cls.tmp, "reports.log")
        )
        cls.metrics_port = free_port()
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "routes": {
                    "example.test": f"[127.0.0.1]:{cls.receiver.port}",
                    "example.com": f"[127.0.0.1]:{cls.report_sink.port}",  # reports go here
                },
                "limits": {"daily_messages": 0},
                "queue": {
                    "minimal_backoff_time": 1,
                    "maximal_backoff_time": 2,
                    "maximal_queue_lifetime": 600,
                    "delay_warning_time": 0,
                },
                "delivery": {"destination_concurrency": 4},
                "shaping": {
                    "max_rate": MAX_RATE * 60,
                    "min_rate": 60,
                    "hold_time": 2,
                    "recovery_interval": 0.5,
                    "rate_step": 120,
                    "max_wait": 5,
                },
                "metrics": {"listen": [f"tcp:{cls.metrics_port}:interface=127.0.0.1"]},
            },
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.receiver.stop()
        cls.report_sink.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def submit_all(self) -> list[str]:
        """Submit the backlog over one session; returns the Message-IDs."""
        ids = []
        ctx = ssl.create_default_context(cafile=self.daemon.cafile)
        with smtplib.SMTP_SSL("localhost", self.daemon.tls_port, context=ctx, timeout=30) as s:
            s.login(LOGIN, PASSWORD)
            for n in range(MESSAGES):
                message_id = f"<shaping-{n}@example.com>"
                ids.append(message_id)
                s.sendmail(
                    LOGIN,
                    [f"user{n}@example.test"],
                    f"From: {LOGIN}\r\nTo: user{n}@example.test\r\nMessage-ID: {message_id}\r\n"
                    f"Subject: shaping {n}\r\n\r\nHello.\r\n",
                )
        return ids

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self.out, "events.jsonl"), encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def shaping(self) -> dict[str, Any]:
        result = mtactl(["queue", "shaping", "--json"], self.daemon.config)
        self.assertEqual(result.returncode, 0, result.stderr)
        return dict(json.loads(result.stdout))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def test_rate_drops_within_a_round_and_climbs_back(self) -> None:
        ids = self.submit_all()
        # While the receiver refuses: the destination is shaped, and says why.
        wait_for(lambda: any(not e["accepted"] for e in self.events()), 60, "refusals")
        shaped = wait_for(lambda: self.shaping()["destinations"], 10, "a shaped destination")
        [row] = shaped
        self.assertEqual(row["destination"], f"relay:[127.0.0.1]:{self.receiver.port}")
        self.assertEqual((row["reason"]["rule"], row["reason"]["provider"]),
                         ("gmail-rate-limited", "Gmail"))  # fmt: skip
        self.assertIn(
            "421 4.7.28 Gmail has detected an unusual rate of email", row["reason"]["reply"]
        )
        self.assertLess(row["concurrency"], 4)
        self.assertLess(row["rate_per_minute"], MAX_RATE * 60)
        metrics = self.metrics()
        self.assertIn('mta_shaping_decreases_total{rule="gmail-rate-limited"}', metrics)
        self.assertIn("mta_shaping_concurrency_limit{destination=", metrics)
        text = mtactl(["queue", "shaping"], self.daemon.config).stdout
        self.assertIn("by rule gmail-rate-limited (Gmail) for:", text)

        # Everything is delivered in the end, each message once.
        def delivered() -> Counter[str]:
            return Counter(e["id"] for e in self.events() if e["accepted"])

        wait_for(lambda: len(delivered()) == MESSAGES, 90, "every message delivered")
        counts = delivered()
        self.assertEqual(sorted(counts), sorted(ids))
        self.assertEqual(max(counts.values()), 1, "a message delivered twice")
        # Nobody got a report, nothing bounced or expired.
        time.sleep(1.0)
        self.assertFalse(os.path.isdir(self.reports) and os.listdir(self.reports))
        log = self.daemon.log()
        self.assertNotIn("status=bounced", log)
        self.assertNotIn("status=expired", log)
        self.assertIn("traffic shaping: concurrency 4 -> 2, rate 1200/min -> 600/min", log)
        self.assertIn("after 421 4.7.28 Gmail has detected an unusual rate of email", log)

        self.check_the_timeline(self.events())
        wait_for(lambda: "traffic shaping ended" in self.daemon.log(), 30, "the limits to end")
        self.assertEqual(self.shaping()["destinations"], [])

    def check_the_timeline(self, events: list[dict[str, Any]]) -> None:
        """The attempts the receiver saw, per second, before, during and after."""
        start = events[0]["t"]
        refusals = [e["t"] for e in events if not e["accepted"]]
        first_refusal, last_refusal = refusals[0], refusals[-1]
        before = [e for e in events if e["t"] < first_refusal]
        rate_before = len(before) / max(first_refusal - before[0]["t"], BIN)
        # "Within one round": the replies to what was in flight when the first
        # 421 came, then the lowered rate.  Count from half a second after it.
        during = [e for e in events if first_refusal + 0.5 <= e["t"] <= first_refusal + REFUSE_FOR]
        rate_during = len(during) / (REFUSE_FOR - 0.5)
        after = [e for e in events if e["t"] > last_refusal]
        bins = Counter(int((e["t"] - start) / BIN) for e in events)
        refused_bins = Counter(int((t - start) / BIN) for t in refusals)
        timeline = [
            f"{n * BIN:>4.0f}s {bins[n]:>3} attempts, {refused_bins[n]:>3} refused"
            for n in range(max(bins) + 1)
        ]
        print("\n".join(["", *timeline]))
        print(
            f"attempts/s before {rate_before:.1f}, during the refusals {rate_during:.1f}, "
            f"{len(refusals)} refusals in {last_refusal - first_refusal:.1f} s"
        )
        self.assertGreater(rate_before, 5.0)
        self.assertLess(rate_during, rate_before / 3)
        # After the refusals: the rate climbs back step by step.
        after_bins = [bins[n] for n in range(int((last_refusal - start) / BIN) + 1, max(bins) + 1)]
        print(f"accepted per second after the refusals: {after_bins}")
        self.assertGreaterEqual(len(after), MESSAGES - ACCEPT_FIRST - len(during) - 10)
        self.assertGreater(max(after_bins), 3 * max(after_bins[0], 1))
