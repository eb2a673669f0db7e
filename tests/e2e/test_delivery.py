"""End to end delivery: a real mta process, a real DNS server and a sink on loopback.

The DNS server (tests/dnsserver.py) publishes C{example.test} with an MX
pointing at 127.0.0.1; the sink (tests/e2e/sink.py) listens there; the
daemon's MX port is the sink's port.  Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, wait_for

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
PASSWORD = "delivery-test-password"

ZONE = {
    "example.test": {"MX": [[10, "mx.example.test"]]},
    "mx.example.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [[0, "."]]},
}


def message_with_dots_and_8bit() -> bytes:
    """A message whose stored form has lone-dot lines at every 16 KiB boundary.

    FileSender reads 16384-octet chunks.  The body is 3-octet lines ".",
    and 16384 = 1 (mod 3), so of the boundaries at 16, 32 and 48 KiB one
    falls exactly on the start of a "." line whatever the length of the
    header section we prepend.  An 8-bit paragraph follows.
    """
    head = (
        f"From: App <{LOGIN}>\r\n"
        "To: someone@example.test\r\n"
        "Subject: dots and 8-bit\r\n"
        "Message-ID: <dots-8bit@example.com>\r\n"
        "Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode()
    body = b"start\r\n" + b".\r\n" * 22000 + b"..\r\n" + "Blåbærsyltetøy på brødskiva.\r\n".encode()
    return head + body


class DeliveryEndToEnd(SynchronousTestCase):
    """Submission to delivery through a real twistd: what reaches the sink is our Received: field
    and then the message exactly (BODY=8BITMIME and the DSN parameters passed on, 22,000 lone-dot
    lines across chunk boundaries), the message moves to done/ with a Postfix-shaped log line; a
    recipient whose domain has a null MX fails at once with 5.1.10."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-delivery-")
        zone = os.path.join(cls.tmp, "zone.json")
        with open(zone, "w", encoding="utf-8") as f:
            json.dump(ZONE, f)
        cls.out = os.path.join(cls.tmp, "sink")
        cls.dns = Helper(["tests/dnsserver.py", zone], os.path.join(cls.tmp, "dns.log"))
        cls.sink = Helper(["tests/e2e/sink.py", cls.out], os.path.join(cls.tmp, "sink.log"))
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "delivery": {
                    "dns_servers": ["127.0.0.1"],
                    "dns_port": cls.dns.port,
                    "port": cls.sink.port,
                    "ip_versions": ["ipv4"],
                    # The test's MX host is 127.0.0.1, refused by default.
                    "refuse_networks": [],
                },
                "routes": None,
            },
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink.stop()
        cls.dns.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def submit(self, data: bytes, rcpts: list[str], **options: Any) -> str:
        return self.daemon.submit(LOGIN, PASSWORD, data, rcpts, **options)

    def received(self, count: int) -> list[tuple[bytes, dict[str, Any]]]:
        def ready() -> list[str] | None:
            names = sorted(n for n in os.listdir(self.out) if n.endswith(".eml"))
            return names if len(names) >= count else None

        names = wait_for(ready, 30, f"{count} message(s) at the sink")
        out = []
        for name in names:
            with open(os.path.join(self.out, name), "rb") as f:
                data = f.read()
            with open(os.path.join(self.out, name[:-4] + ".json"), encoding="utf-8") as f:
                out.append((data, json.load(f)))
        return out

    def test_delivered_byte_identical(self) -> None:
        before = len([n for n in os.listdir(self.out) if n.endswith(".eml")])
        original = message_with_dots_and_8bit()
        queue_id = self.submit(
            original,
            ["someone@example.test"],
            mail_options=["BODY=8BITMIME"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;someone@example.test"],
        )
        data, envelope = self.received(before + 1)[before]
        # What arrives is our Received: field and then the message exactly.
        self.assertTrue(data.startswith(b"Received: from "), data[:100])
        end_of_received = re.search(rb"\r\n(?![ \t])", data).end()
        self.assertIn(f"id {queue_id}".encode(), data[:end_of_received])
        self.assertEqual(data[end_of_received:], original)
        self.assertIn("BODY=8BITMIME", envelope["mail"])
        self.assertEqual(envelope["mail"].split()[1], f"FROM:<{LOGIN}>")
        self.assertIn("NOTIFY=FAILURE,SUCCESS", envelope["rcpt"][0])
        # The lone-dot lines made it; some crossed a 16 KiB chunk boundary.
        self.assertEqual(data.split(b"\r\n").count(b"."), 22000)
        # The queue file moved to done/, and the log has a Postfix-shaped line.
        wait_for(lambda: queue_id in self.daemon.queued("done"), 10, "the message in done/")
        line = wait_for(
            lambda: next(
                (ln for ln in self.daemon.log().splitlines() if f"{queue_id}: to=<" in ln), None
            ),
            10,
            "the delivery log line",
        )
        self.assertIn("to=<someone@example.test>, relay=mx.example.test[127.0.0.1]:", line)
        self.assertIn("dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)", line)
        self.assertRegex(line, r"delay=[0-9.]+, delays=[0-9.]+/[0-9.]+/[0-9.]+/[0-9.]+")

    def test_null_mx_bounces_at_once(self) -> None:
        queue_id = self.submit(
            f"From: {LOGIN}\r\nSubject: x\r\n\r\nhello\r\n".encode(), ["user@nullmx.test"]
        )
        wait_for(lambda: queue_id in self.daemon.queued("done"), 20, "the message in done/")
        env = self.daemon.envelope(queue_id)
        [rcpt] = env["recipients"]
        self.assertEqual((rcpt["state"], rcpt["status"]), ("failed", "5.1.10"))
