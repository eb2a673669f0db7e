"""The clamd and spamd plugins against real daemons on loopback (tests/scanners.py)."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mta.checks import Action, MessageInfo, SessionInfo, Verdict
from mta.checks import clamd as clamdmod
from mta.checks import host as checkhost
from mta.checks import spamd as spamdmod
from mta.envelope import Envelope, Recipient
from mta.spool.format import dumps, loads
from tests.scanners import EICAR, EICAR_NAME, GTUBE, Clamd, Spamd, free_port

# Scores above 0 and below 5 with spamd's shipped rules and no network tests
# (GUARANTEED_100_PERCENT), in a message with every header a submission has.
SPAMMY = (
    b"From: App <app@example.com>\r\nTo: someone@example.test\r\nSubject: Free money\r\n"
    b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <20261124120000.abcdef@example.com>\r\n\r\n"
    b"Click here to claim your FREE prize now!!! 100% guaranteed, act now, limited time offer.\r\n"
)

SESSION = SessionInfo(peer="127.0.0.1", helo="c", login="a@example.com", tls=None, trusted=False)


def message(body: bytes, *, attachment: bytes | None = None) -> MessageInfo:
    if attachment is None:
        data = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n" + body
    else:
        encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
        data = (
            b"From: a@example.com\r\nTo: b@example.net\r\nSubject: report\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\n" + body + b"\r\n"
            b"--XX\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="eicar.com"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--XX--\r\n"
        )
    return MessageInfo(
        queue_id="TESTID",
        sender="a@example.com",
        recipients=("b@example.net",),
        size=len(data),
        eight_bit=False,
        opener=lambda: io.BytesIO(data),
    )


def whole(data: bytes) -> MessageInfo:
    """A message given with its header section."""
    return MessageInfo(
        queue_id="TESTID",
        sender="app@example.com",
        recipients=("someone@example.test",),
        size=len(data),
        eight_bit=False,
        opener=lambda: io.BytesIO(data),
    )


async def verdict_of(result: Verdict | Deferred[Verdict]) -> Verdict:
    if isinstance(result, Deferred):
        return await result
    return result


def closed_port_address() -> str:
    return f"tcp:host=127.0.0.1:port={free_port()}"


class ClamdTests(TestCase):
    """The clamd plugin against a real clamd (over UNIX and TCP sockets): PING, a clean message,
    EICAR as an attachment and near the end of many INSTREAM chunks, a message over max_size, one
    over clamd's own StreamMaxLength, and clamd down as a temporary refusal."""

    clamd: Clamd

    @classmethod
    def setUpClass(cls) -> None:
        cls.clamd = Clamd(stream_max=1024 * 1024)
        cls.clamd.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.clamd.stop()

    def check(self, address: str | None = None, **options: Any) -> clamdmod.ClamdCheck:
        opts = clamdmod.Options(address=address or self.clamd.unix_address, **options)
        return clamdmod.ClamdCheck(opts, reactor, "test")

    async def test_ping(self) -> None:
        self.assertTrue(await self.check().ping())
        self.assertTrue(await self.check(self.clamd.tcp_address).ping())

    async def test_clean_message(self) -> None:
        v = await verdict_of(self.check().on_message(SESSION, message(b"Hello\r\n")))
        self.assertEqual(v.action, Action.CONTINUE)

    async def test_eicar_attachment_over_unix_and_tcp(self) -> None:
        for address in (self.clamd.unix_address, self.clamd.tcp_address):
            m = message(b"See attached.", attachment=EICAR)
            v = await verdict_of(self.check(address).on_message(SESSION, m))
            self.assertEqual(v.action, Action.REJECT)
            reply = v.to_reply()
            self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
            self.assertIn(EICAR_NAME, reply.text)

    async def test_many_chunks(self) -> None:
        """A message of many INSTREAM chunks, EICAR near its end."""
        filler = (b"y" * 76 + b"\r\n") * 6000  # ~470 KB of text before the attachment
        m = message(filler, attachment=EICAR)
        v = await verdict_of(self.check().on_message(SESSION, m))
        self.assertEqual(v.action, Action.REJECT)

    async def test_over_max_size(self) -> None:
        m = message(b"z" * 5000)
        v = await verdict_of(self.check(max_size=1000).on_message(SESSION, m))
        self.assertEqual((v.action, v.to_reply().code), (Action.REJECT, 552))
        v = await verdict_of(self.check(max_size=1000, oversize="accept").on_message(SESSION, m))
        self.assertEqual(v.action, Action.CONTINUE)

    async def test_over_clamds_stream_limit(self) -> None:
        """clamd here takes 1 MB (StreamMaxLength); a larger stream is refused by it."""
        m = message((b"w" * 98 + b"\r\n") * 20000)  # 2 MB
        v = await verdict_of(self.check().on_message(SESSION, m))
        self.assertEqual((v.action, v.to_reply().code), (Action.REJECT, 552))

    async def test_clamd_down_is_a_tempfail(self) -> None:
        for address in (closed_port_address(), "unix:path=/nonexistent/clamd.sock"):
            v = await verdict_of(self.check(address).on_message(SESSION, message(b"hi")))
            reply = v.to_reply()
            self.assertEqual((v.action, reply.code), (Action.TEMPFAIL, 451))
            self.assertIn("Virus scanner unavailable", reply.text)


