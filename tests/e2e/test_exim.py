"""End to end with a real MTA as the client: Exim relays into mta with BDAT.

Two private Exims (tests/exim.py), each on its own loopback port, take a
message from smtplib and relay it to mta as their smarthost, logging in
with AUTH PLAIN after TLS: one with STARTTLS on mta's submission
listener, one with implicit TLS on the submissions listener.  Exim's smtp
transport sends the message with BDAT because mta offers CHUNKING
(RFC 3030); both logs show it (mta counts the BDAT commands of the
session, Exim marks the delivery with K).  mta then delivers to a sink
that reads DATA strictly, and the message must arrive whole: lines that
start with a dot kept (BDAT is not dot-stuffed, but mta's DATA to the
sink is), 8-bit text untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, at_sink, wait_for
from tests.exim import Exim

pytestmark = pytest.mark.e2e

LOGIN = "relay@example.com"
PASSWORD = "exim-relay-password"
RCPT = "someone@example.test"


def message(subject: str, body: bytes) -> bytes:
    head = (
        f"From: Relay <{LOGIN}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.com>\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + body


BODY = (
    "First line.\r\n.\r\n.starts with a dot\r\n..two dots\r\n"
    "Blåbærsyltetøy på brødskiva.\r\n\r\nlast line\r\n"
).encode()


class EximRelayEndToEnd(SynchronousTestCase):
    """Exim as the submitting client: it relays with BDAT over STARTTLS and over implicit TLS, also
    a large message in several chunks, and mta delivers each whole (lines starting with a dot,
    8-bit text) to a strict sink; both logs show the chunks."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-exim-e2e-")
        cls.out = os.path.join(cls.tmp, "sink")
        cls.sink = Helper(["tests/e2e/sink.py", cls.out], os.path.join(cls.tmp, "sink.log"))
        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {"routes": {"example.test": f"[127.0.0.1]:{cls.sink.port}"}},
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()
        cls.exims: dict[str, Exim] = {}
        try:
            for name, port, implicit in (
                ("starttls", cls.daemon.plain_port, False),
                ("smtps", cls.daemon.tls_port, True),
            ):
                exim = Exim(
                    mta_port=port,
                    implicit_tls=implicit,
                    cafile=cls.daemon.cafile,
                    login=LOGIN,
                    password=PASSWORD,
                )
                cls.exims[name] = exim
                exim.start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        for exim in cls.exims.values():
            exim.stop()
        cls.daemon.stop()
        cls.sink.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def delivered(self, subject: str) -> bytes:
        def diagnose() -> str:
            return "\n".join(e.mainlog for e in self.exims.values()) + self.daemon.log()[-3000:]

        try:
            return at_sink(
                self.out, f"\r\nSubject: {subject}\r\n".encode(), 60, f"{subject!r} at the sink"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{diagnose()}") from None

    def relay(self, name: str, subject: str, body: bytes = BODY) -> bytes:
        """Hand a message to one Exim; return what reached the sink via mta.

        Waits for the end of Exim's session with mta too (its line is then
        C{self.session}), so that no test sees the session of another."""
        before = len(self.sessions_with_bdat())
        data = message(subject, body)
        with smtplib.SMTP("127.0.0.1", self.exims[name].port, timeout=60) as s:
            self.assertEqual(s.sendmail(LOGIN, [RCPT], data), {})
        got = self.delivered(subject)
        # mta's Received: (for Exim's session), then Exim's, then the message.
        self.assertTrue(got.startswith(b"Received: from exim.test ([127.0.0.1])"), got[:200])
        self.assertIn(b"by localhost (mta) with ESMTPSA id ", got)
        self.assertIn(b"\r\nReceived: from ", got[10:])
        self.assertTrue(got.endswith(data.partition(b"\r\n\r\n")[2]), got[-300:])
        self.assertIn(b"\r\nSubject: " + subject.encode() + b"\r\n", got)
        self.session = self.bdat_session_after(before)
        return got

    def sessions_with_bdat(self) -> list[str]:
        """mta's end-of-session lines for clients that sent BDAT."""
        return [
            line
            for line in self.daemon.log().splitlines()
            if "disconnect from [127.0.0.1]" in line and "bdat=" in line
        ]

    def exim_delivery(self, name: str, subject: str) -> str:
        """Exim's log line for the delivery of the message with this subject
        (found through its Message-ID on the arrival line)."""

        def find() -> str | None:
            # Exim may write its lines after mta has passed the message on.
            lines = self.exims[name].mainlog.splitlines()
            arrivals = [ln for ln in lines if f" id={subject}@example.com" in ln]
            if not arrivals:
                return None
            [arrival] = arrivals
            exim_id = arrival.split()[2]
            found = [ln for ln in lines if f" {exim_id} => " in ln]
            return found[0] if len(found) == 1 else None

        return str(wait_for(find, 30, f"Exim's delivery line for {subject!r}"))

    def bdat_session_after(self, before: int) -> str:
        """The end-of-session line of the next BDAT session (Exim may say
        QUIT only after mta has already delivered the message)."""
        sessions = wait_for(
            lambda: self.sessions_with_bdat()[before:], 30, "the end of Exim's session"
        )
        self.assertEqual(len(sessions), 1, sessions)
        return str(sessions[0])

    def test_exim_relays_with_bdat_over_starttls(self) -> None:
        self.relay("starttls", "exim-starttls")
        # K: the message went with CHUNKING; A=plain: after AUTH; X=: over TLS.
        line = self.exim_delivery("starttls", "exim-starttls")
        self.assertRegex(line, r" X=TLS\S* CV=yes A=plain K C=\"250 2\.0\.0 Ok: queued as ")
        session = self.session
        self.assertRegex(session, r"\bstarttls=1\b.*\bauth=1\b.*\bmail=1\b")
        self.assertNotRegex(session, r"\bdata=")

    def test_exim_relays_with_bdat_over_implicit_tls(self) -> None:
        self.relay("smtps", "exim-smtps")
        line = self.exim_delivery("smtps", "exim-smtps")
        self.assertRegex(line, r" A=plain K C=\"250 2\.0\.0 Ok: queued as ")

    def test_large_message_in_chunks(self) -> None:
        """A message of several hundred KB (Exim cuts it into chunks)."""
        body = b"".join(b"%06d " % i + b"x" * 90 + b"\r\n" for i in range(6000))
        body += b".\r\n..\r\n" + BODY
        got = self.relay("starttls", "exim-large", body)
        self.assertEqual(len(re.findall(rb"\r\n\.\r\n", got)), 2)
        chunks = re.search(r"\bbdat=(\d+)", self.session)
        assert chunks is not None
        self.assertGreaterEqual(int(chunks.group(1)), 2)
