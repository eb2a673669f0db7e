"""End to end: clients that end lines with LF, and what reaches the next hop.

A real mta (the default C{[limits] bare_newline = "normalize"}) delivers
to a sink process on loopback that reads DATA strictly: it ends DATA only
at CRLF.CRLF and undoes dot-stuffing, so a line of one dot that mta sent
unstuffed would end the message there and the rest would be taken for
commands.  Each test compares what the sink received with what the
client meant: the same lines, every one ending in CRLF.

The clients are those a user has: Python's smtplib handed
C{msg.as_bytes()} (LF line ends, sent unchanged), swaks with a file of
LF lines (both as it normally sends it, converted to CRLF, and with
C{--no-data-fixup}, which sends the file's LF as they are), and
mta-sendmail fed LF lines on standard input.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import subprocess
import tempfile
from email.message import EmailMessage

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import BIN, Daemon, Helper, at_sink

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
PASSWORD = "line-endings-password"
RCPT = "someone@example.test"

# Lines that test the dot-stuffing both ways: a line of one dot, lines
# that start with dots, and an LF form of a false end of data.
BODY_LINES = [
    "First line.",
    ".",
    ".starts with a dot",
    "..two dots",
    "",
    "after an empty line",
    "last line",
]


def lf_message(subject: str) -> bytes:
    """A whole message with LF line ends, Date and Message-ID included."""
    head = [
        f"From: App <{LOGIN}>",
        f"To: <{RCPT}>",
        f"Subject: {subject}",
        "Date: Tue, 24 Nov 2026 12:00:00 +0000",
        f"Message-ID: <{subject}@example.com>",
    ]
    return ("\n".join([*head, "", *BODY_LINES]) + "\n").encode()


def after_received(data: bytes) -> bytes:
    """A delivered message without the Received: field mta put first."""
    assert data.startswith(b"Received: "), data[:100]
    return data.partition(b";\r\n\t")[2].partition(b"\r\n")[2]


class LineEndingsEndToEnd(SynchronousTestCase):
    """Clients that end lines with LF (smtplib with as_bytes, swaks with and without its data fixup,
    mta-sendmail): with bare_newline = normalize the strict sink receives the lines the client
    meant, each ending in CRLF, a line of one dot included."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-lines-")
        cls.out = os.path.join(cls.tmp, "sink")
        cls.sink = Helper(["tests/e2e/sink.py", cls.out], os.path.join(cls.tmp, "sink.log"))
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {"routes": {"example.test": f"[127.0.0.1]:{cls.sink.port}"}},
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def delivered(self, subject: str) -> bytes:
        return at_sink(
            self.out, f"\r\nSubject: {subject}\r\n".encode(), 30, f"{subject!r} at the sink"
        )

    def test_smtplib_sendmail_as_bytes(self) -> None:
        """smtplib sends bytes as they are: LF line ends (it dot-stuffs the
        lines that start with a dot, and adds CRLF . CRLF after a last CRLF
        of its own, so the message gains one empty line)."""
        msg = EmailMessage()
        msg["From"] = f"App <{LOGIN}>"
        msg["To"] = RCPT
        msg["Subject"] = "smtplib-as-bytes"
        msg["Date"] = "Tue, 24 Nov 2026 12:00:00 +0000"
        msg["Message-ID"] = "<smtplib-as-bytes@example.com>"
        msg.set_content("\n".join(BODY_LINES) + "\n")
        data = msg.as_bytes()
        self.assertNotIn(b"\r", data)
        ctx = ssl.create_default_context(cafile=self.daemon.cafile)
        with smtplib.SMTP_SSL("localhost", self.daemon.tls_port, context=ctx, timeout=30) as s:
            s.login(LOGIN, PASSWORD)
            self.assertEqual(s.sendmail(LOGIN, [RCPT], data), {})
        got = after_received(self.delivered("smtplib-as-bytes"))
        self.assertEqual(got, data.replace(b"\n", b"\r\n") + b"\r\n")

    def swaks(self, subject: str, data: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
        path = os.path.join(self.tmp, f"{subject}.eml")
        with open(path, "wb") as f:
            f.write(data)
        swaks = shutil.which("swaks")
        self.assertIsNotNone(swaks, "swaks is not installed; run scripts/install-test-deps.sh")
        return subprocess.run(
            [
                str(swaks), "--server", "localhost", "--port", str(self.daemon.tls_port),
                "--tlsc", "--tls-verify", "--tls-ca-path", self.daemon.cafile,
                "--auth", "PLAIN", "--auth-user", LOGIN, "--auth-password", PASSWORD,
                "--from", LOGIN, "--to", RCPT, "--data", f"@{path}", *extra,
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def test_swaks_with_an_lf_file(self) -> None:
        """swaks as usually run: it turns the file's LF into CRLF itself (and
        puts a CRLF of its own before the final dot: one more empty line)."""
        data = lf_message("swaks-lf-file")
        result = self.swaks("swaks-lf-file", data)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("250 2.0.0 Ok: queued as", result.stdout)
        got = after_received(self.delivered("swaks-lf-file"))
        self.assertEqual(got, data.replace(b"\n", b"\r\n") + b"\r\n")

    def test_swaks_sending_the_lf_file_unchanged(self) -> None:
        """C{--no-data-fixup}: the file's LF lines go out as they are (swaks
        adds only a CRLF of its own).  A file ending CRLF "." ends the data;
        an LF "." would not (only CRLF . CRLF ends DATA), so the file a
        script makes for this has that one CRLF, and stuffs its dots."""
        stuffed = [("." + ln if ln.startswith(".") else ln) for ln in BODY_LINES]
        head = lf_message("swaks-raw-lf").partition(b"\n\n")[0]
        data = head + b"\n\n" + "\n".join(stuffed).encode() + b"\r\n."
        self.assertEqual(data.count(b"\r"), 1)
        result = self.swaks("swaks-raw-lf", data, "--no-data-fixup")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("250 2.0.0 Ok: queued as", result.stdout)
        got = after_received(self.delivered("swaks-raw-lf"))
        self.assertEqual(got, lf_message("swaks-raw-lf").replace(b"\n", b"\r\n"))

    def test_mta_sendmail_with_lf_input(self) -> None:
        data = lf_message("sendmail-lf")
        result = subprocess.run(
            [os.path.join(BIN, "mta-sendmail"), "--config", self.daemon.config, "-oi",
             "-f", LOGIN, RCPT],
            input=data, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        got = self.delivered("sendmail-lf")
        self.assertIn(b"(mta-sendmail, from user ", got)
        self.assertEqual(after_received(got), data.replace(b"\n", b"\r\n"))