class SpamdTests(TestCase):
    """The spamd plugin against a real spamd: PING, GTUBE refused, a clean message passing, a score
    above 0 and below the limit kept for delivery, mark_score flagging instead of refusing, the
    outbound hook sending the kept fields, the operator's reject_score, only the first max_size
    bytes scored, and spamd down as a temporary refusal."""

    spamd: Spamd

    @classmethod
    def setUpClass(cls) -> None:
        cls.spamd = Spamd()
        cls.spamd.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.spamd.stop()

    def check(self, address: str | None = None, **options: Any) -> spamdmod.SpamdCheck:
        opts = spamdmod.Options(address=address or self.spamd.address, **options)
        return spamdmod.SpamdCheck(opts, reactor, "test")

    async def test_ping(self) -> None:
        self.assertTrue(await self.check().ping())

    async def test_gtube_is_refused(self) -> None:
        v = await verdict_of(self.check().on_message(SESSION, message(GTUBE + b"\r\n")))
        reply = v.to_reply()
        self.assertEqual((v.action, reply.code, reply.enhanced), (Action.REJECT, 550, "5.7.1"))
        self.assertIn("spam", reply.text)

    async def test_clean_message_passes(self) -> None:
        body = b"Hello Bob,\r\n\r\nthe minutes of today's meeting are below.\r\n\r\nAlice\r\n"
        info = message(body)
        v = await verdict_of(self.check().on_message(SESSION, info))
        self.assertEqual(v.action, Action.CONTINUE)
        fields = info.notes["spamd"]["headers"]
        self.assertRegex(fields, r"^X-Spam-Checker-Version: SpamAssassin \d")
        self.assertIn("\r\nX-Spam-Status: No, score=", fields)
        self.assertNotIn("X-Spam-Flag", fields)

    async def test_score_above_zero_below_the_limit(self) -> None:
        """A message SpamAssassin scores above 0 (GUARANTEED_100_PERCENT) is
        accepted with the score and the rules in SpamAssassin's header shape."""
        info = whole(SPAMMY)
        v = await verdict_of(self.check().on_message(SESSION, info))
        self.assertEqual(v.action, Action.CONTINUE)
        fields = info.notes["spamd"]["headers"]
        score = re.search(r"\r\nX-Spam-Score: (-?[0-9.]+)\r\n", fields)
        assert score is not None, fields
        self.assertGreater(float(score.group(1)), 0)
        self.assertLess(float(score.group(1)), 5.0)
        # Unfolded (RFC 5322 section 2.2.3), the tests list read without the
        # folding whitespace after its commas.
        unfolded = fields.replace(",\r\n\t", ",").replace("\r\n\t", "\t")
        status = re.search(r"X-Spam-Status: (.*)\r\n", unfolded)
        assert status is not None, fields
        self.assertRegex(
            status.group(1),
            rf"^No, score={re.escape(score.group(1))} required=5\.0 "
            r"tests=\S*GUARANTEED_100_PERCENT\S*\s+autolearn=\w+ ",
        )
        self.assertNotIn("X-Spam-Flag", fields)
        for line in fields.split("\r\n"):
            self.assertLessEqual(len(line), 78, line)

    async def test_mark_score_flags_instead_of_refusing(self) -> None:
        info = whole(SPAMMY)
        v = await verdict_of(self.check(mark_score=1.0).on_message(SESSION, info))
        self.assertEqual(v.action, Action.CONTINUE)
        fields = info.notes["spamd"]["headers"]
        self.assertIn("\r\nX-Spam-Flag: YES\r\n", fields)
        self.assertIn("\r\nX-Spam-Level: **", fields)
        self.assertIn("X-Spam-Status: Yes, score=", fields)
        self.assertIn(" required=1.0 ", fields)
        # Above reject_score it is refused all the same.
        v = await verdict_of(self.check(mark_score=1.0, reject_score=2.0).on_message(SESSION, info))
        self.assertEqual(v.action, Action.REJECT)

    async def test_outbound_hook_sends_the_kept_fields(self) -> None:
        check = self.check()
        info = whole(SPAMMY)
        await verdict_of(check.on_message(SESSION, info))
        env = Envelope("TESTID", "a@example.com", [Recipient("b@example.net")], 0.0)
        self.assertEqual(check.on_outbound(env, b"From: a\r\n\r\nx\r\n"), b"")
        env.extra["plugins"] = dict(info.notes)
        sent = check.on_outbound(env, b"From: a\r\n\r\nx\r\n")
        self.assertEqual(sent, info.notes["spamd"]["headers"].encode())
        self.assertTrue(sent.startswith(b"X-Spam-Checker-Version: "))
        self.assertTrue(sent.endswith(b"\r\n"))
        # Through the envelope's JSON, as the spool keeps it.
        self.assertEqual(check.on_outbound(loads(dumps(env)), b""), sent)
        env.extra["plugins"] = {"spamd": {"headers": 5}}
        self.assertEqual(check.on_outbound(env, b""), b"")

    async def test_reject_score_is_the_operators(self) -> None:
        body = b"Hello Bob,\r\n\r\nsee you tomorrow.\r\n"
        v = await verdict_of(self.check(reject_score=-100.0).on_message(SESSION, message(body)))
        self.assertEqual(v.action, Action.REJECT)

    async def test_only_the_first_max_size_bytes(self) -> None:
        """GTUBE past max_size is not seen (and the daemon is not kept waiting)."""
        body = (b"n" * 98 + b"\r\n") * 20 + GTUBE + b"\r\n"
        # GTUBE alone scores 1000; the rest of this odd message a few points.
        check = self.check(max_size=1024, reject_score=500.0)
        v = await verdict_of(check.on_message(SESSION, message(body)))
        self.assertEqual(v.action, Action.CONTINUE)
        check = self.check(max_size=4096, reject_score=500.0)
        v = await verdict_of(check.on_message(SESSION, message(body)))
        self.assertEqual(v.action, Action.REJECT)

    async def test_spamd_down_is_a_tempfail(self) -> None:
        v = await verdict_of(self.check(closed_port_address()).on_message(SESSION, message(b"x")))
        self.assertEqual((v.action, v.to_reply().code), (Action.TEMPFAIL, 451))


