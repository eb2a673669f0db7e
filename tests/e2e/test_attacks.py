"""Attacks on the submission service, each against a real twistd process.

The daemon delivers through a real DNS server to a sink on loopback that
reads DATA carelessly (L{mta.testing.SinkBehaviour.lenient_end}): NULs
dropped, a "." between any line ends taken as the end.  If anything an
attacker smuggled reached it, the sink would record a second message; the
tests count messages there by their Message-ID.

Every client here is a raw socket (L{tests.e2e.wire.Wire}) so the bytes
are exactly the attacker's.  Where an attacker's address matters it
connects from its own 127.0.0.x address (all of 127/8 is loopback).
"""

from __future__ import annotations

import email
import json
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, wait_for
from tests.e2e.wire import Wire, plain_token

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
PASSWORD = "attack-test-password"
RCPT = "victim@example.test"
ZONE = {
    "example.test": {"MX": [[10, "mx.example.test"]]},
    "mx.example.test": {"A": ["127.0.0.1"]},
}

# The end-of-data forms that some servers accept and others do not
# (SMTP smuggling, CVE-2023-51764/5/6), with NUL variants.
SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\n\x00.\x00\n",
]


def message(mid: str, body: bytes = b"hello\r\n", sender: str = LOGIN) -> bytes:
    head = (
        f"From: <{sender}>\r\nTo: <{RCPT}>\r\nSubject: {mid}\r\n"
        f"Message-ID: <{mid}@example.com>\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n\r\n"
    )
    return head.encode() + body


class AttackDaemon(SynchronousTestCase):
    """One daemon, DNS server and careless sink for the whole class."""

    sections: dict[str, dict[str, Any]] = {}

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-attack-")
        zone = os.path.join(cls.tmp, "zone.json")
        with open(zone, "w", encoding="utf-8") as f:
            json.dump(ZONE, f)
        script = os.path.join(cls.tmp, "sink.json")
        with open(script, "w", encoding="utf-8") as f:
            json.dump({"lenient": True}, f)
        cls.out = os.path.join(cls.tmp, "sink")
        cls.dns = Helper(["tests/dnsserver.py", zone], os.path.join(cls.tmp, "dns.log"))
        cls.sink = Helper(
            ["tests/e2e/sink.py", cls.out, "--script", script], os.path.join(cls.tmp, "sink.log")
        )
        sections: dict[str, Any] = {
            "delivery": {
                "dns_servers": ["127.0.0.1"],
                "dns_port": cls.dns.port,
                "port": cls.sink.port,
                "ip_versions": ["ipv4"],
                "refuse_networks": [],  # the test's MX is 127.0.0.1
            },
            "routes": None,
        }
        for name, values in cls.sections.items():
            sections.setdefault(name, {}).update(values)
        cls.daemon = Daemon(os.path.join(cls.tmp, "mta"), sections)
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()
        cls.context = ssl.create_default_context(cafile=cls.daemon.cafile)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        cls.sink.stop()
        cls.dns.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def smtps(self, source: str | None = None) -> Wire:
        return Wire(self.daemon.tls_port, tls=self.context, source=source)

    def logged_in(self) -> Wire:
        w = self.smtps()
        code, text = w.login(LOGIN, PASSWORD)
        self.assertEqual(code, 235, text)
        return w

    def sink_message_ids(self) -> list[str]:
        """The Message-ID of every message the sink accepted so far."""
        ids = []
        for name in sorted(os.listdir(self.out)):
            if name.endswith(".eml"):
                with open(os.path.join(self.out, name), "rb") as f:
                    msg = email.message_from_bytes(f.read())
                ids.append(str(msg.get("Message-ID", "")).strip("<>").partition("@")[0])
        return ids

    def wait_delivered(self, mids: list[str], timeout: float = 30) -> list[str]:
        """Wait until every Message-ID in C{mids} is at the sink; returns all seen."""

        def seen() -> list[str] | None:
            ids = self.sink_message_ids()
            return ids if set(mids) <= set(ids) else None

        return list(wait_for(seen, timeout, f"{mids} at the sink"))


