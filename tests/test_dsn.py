"""Tests for L{mta.dsn}: golden reports, parse-back, policy, and properties.

The golden files in C{tests/golden/dsn-*.eml} were generated once from the
scenarios below (C{python -m tests.test_dsn} rewrites them) and then read
line by line against RFC 3464, RFC 6522 and RFC 6533 before they were
accepted; regenerate only together with such a review.
"""

from __future__ import annotations

import difflib
import email
import email.policy
import pathlib
import re
import sys
from collections.abc import Callable
from email.message import EmailMessage, Message

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mta.delivery.mime import header_section
from mta.dsn import (
    Notice,
    build_report,
    needs_notice,
    report_is_8bit,
    report_needs_smtputf8,
)
from mta.envelope import Envelope, Recipient, RecipientState

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
HOST = "mail.example.net"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
DAY = 86_400.0

ORIGINAL = (
    b"Received: from client.example.com (client.example.com [192.0.2.10])\r\n"
    b"\tby mail.example.net with ESMTPS id 4SbQ1x2Y3z; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>, Carol <carol@example.org>, Dave <dave@example.net>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:00 +0000\r\n"
    b"Message-ID: <20231114221300.1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"the report for the third quarter is below.\r\n"
    b"--\r\n"
    b"Alice\r\n"
)

ORIGINAL_UTF8 = (
    "From: Jörg Müller <jörg@bücher.example>\r\n"
    "To: Zoë <zoë@例え.jp>\r\n"
    "Subject: Grüße aus Köln\r\n"
    "Date: Tue, 14 Nov 2023 22:13:00 +0000\r\n"
    "Message-ID: <utf8.1@bücher.example>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Liebe Zoë, schöne Grüße!\r\n"
).encode()


def envelope(recipients: list[Recipient], **kw: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": "4SbQ1x2Y3z",
        "sender": "alice@example.com",
        "recipients": recipients,
        "arrival": ARRIVAL,
        "size": len(ORIGINAL),
    }
    fields.update(kw)
    return Envelope(**fields)  # type: ignore[arg-type]


def report(
    env: Envelope,
    notices: list[Notice],
    message: bytes = ORIGINAL,
    *,
    now: float = ARRIVAL + 60,
    retry_until: float | None = None,
    boundary: str = "=_golden_boundary_1",
    **kw: object,
) -> bytes:
    return build_report(
        env,
        notices,
        message,
        hostname=HOST,
        now=now,
        retry_until=retry_until,
        message_id=f"<{env.queue_id}.dsn@{HOST}>",
        boundary=boundary,
        **kw,  # type: ignore[arg-type]
    )


def bob_unknown() -> Recipient:
    return Recipient(
        "bob@example.org",
        state=RecipientState.FAILED,
        attempts=1,
        last_attempt=ARRIVAL + 5,
        reply="550 5.1.1 <bob@example.org>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        dsn_status="5.1.1",
        relay="mx.example.org[192.0.2.25]:25",
        category="recipient",
    )


# -- the golden scenarios -------------------------------------------------------


def scenario_failed_full() -> bytes:
    """(a) One recipient refused with 550 5.1.1; RET absent: the whole message."""
    rcpt = bob_unknown()
    return report(envelope([rcpt]), [Notice(rcpt, "failed")], now=ARRIVAL + 5)


def combined_recipients() -> tuple[Recipient, Recipient]:
    carol = Recipient(
        "carol@example.org",
        notify=("DELAY", "FAILURE"),
        orcpt="rfc822;carol@example.org",
        state=RecipientState.FAILED,
        attempts=1,
        last_attempt=ARRIVAL + 4 * 3600,
        reply="550 5.1.1 <carol@example.org>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        dsn_status="5.1.1",
        relay="mx.example.org[192.0.2.25]:25",
        category="recipient",
    )
    dave = Recipient(
        "dave@example.net",
        orcpt="rfc822;Dave.Smith@example.net",
        state=RecipientState.DEFERRED,
        attempts=3,
        last_attempt=ARRIVAL + 4 * 3600,
        next_attempt=ARRIVAL + 5 * 3600,
        reply="451 4.7.1 <dave@example.net>: Recipient address rejected: Greylisted, "
        "see https://postgrey.example.net/help/example.net.html for details",
        dsn_status="4.7.1",
        relay="mx1.example.net[198.51.100.25]:25",
        category="greylist",
    )
    return carol, dave