class Silent(Protocol):
    """Accepts and never says a word (a wedged daemon)."""

    def connectionMade(self) -> None:
        self.factory.open += 1  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.open -= 1  # type: ignore[attr-defined]


class SilentDaemonTests(TestCase):
    """A daemon that accepts the connection and never answers: the start-up PING gives up after the
    plugin's timeout and logs it."""

    timeout = 20  # without a start-up timeout the PING would wait forever

    def setUp(self) -> None:
        self.factory = Factory.forProtocol(Silent)
        self.factory.open = 0  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.address = f"tcp:host=127.0.0.1:port={port.getHost().port}"
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def test_startup_ping_gives_up_after_the_timeout_and_logs(self) -> None:
        plugins = [
            clamdmod.ClamdCheck(clamdmod.Options(address=self.address), reactor, "test"),
            spamdmod.SpamdCheck(spamdmod.Options(address=self.address), reactor, "test"),
        ]
        checks = checkhost.Checks(
            [checkhost.Loaded(p.name, p, 0.5) for p in plugins],
            reactor,  # type: ignore[arg-type]
        )
        await checks.startup()
        text = [formatEvent(e) for e in self.events]
        for name in ("clamd", "spamd"):
            said = [t for t in text if t.startswith(f"{name} at {self.address} does not answer")]
            self.assertEqual(len(said), 1, text)
            self.assertIn("timeout", said[0])
        # The connections were closed, not left to the daemon.
        await _later(0.1)
        self.assertEqual(self.factory.open, 0)  # type: ignore[attr-defined]