def taken_as_content(sep: bytes, mode: str) -> bool:
    """Whether a message with this false end is accepted (as one message):
    with bare LF normalized, unless it has a bare CR or a NUL."""
    return mode == "normalize" and b"\x00" not in sep and b"\r" not in sep.replace(b"\r\n", b"")


class SmugglingTests(AttackDaemon):
    """The default, C{[limits] bare_newline = "normalize"}."""

    mode = "normalize"

    def delivered(self, mid: str) -> bytes:
        """The one message with this Message-ID that the sink accepted."""
        found = []
        for name in sorted(os.listdir(self.out)):
            if name.endswith(".eml"):
                with open(os.path.join(self.out, name), "rb") as f:
                    data = f.read()
                if f"\r\nMessage-ID: <{mid}@example.com>\r\n".encode() in data:
                    found.append(data)
        self.assertEqual(len(found), 1, mid)
        return found[0]

    def test_no_end_of_data_variant_yields_a_second_message(self) -> None:
        """Each variant hides a whole second transaction after a false end of data.

        The real daemon must refuse the message (bare CR, NUL; bare LF too
        with C{bare_newline = "reject"}) or take it as one, the false end
        and the hidden transaction as its text; a control message on the
        same connection afterwards shows the session stayed in step.
        Downstream, the careless sink must see each control message once,
        each accepted message once and whole (the false end went out
        dot-stuffed), and nothing smuggled.
        """
        outcomes = []
        controls = []
        for i, sep in enumerate(SMUGGLING):
            smuggled = (
                f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
                + message(f"smuggled-{i}")
                + b".\r\n"
            )
            with self.logged_in() as w:
                self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
                self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
                self.assertEqual(w.cmd("DATA")[0], 354)
                # The real end of data is the smuggled message's own.
                w.send(message(f"outer-{i}", b"before" + sep + smuggled))
                outcomes.append(w.reply())
                # A control message: the session is still in step.
                self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
                self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
                self.assertEqual(w.cmd("DATA")[0], 354)
                w.send(message(f"control-{i}") + b".\r\n")
                code, text = w.reply()
                self.assertEqual(code, 250, text)
                controls.append(f"control-{i}")
                self.assertEqual(w.cmd("QUIT")[0], 221)
        accepted = []
        for i, (sep, (code, text)) in enumerate(zip(SMUGGLING, outcomes, strict=True)):
            if taken_as_content(sep, self.mode):
                self.assertEqual(code, 250, f"{sep!r}: {code} {text}")
                accepted.append(i)
                continue
            # Refused, with the reason, rather than repaired.
            self.assertEqual(code, 550, f"{sep!r}: {code} {text}")
            self.assertTrue(text.startswith(("5.6.11", "5.6.0")), f"{sep!r}: {text}")
        self.assertEqual(len(accepted), 3 if self.mode == "normalize" else 0)
        seen = self.wait_delivered(controls + [f"outer-{i}" for i in accepted])
        # Let anything else in the queue arrive too before counting.
        wait_for(lambda: not self.daemon.queued("incoming", "active"), 30, "an empty queue")
        seen = self.sink_message_ids()
        self.assertEqual([m for m in seen if m.startswith("smuggled")], [])
        self.assertEqual(sorted(m for m in seen if m.startswith("outer")),
                         sorted(f"outer-{i}" for i in accepted))  # fmt: skip
        for mid in controls:
            self.assertEqual(seen.count(mid), 1, mid)
        for i in accepted:
            # What reached the sink is the message as stored: its lines with
            # CRLF, the false end a line of one dot, the hidden transaction text.
            body = self.delivered(f"outer-{i}").partition(b"\r\n\r\n")[2]
            self.assertEqual(
                body,
                b"before\r\n.\r\n"
                + f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
                + message(f"smuggled-{i}"),
            )

    def test_false_ends_split_across_packets(self) -> None:
        """Every variant cut at every octet of its false end, each part sent
        on its own (the daemon reads them separately): the same outcome as
        in one piece, and the same message at the sink."""
        outcomes: dict[bytes, list[int]] = {}
        mids = []
        for i, sep in enumerate(SMUGGLING):
            # One connection per variant: refusals count towards [limits] errors.
            with self.logged_in() as w:
                w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for cut in range(len(sep) + 1):
                    mid = f"split-{self.mode}-{i}-{cut}"
                    self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
                    self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
                    self.assertEqual(w.cmd("DATA")[0], 354)
                    data = message(mid, b"before" + sep + b"QUIT\r\nafter\r\n") + b".\r\n"
                    at = data.index(b"before") + len(b"before") + cut
                    w.send(data[:at])
                    time.sleep(0.05)
                    w.send(data[at:])
                    code, _ = w.reply()
                    outcomes.setdefault(sep, []).append(code)
                    if code == 250:
                        mids.append(mid)
        for sep, codes in outcomes.items():
            expected = 250 if taken_as_content(sep, self.mode) else 550
            self.assertEqual(codes, [expected] * (len(sep) + 1), sep)
        self.wait_delivered(mids)
        for mid in mids:
            body = self.delivered(mid).partition(b"\r\n\r\n")[2]
            self.assertEqual(body, b"before\r\n.\r\nQUIT\r\nafter\r\n", mid)

    def test_careless_sink_would_split_a_smuggled_message(self) -> None:
        """The sink is as careless as claimed: the test above can fail."""
        smuggled = (
            f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
            + message("sinkcheck-2")
            + b".\r\n"
        )
        with Wire(self.sink.port) as w:
            self.assertEqual(w.cmd("EHLO attacker.test")[0], 250)
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("sinkcheck-1", b"x\r\n\x00.\r\n" + smuggled))
            self.assertEqual([w.reply()[0] for _ in range(5)], [250, 250, 250, 354, 250])
        seen = self.wait_delivered(["sinkcheck-1", "sinkcheck-2"])
        self.assertEqual(seen.count("sinkcheck-2"), 1)