def scenario_combined_hdrs() -> bytes:
    """(b) A 550 5.1.1 failure and a greylisting delay in one report; ORCPT, ENVID, RET=HDRS."""
    carol, dave = combined_recipients()
    env = envelope([carol, dave], ret="HDRS", envid="Q3 report+42")
    return report(
        env,
        [Notice(carol, "failed"), Notice(dave, "delayed")],
        now=ARRIVAL + 4 * 3600,
        retry_until=ARRIVAL + 5 * DAY,
    )


def scenario_relayed() -> bytes:
    """(c) NOTIFY=SUCCESS and a next hop without DSN: a "relayed" notice, headers only."""
    erin = Recipient(
        "erin@example.com",
        notify=("SUCCESS",),
        state=RecipientState.SENT,
        attempts=1,
        last_attempt=ARRIVAL + 2,
        reply="250 2.0.0 Ok: queued as 7C1D2E3F4A",
        dsn_status="2.0.0",
        relay="smarthost.example.com[203.0.113.5]:587",
    )
    return report(envelope([erin]), [Notice(erin, "relayed")], now=ARRIVAL + 2)


def scenario_expired_local() -> bytes:
    """(d) Expiry after connection timeouts: our own error text, no remote reply."""
    frank = Recipient(
        "frank@example.org",
        state=RecipientState.FAILED,
        attempts=27,
        last_attempt=ARRIVAL + 5 * DAY,
        reply="451 4.4.1 connect to mx.example.org[192.0.2.25]:25: Connection timed out",
        dsn_status="4.4.1",
        relay="mx.example.org[192.0.2.25]:25",
        category="network",
    )
    return report(envelope([frank]), [Notice(frank, "failed")], now=ARRIVAL + 5 * DAY)


def scenario_utf8() -> bytes:
    """(e) SMTPUTF8: UTF-8 sender, recipient, ORCPT, reply and header section."""
    zoe = Recipient(
        "zoë@例え.jp",
        orcpt="utf-8;zoë@例え.jp",
        state=RecipientState.FAILED,
        attempts=1,
        last_attempt=ARRIVAL + 5,
        reply="550 5.1.1 <zoë@例え.jp>: mailbox unavailable",
        dsn_status="5.1.1",
        relay="mx.例え.jp[192.0.2.80]:25",
        category="recipient",
    )
    env = envelope(
        [zoe],
        sender="jörg@bücher.example",
        smtputf8=True,
        body="8BITMIME",
        size=len(ORIGINAL_UTF8),
    )
    return report(env, [Notice(zoe, "failed")], ORIGINAL_UTF8, now=ARRIVAL + 5)


SCENARIOS: dict[str, Callable[[], bytes]] = {
    "dsn-failed-full": scenario_failed_full,
    "dsn-combined-hdrs": scenario_combined_hdrs,
    "dsn-relayed": scenario_relayed,
    "dsn-expired-local": scenario_expired_local,
    "dsn-utf8": scenario_utf8,
}


def regenerate() -> None:
    """Rewrite the golden files (then review every line before committing)."""
    GOLDEN.mkdir(exist_ok=True)
    for name, make in SCENARIOS.items():
        (GOLDEN / f"{name}.eml").write_bytes(make())


# -- helpers --------------------------------------------------------------------


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(data: bytes) -> list[EmailMessage]:
    return list(parse(data).iter_parts())  # type: ignore[arg-type]


def status_blocks(data: bytes) -> list[Message]:
    """The field blocks of the message/delivery-status part: per-message first."""
    part = parts(data)[1]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def words(text: str) -> str:
    """Text with its line breaks and indentation undone, to find a sentence."""
    return " ".join(text.split())


def diff(expected: bytes, actual: bytes) -> str:
    """A unified diff with line ends shown, so a lost CR is visible."""

    def lines(data: bytes) -> list[str]:
        return [repr(line)[2:-1] for line in data.splitlines(keepends=True)]

    return "\n".join(
        difflib.unified_diff(lines(expected), lines(actual), "golden", "built", lineterm="", n=2)
    )


# -- tests ------------------------------------------------------------------------


