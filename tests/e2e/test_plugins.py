"""End to end with every plugin on: a real mta, clamd, spamd, DNS server and sink.

The DKIM keys are made with the real C{mtactl dkim keygen}; the TXT
records it prints are served by the loopback DNS server, and each message
that reaches the sink is verified with dkimpy against them.  The sink
offers no 8BITMIME, so an 8-bit message is converted to quoted-printable
on the way, and its signature (made at delivery) must still verify.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import smtplib
import ssl
import tempfile
from typing import Any

import dkim
import dns.resolver
import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, at_sink, mtactl, wait_for
from tests.scanners import EICAR, EICAR_NAME, GTUBE, Clamd, Spamd
from tests.test_dkim import zone_strings

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
LIMITED = "limited@example.com"
PASSWORD = "plugins-test-password"


def headers(extra: str = "") -> str:
    return (
        f"From: App <{LOGIN}>\r\nTo: someone@example.test\r\nSubject: plugins\r\n"
        f"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n{extra}"
    )


def undated(extra: str = "") -> str:
    """Headers without Date: (the server adds it): SpamAssassin's score of a
    message then does not depend on how long ago a fixed date was."""
    return f"From: App <{LOGIN}>\r\nTo: someone@example.test\r\nSubject: offer\r\n{extra}"


class PluginsEndToEnd(SynchronousTestCase):
    """Every plugin on, with real clamd and spamd: a clean message is delivered DKIM-signed (also
    after 8BITMIME conversion) and verifies against the keys mtactl made; spam scores reach the
    delivered header and forged X-Spam fields are removed, scores between mark and reject are
    flagged; EICAR and GTUBE are refused; start-up pings both daemons; the daily limit refuses
    the next message."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-plugins-")
        cls.clamd, cls.spamd = Clamd(), Spamd()
        cls.clamd.start()
        cls.spamd.start()
        keys = os.path.join(cls.tmp, "keys")
        keygen_config = os.path.join(cls.tmp, "keygen.toml")
        with open(keygen_config, "w") as f:
            f.write(f'[dkim]\nkeys_dir = "{keys}"\n')
        zone: dict[str, Any] = {
            "example.test": {"MX": [[10, "mx.example.test"]]},
            "mx.example.test": {"A": ["127.0.0.1"]},
        }
        for kind in ("rsa", "ed25519"):
            result = mtactl(
                ["dkim", "keygen", "example.com", "--type", kind, "--selector", f"{kind}1"],
                keygen_config,
            )
            assert result.returncode == 0, result.stderr
            name, strings = zone_strings(result.stdout.splitlines()[-1])
            zone[name] = {"TXT": [strings]}
        zone_file = os.path.join(cls.tmp, "zone.json")
        with open(zone_file, "w", encoding="utf-8") as f:
            json.dump(zone, f)
        cls.out = os.path.join(cls.tmp, "sink")
        script = os.path.join(cls.tmp, "sink.json")
        with open(script, "w", encoding="utf-8") as f:
            json.dump({"extensions": ["PIPELINING", "DSN"]}, f)  # no 8BITMIME
        cls.dns = Helper(["tests/dnsserver.py", zone_file], os.path.join(cls.tmp, "dns.log"))
        cls.sink = Helper(
            ["tests/e2e/sink.py", cls.out, "--script", script], os.path.join(cls.tmp, "sink.log")
        )
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "delivery": {
                    "dns_servers": ["127.0.0.1"],
                    "dns_port": cls.dns.port,
                    "port": cls.sink.port,
                    "ip_versions": ["ipv4"],
                    "refuse_networks": [],
                },
                "routes": None,
                "dkim": {"keys_dir": keys},
            },
        )
        with open(cls.daemon.config, "a", encoding="utf-8") as f:
            f.write(
                '[[plugins]]\nname = "clamd"\n[plugins.options]\n'
                f'address = "{cls.clamd.unix_address}"\n\n'
                '[[plugins]]\nname = "spamd"\ntimeout = 60\n[plugins.options]\n'
                f'address = "{cls.spamd.address}"\nmark_score = 2.0\n\n'
                '[[plugins]]\nname = "dkim"\n'
            )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.add_user(LIMITED, PASSWORD, "--daily-limit", "1")
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink.stop()
        cls.dns.stop()
        cls.clamd.stop()
        cls.spamd.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def connect(self) -> smtplib.SMTP_SSL:
        ctx = ssl.create_default_context(cafile=self.daemon.cafile)
        return smtplib.SMTP_SSL("localhost", self.daemon.tls_port, context=ctx, timeout=60)

    def submit(self, data: bytes, login: str = LOGIN) -> tuple[int, str]:
        with self.connect() as s:
            s.login(login, PASSWORD)
            code, text = s.mail(login)
            if code != 250:
                return code, text.decode()
            s.rcpt("someone@example.test")
            code, text = s.data(data)
            return code, text.decode()

    def sink_count(self) -> int:
        return (
            len([n for n in os.listdir(self.out) if n.endswith(".eml")])
            if os.path.isdir(self.out)
            else 0
        )

    def delivered(self, queue_id: str) -> bytes:
        return at_sink(self.out, f"id {queue_id}".encode(), 60, f"{queue_id} at the sink")

    def verify(self, data: bytes) -> list[bool]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.dns.port

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
            return b"".join(b"".join(r.strings) for r in answer)

        d = dkim.DKIM(data)
        count = len(re.findall(rb"^DKIM-Signature:", data, re.M | re.I))
        self.assertEqual(count, 2, data[:2000])
        results = []
        for i in range(count):
            try:
                results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
            except dkim.ValidationError:
                results.append(False)
        return results

    def test_clean_message_is_delivered_signed(self) -> None:
        code, text = self.submit(f"{headers()}\r\nHello, a clean message.\r\n".encode())
        self.assertEqual(code, 250, text)
        data = self.delivered(text.rpartition(" ")[2])
        self.assertTrue(data.startswith(b"DKIM-Signature: "), data[:200])
        self.assertEqual(self.verify(data), [True, True])

    def test_8bit_message_converted_on_the_way_still_verifies(self) -> None:
        body = "Blåbærsyltetøy på brødskiva.\r\n".encode()
        extra = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        extra += "Content-Transfer-Encoding: 8bit\r\n"
        code, text = self.submit(f"{headers(extra)}\r\n".encode() + body)
        self.assertEqual(code, 250, text)
        data = self.delivered(text.rpartition(" ")[2])
        self.assertTrue(data.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", data)
        self.assertEqual(self.verify(data), [True, True])

    def spam_fields(self, data: bytes) -> dict[str, list[str]]:
        """The X-Spam-* fields of a delivered message's header section, unfolded."""
        head = data.partition(b"\r\n\r\n")[0].decode()
        found: dict[str, list[str]] = {}
        for raw in re.split(r"\r\n(?![ \t])", head):
            name, _, value = raw.partition(":")
            if name.lower().startswith("x-spam-"):
                found.setdefault(name, []).append(
                    value.replace(",\r\n\t", ",").replace("\r\n\t", " ").strip()
                )
        return found

    def test_spam_score_on_delivered_mail_and_forged_fields_removed(self) -> None:
        """A message that SpamAssassin scores above 0 and below mark_score is
        delivered with the score, the rules and the checker version; the
        clean verdict the client wrote itself is gone."""
        forged = (
            "X-Spam-Status: No, score=-50.0 required=5.0 tests=FORGED\r\n"
            "X-Spam-Flag: NO\r\nx-spam-score: -50\r\nX-Spam-Checker-Version: none\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html\r\n"
        )
        body = b"<html><body><p>Hello <b>there</b></p></body></html>\r\n"
        code, text = self.submit(f"{undated(forged)}\r\n".encode() + body)
        self.assertEqual(code, 250, text)
        data = self.delivered(text.rpartition(" ")[2])
        fields = self.spam_fields(data)
        self.assertNotIn(b"FORGED", data)
        self.assertNotIn(b"-50", data)
        self.assertEqual(
            sorted(fields), ["X-Spam-Checker-Version", "X-Spam-Score", "X-Spam-Status"], fields
        )
        [score] = fields["X-Spam-Score"]
        self.assertGreater(float(score), 0)
        self.assertLess(float(score), 2.0)
        [status] = fields["X-Spam-Status"]
        self.assertRegex(
            status,
            rf"^No, score={re.escape(score)} required=2\.0 tests=\S*MIME_HTML_ONLY\S* "
            r"autolearn=\w+ autolearn_force=no version=",
        )
        self.assertTrue(fields["X-Spam-Checker-Version"][0].startswith("SpamAssassin "))
        # The fields go in front of the signatures' own headers; both still verify.
        self.assertEqual(self.verify(data), [True, True])

    def test_spam_between_mark_and_reject_is_flagged(self) -> None:
        body = (
            b"<html><body><p>Click here to claim your FREE prize now!!! 100% guaranteed, "
            b"act now, limited time offer.</p></body></html>\r\n"
        )
        forged = undated("X-Spam-Flag: NO\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n")
        code, text = self.submit(f"{forged}\r\n".encode() + body)
        self.assertEqual(code, 250, text)
        fields = self.spam_fields(self.delivered(text.rpartition(" ")[2]))
        self.assertEqual(fields["X-Spam-Flag"], ["YES"])
        [score] = fields["X-Spam-Score"]
        self.assertGreaterEqual(float(score), 2.0)
        self.assertLess(float(score), 5.0)
        self.assertTrue(fields["X-Spam-Status"][0].startswith(f"Yes, score={score} required=2.0"))

    def test_eicar_is_refused(self) -> None:
        encoded = base64.b64encode(EICAR).decode()
        message = (
            f"{headers('MIME-Version: 1.0')}\r\n"
            "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            "--B\r\nContent-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment; filename=eicar.com\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--B--\r\n"
        ).encode()
        before = self.daemon.queued("incoming", "active", "deferred", "done")
        code, text = self.submit(message)
        self.assertEqual(code, 554, text)
        self.assertIn("5.7.1", text)
        self.assertIn(EICAR_NAME, text)
        self.assertEqual(self.daemon.queued("incoming", "active", "deferred", "done"), before)

    def test_gtube_is_refused(self) -> None:
        code, text = self.submit(f"{headers()}\r\n".encode() + GTUBE + b"\r\n")
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.7.1 Message refused as spam"), text)

    def test_startup_pings_the_daemons(self) -> None:
        spamd_line = f"spamd at {self.spamd.address} answers PING"

        def pinged() -> str | None:
            log = self.daemon.log()
            return log if spamd_line in log else None

        log = wait_for(pinged, 30, "the start-up PINGs in the log")
        self.assertIn(f"clamd at {self.clamd.unix_address} answers PING", log)
        self.assertIn(f"spamd at {self.spamd.address} answers PING", log)
        self.assertNotIn("Traceback", log)

    def test_over_the_daily_limit(self) -> None:
        message = f"From: {LIMITED}\r\nTo: someone@example.test\r\nSubject: one\r\n\r\nhi\r\n"
        self.assertEqual(self.submit(message.encode(), LIMITED)[0], 250)
        code, text = self.submit(message.encode(), LIMITED)
        self.assertEqual(code, 451, text)
        self.assertIn("4.7.1 Daily sending limit of 1 messages reached", text)