class RejectModeSmugglingTests(SmugglingTests):
    """C{[limits] bare_newline = "reject"}: every variant is refused."""

    mode = "reject"
    sections = {"limits": {"bare_newline": "reject"}}


class RelayAndSyntaxTests(AttackDaemon):
    """Relay tricks and malformed input on raw sockets: no relay before AUTH (percent hack, quoted
    local parts, source routes, bang paths), those addresses still refused after login, commands
    pipelined with STARTTLS discarded, over-long command and text lines, NUL and non-ASCII in
    commands, malformed addresses, a declared SIZE over the limit, the 1001st recipient, bad AUTH
    base64, and 50 wrong passwords that block one address but not a login from another. Nothing
    of it is queued."""

    RELAY_TRICKS = [
        "friend%remote.example@localhost",
        '"friend@remote.example"@localhost',
        "@localhost:friend@remote.example",
        "@a.example,@b.example:friend@remote.example",
        "remote.example!friend",
        "remote.example!friend@localhost",
        "friend%remote.example@[127.0.0.1]",
        RCPT,
    ]

    def assert_nothing_queued(self, before: list[str]) -> None:
        self.assertEqual(self.daemon.queued(), before)

    def test_unauthenticated_relay_refused(self) -> None:
        before = self.daemon.queued()
        sessions = {
            "587 plaintext": lambda: Wire(self.daemon.plain_port),
            "587 after STARTTLS": self._starttls_session,
            "465": self.smtps,
        }
        for name, connect in sessions.items():
            for rcpt in self.RELAY_TRICKS:
                with connect() as w:
                    if name != "587 after STARTTLS":
                        self.assertEqual(w.cmd("EHLO attacker.test")[0], 250)
                    code, text = w.cmd("MAIL FROM:<someone@remote.example>")
                    self.assertEqual(code, 530, f"{name}: {text}")
                    code, text = w.cmd(f"RCPT TO:<{rcpt}>")
                    self.assertIn(code, (503, 530), f"{name} {rcpt}: {text}")
                    code, text = w.cmd("DATA")
                    self.assertIn(code, (503, 530), f"{name} {rcpt}: {text}")
                    # And without the MAIL command at all.
                    code, text = w.cmd(f"RCPT TO:<{rcpt}>")
                    self.assertIn(code, (503, 530), f"{name} {rcpt}: {text}")
        self.assert_nothing_queued(before)

    def _starttls_session(self) -> Wire:
        w = Wire(self.daemon.plain_port)
        self.assertEqual(w.cmd("EHLO attacker.test")[0], 250)
        self.assertEqual(w.cmd("STARTTLS")[0], 220)
        w.starttls(self.context)
        self.assertEqual(w.cmd("EHLO attacker.test")[0], 250)
        return w

    def test_source_routes_and_bang_paths_refused_even_after_login(self) -> None:
        before = self.daemon.queued()
        with self.logged_in() as w:
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            for rcpt, codes in [
                ("@localhost:friend@remote.example", (553,)),
                ("@a.example,@b.example:friend@remote.example", (553,)),
                ("remote.example!friend", (501, 553)),
            ]:
                code, text = w.cmd(f"RCPT TO:<{rcpt}>")
                self.assertIn(code, codes, f"{rcpt}: {text}")
            self.assertEqual(w.cmd("DATA")[0], 554)  # no valid recipient
        self.assert_nothing_queued(before)

    def test_starttls_pipelined_commands_discarded(self) -> None:
        """CVE-2011-0411: commands sent with STARTTLS must not run inside TLS."""
        before = self.daemon.queued()
        w = Wire(self.daemon.plain_port)
        self.assertEqual(w.cmd("EHLO attacker.test")[0], 250)
        # Credentials that would work, and a transaction, injected in the
        # same packet as STARTTLS.
        w.send(
            f"STARTTLS\r\nEHLO x\r\nAUTH PLAIN {plain_token(LOGIN, PASSWORD)}\r\n"
            f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<{RCPT}>\r\n"
        )
        self.assertEqual(w.reply()[0], 220)
        self.assertEqual(w.buffer, b"")  # nothing answered in plaintext after 220
        w.starttls(self.context)
        code, text = w.cmd("EHLO client.test")
        self.assertEqual(code, 250, text)  # the first reply inside TLS is to this
        self.assertIn("AUTH PLAIN LOGIN", text)
        code, text = w.cmd(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(code, 530, text)  # the injected AUTH did not log in
        self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 503)
        w.close()
        self.assert_nothing_queued(before)

    def test_overlong_command_and_text_lines(self) -> None:
        before = self.daemon.queued()
        with self.logged_in() as w:
            code, text = w.cmd("NOOP " + "a" * 600)
            self.assertEqual((code, text[:5]), (500, "5.5.2"))
            # A line far beyond any limit gets one reply, and the session
            # goes on at the next line.
            w.send(b"MAIL FROM:<" + b"x" * 300_000 + b">\r\n")
            self.assertEqual(w.reply()[0], 500)
            self.assertEqual(w.cmd("NOOP")[0], 250)
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("longline", b"y" * 1001 + b"\r\nend\r\n.\r\n"))
            code, text = w.reply()
            self.assertEqual((code, text[:5]), (550, "5.6.0"))
            # A text line with no end at all, 2 MB of it, then the end of data.
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("endless", b"z" * 2_000_000 + b"\r\n.\r\n"))
            self.assertEqual(w.reply()[0], 550)
            self.assertEqual(w.cmd("NOOP")[0], 250)
        self.assert_nothing_queued(before)

    def test_nul_and_non_ascii_in_commands(self) -> None:
        before = self.daemon.queued()
        with self.logged_in() as w:
            for line, codes in [
                (b"NOOP\x00", (500, 501)),
                (b"\x00MAIL FROM:<" + LOGIN.encode() + b">", (500,)),
                (b"MAIL FROM:<app\x00@example.com>", (501, 553)),
                (b"MAIL FROM:<" + LOGIN.encode() + b">\x00 SIZE=10", (501, 555)),
                (b"EHLO cl\x00ient.test", (501,)),
                (b"\xff\xfe\xfd", (500,)),
                ("MAİL FROM:<app@example.com>".encode(), (500,)),
                ("MAIL FROM:<app@exämple.com>".encode(), (553,)),
                ("MAIL FROM:<äpp@example.com>".encode(), (553,)),
                (b"MAIL FROM:<app@example.com> BODY=8BIT\xc3\xa4MIME", (501, 555)),
            ]:
                code, text = w.cmd(line)
                self.assertIn(code, codes, f"{line!r}: {code} {text}")
            # Still in step and usable.
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd("RCPT TO:<vict\x00im@example.test>")[0], 501)
            self.assertEqual(w.cmd("RCPT TO:<vïctim@example.test>")[0], 553)
            self.assertEqual(w.cmd("RSET")[0], 250)
        self.assert_nothing_queued(before)

    def test_malformed_addresses(self) -> None:
        before = self.daemon.queued()
        long_local = "l" * 65
        bad = [
            "<a@b@c>",
            "a@example.com",
            "<a@example.com",
            f"<{long_local}@example.com>",
            "<@example.com>",
            "<a@>",
            "<a..b@example.com>",
            "<a@-example.com>",
            "<a@exa mple.com>",
        ]
        with self.logged_in() as w:
            for path in bad:
                code, text = w.cmd(f"MAIL FROM:{path}")
                self.assertIn(code, (501, 553), f"MAIL {path}: {text}")
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            for path in bad:
                code, text = w.cmd(f"RCPT TO:{path}")
                self.assertIn(code, (501, 553), f"RCPT {path}: {text}")
            self.assertEqual(w.cmd("DATA")[0], 554)
        self.assert_nothing_queued(before)

    def test_declared_size_refused_before_data(self) -> None:
        before = self.daemon.queued()
        with self.logged_in() as w:
            code, text = w.cmd(f"MAIL FROM:<{LOGIN}> SIZE=99999999999")
            self.assertEqual((code, text[:5]), (552, "5.3.4"))
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 503)
            self.assertEqual(w.cmd("DATA")[0], 503)
            code, text = w.cmd(f"MAIL FROM:<{LOGIN}> SIZE=99999999999999999999999999")
            self.assertIn(code, (501, 552), text)
        self.assert_nothing_queued(before)

    def test_1001st_recipient_refused(self) -> None:
        with self.logged_in() as w:
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            w.send("".join(f"RCPT TO:<r{n}@example.test>\r\n" for n in range(1000)))
            self.assertEqual([w.reply()[0] for _ in range(1000)], [250] * 1000)
            code, text = w.cmd("RCPT TO:<r1000@example.test>")
            self.assertEqual((code, text[:5]), (452, "4.5.3"))
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("thousand") + b".\r\n")
            code, text = w.reply()
            self.assertEqual(code, 250, text)
        queue_id = text.rpartition(" ")[2]
        env = self.daemon.envelope(queue_id)
        self.assertEqual(len(env["recipients"]), 1000)
        self.assertNotIn("r1000@example.test", [r["address"] for r in env["recipients"]])

    def test_malformed_auth_base64(self) -> None:
        with self.smtps() as w:
            self.assertEqual(w.cmd("EHLO client.test")[0], 250)
            for line in [
                "AUTH PLAIN !!!notbase64!!!",
                "AUTH PLAIN AGFwcEBleGFtcGxlLmNvbQ",  # padding missing
                "AUTH PLAIN ====",
                "AUTH PLAIN Zm9v=YmFy",  # padding inside
                "AUTH PLAIN Zm9v YmFy",
                "AUTH PLAIN YWJj",  # "abc": no NULs
                "AUTH PLAIN /w==",  # not UTF-8
            ]:
                code, text = w.cmd(line)
                self.assertEqual(code, 501, f"{line}: {text}")
            self.assertEqual(w.cmd("AUTH LOGIN")[0], 334)
            self.assertEqual(w.cmd("%%%")[0], 501)
            self.assertEqual(w.cmd("AUTH PLAIN")[0], 334)
            self.assertEqual(w.cmd("Zm9v\x00YmFy")[0], 501)
            # None of that counts as a login attempt; the real one works.
            code, text = w.cmd(f"AUTH PLAIN {plain_token(LOGIN, PASSWORD)}")
            self.assertEqual(code, 235, text)

    def test_50_wrong_passwords_then_right_one_from_another_address(self) -> None:
        attacker, user = "127.0.0.3", "127.0.0.4"
        replies = []
        w = self.smtps(attacker)
        w.cmd("EHLO attacker.test")
        for n in range(50):
            code, _ = w.cmd(f"AUTH PLAIN {plain_token(LOGIN, f'guess-{n}')}")
            if code == 421:
                # Too many errors: the server hangs up after this reply.
                self.assertEqual(w.closed_within(10), b"")
                w.close()
                w = self.smtps(attacker)
                w.cmd("EHLO attacker.test")
                code, _ = w.cmd(f"AUTH PLAIN {plain_token(LOGIN, f'guess-{n}')}")
            replies.append(code)
        # The right password from the attacker's address is refused too now.
        code, _ = w.cmd(f"AUTH PLAIN {plain_token(LOGIN, PASSWORD)}")
        w.close()
        self.assertEqual(set(replies), {535, 454})
        self.assertEqual(replies[:10], [535] * 10)
        self.assertEqual(code, 454)
        # The account is not locked: its owner, elsewhere, logs in and sends.
        started = time.monotonic()
        with self.smtps(user) as w:
            code, text = w.login(LOGIN, PASSWORD)
            self.assertEqual(code, 235, text)
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("after-bruteforce") + b".\r\n")
            self.assertEqual(w.reply()[0], 250)
        self.wait_delivered(["after-bruteforce"])


