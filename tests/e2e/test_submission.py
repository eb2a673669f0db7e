"""End to end: a real mta process, real clients (smtplib, swaks, Nodemailer)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mta.spool.format import from_json
from tests.e2e.daemon import REPO, Daemon, mtactl, unfinished

pytestmark = pytest.mark.e2e

LOGIN = "your-username@your-domain.com"
PASSWORD = "your-password-123"
PLAIN = base64.b64encode(f"\0{LOGIN}\0{PASSWORD}".encode()).decode()
NODE_DIR = os.path.join(REPO, "tests", "e2e", "node")


def seed_message(sender: str = LOGIN, to: str = "recipient@example.com") -> MIMEMultipart:
    """The message of the seed's smtplib example."""
    message = MIMEMultipart("alternative")
    message["Subject"] = "Hello from Forward Email"
    message["From"] = sender
    message["To"] = to
    message.attach(MIMEText("Hello world! This is a test email sent using Python.", "plain"))
    message.attach(MIMEText("<html><body><b>Hello world!</b></body></html>", "html"))
    return message


class DaemonTestCase(SynchronousTestCase):
    """One daemon (message_size 200000, a user with an alias) for every test of the class, and an
    implicit-TLS smtplib client for it."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-e2e-")
        cls.daemon = Daemon(cls.tmp, {"limits": {"message_size": 200_000}})
        cls.daemon.add_user(LOGIN, PASSWORD, "--alias", "sales@your-domain.com")
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.daemon.cafile)

    def smtps(self) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL(
            "localhost", self.daemon.tls_port, context=self.context(), timeout=30
        )


class SeedClientTests(DaemonTestCase):
    """The seed's clients unchanged but for host, port and CA: smtplib SMTP_SSL on 465 and STARTTLS
    on 587, swaks, Nodemailer with secure true and with STARTTLS, and what Nodemailer reports for
    a wrong password and a From mismatch."""

    def test_smtplib_ssl_as_in_the_seed(self) -> None:
        before = set(self.daemon.queued())
        server = self.smtps()
        server.login(LOGIN, PASSWORD)
        refused = server.sendmail(LOGIN, "recipient@example.com", seed_message().as_string())
        reply = server.noop()
        server.quit()
        self.assertEqual(refused, {})
        self.assertEqual(reply[0], 250)
        [queue_id] = set(self.daemon.queued()) - before
        env = from_json(self.daemon.envelope(queue_id))
        self.assertEqual(env.sender, LOGIN)
        self.assertEqual([r.address for r in env.recipients], ["recipient@example.com"])
        self.assertEqual(env.auth_user, LOGIN)
        stored = self.daemon.read(queue_id)
        self.assertTrue(stored.startswith(b"Received: from "))
        self.assertIn(b"Subject: Hello from Forward Email\r\n", stored)
        self.assertIn(b"Message-ID: <", stored)

    def test_starttls_on_587(self) -> None:
        before = set(self.daemon.queued())
        with smtplib.SMTP("localhost", self.daemon.plain_port, timeout=30) as s:
            s.starttls(context=self.context())
            s.login(LOGIN, PASSWORD)
            s.send_message(seed_message("sales@your-domain.com"))
        self.assertEqual(len(set(self.daemon.queued()) - before), 1)

    def test_swaks(self) -> None:
        swaks = shutil.which("swaks")
        self.assertIsNotNone(swaks, "swaks is not installed; run the README's test command")
        before = set(self.daemon.queued())
        result = subprocess.run(
            [
                str(swaks), "--server", "localhost", "--port", str(self.daemon.tls_port),
                "--tlsc", "--tls-verify", "--tls-ca-path", self.daemon.cafile,
                "--auth", "LOGIN", "--auth-user", LOGIN, "--auth-password", PASSWORD,
                "--from", LOGIN, "--to", "someone@example.net",
                "--header", f"From: {LOGIN}",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("250 2.0.0 Ok: queued as", result.stdout)
        self.assertEqual(len(set(self.daemon.queued()) - before), 1)

    def node(self, port: int, secure: bool, sender: str = LOGIN, password: str = PASSWORD) -> dict:
        node = shutil.which("node")
        self.assertIsNotNone(node, "node is not installed")
        self.assertTrue(
            os.path.isdir(os.path.join(NODE_DIR, "node_modules", "nodemailer")),
            "nodemailer is not installed; run the README's test command",
        )
        env = dict(
            os.environ,
            SMTP_HOST="localhost", SMTP_PORT=str(port), SMTP_SECURE="true" if secure else "false",
            SMTP_USER=LOGIN, SMTP_PASS=password, SMTP_CA=self.daemon.cafile,
            MAIL_FROM=sender, MAIL_TO="recipient@example.com",
        )  # fmt: skip
        result = subprocess.run(
            [str(node), "send.js"], cwd=NODE_DIR, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def test_nodemailer_secure_465(self) -> None:
        result = self.node(self.daemon.tls_port, secure=True)
        self.assertTrue(result["ok"], result)
        self.assertIn("250 2.0.0 Ok: queued as", result["response"])

    def test_nodemailer_starttls_587(self) -> None:
        result = self.node(self.daemon.plain_port, secure=False)
        self.assertTrue(result["ok"], result)

    def test_nodemailer_wrong_password(self) -> None:
        result = self.node(self.daemon.tls_port, secure=True, password="wrong-password")
        self.assertFalse(result["ok"])
        self.assertEqual(result["responseCode"], 535)
        self.assertIn("wrong username or password", result["response"])

    def test_nodemailer_from_mismatch(self) -> None:
        result = self.node(self.daemon.tls_port, secure=True, sender="ceo@other.example")
        self.assertFalse(result["ok"])
        self.assertEqual(result["responseCode"], 550)
        self.assertIn("make sure your From address matches", result["response"])


class NegativeTests(DaemonTestCase):
    """What a real client is told when it gets things wrong: wrong password, AUTH before TLS, From
    header or envelope sender not the login's, oversize, over 1,000 recipients, bare LF (stored
    with CRLF), an over-long line, relay without AUTH, HTTP on the submission port."""

    def test_wrong_password(self) -> None:
        with self.smtps() as s, self.assertRaises(smtplib.SMTPAuthenticationError) as e:
            s.login(LOGIN, "not-the-password")
        self.assertEqual(e.exception.smtp_code, 535)

    def test_auth_before_tls(self) -> None:
        with smtplib.SMTP("localhost", self.daemon.plain_port, timeout=30) as s:
            s.ehlo()
            self.assertFalse(s.has_extn("auth"))
            code, text = s.docmd("AUTH", f"PLAIN {PLAIN}")
        self.assertEqual(code, 538)
        self.assertTrue(text.startswith(b"5.7.11"))

    def test_from_header_mismatch(self) -> None:
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            with self.assertRaises(smtplib.SMTPDataError) as e:
                s.sendmail(
                    LOGIN, ["x@example.net"], seed_message("boss@elsewhere.example").as_string()
                )
        self.assertEqual(e.exception.smtp_code, 550)
        self.assertIn(b"5.7.1", e.exception.smtp_error)

    def test_envelope_sender_mismatch(self) -> None:
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("boss@elsewhere.example", ["x@example.net"], seed_message().as_string())
        self.assertEqual(e.exception.smtp_code, 550)

    def test_oversize(self) -> None:
        big = seed_message()
        big.attach(MIMEText(("x" * 70 + "\n") * 3600, "plain"))
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            self.assertIn("size", s.esmtp_features)
            self.assertEqual(s.esmtp_features["size"], "200000")
            # smtplib sends SIZE= itself, so the refusal comes at MAIL.
            with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                s.sendmail(LOGIN, ["x@example.net"], big.as_string())
            self.assertEqual(e.exception.smtp_code, 552)
            # Without SIZE=, the message is read and refused after DATA.
            s.mail(LOGIN)
            s.rcpt("x@example.net")
            code, text = s.data(big.as_string())
        self.assertEqual(code, 552)
        self.assertTrue(text.startswith(b"5.3.4"))

    def test_too_many_recipients(self) -> None:
        """1,000 recipients per message by default; smtplib reports the rest."""
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            refused = s.sendmail(
                LOGIN, [f"r{i}@example.net" for i in range(1002)], seed_message().as_string()
            )
        self.assertEqual(sorted(refused), ["r1000@example.net", "r1001@example.net"])
        self.assertEqual(refused["r1000@example.net"][0], 452)
        self.assertTrue(refused["r1000@example.net"][1].startswith(b"4.5.3"))

    def test_bare_lf(self) -> None:
        """smtplib sends bytes unchanged, bare LF included: stored with CRLF."""
        before = set(self.daemon.queued())
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            body = seed_message().as_bytes().replace(b"\r\n", b"\n")
            self.assertEqual(s.sendmail(LOGIN, ["x@example.net"], body), {})
        [queue_id] = set(self.daemon.queued()) - before
        stored = self.daemon.read(queue_id)
        self.assertNotIn(b"\n", stored.replace(b"\r\n", b""))
        # Message-ID: and Date: are added at the end of the header section.
        head, _, rest = body.replace(b"\n", b"\r\n").partition(b"\r\n\r\n")
        self.assertIn(head + b"\r\nMessage-ID: <", stored)
        self.assertTrue(stored.endswith(b"\r\n\r\n" + rest + b"\r\n"), stored[-200:])

    def test_line_too_long(self) -> None:
        with self.smtps() as s:
            s.login(LOGIN, PASSWORD)
            code, _ = s.docmd("NOOP " + "x" * 600)
            self.assertEqual(code, 500)
            s.mail(LOGIN)
            s.rcpt("x@example.net")
            code, _ = s.data(seed_message().as_string() + "y" * 1200 + "\r\n")
        self.assertEqual(code, 550)

    def test_no_relay_without_auth(self) -> None:
        with self.smtps() as s:
            s.ehlo()
            for sender in ("", LOGIN, "anyone@example.org"):
                code, _ = s.docmd(f"MAIL FROM:<{sender}>")
                self.assertEqual(code, 530)
            code, _ = s.docmd("RCPT TO:<victim%elsewhere.example@example.net>")
            self.assertEqual(code, 503)

    def test_http_on_submission_port(self) -> None:
        with socket.create_connection(("127.0.0.1", self.daemon.plain_port), timeout=10) as raw:
            raw.recv(1024)
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = raw.recv(1024)
        self.assertTrue(reply.startswith(b"421 "))


class DurabilityTests(SynchronousTestCase):
    """kill -9 during a session: the message that got 250 is still queued after a restart (through
    python -m twisted), and the half-received one is removed from tmp/."""

    def test_kill_9_and_restart_keeps_the_message(self) -> None:
        """A message that got 250 survives SIGKILL; stale temp files are cleaned."""
        d = Daemon(self.mktemp())
        d.add_user(LOGIN, PASSWORD)
        d.start("twistd")
        try:
            with smtplib.SMTP_SSL(
                "localhost", d.tls_port, context=ssl.create_default_context(cafile=d.cafile)
            ) as s:
                s.login(LOGIN, PASSWORD)
                s.sendmail(LOGIN, ["a@example.net", "b@example.org"], seed_message().as_string())
            # A message caught mid-DATA when the process dies.
            half = ssl.create_default_context(cafile=d.cafile).wrap_socket(
                socket.create_connection(("127.0.0.1", d.tls_port)), server_hostname="localhost"
            )
            replies = half.makefile("rb")
            replies.readline()
            for line in ("EHLO x", f"AUTH PLAIN {PLAIN}", f"MAIL FROM:<{LOGIN}>",
                         "RCPT TO:<c@example.net>", "DATA"):  # fmt: skip
                half.sendall(line.encode() + b"\r\n")
                while (reply := replies.readline())[3:4] != b" ":
                    pass
            self.assertTrue(reply.startswith(b"354"), reply)
            # Large enough to be written to tmp/ as it arrives (smaller ones
            # stay in memory until the end of data).
            body = b"partial body line\r\n" * 20_000
            half.sendall(f"From: {LOGIN}\r\nSubject: half\r\n\r\n".encode() + body)
            [queued] = d.queued()
            deadline = time.monotonic() + 10
            while not unfinished(d.spool) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(len(unfinished(d.spool)), 1, "the half-received message is in tmp/")
        finally:
            d.kill()
        half.close()
        self.assertEqual(d.process.returncode, -9)
        d.start("python -m twisted")
        try:
            self.assertEqual(d.queued(), [queued])
            self.assertEqual(os.listdir(os.path.join(d.spool, "tmp")), [], "spares too")
            listing = mtactl(["queue", "list", "--json"], d.config)
            self.assertEqual(listing.returncode, 0, listing.stderr)
            [row] = json.loads(listing.stdout)
            self.assertEqual(row["id"], queued)
            self.assertEqual(
                [r["address"] for r in row["recipients"]], ["a@example.net", "b@example.org"]
            )
        finally:
            # twist re-raises the SIGTERM it was stopped with, twistd exits 0.
            self.assertIn(d.stop(), (0, -15))


class StartupErrorTests(SynchronousTestCase):
    """Start-up that cannot work stops with exit status 1 and one 'mta: error:' line naming the file
    and key, no traceback: a bad value, too few recipients allowed, an unknown key, a port in
    use, a missing certificate, a spool another daemon holds."""

    def run_daemon(self, d: Daemon, runner: str = "twistd") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            d.command(runner), cwd=d.dir, capture_output=True, text=True, timeout=60, check=False
        )

    def assertOneLineError(self, result: subprocess.CompletedProcess[str], *words: str) -> None:
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mta: error:")]
        self.assertEqual(len(lines), 1, result.stderr)
        for word in words:
            self.assertIn(word, lines[0])

    def test_bad_value(self) -> None:
        d = Daemon(self.mktemp(), {"limits": {"recipients": "many"}})
        self.assertOneLineError(self.run_daemon(d), "mta.toml", "[limits] recipients", "integer")

    def test_too_few_recipients_allowed(self) -> None:
        """Below RFC 5321's minimum of 100 recipients the daemon does not start."""
        d = Daemon(self.mktemp(), {"limits": {"recipients": 50}})
        self.assertOneLineError(
            self.run_daemon(d), "[limits] recipients", "at least 100", "RFC 5321", "got 50"
        )

    def test_unknown_key(self) -> None:
        d = Daemon(self.mktemp(), {"limits": {"recipeints": 5}})
        self.assertOneLineError(self.run_daemon(d, "twist"), "unknown key", "recipeints")

    def test_port_in_use(self) -> None:
        d = Daemon(self.mktemp())
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", d.tls_port))
            busy.listen(1)
            self.assertOneLineError(self.run_daemon(d), "cannot listen", str(d.tls_port))

    def test_missing_certificate(self) -> None:
        d = Daemon(self.mktemp(), {"tls": {"certificate": "nope.pem", "key": "nope.key"}})
        self.assertOneLineError(self.run_daemon(d), "[tls] certificate", "nope.pem")

    def test_spool_in_use(self) -> None:
        d = Daemon(self.mktemp())
        d.start()
        try:
            other = Daemon(d.dir)
            with open(other.config, "w") as f, open(d.config) as g:
                f.write(g.read().replace(str(d.tls_port), str(other.tls_port)).replace(
                    str(d.plain_port), str(other.plain_port)))  # fmt: skip
            self.assertOneLineError(self.run_daemon(other), "in use")
        finally:
            d.stop()