class GoldenTests(SynchronousTestCase):
    """Each scenario's report equals its reviewed golden file, byte for byte."""

    def check(self, name: str) -> None:
        built = SCENARIOS[name]()
        path = GOLDEN / f"{name}.eml"
        expected = path.read_bytes()
        if built != expected:
            self.fail(
                f"{name}: the report differs from {path}; if the change is intended, "
                f"run `python -m tests.test_dsn` and review the file.\n{diff(expected, built)}"
            )

    def test_failed_full(self) -> None:
        self.check("dsn-failed-full")

    def test_combined_failed_and_delayed(self) -> None:
        self.check("dsn-combined-hdrs")

    def test_relayed(self) -> None:
        self.check("dsn-relayed")

    def test_expired_local_error(self) -> None:
        self.check("dsn-expired-local")

    def test_utf8(self) -> None:
        self.check("dsn-utf8")

    def test_diff_shows_changed_line(self) -> None:
        """The failure message names the line that differs, line ends included."""
        text = diff(b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 3\n")
        self.assertIn("-B: 2\\r\\n", text)
        self.assertIn("+B: 3\\n", text)


class ParseBackTests(SynchronousTestCase):
    """The reports read back with the stdlib parser as RFC 3464/6522 say."""

    def test_structure(self) -> None:
        for name, make in SCENARIOS.items():
            msg = parse(make())
            self.assertEqual(msg.get_content_type(), "multipart/report", name)
            self.assertEqual(msg.get_param("report-type"), "delivery-status", name)
            kinds = [p.get_content_type() for p in msg.iter_parts()]  # type: ignore[attr-defined]
            self.assertEqual(kinds[:2], ["text/plain", "message/delivery-status"], name)
            self.assertEqual(len(kinds), 3, name)
            self.assertEqual(msg["From"], f"Mail Delivery System <MAILER-DAEMON@{HOST}>")
            self.assertEqual(msg["Auto-Submitted"], "auto-replied")
            self.assertEqual(msg["MIME-Version"], "1.0")
            self.assertEqual(msg.defects, [], name)

    def test_failed_full(self) -> None:
        data = scenario_failed_full()
        msg = parse(data)
        self.assertIn(b"\r\nTo: <alice@example.com>\r\n", data)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Date"], "Tue, 14 Nov 2023 22:13:25 +0000")
        self.assertEqual(msg["Message-ID"], f"<4SbQ1x2Y3z.dsn@{HOST}>")
        per_message, bob = status_blocks(data)
        self.assertEqual(per_message["Reporting-MTA"], f"dns; {HOST}")
        self.assertEqual(per_message["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertIsNone(per_message["Original-Envelope-Id"])
        self.assertIsNone(bob["Original-Recipient"])
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.org")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(
            bob["Diagnostic-Code"],
            "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
        )
        self.assertEqual(bob["Last-Attempt-Date"], "Tue, 14 Nov 2023 22:13:25 +0000")
        self.assertIsNone(bob["Will-Retry-Until"])
        returned = parts(data)[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        inner = returned.get_payload()[0]  # type: ignore[index]
        self.assertEqual(inner["Message-ID"], "<20231114221300.1234@example.com>")
        self.assertIn(b"the report for the third quarter is below.\r\n", data)
        text = words(parts(data)[0].get_content())
        self.assertIn("<bob@example.org>", text)
        self.assertIn("Recipient address rejected: User unknown in virtual mailbox table", text)
        self.assertIn("4SbQ1x2Y3z", text)
        self.assertIn("Subject: Quarterly report", text)

    def test_combined(self) -> None:
        data = scenario_combined_hdrs()
        msg = parse(data)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        per_message, carol, dave = status_blocks(data)
        self.assertEqual(per_message["Original-Envelope-Id"], "Q3+20report+2B42")
        self.assertEqual(per_message["Reporting-MTA"], f"dns; {HOST}")
        self.assertIsNotNone(per_message["Arrival-Date"])
        self.assertEqual(carol["Original-Recipient"], "rfc822; carol@example.org")
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.org")
        self.assertEqual(carol["Action"], "failed")
        self.assertEqual(carol["Status"], "5.1.1")
        self.assertIsNone(carol["Will-Retry-Until"])
        self.assertEqual(dave["Original-Recipient"], "rfc822; Dave.Smith@example.net")
        self.assertEqual(dave["Final-Recipient"], "rfc822; dave@example.net")
        self.assertEqual(dave["Action"], "delayed")
        self.assertEqual(dave["Status"], "4.7.1")
        self.assertEqual(dave["Remote-MTA"], "dns; mx1.example.net")
        self.assertTrue(dave["Diagnostic-Code"].startswith("smtp; 451 4.7.1 <dave@example.net>"))
        self.assertIn("postgrey.example.net/help/example.net.html", dave["Diagnostic-Code"])
        self.assertEqual(dave["Last-Attempt-Date"], "Wed, 15 Nov 2023 02:13:20 +0000")
        self.assertEqual(dave["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")
        returned = parts(data)[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertEqual(returned.get_content().encode(), header_section(ORIGINAL))
        self.assertNotIn(b"third quarter", data)
        text = parts(data)[0].get_content()
        self.assertIn("I will keep trying until Sunday 19 November 2023, 22:13 UTC.", text)
        self.assertIn("(you addressed it to <Dave.Smith@example.net>)", text)

    def test_relayed(self) -> None:
        data = scenario_relayed()
        self.assertEqual(parse(data)["Subject"], "Successful Mail Delivery Report")
        _, erin = status_blocks(data)
        self.assertEqual(erin["Action"], "relayed")
        self.assertEqual(erin["Status"], "2.0.0")
        self.assertEqual(erin["Remote-MTA"], "dns; smarthost.example.com")
        self.assertEqual(erin["Diagnostic-Code"], "smtp; 250 2.0.0 Ok: queued as 7C1D2E3F4A")
        self.assertEqual(parts(data)[2].get_content_type(), "text/rfc822-headers")

    def test_expired_local(self) -> None:
        data = scenario_expired_local()
        _, frank = status_blocks(data)
        self.assertEqual(frank["Action"], "failed")
        self.assertEqual(frank["Status"], "4.4.1")
        self.assertIsNone(frank["Remote-MTA"])
        self.assertEqual(
            frank["Diagnostic-Code"],
            "X-mta; connect to mx.example.org[192.0.2.25]:25: Connection timed out",
        )
        self.assertEqual(parts(data)[2].get_content_type(), "message/rfc822")
        text = words(parts(data)[0].get_content())
        self.assertIn("I kept trying for 5 days, but the problem did not go away", text)

    def test_utf8(self) -> None:
        data = scenario_utf8()
        self.assertIn("\r\nTo: <jörg@bücher.example>\r\n".encode(), data)
        _, zoe = status_blocks(data)
        self.assertEqual(zoe["Final-Recipient"], "utf-8; zo\\x{EB}@\\x{4F8B}\\x{3048}.jp")
        self.assertEqual(zoe["Original-Recipient"], "utf-8; zo\\x{EB}@\\x{4F8B}\\x{3048}.jp")
        self.assertEqual(zoe["Remote-MTA"], "dns; mx.xn--r8jz45g.jp")  # RFC 5890 A-label
        self.assertIn("<zo\\x{EB}@", zoe["Diagnostic-Code"])
        returned = parts(data)[2]
        self.assertEqual(returned.get_content_type(), "message/global")
        self.assertEqual(returned["Content-Transfer-Encoding"], "8bit")
        self.assertIn(ORIGINAL_UTF8, data)
        text = parts(data)[0].get_content()
        self.assertIn("<zoë@例え.jp>", text)
        self.assertIn("Subject: Grüße aus Köln", text)
        self.assertTrue(report_is_8bit(data))
        self.assertTrue(report_needs_smtputf8(data))

    def test_delivery_status_part_is_7bit(self) -> None:
        """RFC 3464 section 2.1: message/delivery-status is 7-bit."""
        for name, make in SCENARIOS.items():
            data = make()
            start = data.index(b"Content-Type: message/delivery-status")
            end = data.index(b"\r\n--=_golden_boundary_1", start)
            self.assertTrue(data[start:end].isascii(), name)

    def test_lines(self) -> None:
        """CRLF everywhere; no line over 998 octets; the machine part under 79."""
        for name, make in SCENARIOS.items():
            data = make()
            self.assertNotIn(b"\n", data.replace(b"\r\n", b""), name)
            self.assertNotIn(b"\r", data.replace(b"\r\n", b""), name)
            head = data[: data.index(b"\r\n\r\n")]
            for line in head.split(b"\r\n"):
                self.assertLessEqual(len(line), 78, (name, line))
            for block in status_blocks(data):
                for key, value in block.items():
                    self.assertLessEqual(len(key) + 2 + len(value), 200, (name, key))


class ContentRuleTests(SynchronousTestCase):
    """Which original is returned, how it is labelled, and the status rules."""

    def third(self, data: bytes) -> EmailMessage:
        return parts(data)[2]

    def test_ret_full_returns_message(self) -> None:
        rcpt = bob_unknown()
        data = report(envelope([rcpt], ret="FULL"), [Notice(rcpt, "failed")])
        self.assertEqual(self.third(data).get_content_type(), "message/rfc822")
        self.assertTrue(data.endswith(b"Alice\r\n\r\n--=_golden_boundary_1--\r\n"))

    def test_ret_hdrs_returns_headers(self) -> None:
        rcpt = bob_unknown()
        data = report(envelope([rcpt], ret="HDRS"), [Notice(rcpt, "failed")])
        self.assertEqual(self.third(data).get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"third quarter", data)
        self.assertIn("header of your message is attached", parts(data)[0].get_content())

    def test_large_message_returns_headers(self) -> None:
        rcpt = bob_unknown()
        env = envelope([rcpt], ret="FULL")
        data = report(env, [Notice(rcpt, "failed")], full_limit=len(ORIGINAL) - 1)
        self.assertEqual(self.third(data).get_content_type(), "text/rfc822-headers")
        self.assertIn("too large", parts(data)[0].get_content())
        data = report(env, [Notice(rcpt, "failed")], full_limit=len(ORIGINAL))
        self.assertEqual(self.third(data).get_content_type(), "message/rfc822")

    def test_stored_size_decides_too(self) -> None:
        """Only the start of a large message handed over: never returned as if whole."""
        rcpt = bob_unknown()
        env = envelope([rcpt], size=10 * len(ORIGINAL))
        data = report(env, [Notice(rcpt, "failed")], full_limit=2 * len(ORIGINAL))
        self.assertEqual(self.third(data).get_content_type(), "text/rfc822-headers")

    def test_delay_and_success_return_headers(self) -> None:
        for action in ("delayed", "delivered", "relayed", "expanded"):
            rcpt = Recipient("bob@example.org", notify=("SUCCESS", "DELAY"))
            data = report(envelope([rcpt], ret="FULL"), [Notice(rcpt, action)])
            self.assertEqual(self.third(data).get_content_type(), "text/rfc822-headers", action)

    def test_8bit_body_is_message_rfc822_labelled_8bit(self) -> None:
        """RFC 2046 5.2.1: no re-encoding inside message/rfc822; the label says 8bit."""
        original = ORIGINAL.replace(b"Hello,", "Grüß dich,".encode())
        rcpt = bob_unknown()
        data = report(envelope([rcpt], body="8BITMIME"), [Notice(rcpt, "failed")], original)
        third = self.third(data)
        self.assertEqual(third.get_content_type(), "message/rfc822")
        self.assertEqual(third["Content-Transfer-Encoding"], "8bit")
        self.assertIn(original, data)
        self.assertEqual(parse(data)["Content-Transfer-Encoding"], "8bit")
        self.assertTrue(report_is_8bit(data))
        self.assertFalse(report_needs_smtputf8(data))
        # Headers only: the header section is ASCII, so the report is too.
        data = report(envelope([rcpt], ret="HDRS"), [Notice(rcpt, "failed")], original)
        self.assertEqual(self.third(data).get_content_type(), "text/rfc822-headers")
        self.assertFalse(report_is_8bit(data))
        self.assertIsNone(parse(data)["Content-Transfer-Encoding"])

    def test_utf8_headers_only_is_global_headers(self) -> None:
        """RFC 6533 section 6.3: UTF-8 header fields go back as message/global-headers."""
        rcpt = Recipient("zoe@example.jp", reply="550 5.1.1 no", relay="none")
        env = envelope([rcpt], ret="HDRS", smtputf8=True)
        data = report(env, [Notice(rcpt, "failed")], ORIGINAL_UTF8)
        third = self.third(data)
        self.assertEqual(third.get_content_type(), "message/global-headers")
        self.assertEqual(third["Content-Transfer-Encoding"], "8bit")
        self.assertNotIn("schöne".encode(), data)
        self.assertTrue(report_needs_smtputf8(data))

    def test_ascii_report_needs_nothing(self) -> None:
        data = scenario_failed_full()
        self.assertFalse(report_is_8bit(data))
        self.assertFalse(report_needs_smtputf8(data))
        self.assertNotIn("Content-Transfer-Encoding", parts(data)[0])

    def test_utf8_text_is_quoted_printable(self) -> None:
        """A UTF-8 explanation alone does not make the report 8-bit."""
        rcpt = Recipient(
            "bob@example.org",
            reply="550 5.1.1 Benutzer unbekannt \u2013 prüfen",
            relay="mx[192.0.2.1]:25",
        )
        data = report(envelope([rcpt]), [Notice(rcpt, "failed")])
        self.assertFalse(report_is_8bit(data))
        text = parts(data)[0]
        self.assertEqual(text["Content-Transfer-Encoding"], "quoted-printable")
        self.assertIn("Benutzer unbekannt \u2013 prüfen", text.get_content())
        _, block = status_blocks(data)
        self.assertEqual(
            block["Diagnostic-Code"], "smtp; 550 5.1.1 Benutzer unbekannt \\x{2013} pr\\x{FC}fen"
        )

    def test_status_follows_action(self) -> None:
        """RFC 3464 2.3.4: the status class agrees with the action."""
        cases = [
            ("failed", None, "5.0.0"),
            ("failed", "5.2.2", "5.2.2"),
            ("failed", "4.4.7", "4.4.7"),  # expiry: RFC 3463 X.4.7
            ("failed", "2.0.0", "5.0.0"),
            ("failed", "bogus", "5.0.0"),
            ("delayed", None, "4.0.0"),
            ("delayed", "4.2.2", "4.2.2"),
            ("delayed", "5.7.1", "4.7.1"),  # a 5xx block list we retry
            ("delivered", None, "2.0.0"),
            ("delivered", "2.6.0", "2.6.0"),
            ("relayed", "5.0.0", "2.0.0"),
            ("expanded", None, "2.0.0"),
        ]
        for action, recorded, expected in cases:
            rcpt = Recipient("bob@example.org", notify=("SUCCESS",), dsn_status=recorded)
            _, block = status_blocks(report(envelope([rcpt]), [Notice(rcpt, action)]))
            self.assertEqual(block["Status"], expected, (action, recorded))

    def test_diagnostic_type(self) -> None:
        """RFC 3464 2.3.6: smtp for a server's reply, X-mta for our own errors."""
        cases = [
            (
                "550 5.1.1 no such user",
                "mx.example.org[192.0.2.1]:25",
                "smtp; 550 5.1.1 no such user",
            ),
            ("451 4.4.3 no MX for example.org", "none", "X-mta; no MX for example.org"),
            (
                "451 4.3.0 internal error during delivery",
                None,
                "X-mta; internal error during delivery",
            ),
            (
                "451 4.4.2 mx.example.org[192.0.2.1]:25: lost connection",
                "mx.example.org[192.0.2.1]:25",
                "X-mta; mx.example.org[192.0.2.1]:25: lost connection",
            ),
            ("connection reset", "mx.example.org[192.0.2.1]:25", "X-mta; connection reset"),
        ]
        for reply, relay, expected in cases:
            rcpt = Recipient("bob@example.org", reply=reply, relay=relay)
            _, block = status_blocks(report(envelope([rcpt]), [Notice(rcpt, "failed")]))
            self.assertEqual(block["Diagnostic-Code"], expected, reply)
            self.assertEqual(block["Remote-MTA"] is not None, expected.startswith("smtp"), reply)

    def test_remote_mta_ip_only(self) -> None:
        rcpt = Recipient("bob@example.org", reply="550 5.1.1 no", relay="[192.0.2.1]:25")
        _, block = status_blocks(report(envelope([rcpt]), [Notice(rcpt, "failed")]))
        self.assertEqual(block["Remote-MTA"], "dns; [192.0.2.1]")

    def test_no_reply_no_dates(self) -> None:
        rcpt = Recipient("bob@example.org")
        _, block = status_blocks(report(envelope([rcpt]), [Notice(rcpt, "delayed")]))
        for absent in ("Diagnostic-Code", "Remote-MTA", "Last-Attempt-Date", "Will-Retry-Until"):
            self.assertIsNone(block[absent], absent)

    def test_long_reply_is_folded(self) -> None:
        reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
        rcpt = Recipient("bob@example.org", reply=reply, relay="mx.example.org[192.0.2.1]:25")
        data = report(envelope([rcpt]), [Notice(rcpt, "failed")])
        start = data.index(b"Diagnostic-Code:")
        lines = data[start : data.index(b"\r\n\r\n", start)].split(b"\r\n")
        self.assertGreater(len(lines), 3)
        for line in lines:
            self.assertLessEqual(len(line), 78, line)
        for line in lines[1:]:
            self.assertTrue(line.startswith(b" "), line)
        _, block = status_blocks(data)
        self.assertEqual(block["Diagnostic-Code"], f"smtp; {reply}")

    def test_envid_is_xtext(self) -> None:
        """RFC 3464 2.2.1: the ENVID in xtext; '+', '=' and space are escaped."""
        rcpt = bob_unknown()
        data = report(envelope([rcpt], envid="a+b=c d"), [Notice(rcpt, "failed")])
        self.assertEqual(status_blocks(data)[0]["Original-Envelope-Id"], "a+2Bb+3Dc+20d")

    def test_deterministic_boundary(self) -> None:
        rcpt = bob_unknown()
        env = envelope([rcpt])

        def build(message_id: str) -> bytes:
            return build_report(
                env, [Notice(rcpt, "failed")], ORIGINAL, hostname=HOST, now=ARRIVAL,
                retry_until=None, message_id=message_id,
            )  # fmt: skip

        first = build("<A.dsn@mail.example.net>")
        self.assertEqual(first, build("<A.dsn@mail.example.net>"))
        self.assertNotEqual(first, build("<B.dsn@mail.example.net>"))
        boundary = parse(first).get_boundary()
        assert boundary is not None
        self.assertTrue(boundary.startswith("=_"))
        self.assertEqual(len(parts(first)), 3)

    def test_boundary_avoids_content(self) -> None:
        """RFC 2046 5.1.1: a derived boundary that occurs in the original is changed."""
        rcpt = bob_unknown()
        env = envelope([rcpt])
        probe = build_report(
            env, [Notice(rcpt, "failed")], ORIGINAL, hostname=HOST, now=ARRIVAL,
            retry_until=None, message_id="<X@h>",
        )  # fmt: skip
        taken = parse(probe).get_boundary()
        assert taken is not None
        original = ORIGINAL + f"--{taken}\r\n".encode()
        data = build_report(
            env, [Notice(rcpt, "failed")], original, hostname=HOST, now=ARRIVAL,
            retry_until=None, message_id="<X@h>",
        )  # fmt: skip
        self.assertNotEqual(parse(data).get_boundary(), taken)
        self.assertIn(original, data)
        self.assertEqual(len(parts(data)), 3)

    def test_bad_explicit_boundary(self) -> None:
        rcpt = bob_unknown()
        env = envelope([rcpt])
        with self.assertRaises(ValueError):
            report(env, [Notice(rcpt, "failed")], ORIGINAL + b"--=_golden_boundary_1\r\n")
        with self.assertRaises(ValueError):
            report(env, [Notice(rcpt, "failed")], boundary='bad"boundary')

    def test_empty_or_bad_input(self) -> None:
        with self.assertRaises(ValueError):
            report(envelope([bob_unknown()]), [])
        with self.assertRaises(ValueError):
            Notice(bob_unknown(), "bounced")

    def test_header_section(self) -> None:
        self.assertEqual(header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(header_section(b"A: 1\r\n"), b"A: 1\r\n")
        self.assertEqual(header_section(b"\r\nbody\r\n"), b"")

    def test_subject_by_worst_action(self) -> None:
        a = Recipient("a@example.org", notify=("SUCCESS",))
        b = Recipient("b@example.org")
        cases = [
            (["delivered"], "Successful Mail Delivery Report"),
            (["delivered", "delayed"], "Delayed Mail (still being retried)"),
            (["delayed", "failed"], "Undelivered Mail Returned to Sender"),
        ]
        for actions, subject in cases:
            notices = [Notice(r, act) for r, act in zip((a, b), actions, strict=False)]
            self.assertEqual(parse(report(envelope([a, b]), notices))["Subject"], subject)

    def test_delay_text_mentions_later_failure_notice(self) -> None:
        rcpt = Recipient("bob@example.org", notify=("DELAY",))
        text = parts(report(envelope([rcpt]), [Notice(rcpt, "delayed")]))[0].get_content()
        self.assertNotIn("I will tell you", text)
        rcpt = Recipient("bob@example.org")
        text = parts(report(envelope([rcpt]), [Notice(rcpt, "delayed")]))[0].get_content()
        self.assertIn("If I have to give up, I will tell you.", text)

    def test_control_characters_in_orcpt(self) -> None:
        """An xtext ORCPT can decode to CR LF; it must not start a field."""
        rcpt = Recipient("bob@example.org", orcpt="rfc822;bob@example.org\r\nBcc: x@example.com")
        data = report(envelope([rcpt]), [Notice(rcpt, "failed")])
        _, block = status_blocks(data)
        self.assertIsNone(block["Bcc"])
        self.assertEqual(
            block["Original-Recipient"],
            "utf-8; bob@example.org\\x{0D}\\x{0A}Bcc:\\x{20}x@example.com",
        )


class NeedsNoticeTests(SynchronousTestCase):
    """RFC 3461 section 4.1 and 6.2, and no reports about reports."""

    ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
    # notify -> the actions that get a notice
    TABLE: list[tuple[tuple[str, ...] | None, set[str]]] = [
        (None, {"failed", "delayed"}),
        (("NEVER",), set()),
        (("FAILURE",), {"failed"}),
        (("DELAY",), {"delayed"}),
        (("SUCCESS",), {"delivered", "relayed", "expanded"}),
        (("DELAY", "FAILURE"), {"failed", "delayed"}),
        (("FAILURE", "SUCCESS"), {"failed", "delivered", "relayed", "expanded"}),
        (("DELAY", "SUCCESS"), {"delayed", "delivered", "relayed", "expanded"}),
        (("DELAY", "FAILURE", "SUCCESS"), set(ACTIONS)),
        (("failure",), {"failed"}),
        (("NEVER", "FAILURE", "SUCCESS"), set()),  # not valid SMTP, but NEVER wins
    ]

    def test_table(self) -> None:
        for notify, expected in self.TABLE:
            rcpt = Recipient("bob@example.org", notify=notify)
            env = envelope([rcpt])
            got = {a for a in self.ACTIONS if needs_notice(env, rcpt, a)}
            self.assertEqual(got, expected, notify)

    def test_null_sender_and_own_reports(self) -> None:
        for notify, _ in self.TABLE:
            rcpt = Recipient("bob@example.org", notify=notify)
            for env in (envelope([rcpt], sender=""), envelope([rcpt], kind="dsn")):
                for action in self.ACTIONS:
                    self.assertFalse(needs_notice(env, rcpt, action), (notify, env.kind, action))

    def test_unknown_action(self) -> None:
        rcpt = Recipient("bob@example.org")
        with self.assertRaises(ValueError):
            needs_notice(envelope([rcpt]), rcpt, "bounced")


# -- properties -------------------------------------------------------------------

_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(["\r", "\n", " ", "\t", "\x0b", "\x85", "\u2028", ":", "\\"]),
    ),
    max_size=300,
)
_injection = st.sampled_from(["", "\r\nBcc: x@example.com", "\nBcc: x", "\rBcc: x\r\n\r\n"])
_reply = st.one_of(
    st.none(),
    st.builds(lambda code, text: f"{code} {text}", st.sampled_from(["250", "451", "550"]), _text),
    _text,
    st.builds(lambda t, n: t * n, st.text(min_size=1, max_size=20), st.integers(1, 200)),
)
_recipient = st.builds(
    Recipient,
    address=st.builds(lambda a, b: a + b, _text, _injection),
    orcpt=st.one_of(st.none(), st.builds(lambda a, b: "rfc822;" + a + b, _text, _injection)),
    reply=st.builds(lambda r, i: None if r is None else r + i, _reply, _injection),
    dsn_status=st.one_of(st.none(), st.sampled_from(["5.1.1", "4.4.1", "2.0.0", "x"])),
    relay=st.one_of(st.none(), st.just("none"), st.just("mx.example.org[192.0.2.1]:25"), _text),
    last_attempt=st.one_of(st.none(), st.floats(0, 4e9)),
    category=st.one_of(st.none(), st.sampled_from(["recipient", "network", "greylist"])),
)


class PropertyTests(SynchronousTestCase):
    """Hypothesis over senders, recipients, replies, ENVID and RET, with header injection attempts:
    every report parses back with one status block per notice and no injected field."""

    @given(
        recipients=st.lists(st.tuples(_recipient, st.sampled_from(NeedsNoticeTests.ACTIONS)),
                            min_size=1, max_size=4),
        sender=st.builds(lambda a, b: a + b, _text, _injection),
        envid=st.one_of(st.none(), _text),
        ret=st.sampled_from([None, "FULL", "HDRS"]),
    )  # fmt: skip
    @settings(max_examples=200, deadline=None)
    def test_always_parses_back(
        self,
        recipients: list[tuple[Recipient, str]],
        sender: str,
        envid: str | None,
        ret: str | None,
    ) -> None:
        """Any addresses and replies: same number of blocks, no injected field."""
        env = envelope([r for r, _ in recipients], sender=sender, envid=envid, ret=ret)
        notices = [Notice(r, action) for r, action in recipients]
        data = build_report(
            env, notices, ORIGINAL, hostname=HOST, now=ARRIVAL, retry_until=ARRIVAL + DAY,
            message_id="<P.dsn@mail.example.net>",
        )  # fmt: skip
        msg = parse(data)
        self.assertIsNone(msg["Bcc"])
        self.assertEqual(msg["From"], f"Mail Delivery System <MAILER-DAEMON@{HOST}>")
        self.assertEqual(len(parts(data)), 3)
        blocks = status_blocks(data)
        self.assertEqual(len(blocks), 1 + len(notices))
        self.assertEqual(blocks[0]["Reporting-MTA"], f"dns; {HOST}")
        allowed = {
            "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
            "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until",
        }  # fmt: skip
        for block, notice in zip(blocks[1:], notices, strict=True):
            self.assertLessEqual(set(block.keys()), allowed)
            self.assertEqual(block["Action"], notice.action)
            self.assertTrue(re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", block["Status"]))
            self.assertIsNotNone(block["Final-Recipient"])
        for line in data.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", data.replace(b"\r\n", b""))
        start = data.index(b"Content-Type: message/delivery-status")
        self.assertTrue(data[start : data.index(b"\r\n--=_", start)].isascii())


if __name__ == "__main__":
    if sys.argv[1:] != []:
        sys.exit("usage: python -m tests.test_dsn  (rewrites tests/golden/dsn-*.eml)")
    regenerate()