def _later(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


class SpamdAnswerTests(TestCase):
    """Parsing spamd's answers (SPAMC protocol, HEADERS): the Spam: line, the report fields (control
    characters dropped), an answer without X-Spam-Status, the fields the plugin owns, malformed
    answers and a score that is not a number."""

    def test_parse(self) -> None:
        answer = (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: True ; 1002.3 / 5.0\r\n\r\nGTUBE,X_Y"
        )
        result = spamdmod.parse_answer(answer)
        self.assertEqual((result.score, result.threshold, result.rules), (1002.3, 5.0, "GTUBE,X_Y"))

    def test_parse_headers_answer(self) -> None:
        answer = (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 300\r\nSpam: False ; 1.1 / 5.0\r\n\r\n"
            b"X-Spam-Checker-Version: SpamAssassin 4.0.1 (2024-03-25) on mx\r\n"
            b"X-Spam-Level: *\r\n"
            b"X-Spam-Status: No, score=1.1 required=5.0 tests=HTML_MESSAGE,MIME_HTML_ONLY,\r\n"
            b"\tNO_RECEIVED autolearn=no autolearn_force=no version=4.0.1\r\n"
            b"From: a@example.com\r\nX-Spam-Other: \x1b[31mred\r\n\r\n"
        )
        result = spamdmod.parse_answer(answer)
        self.assertEqual(result.rules, "HTML_MESSAGE,MIME_HTML_ONLY,NO_RECEIVED")
        self.assertEqual(result.score_text, "1.1")
        self.assertEqual(result.field("X-Spam-Other"), "[31mred")
        fields = spamdmod.report_fields(result, 5.0)
        self.assertEqual(
            fields,
            b"X-Spam-Checker-Version: SpamAssassin 4.0.1 (2024-03-25) on mx\r\n"
            b"X-Spam-Score: 1.1\r\n"
            b"X-Spam-Status: No, score=1.1 required=5.0 tests=HTML_MESSAGE,MIME_HTML_ONLY,\r\n"
            b"\tNO_RECEIVED autolearn=no autolearn_force=no version=4.0.1\r\n",
        )
        marked = spamdmod.report_fields(result, 1.0)
        self.assertIn(b"\r\nX-Spam-Flag: YES\r\nX-Spam-Level: *\r\n", marked)
        self.assertIn(b"X-Spam-Status: Yes, score=1.1 required=1.0 tests=", marked)

    def test_report_without_spamassassin_status(self) -> None:
        answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5.0\r\n\r\nFrom: a@b\r\n\r\n"
        fields = spamdmod.report_fields(spamdmod.parse_answer(answer), 5.0)
        self.assertEqual(
            fields,
            b"X-Spam-Score: -0.5\r\nX-Spam-Status: No, score=-0.5 required=5.0 tests=none\r\n",
        )

    def test_owned_fields(self) -> None:
        self.assertIn("X-Spam-Status", spamdmod.SpamdCheck.owned_fields)
        self.assertIn("X-Spam-Flag", spamdmod.SpamdCheck.owned_fields)

    def test_errors(self) -> None:
        for answer in (b"HTTP/1.0 200 OK\r\n\r\n", b"SPAMD/1.1 76 EX_PROTOCOL\r\n\r\n",
                       b"SPAMD/1.1 0 EX_OK\r\n\r\n"):  # fmt: skip
            self.assertRaises(spamdmod.SpamdAnswerError, spamdmod.parse_answer, answer)

    def test_a_score_that_is_not_a_number(self) -> None:
        for score in (b".", b"1.2.3", b"-", b"1.", b"nan", b"1e3"):
            for line in (b"Spam: False ; %s / 5.0" % score, b"Spam: False ; 1.0 / %s" % score):
                answer = b"SPAMD/1.1 0 EX_OK\r\n" + line + b"\r\n\r\n"
                e = self.assertRaises(spamdmod.SpamdAnswerError, spamdmod.parse_answer, answer)
                self.assertIn("not a spamd answer", str(e))
        answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5\r\n\r\n"
        result = spamdmod.parse_answer(answer)
        self.assertEqual((result.score, result.threshold), (-0.5, 5.0))