IDLE_TIMEOUT = 10.0


class Attacker:
    """One slow connection, driven by L{SlowClientTests} without blocking."""

    def __init__(self, kind: str, sock: Any, opened: float) -> None:
        self.kind = kind
        self.sock = sock
        self.opened = opened
        self.closed: float | None = None
        self.got = b""
        self.sent = 0


class SlowClientTests(AttackDaemon):
    """200 idle or byte-a-second connections, and a normal client beside them.

    The attackers come from 20 addresses, 10 each (the default per-address
    limit); [limits] idle_timeout is lowered to IDLE_TIMEOUT seconds so the
    test does not wait 5 minutes.
    """

    sections = {"limits": {"idle_timeout": IDLE_TIMEOUT}}
    DRIBBLE = b"EHLO slow.example\r\nNOOP\r\n" * 100

    def open_attackers(self) -> list[Attacker]:
        attackers = []
        kinds = ["idle 587", "dribble 587", "no handshake 465", "dribble 465"]
        for n in range(200):
            kind = kinds[n % 4]
            source = (f"127.0.1.{1 + n % 20}", 0)
            opened = time.monotonic()
            sock: Any = socket.create_connection(
                ("127.0.0.1", self.daemon.tls_port if "465" in kind else self.daemon.plain_port),
                timeout=10,
                source_address=source,
            )
            if kind == "dribble 465":
                sock = self.context.wrap_socket(sock, server_hostname="localhost")
            sock.setblocking(False)
            attackers.append(Attacker(kind, sock, opened))
        return attackers

    def run_attackers(self, attackers: list[Attacker], stop: threading.Event) -> None:
        """Send a byte a second to the dribblers; note when each is cut off."""
        next_byte = time.monotonic()
        deadline = time.monotonic() + IDLE_TIMEOUT + 60
        while time.monotonic() < deadline and not stop.is_set():
            open_ = [a for a in attackers if a.closed is None]
            if not open_:
                return
            now = time.monotonic()
            if now >= next_byte:
                next_byte = now + 1.0
                for a in open_:
                    if a.kind.startswith("dribble"):  # "dribble 587", "dribble DATA", ...
                        try:
                            a.sock.send(self.DRIBBLE[a.sent : a.sent + 1])
                            a.sent += 1
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                            pass
                        except OSError:
                            a.closed = time.monotonic()
            readable, _, _ = select.select([a.sock for a in open_ if a.closed is None], [], [], 0.2)
            for a in open_:
                if a.sock not in readable or a.closed is not None:
                    continue
                try:
                    chunk = a.sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (OSError, ssl.SSLError):
                    chunk = b""
                if chunk:
                    a.got += chunk
                else:
                    a.closed = time.monotonic()

    def submit(self) -> float:
        started = time.monotonic()
        with self.logged_in() as w:
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.send(message("normal") + b".\r\n")
            self.assertEqual(w.reply()[0], 250)
            self.assertEqual(w.cmd("QUIT")[0], 221)
        return time.monotonic() - started

    def test_slow_clients_cut_after_idle_timeout_normal_client_served(self) -> None:
        attackers = self.open_attackers()
        stop = threading.Event()
        thread = threading.Thread(target=self.run_attackers, args=(attackers, stop))
        thread.start()
        try:
            latencies = []
            while len(latencies) < 20:
                latencies.append(self.submit())
            during = sum(1 for a in attackers if a.closed is None)
            thread.join(IDLE_TIMEOUT + 60)
        finally:
            stop.set()
            thread.join()
            for a in attackers:
                a.sock.close()
        latencies.sort()
        p90 = latencies[int(0.9 * len(latencies)) - 1]
        print(f"normal client: p90 {p90:.3f}s, max {latencies[-1]:.3f}s over {len(latencies)}")
        self.assertGreaterEqual(during, 190, "the attackers were cut before the measurement")
        self.assertLess(p90, 1.0, latencies)
        for a in attackers:
            self.assertIsNotNone(a.closed, f"{a.kind}: still open, got {a.got!r}")
            assert a.closed is not None
            lived = a.closed - a.opened
            # Cut at the idle timeout: not before it, and not long after.
            # A TLS connection that never sent a ClientHello cannot be told
            # 421; it is aborted when the close does not complete, after a
            # grace of min(30 s, idle_timeout).
            self.assertGreater(lived, IDLE_TIMEOUT - 0.5, a.kind)
            grace = IDLE_TIMEOUT if a.kind == "no handshake 465" else 0
            self.assertLess(lived, IDLE_TIMEOUT + grace + 10, a.kind)
            if a.kind.endswith("587"):
                self.assertIn(b"421 4.4.2", a.got, a.kind)

    def test_byte_a_second_inside_data_is_cut_after_the_idle_timeout(self) -> None:
        """Logged-in clients that trickle their message: [limits] data_min_rate."""
        before = self.daemon.queued()
        attackers = []
        for n in range(10):
            w = self.smtps(source=f"127.0.2.{1 + n % 5}")
            self.assertEqual(w.login(LOGIN, PASSWORD)[0], 235)
            self.assertEqual(w.cmd(f"MAIL FROM:<{LOGIN}>")[0], 250)
            self.assertEqual(w.cmd(f"RCPT TO:<{RCPT}>")[0], 250)
            self.assertEqual(w.cmd("DATA")[0], 354)
            w.sock.setblocking(False)
            attackers.append(Attacker("dribble DATA", w.sock, time.monotonic()))
        try:
            self.run_attackers(attackers, threading.Event())
        finally:
            for a in attackers:
                a.sock.close()
        for a in attackers:
            self.assertIsNotNone(a.closed, f"{a.kind}: still open after {a.sent} octets")
            assert a.closed is not None
            self.assertGreater(a.closed - a.opened, IDLE_TIMEOUT - 0.5)
            self.assertLess(a.closed - a.opened, IDLE_TIMEOUT + 10)
            self.assertIn(b"421 4.4.2", a.got)
        self.assertEqual(self.daemon.queued(), before)
