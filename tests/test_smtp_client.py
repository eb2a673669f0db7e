"""Tests for L{mta.smtp.client}: the outbound ESMTP client.

Layers, fastest first: L{DotStuffer} alone (cases and a Hypothesis
property); L{ClientProtocol} on a StringTransport; the client against the
scriptable sink and against our own submission server in memory (iosim,
with real TLS in memory, see L{tests.client_support}); a table of broken
servers; timeouts on a Clock; then real loopback sockets with real TLS.

The message bytes handed to the client are the spool's: CRLF line ends,
not dot-stuffed.  FileSender reads them in chunks of 2**14 octets, and
Twisted's own SMTPClient stuffs each chunk on its own, so that a line "."
beginning exactly at offset 16384 ends the message early; the boundary
tests below place dot lines at exactly those offsets.
"""

from __future__ import annotations

import base64
import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.errors import DeliveryError, Reply
from mta.smtp.client import (
    WHOLE_WRITE,
    ClientPolicy,
    ClientProtocol,
    ClientTimeouts,
    DotStuffer,
    OutboundConnection,
    OutboundRecipient,
    TransactionResult,
    connect,
)
from mta.smtp.dataread import DataReader
from mta.smtp.server import SubmissionFactory
from mta.testing import DROP, HANG, SinkBehaviour, SinkFactory, SinkServer
from mta.tls import ServerTLS, ensure_selfsigned
from tests.client_support import (
    CLIENT_ADDRESS,
    NOT_TLS,
    STARTTLS_NOW,
    NoCertificateTLS,
    RecordingSinkFactory,
    ScriptedServer,
    Wire,
    client_closed,
    deferred_test,
    outbound,
    peek,
    sink_wire,
    unstuff,
)
from tests.support import CERT, KEY, LOGIN, PASSWORD, Harness

CHUNK = 2**14  # FileSender.CHUNK_SIZE; checked below

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".A line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"The line above was a single dot.\r\n"
)


def server_tls() -> ServerTLS:
    return ServerTLS(CERT, KEY)


def stuff_all(chunks: list[bytes]) -> bytes:
    """The DATA stream one DotStuffer makes of these chunks, terminator included."""
    s = DotStuffer()
    return b"".join(s(c) for c in chunks) + s.terminator()


def chunked(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def filler(n: int) -> bytes:
    """C{n} octets of CRLF lines of at most 81 octets (C{n} is 0 or >= 2)."""
    assert n == 0 or n >= 2, n
    out = bytearray()
    while n > 81:
        out += b"f" * 78 + b"\r\n"
        n -= 80
    if n:
        out += b"g" * (n - 2) + b"\r\n"
    return bytes(out)


def dotted_message(lines_at: list[tuple[int, bytes]], tail: bytes = b"end\r\n") -> bytes:
    """A message with each C{line} (plus CRLF) starting exactly at its offset."""
    out = bytearray(b"From: <alice@example.com>\r\nSubject: dots at chunk boundaries\r\n\r\n")
    for offset, line in lines_at:
        out += filler(offset - len(out))
        assert len(out) == offset
        out += line + b"\r\n"
    return bytes(out + tail)


def naive_chunk_stuffing(data: bytes) -> bytes:
    """Twisted SMTPClient's way: each 16 KiB chunk stuffed on its own."""
    out = b"".join(c.replace(b"\r\n.", b"\r\n..") for c in chunked(data))
    if out.startswith(b"."):
        out = b"." + out
    return out + b"\r\n.\r\n"


# A line "." starting exactly at the first chunk boundary: the case the
# issue names.  Variants: the boundary inside the CRLF before the dot
# ("\r" | "\n."), and dot lines that are not the terminator.
AT_BOUNDARY = dotted_message([(CHUNK, b".")])
CR_LF_SPLIT = dotted_message([(CHUNK + 1, b".")])
# More than 1 MiB with dot lines at or around 70 boundaries.
_VARIANTS = [(0, b"."), (1, b"."), (0, b".."), (-1, b".x"), (0, b".\t"), (2, b".")]
BIG = dotted_message(
    [(k * CHUNK + _VARIANTS[k % 6][0], _VARIANTS[k % 6][1]) for k in range(1, 70)]
    + [(70 * CHUNK + 100, b".")]
)


def refusing_mail(reply: str, *, pipelining: bool = True, **kw: Any) -> SinkBehaviour:
    """A sink that refuses MAIL and then, like a real server, RCPT with 503.

    (The sink itself accepts RCPT without MAIL; see SinkBugs.)
    """
    state = {"mail": False}

    def mail(line: str) -> str:
        state["mail"] = reply.startswith("250")
        return reply

    def rcpt(line: str) -> str:
        return "250 2.1.5 Ok" if state["mail"] else "503 5.5.1 Need MAIL command"

    ext = SinkBehaviour().extensions
    if not pipelining:
        ext = tuple(e for e in ext if e != "PIPELINING")
    return SinkBehaviour(mail=mail, rcpt=rcpt, extensions=ext, **kw)


NO_PIPELINING = tuple(e for e in SinkBehaviour().extensions if e != "PIPELINING")


# -- DotStuffer ------------------------------------------------------------


class DotStufferTests(SynchronousTestCase):
    """The outbound dot-stuffer at every chunk boundary: leading and lone dots at the start, dots
    inside a chunk, boundaries between CR and LF, after CRLF and before a dot, a dot at the end
    of a chunk, the terminator with and without a final CRLF, empty messages and chunks, every
    two- and three-way split, and Hypothesis round trips."""

    def test_chunk_size_is_what_the_boundary_tests_assume(self) -> None:
        self.assertEqual(FileSender.CHUNK_SIZE, CHUNK)

    def test_leading_dot_at_message_start(self) -> None:
        s = DotStuffer()
        self.assertEqual(s(b".hidden\r\n"), b"..hidden\r\n")
        self.assertEqual(s.terminator(), b".\r\n")

    def test_lone_dot_at_message_start(self) -> None:
        self.assertEqual(stuff_all([b".\r\n"]), b"..\r\n.\r\n")

    def test_dots_inside_a_chunk(self) -> None:
        self.assertEqual(stuff_all([b"a\r\n.\r\nb.\r\n..c\r\n"]), b"a\r\n..\r\nb.\r\n...c\r\n.\r\n")

    def test_boundary_between_cr_and_lf_dot(self) -> None:
        s = DotStuffer()
        self.assertEqual(s(b"a\r") + s(b"\n.b\r\n"), b"a\r\n..b\r\n")

    def test_boundary_between_crlf_and_dot(self) -> None:
        s = DotStuffer()
        self.assertEqual(s(b"a\r\n") + s(b".\r\n"), b"a\r\n..\r\n")
        self.assertEqual(s.terminator(), b".\r\n")

    def test_boundary_cr_then_lone_lf_then_dot(self) -> None:
        self.assertEqual(stuff_all([b"a\r", b"\n", b".", b"\r\n"]), b"a\r\n..\r\n.\r\n")

    def test_dot_at_end_of_chunk_is_not_a_line_start(self) -> None:
        self.assertEqual(stuff_all([b"a.", b"\r\nb\r\n"]), b"a.\r\nb\r\n.\r\n")
        self.assertEqual(stuff_all([b"a\r\n.", b"\r\n"]), b"a\r\n..\r\n.\r\n")

    def test_terminator_after_final_crlf(self) -> None:
        self.assertEqual(stuff_all([b"a\r\n"]), b"a\r\n.\r\n")

    def test_terminator_without_final_crlf(self) -> None:
        self.assertEqual(stuff_all([b"a"]), b"a\r\n.\r\n")
        self.assertEqual(stuff_all([b"a\r\n."]), b"a\r\n..\r\n.\r\n")

    def test_empty_message(self) -> None:
        self.assertEqual(stuff_all([]), b".\r\n")
        self.assertEqual(stuff_all([b""]), b".\r\n")
        self.assertEqual(unstuff(stuff_all([])), b"")

    def test_empty_chunk_keeps_state(self) -> None:
        self.assertEqual(stuff_all([b"a\r", b"", b"\n.", b"\r\n"]), b"a\r\n..\r\n.\r\n")

    def test_every_two_and_three_way_split(self) -> None:
        whole = stuff_all([MESSAGE])
        self.assertEqual(unstuff(whole), MESSAGE)
        n = len(MESSAGE)
        for i in range(n + 1):
            self.assertEqual(stuff_all([MESSAGE[:i], MESSAGE[i:]]), whole, i)
        for i in range(0, n + 1, 3):
            for j in range(i, n + 1):
                self.assertEqual(stuff_all([MESSAGE[:i], MESSAGE[i:j], MESSAGE[j:]]), whole, (i, j))

    def test_boundary_messages_need_state(self) -> None:
        """The boundary messages break per-chunk stuffing (so they test something)."""
        for data in (AT_BOUNDARY, BIG):
            with self.assertRaises(ValueError):
                unstuff(naive_chunk_stuffing(data))
            self.assertEqual(unstuff(stuff_all(chunked(data))), data)
        self.assertEqual(AT_BOUNDARY[CHUNK - 2 : CHUNK + 3], b"\r\n.\r\n")
        self.assertEqual(CR_LF_SPLIT[CHUNK - 1 : CHUNK + 4], b"\r\n.\r\n")
        self.assertGreater(len(BIG), 2**20)

    # No CR, LF or NUL inside lines: our server's reader, used as a check
    # below, refuses those.
    _line = st.one_of(
        st.sampled_from([b"", b".", b"..", b". ", b".x", b"x.", b"\t."]),
        st.binary(max_size=12).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00")),
        st.binary(max_size=6).map(lambda b: b"." + bytes(c for c in b if c not in b"\r\n\x00")),
    )

    @settings(max_examples=400, deadline=None)
    @given(
        lines=st.lists(_line, max_size=30),
        tail=st.sampled_from([b"", b"x", b".", b".x", b".."]),
        data=st.data(),
    )
    def test_property_any_chunking_round_trips(
        self, lines: list[bytes], tail: bytes, data: st.DataObject
    ) -> None:
        """Stuffed in any chunks, then unstuffed, a message comes back whole.

        C{tail} is an unterminated last line, which gets a CRLF.
        """
        original = b"".join(ln + b"\r\n" for ln in lines) + tail
        cuts = data.draw(st.lists(st.integers(0, len(original)), max_size=15))
        bounds = [0, *sorted(cuts), len(original)]
        stream = stuff_all([original[i:j] for i, j in itertools.pairwise(bounds)])
        expected = original + (b"\r\n" if tail else b"")
        # The first CRLF.CRLF (counting the CRLF of the DATA line) is the end.
        self.assertEqual((b"\r\n" + stream).find(b"\r\n.\r\n"), len(stream) - 3)
        self.assertEqual(unstuff(stream), expected)
        # Our own server's DATA reader agrees.
        received: list[bytes] = []
        reader = DataReader(received.append, 10_000_000)
        self.assertEqual(reader.feed(stream), b"")
        self.assertEqual(b"".join(received), expected)
        # And the chunking made no difference to the stream.
        self.assertEqual(stream, stuff_all([original]))


# -- ClientProtocol on a StringTransport ------------------------------------


class ReplyReaderTests(SynchronousTestCase):
    """Reading the next hop's replies: multi-line replies in pieces, enhanced codes (and ones of
    another class taken as text), bare LF tolerated, code-only replies, malformed lines and mixed
    codes as protocol errors, endless lines and replies bounded, a reply nobody waits for, the
    timeout, waiters served in order, and a lost connection failing every waiter."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.p = ClientProtocol(self.clock)
        self.p.remote = "mx.test[127.0.0.1]:25"
        self.transport = StringTransport()
        self.p.makeConnection(self.transport)

    def reply(self, *chunks: bytes) -> Reply | DeliveryError:
        d = self.p.expect(10)
        for c in chunks:
            self.p.dataReceived(c)
        if not d.called:
            return self.fail("no reply")
        result: list[Any] = []
        d.addBoth(result.append)
        if isinstance(result[0], Failure):
            error = result[0].value
            assert isinstance(error, DeliveryError)
            return error
        assert isinstance(result[0], Reply)
        return result[0]

    def test_multi_line_reply_in_pieces(self) -> None:
        r = self.reply(b"250-mx.test\r", b"\n250-PIPE", b"LINING\r\n250 SIZE 100\r\n")
        self.assertEqual(r, Reply(250, None, "mx.test\nPIPELINING\nSIZE 100"))

    def test_enhanced_code_on_every_line(self) -> None:
        r = self.reply(b"550-5.1.1 No such user\r\n550-5.1.1 here\r\n550 5.1.1 at all\r\n")
        self.assertEqual(r, Reply(550, "5.1.1", "No such user\nhere\nat all"))

    def test_enhanced_code_of_another_class_is_text(self) -> None:
        self.assertEqual(self.reply(b"550 4.1.1 odd\r\n"), Reply(550, None, "4.1.1 odd"))

    def test_bare_lf_is_tolerated(self) -> None:
        self.assertEqual(self.reply(b"250 ok\n"), Reply(250, None, "ok"))

    def test_code_only(self) -> None:
        self.assertEqual(self.reply(b"250\r\n"), Reply(250, None, ""))

    def assertProtocolError(self, result: Reply | DeliveryError) -> None:
        assert isinstance(result, DeliveryError), result
        self.assertEqual(result.kind, "protocol")
        self.assertEqual((result.reply.code, result.reply.enhanced), (451, "4.5.0"))
        self.assertTrue(result.temporary)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformed_lines(self) -> None:
        for bad in (
            b"hello\r\n",
            b"25\r\n",
            b"2500 x\r\n",
            b"25O x\r\n",
            b"199 x\r\n",
            b"600 x\r\n",
        ):
            self.setUp()
            self.assertProtocolError(self.reply(bad))

    def test_lines_with_different_codes(self) -> None:
        self.assertProtocolError(self.reply(b"250-a\r\n251 b\r\n"))

    def test_endless_line(self) -> None:
        self.assertProtocolError(self.reply(b"250 " + b"x" * 3000))

    def test_endless_reply(self) -> None:
        self.assertProtocolError(self.reply(b"250-x\r\n" * 101))

    def test_reply_nobody_waits_for(self) -> None:
        self.p.dataReceived(b"421 4.3.2 shutting down\r\n")
        self.assertTrue(self.transport.disconnecting)
        d = self.p.expect(10)
        self.assertEqual(self.failureResultOf(d, DeliveryError).value.kind, "protocol")

    def test_timeout_aborts(self) -> None:
        d = self.p.expect(10)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual(
            (error.kind, error.reply.code, error.reply.enhanced), ("timeout", 451, "4.4.2")
        )
        self.assertTrue(self.transport.disconnecting)

    def test_replies_go_to_waiters_in_order(self) -> None:
        first, second = self.p.expect(10), self.p.expect(20)
        self.p.dataReceived(b"250 one\r\n")
        self.assertEqual(self.successResultOf(first).text, "one")
        # The second reply's own timeout starts when the first has come.
        self.clock.advance(19)
        self.assertNoResult(second)
        self.p.dataReceived(b"251 two\r\n")
        self.assertEqual(self.successResultOf(second).code, 251)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_fails_every_waiter(self) -> None:
        first, second = self.p.expect(10), self.p.expect(10)
        self.p.connectionLost(Failure(Exception("gone")))
        for d in (first, second):
            error = self.failureResultOf(d, DeliveryError).value
            self.assertEqual((error.kind, error.reply.code), ("network", 451))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- in memory against the sink ---------------------------------------------


class SinkConversationTests(SynchronousTestCase):
    """The outbound client against an in-memory sink: messages byte for byte (dots at chunk
    boundaries, empty, no final CRLF), pipelining or one command at a time, refused recipients
    and transactions, two transactions on one connection, unusable after a 421, a drop or a
    timeout, DSN and MIME parameters only when offered, SIZE checked before MAIL, HELO without
    extensions, STARTTLS by policy (and a response injected before TLS not believed), AUTH PLAIN
    preferred over LOGIN, and no password without TLS."""

    def ready(
        self, behaviour: SinkBehaviour | None = None, policy: ClientPolicy | None = None, **kw: Any
    ) -> tuple[RecordingSinkFactory, Wire]:
        factory, wire = sink_wire(behaviour, policy, **kw)
        self.successResultOf(wire.run(wire.connection.setup()))
        return factory, wire

    def send(self, wire: Wire, data: bytes = MESSAGE, **kw: Any) -> TransactionResult:
        return self.successResultOf(wire.run(wire.connection.send(outbound(data, **kw))))

    def quit(self, wire: Wire) -> None:
        self.successResultOf(wire.run(wire.connection.quit()))
        self.assertTrue(wire.client_io.disconnected)
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_message_arrives_byte_identical(self) -> None:
        factory, wire = self.ready()
        result = self.send(wire)
        self.assertEqual(result.replies, [Reply(250, "2.0.0", "Ok: queued as SINK")])
        self.assertEqual(result.data_reply, result.replies[0])
        self.assertEqual(len(factory.messages), 1)
        self.assertEqual(factory.messages[0].data, MESSAGE)
        self.assertEqual(
            factory.messages[0].sender_line, f"MAIL FROM:<alice@example.com> SIZE={len(MESSAGE)}"
        )
        self.assertEqual(factory.messages[0].rcpt_lines, ["RCPT TO:<bob@example.net>"])
        self.quit(wire)
        self.assertEqual(factory.commands[0], "EHLO client.test")
        self.assertEqual(factory.commands[-1], "QUIT")

    def test_line_dot_at_chunk_boundary_in_memory(self) -> None:
        for data in (AT_BOUNDARY, CR_LF_SPLIT):
            factory, wire = self.ready()
            self.assertEqual(
                self.send(wire, data).data_reply, Reply(250, "2.0.0", "Ok: queued as SINK")
            )
            self.assertEqual([m.data for m in factory.messages], [data])
            self.quit(wire)
            self.assertEqual(factory.commands[-1], "QUIT")

    def test_dot_lines_where_the_whole_write_ends_in_memory(self) -> None:
        """A message over WHOLE_WRITE goes out as one write and then a
        stream: a dot line at, or one octet either side of, the seam (the
        CRLF before it split there too) is stuffed as anywhere else."""
        for delta in (-2, -1, 0, 1, 2):
            data = dotted_message([(WHOLE_WRITE + 1 + delta, b".")])
            with self.subTest(delta=delta):
                factory, wire = self.ready()
                self.assertEqual(self.send(wire, data).replies[0].code, 250)
                self.assertTrue(factory.messages[0].data == data, "the message changed")
                self.quit(wire)

    def test_big_message_with_dots_at_many_boundaries_in_memory(self) -> None:
        factory, wire = self.ready()
        self.assertEqual(self.send(wire, BIG).replies[0].code, 250)
        self.assertEqual(len(factory.messages), 1)
        self.assertTrue(factory.messages[0].data == BIG, "the message changed on the way")
        self.quit(wire)

    def test_empty_message(self) -> None:
        factory, wire = self.ready()
        self.assertEqual(self.send(wire, b"").replies[0].code, 250)
        self.assertEqual(factory.messages[0].data, b"")

    def test_message_without_final_crlf_gets_one(self) -> None:
        factory, wire = self.ready()
        self.send(wire, b"Subject: x\r\n\r\nno newline at the end")
        self.assertEqual(factory.messages[0].data, b"Subject: x\r\n\r\nno newline at the end\r\n")

    # PIPELINING (RFC 2920)

    def test_pipelining_sends_mail_rcpt_data_in_one_write(self) -> None:
        factory, wire = self.ready()
        ehlo_reply_at = len(wire.transcript)
        self.send(wire, recipients=["a@example.net", "b@example.net"])
        group = (
            f"MAIL FROM:<alice@example.com> SIZE={len(MESSAGE)}\r\n"
            "RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        ).encode()
        # The first thing after setup is the whole group, in one write ...
        self.assertEqual(wire.transcript[ehlo_reply_at], ("C", group))
        # ... and the server got it in one piece before it replied to any of it.
        server = factory.servers[0]
        self.assertIn(group, server.received)
        self.assertEqual(
            [side for side, _ in wire.transcript[ehlo_reply_at:][:5]], ["C", "S", "S", "S", "S"]
        )
        self.assertEqual(
            factory.commands[1:],
            group.decode().split("\r\n")[:4],
        )

    def test_without_pipelining_one_command_at_a_time(self) -> None:
        factory, wire = self.ready(SinkBehaviour(extensions=NO_PIPELINING))
        start = len(wire.transcript)
        self.send(wire, recipients=["a@example.net", "b@example.net"])
        exchange = wire.transcript[start:]
        self.assertEqual([side for side, _ in exchange[:8]], ["C", "S"] * 4)
        self.assertEqual(
            [data for side, data in exchange[:8] if side == "C"],
            [
                f"MAIL FROM:<alice@example.com> SIZE={len(MESSAGE)}\r\n".encode(),
                b"RCPT TO:<a@example.net>\r\n",
                b"RCPT TO:<b@example.net>\r\n",
                b"DATA\r\n",
            ],
        )
        self.assertEqual(factory.messages[0].data, MESSAGE)

    def test_without_pipelining_no_data_when_every_rcpt_refused(self) -> None:
        factory, wire = self.ready(
            SinkBehaviour(extensions=NO_PIPELINING, rcpt=lambda line: "550 5.1.1 No such user")
        )
        result = self.send(wire, recipients=["a@example.net", "b@example.net"])
        self.assertEqual([r.code for r in result.replies], [550, 550])
        self.assertIsNone(result.data_reply)
        self.assertEqual(
            [c.split(" ")[0] for c in factory.commands], ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]
        )
        self.assertEqual(factory.messages, [])
        self.assertTrue(wire.connection.usable)

    # per-recipient results

    def test_some_recipients_refused(self) -> None:
        codes = {
            "a": "250 2.1.5 Ok",
            "b": "450 4.2.1 Mailbox busy",
            "c": "550 5.1.1 No such user",
            "d": "251 2.1.5 Will forward",
        }
        for ext in (SinkBehaviour().extensions, NO_PIPELINING):
            factory, wire = self.ready(
                SinkBehaviour(extensions=ext, rcpt=lambda line: codes[line[9]])
            )
            result = self.send(wire, recipients=[f"{x}@example.net" for x in "abcd"])
            final = Reply(250, "2.0.0", "Ok: queued as SINK")
            self.assertEqual(
                result.replies,
                [
                    final,
                    Reply(450, "4.2.1", "Mailbox busy"),
                    Reply(550, "5.1.1", "No such user"),
                    final,
                ],
            )
            self.assertEqual(result.data_reply, final)
            self.assertEqual(
                factory.messages[0].rcpt_lines,
                ["RCPT TO:<a@example.net>", "RCPT TO:<d@example.net>"],
            )
            self.assertTrue(wire.connection.usable)

    def test_all_refused_then_second_transaction(self) -> None:
        refuse = {"on": True}
        factory, wire = self.ready(
            SinkBehaviour(
                rcpt=lambda line: "550 5.1.1 No such user" if refuse["on"] else "250 2.1.5 Ok"
            )
        )
        result = self.send(wire, recipients=["a@example.net", "b@example.net"])
        self.assertEqual([r.code for r in result.replies], [550, 550])
        self.assertIsNone(result.data_reply)
        self.assertEqual(factory.messages, [])
        self.assertEqual(factory.commands[-1], "RSET")
        self.assertTrue(wire.connection.usable)
        refuse["on"] = False
        self.assertEqual(self.send(wire).replies[0].code, 250)
        self.assertEqual(wire.connection.transactions, 2)
        self.assertEqual([m.data for m in factory.messages], [MESSAGE])

    # connection reuse

    def test_two_transactions_on_one_connection(self) -> None:
        factory, wire = self.ready()
        self.assertEqual(wire.connection.transactions, 0)
        self.send(wire, b"first\r\n")
        self.assertTrue(wire.connection.usable)
        self.send(wire, b".second\r\n", recipients=["c@example.net"])
        self.assertEqual(wire.connection.transactions, 2)
        self.assertEqual([m.data for m in factory.messages], [b"first\r\n", b".second\r\n"])
        self.assertEqual(factory.connections, 1)
        self.quit(wire)

    def test_not_usable_after_final_421(self) -> None:
        _factory, wire = self.ready(SinkBehaviour(message=lambda data: "421 4.3.2 Shutting down"))
        result = self.send(wire)
        self.assertEqual(result.replies, [Reply(421, "4.3.2", "Shutting down")])
        self.assertFalse(wire.connection.usable)

    def test_not_usable_after_a_drop(self) -> None:
        _factory, wire = self.ready(SinkBehaviour(message=lambda data: DROP))
        self.failureResultOf(wire.run(wire.connection.send(outbound(MESSAGE))), DeliveryError)
        self.assertFalse(wire.connection.usable)

    def test_not_usable_after_a_timeout(self) -> None:
        _factory, wire = self.ready(SinkBehaviour(rcpt=lambda line: HANG))
        d = wire.run(wire.connection.send(outbound(MESSAGE)))
        wire.advance(300)
        self.assertEqual(self.failureResultOf(d, DeliveryError).value.kind, "timeout")
        self.assertFalse(wire.connection.usable)
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    # extensions and parameters

    def test_dsn_and_mime_parameters_when_offered(self) -> None:
        factory, wire = self.ready()
        rcpt = OutboundRecipient(
            "bob@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Bob+x=y@example.net"
        )
        result = self.send(
            wire, recipients=[rcpt], ret="HDRS", envid="id+1 =x", eight_bit=True, smtputf8=True
        )
        self.assertTrue(result.dsn)
        self.assertEqual(
            factory.messages[0].sender_line,
            f"MAIL FROM:<alice@example.com> SIZE={len(MESSAGE)} BODY=8BITMIME SMTPUTF8 "
            "RET=HDRS ENVID=id+2B1+20+3Dx",
        )
        self.assertEqual(
            factory.messages[0].rcpt_lines,
            [
                "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE "
                "ORCPT=rfc822;Bob+2Bx+3Dy@example.net"
            ],
        )

    def test_no_parameters_when_not_offered(self) -> None:
        factory, wire = self.ready(SinkBehaviour(extensions=("ENHANCEDSTATUSCODES",)))
        rcpt = OutboundRecipient("bob@example.net", notify=("NEVER",), orcpt="rfc822;b@x.test")
        result = self.send(
            wire, recipients=[rcpt], ret="FULL", envid="e", eight_bit=True, smtputf8=True
        )
        self.assertFalse(result.dsn)
        self.assertEqual(factory.messages[0].sender_line, "MAIL FROM:<alice@example.com>")
        self.assertEqual(factory.messages[0].rcpt_lines, ["RCPT TO:<bob@example.net>"])

    def test_extensions_are_read_from_ehlo(self) -> None:
        _factory, wire = self.ready(SinkBehaviour(extensions=("pipelining", "SIZE 1000", "DSN")))
        self.assertTrue(wire.connection.esmtp)
        self.assertEqual(wire.connection.extensions, {"PIPELINING": "", "SIZE": "1000", "DSN": ""})
        self.assertEqual(wire.connection.size_limit(), 1000)
        self.assertEqual(wire.connection.greeting, Reply(220, None, "sink.test ESMTP"))

    def test_size_too_big_refused_before_mail(self) -> None:
        factory, wire = self.ready(SinkBehaviour(extensions=("PIPELINING", "SIZE 100")))
        d = wire.run(wire.connection.send(outbound(b"x" * 99 + b"\r\n")))
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((error.reply.code, error.reply.enhanced), (552, "5.3.4"))
        self.assertEqual(error.kind, "message")
        self.assertFalse(error.temporary)
        self.assertEqual(factory.commands, ["EHLO client.test"])
        self.assertEqual(wire.connection.transactions, 0)
        # The connection is still good for a smaller message.
        self.assertTrue(wire.connection.usable)
        self.assertEqual(self.send(wire, b"x" * 98).replies[0].code, 250)

    def test_size_exactly_at_the_limit(self) -> None:
        _factory, wire = self.ready(SinkBehaviour(extensions=("SIZE 100",)))
        self.assertEqual(self.send(wire, b"x" * 98 + b"\r\n").replies[0].code, 250)

    def test_helo_fallback_has_no_extensions(self) -> None:
        factory, wire = self.ready(SinkBehaviour(ehlo=lambda line: "500 5.5.1 What?"))
        self.assertFalse(wire.connection.esmtp)
        self.assertEqual(wire.connection.extensions, {})
        self.send(wire, recipients=["a@example.net", "b@example.net"], ret="FULL")
        self.assertEqual(
            factory.commands,
            [
                "EHLO client.test",
                "HELO client.test",
                "MAIL FROM:<alice@example.com>",
                "RCPT TO:<a@example.net>",
                "RCPT TO:<b@example.net>",
                "DATA",
            ],
        )

    # STARTTLS in memory (real TLS through TLSFakeTransport)

    def test_starttls_may_upgrades(self) -> None:
        factory, wire = self.ready(tls=server_tls())
        self.assertTrue(wire.connection.tls)
        self.assertTrue(factory.servers[0].tls)
        self.assertNotIn("STARTTLS", wire.connection.extensions)
        self.assertEqual(factory.commands[:3], ["EHLO client.test", "STARTTLS", "EHLO client.test"])
        self.send(wire, AT_BOUNDARY)
        self.assertEqual(factory.messages[0].data, AT_BOUNDARY)
        self.quit(wire)

    def test_starttls_none_stays_plain(self) -> None:
        factory, wire = self.ready(policy=ClientPolicy("client.test", tls="none"), tls=server_tls())
        self.assertFalse(wire.connection.tls)
        self.assertNotIn("STARTTLS", factory.commands)

    def test_starttls_response_injection_is_not_believed(self) -> None:
        _factory, wire = sink_wire(
            SinkBehaviour(starttls="220 2.0.0 Ready to start TLS\n250 injected"),
            tls=server_tls(),
        )
        d = wire.run(wire.connection.setup())
        if isinstance(peek(d), Failure):  # refusing is fine ...
            self.failureResultOf(d, DeliveryError)
            return
        # ... believing the injected reply is not.
        self.assertTrue(wire.connection.tls)
        self.assertIn("DSN", wire.connection.extensions)
        self.assertEqual(self.send(wire).replies[0].code, 250)

    # AUTH

    def test_auth_login_when_plain_is_not_offered(self) -> None:
        server = ScriptedServer(
            "220 mx.test ESMTP",
            [
                "250-mx.test\n250 STARTTLS",
                STARTTLS_NOW,
                "250-mx.test\n250 AUTH LOGIN CRAM-MD5",
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 2.7.0 Authentication successful",
            ],
            tls=server_tls(),
        )
        wire = Wire(server, ClientPolicy("client.test", tls="may", username="u@x", password="p w"))
        self.successResultOf(wire.run(wire.connection.setup()))
        self.assertTrue(wire.connection.tls)
        self.assertEqual(
            server.lines,
            [
                "EHLO client.test",
                "STARTTLS",
                "EHLO client.test",
                "AUTH LOGIN",
                base64.b64encode(b"u@x").decode(),
                base64.b64encode(b"p w").decode(),
            ],
        )
        # Nothing of the password went over the wire in the clear.
        on_wire = b"".join(wire.client_io.on_wire)
        self.assertTrue(on_wire.startswith(b"EHLO client.test\r\nSTARTTLS\r\n"))
        self.assertNotIn(base64.b64encode(b"p w"), on_wire)
        self.assertNotIn(b"AUTH", on_wire)

    def test_auth_plain_preferred(self) -> None:
        server = ScriptedServer(
            "220 mx.test ESMTP",
            [
                "250-mx.test\n250 STARTTLS",
                STARTTLS_NOW,
                "250-mx.test\n250 AUTH LOGIN PLAIN",
                "235 2.7.0 Authentication successful",
            ],
            tls=server_tls(),
        )
        wire = Wire(server, ClientPolicy("client.test", tls="encrypt", username="u", password="p"))
        self.successResultOf(wire.run(wire.connection.setup()))
        self.assertEqual(server.lines[-1], "AUTH PLAIN " + base64.b64encode(b"\0u\0p").decode())

    def test_no_password_without_tls(self) -> None:
        for policy, tls in (
            (ClientPolicy("client.test", tls="may", username="u", password="p"), None),
            (ClientPolicy("client.test", tls="none", username="u", password="p"), server_tls()),
        ):
            factory, wire = sink_wire(
                SinkBehaviour(extensions=("AUTH PLAIN LOGIN",)), policy, tls=tls
            )
            d = wire.run(wire.connection.setup())
            error = self.failureResultOf(d, DeliveryError).value
            self.assertEqual(error.kind, "config")
            self.assertNotIn("AUTH", " ".join(factory.commands))
            self.assertNotIn("STARTTLS", factory.commands)
            self.assertFalse(wire.connection.usable)


# -- in memory against our own submission server ----------------------------


class OwnServerTests(SynchronousTestCase):
    """Our client, STARTTLS and AUTH PLAIN to our server (implicit_tls=False)."""

    def setUp(self) -> None:
        self.h = Harness(tempfile.mkdtemp(dir="."))

    def wire(self, password: str = PASSWORD) -> Wire:
        server = SubmissionFactory(self.h.settings, implicit_tls=False).buildProtocol(
            CLIENT_ADDRESS
        )
        policy = ClientPolicy("client.test", tls="encrypt", username=LOGIN, password=password)
        return Wire(server, policy, clock=self.h.clock, server_name="mx.test")

    def test_setup_starttls_and_auth(self) -> None:
        wire = self.wire()
        self.successResultOf(wire.run(wire.connection.setup()))
        conn = wire.connection
        self.assertTrue(conn.tls)
        self.assertIn("AUTH", conn.extensions)
        for name in ("PIPELINING", "DSN", "8BITMIME", "SMTPUTF8", "SIZE"):
            self.assertIn(name, conn.extensions)
        self.assertIsNotNone(conn.size_limit())
        sent = wire.commands()
        self.assertEqual(sent[:3], [b"EHLO client.test", b"STARTTLS", b"EHLO client.test"])
        self.assertEqual(
            sent[3], b"AUTH PLAIN " + base64.b64encode(f"\0{LOGIN}\0{PASSWORD}".encode())
        )
        # The credentials went only through TLS: not in the clear.
        on_wire = b"".join(wire.client_io.on_wire)
        self.assertTrue(on_wire.startswith(b"EHLO client.test\r\nSTARTTLS\r\n"))
        self.assertNotIn(b"AUTH", on_wire)

    def test_our_server_queues_what_our_client_sends(self) -> None:
        wire = self.wire()
        self.successResultOf(wire.run(wire.connection.setup()))
        rcpts = [
            OutboundRecipient(
                "bob@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Bob+x=y@example.net"
            ),
            OutboundRecipient("carol@example.org", notify=("NEVER",)),
            OutboundRecipient("dave@example.org"),
        ]
        data = MESSAGE.replace(b"Alice <alice@example.com>", f"<{LOGIN}>".encode())
        msg = outbound(
            data, rcpts, sender=LOGIN, ret="HDRS", envid="id+1 =x", eight_bit=True, smtputf8=True
        )
        result = self.successResultOf(wire.run(wire.connection.send(msg)))
        self.assertTrue(result.dsn)
        assert result.data_reply is not None
        self.assertEqual(result.data_reply.code, 250)
        self.assertEqual(result.replies, [result.data_reply] * 3)
        queue_id = result.data_reply.text.rpartition(" ")[2]
        state, envelope, stored = self.h.spool.messages[queue_id]
        self.assertEqual(state, "incoming")
        self.assertEqual(envelope.sender, LOGIN)
        self.assertEqual(
            [(r.address, r.notify, r.orcpt) for r in envelope.recipients],
            [
                ("bob@example.net", ("FAILURE", "SUCCESS"), "rfc822;Bob+x=y@example.net"),
                ("carol@example.org", ("NEVER",), None),
                ("dave@example.org", None, None),
            ],
        )
        self.assertEqual(
            (envelope.ret, envelope.envid, envelope.body, envelope.smtputf8),
            ("HDRS", "id+1 =x", "8BITMIME", True),
        )
        self.assertEqual(envelope.auth_user, LOGIN)
        self.assertEqual(envelope.client_helo, "client.test")
        self.assertTrue(envelope.tls and envelope.tls.startswith("TLS"))
        # The body arrived unchanged (the server adds header fields in front).
        body = data.partition(b"\r\n\r\n")[2]
        self.assertTrue(stored.endswith(b"\r\n\r\n" + body), stored)
        # SIZE was declared (and accepted).
        self.assertIn(f"SIZE={len(data)}".encode(), wire.commands()[4])
        self.successResultOf(wire.run(wire.connection.quit()))
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_boundary_messages_through_our_server(self) -> None:
        wire = self.wire()
        self.successResultOf(wire.run(wire.connection.setup()))
        for data in (AT_BOUNDARY, CR_LF_SPLIT, BIG):
            result = self.successResultOf(
                wire.run(wire.connection.send(outbound(data, sender=LOGIN)))
            )
            assert result.data_reply is not None
            self.assertEqual(result.data_reply.code, 250, result.data_reply)
            stored = self.h.spool.messages[result.data_reply.text.rpartition(" ")[2]][2]
            self.assertTrue(stored.endswith(data.partition(b"\r\n\r\n")[2]))
        self.assertEqual(wire.connection.transactions, 3)

    def test_refusals_from_our_server(self) -> None:
        wire = self.wire()
        self.successResultOf(wire.run(wire.connection.setup()))
        # A sender the login may not use: MAIL 550 for the whole transaction.
        d = wire.run(wire.connection.send(outbound(MESSAGE, sender="mallory@example.com")))
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual(
            (error.reply.code, error.reply.enhanced, error.kind), (550, "5.7.1", "remote")
        )
        self.assertTrue(wire.connection.usable)
        # Then a good one on the same connection.
        data = f"From: <{LOGIN}>\r\n\r\nhi\r\n".encode()
        result = self.successResultOf(wire.run(wire.connection.send(outbound(data, sender=LOGIN))))
        self.assertEqual(result.replies[0].code, 250)

    def test_wrong_password(self) -> None:
        wire = self.wire(password="wrong")
        d = wire.run(wire.connection.setup())
        self.assertNoResult(d)  # the server delays its answer
        wire.advance(self.h.config.auth.failure_delay)
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((error.reply.code, error.reply.enhanced), (535, "5.7.8"))
        self.assertEqual(error.kind, "auth")
        self.assertFalse(error.temporary)
        self.assertFalse(wire.connection.usable)


# -- the broken-server table ------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One broken (or merely unusual) server and what the client must make of it.

    C{error}: (phase, kind, code, enhanced) of the DeliveryError expected
    from C{setup} or C{send}; otherwise C{replies} are the expected
    per-recipient replies (codes or whole L{Reply}s).
    """

    name: str
    server: Callable[[], Protocol]
    error: tuple[str, str, int, str | None] | None = None
    replies: list[int | Reply] = field(default_factory=list)
    recipients: tuple[str, ...] = ("a@example.net",)
    policy: dict[str, Any] = field(default_factory=dict)
    hang: bool = False  # the outcome needs time to pass
    usable: bool | None = None
    data: bytes = MESSAGE
    check: Callable[[Any, Protocol, Wire], None] | None = None


def sink(tls: bool = False, **kw: Any) -> Callable[[], Protocol]:
    def build() -> Protocol:
        return SinkFactory(SinkBehaviour(**kw), server_tls() if tls else None).buildProtocol(None)

    return build


def sink_of(make: Callable[[], SinkBehaviour]) -> Callable[[], Protocol]:
    return lambda: SinkFactory(make()).buildProtocol(None)


def script(greeting: str, *replies: str, tls: bool = False) -> Callable[[], Protocol]:
    return lambda: ScriptedServer(greeting, replies, server_tls() if tls else None)


def commands_of(server: Protocol) -> list[str]:
    if isinstance(server, SinkServer):
        return server.commands
    assert isinstance(server, ScriptedServer)
    return server.lines


def _helo_used(case: Any, server: Protocol, wire: Wire) -> None:
    case.assertEqual(commands_of(server)[:2], ["EHLO client.test", "HELO client.test"])
    case.assertFalse(wire.connection.esmtp)


def _no_mail(case: Any, server: Protocol, wire: Wire) -> None:
    case.assertFalse(any(c.startswith("MAIL") for c in commands_of(server)))


def _plaintext(case: Any, server: Protocol, wire: Wire) -> None:
    case.assertFalse(wire.connection.tls)
    case.assertEqual(
        commands_of(server)[:3],
        ["EHLO client.test", "STARTTLS", f"MAIL FROM:<alice@example.com> SIZE={len(MESSAGE)}"],
    )


def _rset_after(case: Any, server: Protocol, wire: Wire) -> None:
    case.assertEqual(commands_of(server)[-1], "RSET")
    assert isinstance(server, SinkServer)
    case.assertEqual(server.f.messages, [])


TIMEOUT = ("timeout", 451, "4.4.2")
LOST = ("network", 451, "4.4.2")
PROTOCOL = ("protocol", 451, "4.5.0")
MULTI_550 = "550-5.1.1 The account does not exist.\n550-5.1.1 Please check\n550 5.1.1 the address"
FIVE_FIFTY = Reply(550, "5.1.1", "The account does not exist.\nPlease check\nthe address")
ABCD = ("a@example.net", "b@example.net", "c@example.net", "d@example.net")


def _mixed(line: str) -> str:
    return {
        "a": "250 2.1.5 Ok",
        "b": "450 4.2.1 Mailbox busy",
        "c": MULTI_550,
        "d": "251 2.1.5 Forwarding",
    }[line[9]]


QUEUED = Reply(250, "2.0.0", "Ok: queued as SINK")


TABLE = [
    # greeting
    Row("greeting_hang", sink(greeting=HANG), ("setup", *TIMEOUT), hang=True),
    Row(
        "greeting_554",
        sink(greeting="554 5.3.2 No SMTP service here"),
        ("setup", "remote", 554, "5.3.2"),
    ),
    Row("greeting_421", sink(greeting="421 4.3.2 Too busy"), ("setup", "remote", 421, "4.3.2")),
    Row("greeting_drop", sink(greeting=DROP), ("setup", *LOST)),
    Row("greeting_malformed", sink(greeting="Welcome to my SMTP server"), ("setup", *PROTOCOL)),
    Row(
        "greeting_multiline",
        sink(greeting="220-sink.test ESMTP\n220-no UCE\n220 welcome"),
        replies=[QUEUED],
    ),
    Row("greeting_codes_differ", sink(greeting="220-sink.test\n554 go away"), ("setup", *PROTOCOL)),
    # EHLO / HELO
    Row("hang_after_greeting", sink(ehlo=lambda line: HANG), ("setup", *TIMEOUT), hang=True),
    Row(
        "ehlo_5xx_helo_ok",
        sink(ehlo=lambda line: "502 5.5.2 Not implemented"),
        replies=[QUEUED],
        check=_helo_used,
    ),
    Row(
        "ehlo_and_helo_refused",
        script("220 x", "500 5.5.1 No EHLO", "501 5.5.4 No HELO either"),
        ("setup", "remote", 501, "5.5.4"),
    ),
    Row(
        "ehlo_4xx_no_helo",
        sink(ehlo=lambda line: "421 4.3.2 Try later"),
        ("setup", "remote", 421, "4.3.2"),
    ),
    Row("ehlo_drop", sink(ehlo=lambda line: DROP), ("setup", *LOST)),
    Row(
        "ehlo_malformed",
        sink(ehlo=lambda line: "250-sink.test\n250+PIPELINING"),
        ("setup", *PROTOCOL),
    ),
    Row(
        "ehlo_codes_differ",
        sink(ehlo=lambda line: "250-sink.test\n251 PIPELINING"),
        ("setup", *PROTOCOL),
    ),
    # STARTTLS
    Row(
        "starttls_refused_may",
        sink(tls=True, starttls="454 4.7.0 TLS not available"),
        replies=[QUEUED],
        check=_plaintext,
    ),
    Row(
        "starttls_refused_encrypt",
        sink(tls=True, starttls="454 4.7.0 TLS not available"),
        ("setup", "tls", 451, "4.7.5"),
        policy={"tls": "encrypt"},
    ),
    Row("starttls_drop", sink(tls=True, starttls=DROP), ("setup", *LOST)),
    Row(
        "starttls_multiline_220",
        sink(tls=True, starttls="220-2.0.0 Ready\n220 2.0.0 Go ahead"),
        replies=[QUEUED],
        check=lambda case, server, wire: case.assertTrue(wire.connection.tls),
    ),
    Row(
        "tls_handshake_fails",
        lambda: SinkFactory(tls=NoCertificateTLS()).buildProtocol(None),
        ("setup", "tls", 454, "4.7.0"),
    ),
    Row(
        "no_tls_after_220",
        script("220 x", "250-x\n250 STARTTLS", NOT_TLS),
        ("setup", "tls", 454, "4.7.0"),
    ),
    Row(
        "tls_required_not_offered", sink(), ("setup", "tls", 451, "4.7.4"), policy={"tls": "verify"}
    ),
    # AUTH
    Row(
        "auth_535",
        script(
            "220 x",
            "250-x\n250 STARTTLS",
            STARTTLS_NOW,
            "250-x\n250 AUTH PLAIN",
            "535 5.7.8 Bad credentials",
            tls=True,
        ),
        ("setup", "auth", 535, "5.7.8"),
        policy={"username": "u", "password": "p"},
    ),
    Row(
        "auth_454",
        script(
            "220 x",
            "250-x\n250 STARTTLS",
            STARTTLS_NOW,
            "250-x\n250 AUTH PLAIN",
            "454 4.7.0 Try later",
            tls=True,
        ),
        ("setup", "remote", 454, "4.7.0"),
        policy={"username": "u", "password": "p"},
    ),
    Row(
        "auth_drop",
        script(
            "220 x", "250-x\n250 STARTTLS", STARTTLS_NOW, "250-x\n250 AUTH PLAIN", DROP, tls=True
        ),
        ("setup", *LOST),
        policy={"username": "u", "password": "p"},
    ),
    Row(
        "auth_not_offered",
        sink(tls=True),
        ("setup", "config", 451, "4.7.0"),
        policy={"tls": "encrypt", "username": "u", "password": "p"},
    ),
    # MAIL
    Row(
        "mail_4xx",
        sink_of(lambda: refusing_mail("451 4.3.0 Try later")),
        ("send", "remote", 451, "4.3.0"),
        usable=True,
    ),
    Row(
        "mail_5xx",
        sink_of(lambda: refusing_mail("550 5.7.1 Sender refused")),
        ("send", "remote", 550, "5.7.1"),
        usable=True,
    ),
    Row(
        "mail_4xx_no_pipelining",
        sink_of(lambda: refusing_mail("452 4.3.1 Full", pipelining=False)),
        ("send", "remote", 452, "4.3.1"),
        usable=True,
    ),
    Row(
        "mail_5xx_no_pipelining",
        sink_of(lambda: refusing_mail("553 5.1.8 Bad sender", pipelining=False)),
        ("send", "remote", 553, "5.1.8"),
        usable=True,
    ),
    Row(
        "mail_multiline_250",
        sink(mail=lambda line: "250-2.1.0 Sender\n250 2.1.0 Ok"),
        replies=[QUEUED],
    ),
    Row(
        "mail_multiline_550",
        sink_of(lambda: refusing_mail(MULTI_550)),
        ("send", "remote", 550, "5.1.1"),
    ),
    Row("mail_drop", sink(mail=lambda line: DROP), ("send", *LOST), usable=False),
    Row("mail_hang", sink(mail=lambda line: HANG), ("send", *TIMEOUT), hang=True, usable=False),
    Row(
        "mail_malformed", sink(mail=lambda line: "25O 2.1.0 Ok"), ("send", *PROTOCOL), usable=False
    ),
    # RCPT
    Row(
        "rcpt_mix",
        sink(rcpt=_mixed),
        replies=[QUEUED, 450, FIVE_FIFTY, QUEUED],
        recipients=ABCD,
        usable=True,
    ),
    Row(
        "rcpt_mix_no_pipelining",
        sink(rcpt=_mixed, extensions=NO_PIPELINING),
        replies=[QUEUED, 450, FIVE_FIFTY, QUEUED],
        recipients=ABCD,
    ),
    Row(
        "rcpt_all_refused",
        sink(rcpt=lambda line: MULTI_550 if "a@" in line else "452 4.5.3 Too many"),
        replies=[FIVE_FIFTY, 452],
        recipients=ABCD[:2],
        usable=True,
        check=_rset_after,
    ),
    Row("rcpt_drop", sink(rcpt=lambda line: DROP), ("send", *LOST), usable=False),
    Row("rcpt_hang", sink(rcpt=lambda line: HANG), ("send", *TIMEOUT), hang=True),
    Row(
        "rcpt_codes_differ",
        sink(rcpt=lambda line: "250-2.1.5 Ok\n550 5.1.1 No"),
        ("send", *PROTOCOL),
    ),
    # DATA
    Row(
        "data_4xx",
        sink(data=lambda: "451 4.3.0 Try later"),
        replies=[Reply(451, "4.3.0", "Try later")],
        usable=True,
    ),
    Row("data_5xx", sink(data=lambda: "554 5.5.1 No valid recipients"), replies=[554], usable=True),
    Row(
        "data_5xx_some_refused",
        sink(data=lambda: "554 5.7.1 Not now", rcpt=_mixed),
        replies=[554, 450, FIVE_FIFTY, 554],
        recipients=ABCD,
    ),
    Row(
        "data_multiline_354",
        sink(data=lambda: "354-Go ahead\n354 End with <CRLF>.<CRLF>"),
        replies=[QUEUED],
    ),
    Row("data_drop", sink(data=lambda: DROP), ("send", *LOST), usable=False),
    Row("data_hang", sink(data=lambda: HANG), ("send", *TIMEOUT), hang=True),
    Row(
        "drop_mid_data",
        sink(drop_after_data_bytes=10_000),
        ("send", *LOST),
        data=AT_BOUNDARY,
        usable=False,
    ),
    # the reply to the message
    Row(
        "final_4xx",
        sink(message=lambda d: "451 4.7.1 Greylisted"),
        replies=[Reply(451, "4.7.1", "Greylisted")],
        usable=True,
    ),
    Row(
        "final_5xx",
        sink(message=lambda d: "554 5.7.1 Spam"),
        replies=[554, 554],
        recipients=ABCD[:2],
        usable=True,
    ),
    Row("final_421", sink(message=lambda d: "421 4.3.2 Bye"), replies=[421], usable=False),
    Row(
        "final_multiline_250",
        sink(message=lambda d: "250-2.0.0 Ok\n250 2.0.0 queued as X"),
        replies=[Reply(250, "2.0.0", "Ok\nqueued as X")],
    ),
    Row("final_multiline_550", sink(message=lambda d: MULTI_550), replies=[FIVE_FIFTY]),
    Row("final_drop", sink(message=lambda d: DROP), ("send", *LOST), usable=False),
    Row("final_hang", sink(message=lambda d: HANG), ("send", *TIMEOUT), hang=True, usable=False),
    Row("final_malformed", sink(message=lambda d: "2.0.0 Ok"), ("send", *PROTOCOL), usable=False),
    # SIZE
    Row(
        "size_too_big",
        sink(extensions=("PIPELINING", "SIZE 100")),
        ("send", "message", 552, "5.3.4"),
        data=b"x" * 200,
        usable=True,
        check=_no_mail,
    ),
]


class BrokenServerTable(SynchronousTestCase):
    """One test per row of L{TABLE}."""

    def check_row(self, row: Row) -> None:
        server = row.server()
        policy = ClientPolicy("client.test", **row.policy)
        wire = Wire(server, policy)
        conn = wire.connection

        def settle(d: Deferred[Any]) -> None:
            if row.hang and not d.called:
                self.assertNoResult(d)
                wire.advance(1000)

        d: Deferred[Any] = wire.run(conn.setup())
        settle(d)
        outcome: Any = None
        phase = "setup"
        if not isinstance(peek(d), Failure):
            self.successResultOf(d)
            phase = "send"
            d = wire.run(conn.send(outbound(row.data, row.recipients)))
            settle(d)
        if row.error is not None:
            error = self.failureResultOf(d, DeliveryError).value
            self.assertEqual(
                (phase, error.kind, error.reply.code, error.reply.enhanced), row.error, error
            )
            self.assertEqual(error.temporary, row.error[2] < 500)
            self.assertEqual(error.remote, "sink.test[127.0.0.1]:25")
            outcome = error
        else:
            result = self.successResultOf(d)
            self.assertEqual(phase, "send")
            got = [
                r.code if isinstance(want, int) else r
                for r, want in zip(result.replies, row.replies, strict=True)
            ]
            self.assertEqual(got, row.replies)
            outcome = result
        if row.usable is not None:
            self.assertEqual(conn.usable, row.usable)
        if row.check is not None:
            row.check(self, server, wire)
        # Whatever happened, quitting leaves no timer behind.
        self.successResultOf(wire.run(conn.quit()))
        self.assertEqual(wire.clock.getDelayedCalls(), [], outcome)


def _add_row_test(row: Row) -> None:
    def test(self: BrokenServerTable) -> None:
        self.check_row(row)

    test.__name__ = f"test_{row.name}"
    test.__doc__ = f"Broken-server table row {row.name!r}."
    setattr(BrokenServerTable, test.__name__, test)


for _row in TABLE:
    _add_row_test(_row)


# -- 421 and the sink's own mistakes ------------------------------------------


class FourTwentyOneTests(SynchronousTestCase):
    """RFC 5321 section 3.8: 421 means the server is closing the channel.

    After a 421 to any command the connection must not be cached for reuse,
    even when the server is slow to actually close it.
    """

    def after(self, behaviour: SinkBehaviour) -> OutboundConnection:
        _factory, wire = sink_wire(behaviour)
        self.successResultOf(wire.run(wire.connection.setup()))
        wire.run(wire.connection.send(outbound(MESSAGE))).addErrback(lambda f: None)
        return wire.connection

    def test_final_421(self) -> None:
        self.assertFalse(self.after(SinkBehaviour(message=lambda d: "421 4.3.2 Bye")).usable)

    def test_mail_421(self) -> None:
        self.assertFalse(self.after(refusing_mail("421 4.3.2 Bye")).usable)

    def test_rcpt_421(self) -> None:
        self.assertFalse(self.after(SinkBehaviour(rcpt=lambda line: "421 4.3.2 Bye")).usable)

    def test_data_421(self) -> None:
        self.assertFalse(self.after(SinkBehaviour(data=lambda: "421 4.3.2 Bye")).usable)


class PipelinedRefusalTests(SynchronousTestCase):
    """A lenient server that refuses MAIL, or every RCPT, yet accepts the pipelined DATA: the client
    ends the data at once, sends RSET, and reports the refusal."""

    def test_mail_refused_but_data_accepted(self) -> None:
        server = ScriptedServer(
            "220 x",
            [
                "250-x\n250 PIPELINING",
                "451 4.3.0 Try later",  # MAIL
                "250 2.1.5 Ok",  # RCPT (a lenient server)
                "354 Go ahead",  # DATA
                "554 5.5.1 No transaction",  # "."
                "250 2.0.0 Ok",  # RSET
            ],
        )
        wire = Wire(server)
        self.successResultOf(wire.run(wire.connection.setup()))
        d = wire.run(wire.connection.send(outbound(MESSAGE)))
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual(error.reply.code, 451)
        self.assertEqual(server.lines[-2:], [".", "RSET"])
        self.assertTrue(wire.connection.usable)

    def test_all_rcpt_refused_but_data_accepted(self) -> None:
        server = ScriptedServer(
            "220 x",
            [
                "250-x\n250 PIPELINING",
                "250 2.1.0 Ok",  # MAIL
                "550 5.1.1 No such user",  # RCPT
                "354 Go ahead",  # DATA (a lenient server)
                "554 5.5.1 No valid recipients",  # "."
                "250 2.0.0 Ok",  # RSET
            ],
        )
        wire = Wire(server)
        self.successResultOf(wire.run(wire.connection.setup()))
        result = self.successResultOf(wire.run(wire.connection.send(outbound(MESSAGE))))
        self.assertEqual([r.code for r in result.replies], [550])
        self.assertEqual(server.lines[-2:], [".", "RSET"])
        self.assertEqual(server.data, [])
        self.assertTrue(wire.connection.usable)


class SinkBugs(SynchronousTestCase):
    """The sink in mta/testing.py must behave like a real server."""

    def test_ehlo_without_extensions(self) -> None:
        _factory, wire = sink_wire(SinkBehaviour(extensions=()))
        self.successResultOf(wire.run(wire.connection.setup()))
        self.assertEqual(wire.server_writes()[1], b"250 sink.test\r\n")

    def test_rcpt_needs_mail(self) -> None:
        server = SinkFactory(SinkBehaviour(mail=lambda line: "550 5.7.1 No")).buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        replies = [ln[:3] for ln in transport.value().split(b"\r\n") if ln[3:4] == b" "]
        self.assertEqual(replies, [b"220", b"250", b"550", b"503", b"503"])


# -- timeouts on a Clock -----------------------------------------------------

TIMEOUTS = ClientTimeouts(
    connect=3, greeting=7, helo=11, starttls=13, mail=17, rcpt=19, data_init=23,
    data_block=29, data_done=97, quit=5,
)  # fmt: skip


class TimeoutTests(SynchronousTestCase):
    """The client's timeouts on a Clock: greeting, HELO, RCPT (counted from the MAIL reply), DATA
    init and termination, a data block timeout restarted by progress but hit when sending stalls,
    a quiet QUIT timeout, and no timer left after success."""

    def wire(self, behaviour: SinkBehaviour) -> tuple[RecordingSinkFactory, Wire]:
        return sink_wire(behaviour, ClientPolicy("client.test", timeouts=TIMEOUTS))

    def assertTimesOutAfter(self, wire: Wire, d: Deferred[Any], seconds: float) -> None:
        wire.advance(seconds - 0.01)
        self.assertNoResult(d)
        wire.advance(0.02)
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((error.kind, error.reply.code, error.reply.enhanced), TIMEOUT)
        self.assertTrue(error.temporary)
        self.assertFalse(wire.connection.usable)
        self.assertTrue(wire.client_io.disconnected)
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_greeting_timeout(self) -> None:
        _factory, wire = self.wire(SinkBehaviour(greeting=HANG))
        self.assertTimesOutAfter(wire, wire.run(wire.connection.setup()), TIMEOUTS.greeting)

    def test_helo_timeout(self) -> None:
        _factory, wire = self.wire(SinkBehaviour(ehlo=lambda line: HANG))
        self.assertTimesOutAfter(wire, wire.run(wire.connection.setup()), TIMEOUTS.helo)

    def test_rcpt_timeout(self) -> None:
        _factory, wire = self.wire(SinkBehaviour(rcpt=lambda line: HANG))
        self.successResultOf(wire.run(wire.connection.setup()))
        d = wire.run(wire.connection.send(outbound(MESSAGE)))
        self.assertTimesOutAfter(wire, d, TIMEOUTS.rcpt)

    def test_rcpt_timeout_counts_from_the_mail_reply(self) -> None:
        _factory, wire = self.wire(SinkBehaviour(extensions=NO_PIPELINING, rcpt=lambda line: HANG))
        self.successResultOf(wire.run(wire.connection.setup()))
        wire.advance(100)  # idle between setup and send does not count
        d = wire.run(wire.connection.send(outbound(MESSAGE)))
        self.assertTimesOutAfter(wire, d, TIMEOUTS.rcpt)

    def test_data_init_timeout(self) -> None:
        _factory, wire = self.wire(SinkBehaviour(data=lambda: HANG))
        self.successResultOf(wire.run(wire.connection.setup()))
        d = wire.run(wire.connection.send(outbound(MESSAGE)))
        self.assertTimesOutAfter(wire, d, TIMEOUTS.data_init)

    def test_data_termination_timeout(self) -> None:
        factory, wire = self.wire(SinkBehaviour(message=lambda data: HANG))
        self.successResultOf(wire.run(wire.connection.setup()))
        d = wire.run(wire.connection.send(outbound(BIG)))
        # All of the message went out; now the longer data_done applies,
        # not data_block.
        self.assertEqual(factory.messages[0].data, BIG)
        self.assertTimesOutAfter(wire, d, TIMEOUTS.data_done)

    def start_data(self) -> tuple[RecordingSinkFactory, Wire, Deferred[TransactionResult]]:
        """A send of BIG, pumped (with no time passing) up to its first chunk."""
        factory, wire = self.wire(SinkBehaviour())
        self.successResultOf(wire.run(wire.connection.setup()))
        d = Deferred.fromCoroutine(wire.connection.send(outbound(BIG)))
        while wire.client_io.producer is None:
            self.assertTrue(wire.pump.pump())
        return factory, wire, d

    def test_data_block_timeout_restarted_by_progress(self) -> None:
        """A chunk every 0.8 data_block is slow but never idle: no timeout."""
        factory, wire, d = self.start_data()
        steps = 0
        while not d.called:
            wire.pump.pump()  # one more chunk
            wire.clock.advance(TIMEOUTS.data_block * 0.8)
            steps += 1
            self.assertLess(steps, 500)
        self.assertEqual(self.successResultOf(d).replies[0].code, 250)
        self.assertGreater(wire.clock.seconds(), 10 * TIMEOUTS.data_block)
        self.assertEqual(factory.messages[0].data, BIG)

    def test_data_block_timeout_when_sending_stalls(self) -> None:
        factory, wire, d = self.start_data()
        for _ in range(3):
            wire.pump.pump()  # some progress
        # Then the peer stops taking data: nothing more is pumped.
        wire.clock.advance(TIMEOUTS.data_block - 0.01)
        self.assertNoResult(d)
        wire.clock.advance(0.02)
        # (iosim does not stop a producer when the connection goes; pumping
        # lets the FileSender run out, as stopProducing would on TCP.)
        wire.flush()
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((error.kind, error.reply.code, error.reply.enhanced), TIMEOUT)
        self.assertEqual(factory.messages, [])
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_quit_timeout_is_quiet(self) -> None:
        factory, wire = self.wire(SinkBehaviour())
        self.successResultOf(wire.run(wire.connection.setup()))
        factory.servers[0].hung = True
        d = wire.run(wire.connection.quit())
        self.assertNoResult(d)
        wire.advance(TIMEOUTS.quit)
        self.successResultOf(d)
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_no_timer_left_after_success(self) -> None:
        _factory, wire = self.wire(SinkBehaviour())
        self.successResultOf(wire.run(wire.connection.setup()))
        for data in (MESSAGE, BIG):
            self.successResultOf(wire.run(wire.connection.send(outbound(data))))
            self.assertEqual(wire.clock.getDelayedCalls(), [])
        self.successResultOf(wire.run(wire.connection.quit()))
        self.assertEqual(wire.clock.getDelayedCalls(), [])


# -- connect() with a memory reactor -----------------------------------------


class ConnectInMemoryTests(SynchronousTestCase):
    """connect() on a MemoryReactorClock: the connect timeout as a 451 4.4.1 naming the host,
    connect and setup, and a failed setup aborting the connection."""

    def start(self) -> tuple[MemoryReactorClock, Deferred[OutboundConnection]]:
        memory = MemoryReactorClock()
        policy = ClientPolicy("client.test", timeouts=TIMEOUTS)
        d = Deferred.fromCoroutine(connect(memory, "mx.test", "127.0.0.1", 2525, policy))
        host, port, _, timeout, _ = memory.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 2525, TIMEOUTS.connect))
        return memory, d

    def test_connect_timeout(self) -> None:
        memory, d = self.start()
        memory.tcpClients[0][2].clientConnectionFailed(
            memory.connectors[0], Failure(ConnectTimeoutError())
        )
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual(
            (error.kind, error.reply.code, error.reply.enhanced), ("timeout", 451, "4.4.1")
        )
        self.assertEqual(error.remote, "mx.test[127.0.0.1]:2525")

    def test_connect_and_setup(self) -> None:
        memory, d = self.start()
        client = memory.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        factory = SinkFactory()
        wire = Wire(factory.buildProtocol(None), client=client, clock=memory)
        wire.flush()
        conn = self.successResultOf(d)
        self.assertEqual(conn.remote, "mx.test[127.0.0.1]:2525")
        self.assertEqual(conn.server_name, "mx.test")
        self.assertIn("PIPELINING", conn.extensions)
        self.successResultOf(wire.run(conn.send(outbound(AT_BOUNDARY))))
        self.assertEqual(factory.messages[0].data, AT_BOUNDARY)

    def test_setup_failure_aborts(self) -> None:
        memory, d = self.start()
        client = memory.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        wire = Wire(
            SinkFactory(SinkBehaviour(greeting="554 5.7.1 Go away")).buildProtocol(None),
            client=client,
            clock=memory,
        )
        wire.flush()
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((error.kind, error.reply.code), ("remote", 554))
        self.assertTrue(wire.client_io.disconnected)
        self.assertEqual(memory.getDelayedCalls(), [])


# -- real loopback sockets ----------------------------------------------------


class LoopbackTests(TestCase):
    """The real reactor, TCP on 127.0.0.1 and real TLS."""

    def serve(self, factory: SinkFactory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def open(
        self,
        factory: RecordingSinkFactory,
        policy: ClientPolicy | None = None,
        host: str = "localhost",
    ) -> OutboundConnection:
        port = self.serve(factory)
        return await connect(
            reactor, host, "127.0.0.1", port, policy or ClientPolicy("client.test")
        )

    async def close(self, factory: RecordingSinkFactory, conn: OutboundConnection | None) -> None:
        if conn is not None:
            await conn.quit()
            await client_closed(conn)
        await factory.all_closed()

    @deferred_test
    async def test_line_dot_at_chunk_boundary_over_tcp(self) -> None:
        factory = RecordingSinkFactory()
        conn = await self.open(factory)
        for data in (AT_BOUNDARY, CR_LF_SPLIT, BIG):
            result = await conn.send(outbound(data))
            self.assertEqual(result.data_reply, Reply(250, "2.0.0", "Ok: queued as SINK"))
        self.assertEqual(conn.transactions, 3)
        received = [m.data for m in factory.messages]
        self.assertTrue(received == [AT_BOUNDARY, CR_LF_SPLIT, BIG], "a message changed")
        await self.close(factory, conn)
        self.assertEqual(factory.commands[-1], "QUIT")

    @deferred_test
    async def test_starttls_may_upgrades(self) -> None:
        factory = RecordingSinkFactory(tls=server_tls())
        conn = await self.open(factory, ClientPolicy("client.test", tls="may"))
        self.assertTrue(conn.tls)
        self.assertTrue(factory.servers[0].tls)
        await conn.send(outbound(AT_BOUNDARY))
        self.assertEqual(factory.messages[0].data, AT_BOUNDARY)
        await self.close(factory, conn)

    @deferred_test
    async def test_starttls_verify_good_name(self) -> None:
        factory = RecordingSinkFactory(tls=server_tls())
        policy = ClientPolicy("client.test", tls="verify", ca_file=CERT)
        conn = await self.open(factory, policy, host="localhost")
        self.assertTrue(conn.tls)
        await conn.send(outbound(MESSAGE))
        self.assertEqual(factory.messages[0].data, MESSAGE)
        await self.close(factory, conn)

    @deferred_test
    async def test_starttls_verify_wrong_name(self) -> None:
        factory = RecordingSinkFactory(tls=server_tls())
        policy = ClientPolicy("client.test", tls="verify", ca_file=CERT)
        with self.assertRaises(DeliveryError) as caught:
            await self.open(factory, policy, host="wrong.example")
        self.assertEqual(caught.exception.kind, "tls")
        self.assertTrue(caught.exception.temporary)
        self.assertEqual(factory.messages, [])
        self.assertNotIn("MAIL", " ".join(factory.commands))
        await self.close(factory, None)

    @deferred_test
    async def test_starttls_verify_untrusted(self) -> None:
        other = tempfile.mkdtemp(dir=".")
        other_cert, _ = ensure_selfsigned(other, "localhost")
        factory = RecordingSinkFactory(tls=server_tls())
        policy = ClientPolicy("client.test", tls="verify", ca_file=other_cert)
        with self.assertRaises(DeliveryError) as caught:
            await self.open(factory, policy)
        self.assertEqual(caught.exception.kind, "tls")
        await self.close(factory, None)

    @deferred_test
    async def test_connection_refused(self) -> None:
        port = reactor.listenTCP(0, SinkFactory(), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(DeliveryError) as caught:
            await connect(reactor, "mx.test", "127.0.0.1", number, ClientPolicy("client.test"))
        error = caught.exception
        self.assertEqual(
            (error.kind, error.reply.code, error.reply.enhanced), ("network", 451, "4.4.1")
        )
        self.assertEqual(error.remote, f"mx.test[127.0.0.1]:{number}")

    @deferred_test
    async def test_hang_with_tiny_timeouts(self) -> None:
        factory = RecordingSinkFactory(SinkBehaviour(ehlo=lambda line: HANG))
        policy = ClientPolicy("client.test", timeouts=ClientTimeouts(helo=0.1))
        with self.assertRaises(DeliveryError) as caught:
            await self.open(factory, policy)
        self.assertEqual(caught.exception.kind, "timeout")
        await self.close(factory, None)
