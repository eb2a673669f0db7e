"""CHUNKING/BDAT (RFC 3030) in the submission session, on a StringTransport.

Raw sessions for the edge cases: chunks mixed with pipelined commands,
chunk boundaries anywhere (inside a line, between CR and LF, one octet at
a time), SIZE across chunks, C{BDAT 0 LAST}, DATA and RCPT after BDAT,
RSET in the middle, refused chunks that must still be read, the commit
before the last C{250}, and the same checks and header fixes as DATA.
Where RFC 3030 leaves room, the replies follow Postfix's smtpd.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mta.checks import CONTINUE, SessionInfo, Verdict, reject
from mta.checks import host as checkhost
from mta.errors import StorageError
from mta.interfaces import IMessageHook
from mta.smtp.dataread import BARE_CR, LINE_TOO_LONG, MAX_LINE, NUL_OCTET, ChunkReader, too_big
from tests.support import LOGIN, OTHER, Client, Harness, make_config

MESSAGE = (
    f"From: Alice <{LOGIN}>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Bcc: secret@example.net\r\n"
    "Subject: chunks\r\n"
    "\r\n"
    "Hello Bob.\r\n"
    ".a line that starts with a dot, sent as it is\r\n"
    ".\r\n"
    "..\r\n"
    "the end\r\n"
).encode()


def bdat(chunk: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


class ChunkingTestCase(SynchronousTestCase):
    """Shared by the BDAT tests: a Harness, a logged-in client with MAIL and RCPT sent (begin), the
    stored message of a 250 (stored) and its body after our Received: field."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def begin(self, h: Harness | None = None, rcpts: int = 1) -> Client:
        c = (h or self.h).connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 250)
        for i in range(rcpts):
            self.assertEqual(c.command(f"RCPT TO:<r{i}@example.net>")[0], 250)
        return c

    def stored(self, reply: tuple[int, str], h: Harness | None = None) -> bytes:
        code, text = reply
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith("2.0.0 Ok: queued as "), text)
        _, _, data = (h or self.h).spool.messages[text.rpartition(" ")[2]]
        return data

    def body_of(self, stored: bytes) -> bytes:
        """The stored message after our Received: field."""
        self.assertTrue(stored.startswith(b"Received: from client.test"), stored[:80])
        return stored.partition(b";\r\n\t")[2].partition(b"\r\n")[2]


class BdatTests(ChunkingTestCase):
    """BDAT (RFC 3030) taking a message: chunks stored verbatim with no dot-unstuffing, boundaries
    anywhere (inside a line, between CR and LF, octet by octet), pipelined with commands, chunk
    bytes never run as commands, BDAT 0 LAST alone and after chunks, empty and lower-case LAST
    chunks, a final line without CRLF, 8-bit content recorded, and on the STARTTLS listener too."""

    def test_one_chunk_taken_verbatim(self) -> None:
        """No dot is removed (RFC 3030 section 2): a line of one dot is content."""
        c = self.begin()
        c.send(bdat(MESSAGE, last=True))
        [reply] = c.replies()
        stored = self.stored(reply)
        body = self.body_of(stored)
        self.assertIn(b"\r\n\r\nHello Bob.\r\n.a line that starts with a dot", body)
        self.assertTrue(body.endswith(b"\r\n.\r\n..\r\nthe end\r\n"), body)
        # The same header fixes as DATA.
        self.assertNotIn(b"Bcc:", stored)
        self.assertIn(b"\r\nMessage-ID: <", stored)
        self.assertIn(b"\r\nDate: ", stored)
        self.assertIn(b" with ESMTPSA id ", stored)

    def test_chunks_split_anywhere(self) -> None:
        """Chunk boundaries inside a line, between CR and LF, before a dot."""
        for cuts in ([1], [len(MESSAGE) - 1], [5, 6, 7], [MESSAGE.index(b"\r\n.\r\n") + 1]):
            with self.subTest(cuts=cuts):
                h = Harness(self.mktemp())
                c = self.begin(h)
                bounds = [0, *cuts, len(MESSAGE)]
                pieces = [MESSAGE[a:b] for a, b in pairwise(bounds)]
                for piece in pieces[:-1]:
                    c.send(bdat(piece))
                    self.assertEqual(
                        c.replies(), [(250, f"2.0.0 Ok: {len(piece)} octets received")]
                    )
                c.send(bdat(pieces[-1], last=True))
                [reply] = c.replies()
                self.assertTrue(self.body_of(self.stored(reply, h)).endswith(b"..\r\nthe end\r\n"))

    def test_octet_by_octet(self) -> None:
        c = self.begin()
        wire = bdat(MESSAGE[:100]) + bdat(MESSAGE[100:], last=True) + b"NOOP\r\n"
        for i in range(len(wire)):
            c.send(wire[i : i + 1])
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        self.assertTrue(self.body_of(self.stored(replies[1])).endswith(b"the end\r\n"))

    def test_pipelined_with_commands(self) -> None:
        """RFC 2920 and 3030 together: one packet, replies in order."""
        c = self.h.connect()
        c.login()
        c.send(
            f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<a@example.net>\r\n".encode()
            + b"RCPT TO:<b@example.net>\r\n"
            + bdat(MESSAGE[:40])
            + bdat(MESSAGE[40:], last=True)
            + f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<c@example.net>\r\n".encode()
            + bdat(MESSAGE, last=True)
            + b"QUIT\r\n"
        )
        replies = c.replies()
        self.assertEqual(
            [code for code, _ in replies], [250, 250, 250, 250, 250, 250, 250, 250, 221]
        )
        for reply in (replies[4], replies[7]):
            self.assertTrue(self.body_of(self.stored(reply)).endswith(b"..\r\nthe end\r\n"))
        self.assertEqual(len(self.h.spool.messages), 2)

    def test_chunk_that_looks_like_commands_is_message(self) -> None:
        """What a chunk holds is never run as a command, not even a whole
        transaction or QUIT at a chunk boundary."""
        c = self.begin()
        head = f"From: <{LOGIN}>\r\n\r\n".encode()
        inner = b"QUIT\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n"
        c.send(bdat(head) + bdat(inner) + bdat(b".\r\nRSET\r\n", last=True))
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        self.assertFalse(c.closed)
        body = self.body_of(self.stored(replies[2]))
        self.assertTrue(body.endswith(b"\r\n\r\n" + inner + b".\r\nRSET\r\n"), body)

    def test_bdat_0_last(self) -> None:
        """An empty LAST chunk ends the message (RFC 3030 section 2)."""
        c = self.begin()
        c.send(bdat(MESSAGE) + b"BDAT 0 LAST\r\n")
        replies = c.replies()
        self.assertEqual(replies[0], (250, f"2.0.0 Ok: {len(MESSAGE)} octets received"))
        self.assertTrue(self.body_of(self.stored(replies[1])).endswith(b"the end\r\n"))

    def test_empty_chunks_and_lowercase_last(self) -> None:
        c = self.begin()
        c.send(b"BDAT 0\r\n" + bdat(MESSAGE) + b"bdat 0 last\r\n")
        replies = c.replies()
        self.assertEqual(replies[0], (250, "2.0.0 Ok: 0 octets received"))
        self.stored(replies[2])

    def test_bdat_0_last_alone_is_an_empty_message(self) -> None:
        """Nothing at all: no From: header, refused as DATA would refuse it."""
        c = self.begin()
        c.send(b"BDAT 0 LAST\r\n")
        [(code, text)] = c.replies()
        self.assertEqual((code, text[:5]), (550, "5.6.0"))
        self.assertIn("no From: header", text)
        self.assertEqual(self.h.spool.messages, {})
        # The transaction is over.
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 250)

    def test_unterminated_last_line_gets_crlf(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE + b"no line end", last=True))
        [reply] = c.replies()
        self.assertTrue(self.body_of(self.stored(reply)).endswith(b"the end\r\nno line end\r\n"))

    def test_8bit_chunk_recorded(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE + "blåbær\r\n".encode(), last=True))
        [reply] = c.replies()
        self.stored(reply)
        _, env, _ = self.h.spool.messages[reply[1].rpartition(" ")[2]]
        self.assertEqual(env.body, "8BITMIME")

    def test_on_the_starttls_listener(self) -> None:
        """Offered and taken on 587 as on 465: after STARTTLS, EHLO and AUTH."""
        c = self.h.connect(implicit_tls=False)
        c.replies()
        self.assertIn("CHUNKING", c.command("EHLO client.test")[1].split("\n"))
        # Before TLS and AUTH there is no transaction: the chunk is discarded.
        c.send(bdat(b"MAIL FROM:<x@example.com>\r\n", last=True))
        self.assertEqual(c.codes(), [503])
        self.assertEqual(c.command("STARTTLS")[0], 220)
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.send(bdat(MESSAGE, last=True))
        [reply] = c.replies()
        self.assertIn(b" with ESMTPSA id ", self.stored(reply))


class BdatSequenceTests(ChunkingTestCase):
    """BDAT in the command sequence: DATA, RCPT or MAIL after BDAT refused, RSET and a disconnect in
    the middle drop the partial message, BDAT needs MAIL, a recipient, EHLO and a login, a size
    that cannot be read gives 501 and the rest is read as commands, BDAT after LAST needs a new
    MAIL, and the idle timeout inside a chunk."""

    def test_data_after_bdat_refused(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE[:30]) + b"DATA\r\n" + bdat(MESSAGE[30:], last=True))
        replies = c.replies()
        self.assertEqual(
            replies[1], (503, "5.5.1 DATA after BDAT: send the rest with BDAT, or RSET")
        )
        self.assertTrue(self.body_of(self.stored(replies[2])).endswith(b"the end\r\n"))

    def test_rcpt_after_bdat_refused(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE[:30]) + b"RCPT TO:<late@example.net>\r\n" + bdat(MESSAGE[30:], True))
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 503, 250])
        _, env, _ = self.h.spool.messages[replies[2][1].rpartition(" ")[2]]
        self.assertEqual([r.address for r in env.recipients], ["r0@example.net"])

    def test_mail_after_bdat_refused(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE[:30]))
        self.assertEqual(c.codes(), [250])
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 503)

    def test_rset_in_the_middle_discards(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE[:30]) + b"RSET\r\n")
        self.assertEqual(c.codes(), [250, 250])
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        # The rest of the message, sent anyway, is refused and its octets
        # are read, not run: the chunk holds a QUIT.
        c.send(bdat(b"QUIT\r\n", last=True))
        self.assertEqual(c.replies(), [(503, "5.5.1 Need MAIL command first")])
        self.assertFalse(c.closed)
        self.assertEqual(self.h.spool.messages, {})
        # A new transaction starts afresh, with DATA if the client likes.
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        self.assertEqual(c.command("DATA")[0], 354)

    def test_disconnect_in_the_middle_aborts(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE[:30]) + b"BDAT 100\r\npartial")
        c.protocol.connectionLost(None)
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        self.assertEqual(self.h.spool.messages, {})

    def test_bdat_needs_mail_and_recipients(self) -> None:
        c = self.h.connect()
        c.login()
        c.send(bdat(b"MAIL FROM:<x@example.com>\r\n"))
        self.assertEqual(c.replies(), [(503, "5.5.1 Need MAIL command first")])
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.send(bdat(b"RCPT TO:<x@example.com>\r\n", last=True))
        self.assertEqual(c.replies(), [(554, "5.5.1 No valid recipients")])
        # Still in the transaction: a recipient, then the message.
        self.assertEqual(c.command("RCPT TO:<bob@example.net>")[0], 250)
        c.send(bdat(MESSAGE, last=True))
        self.stored(c.replies()[0])

    def test_bdat_needs_ehlo_and_login(self) -> None:
        c = self.h.connect()
        c.replies()
        c.send(bdat(b"NOOP\r\n"))
        self.assertEqual(c.replies(), [(503, "5.5.1 BDAT needs EHLO first")])
        c.command("EHLO client.test")
        c.send(bdat(b"NOOP\r\n"))
        self.assertEqual(c.replies(), [(503, "5.5.1 Need MAIL command first")])

    def test_syntax(self) -> None:
        """A size that cannot be read: 501, and what follows is read as commands
        (there is no telling where the chunk would end), as Postfix does."""
        c = self.begin()
        for args in ("", " x", " 10 NOTLAST", " -1", " 1.5", " 10 LAST extra", " " + "9" * 21):
            with self.subTest(args=args):
                self.assertEqual(
                    c.command("BDAT" + args), (501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
                )
        c.send(bdat(MESSAGE, last=True))
        self.stored(c.replies()[0])

    def test_bdat_after_last_needs_mail(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE, last=True) + bdat(b"more\r\n", last=True))
        self.assertEqual(c.codes(), [250, 503])

    def test_idle_timeout_inside_a_chunk(self) -> None:
        c = self.begin()
        c.send(b"BDAT 1000\r\n" + b"x" * 10)
        self.h.clock.advance(301)
        self.assertEqual(c.replies(), [(421, "4.4.2 Timeout exceeded; closing connection")])
        self.assertTrue(c.closed)
        c.protocol.connectionLost(None)
        self.assertTrue(self.h.spool.transactions[-1].aborted)


class BdatLimitTests(ChunkingTestCase):
    """The DATA rules on chunked messages: the size limit across chunks (552 for the chunk that
    passes it, the rest read and discarded), exactly at the limit, a declared SIZE over it, bare
    LF normalized or refused, bare CR (also as the very last octet), NUL and over-long lines, a
    998-character line, the From: alignment, the Received: loop limit."""

    def test_size_across_chunks(self) -> None:
        """552 for the chunk that passes the limit; the rest read and discarded
        (each answered so), the session in step; nothing queued."""
        h = Harness(self.mktemp(), make_config(limits={"message_size": 2048}))
        c = self.begin(h)
        line = b"x" * 98 + b"\r\n"
        chunks = [MESSAGE, line * 10, line * 10, b"QUIT\r\n" + line]
        c.send(b"".join(bdat(chunk) for chunk in chunks) + b"BDAT 0 LAST\r\n")
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 250, 552, 552, 552])
        self.assertEqual(replies[2][1], "5.3.4 " + too_big(2048).text)
        self.assertFalse(c.closed)
        self.assertEqual(h.spool.messages, {})
        self.assertTrue(h.spool.transactions[-1].aborted)
        # The transaction ended with the LAST chunk; the next one works.
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.send(bdat(MESSAGE, last=True))
        self.stored(c.replies()[0], h)

    def test_size_limit_exactly(self) -> None:
        stored_size = len(MESSAGE) - len(b"Bcc: secret@example.net\r\n")
        h = Harness(self.mktemp(), make_config(limits={"message_size": len(MESSAGE)}))
        c = self.begin(h)
        c.send(bdat(MESSAGE, last=True))
        self.assertEqual(c.codes(), [250])
        self.assertLess(stored_size, len(MESSAGE))

    def test_declared_size_over_limit(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}> SIZE=52428801")[0], 552)

    def test_bare_lf_normalized(self) -> None:
        c = self.begin()
        c.send(
            bdat(MESSAGE.replace(b"\r\n", b"\n")[:50])
            + bdat(MESSAGE.replace(b"\r\n", b"\n")[50:], True)
        )
        replies = c.replies()
        body = self.body_of(self.stored(replies[1]))
        self.assertTrue(body.endswith(b"\r\n.\r\n..\r\nthe end\r\n"), body)
        self.assertNotIn(b"\n", body.replace(b"\r\n", b""))

    def test_bare_lf_refused_when_configured(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"bare_newline": "reject"}))
        c = self.begin(h)
        c.send(bdat(MESSAGE) + bdat(b"bare\nline\r\n") + bdat(b"more\r\n", last=True))
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 550, 550])
        self.assertTrue(replies[1][1].startswith("5.6.11"))
        self.assertEqual(h.spool.messages, {})

    def test_bare_cr_refused(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE + b"a\r.\rb\r\n", last=True))
        [(code, text)] = c.replies()
        self.assertEqual((code, text[:6]), (550, "5.6.11"))

    def test_bare_cr_at_the_very_end(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE + b"end\r", last=True))
        self.assertEqual(c.codes(), [550])

    def test_nul_and_long_line_refused(self) -> None:
        for extra in (b"a\x00b\r\n", b"y" * 999 + b"\r\n"):
            with self.subTest(extra=extra[:5]):
                h = Harness(self.mktemp())
                c = self.begin(h)
                c.send(bdat(MESSAGE) + bdat(extra) + bdat(b"fine\r\n", last=True))
                replies = c.replies()
                self.assertEqual([code for code, _ in replies], [250, 550, 550])
                self.assertTrue(replies[1][1].startswith("5.6.0"), replies)
                self.assertEqual(h.spool.messages, {})

    def test_998_character_line_accepted(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE + b"y" * 500) + bdat(b"y" * 498 + b"\r\n", last=True))
        self.assertEqual(c.codes(), [250, 250])

    def test_from_header_must_match(self) -> None:
        c = self.begin()
        c.send(bdat(MESSAGE.replace(LOGIN.encode(), OTHER.encode())) + b"BDAT 0 LAST\r\n")
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [550, 550])
        self.assertTrue(replies[0][1].startswith("5.7.1"))
        self.assertEqual(self.h.spool.messages, {})

    def test_mail_loop(self) -> None:
        c = self.begin()
        c.send(bdat(b"Received: from x by y; now\r\n" * 26 + MESSAGE, last=True))
        self.assertEqual(c.replies()[0][1][:5], "5.4.6")


class BdatCommitTests(ChunkingTestCase):
    """The end of a chunked message: 250 only after the spool commit, 451 when the commit fails, an
    account deleted while MAIL is open (the chunk still read), a write failure at a middle chunk,
    and the message hooks seeing the BDAT message as they see a DATA one."""

    def test_250_only_after_the_commit(self) -> None:
        self.h.spool.hold_commits = True
        c = self.begin()
        c.send(bdat(MESSAGE[:20]) + bdat(MESSAGE[20:], last=True) + b"NOOP\r\nQUIT\r\n")
        self.assertEqual(c.codes(), [250], "only the first chunk is answered")
        self.assertEqual(self.h.spool.messages, {})
        self.h.spool.release_held()
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250, 250, 221])
        self.assertTrue(replies[0][1].startswith("2.0.0 Ok: queued as "))

    def test_commit_failure(self) -> None:
        self.h.spool.fail_commit = StorageError("ENOSPC", disk_full=True)
        c = self.begin()
        c.send(bdat(MESSAGE, last=True))
        [(code, text)] = c.replies()
        self.assertEqual((code, text[:5]), (452, "4.3.1"))
        self.assertEqual(self.h.spool.messages, {})

    def test_deleted_user_cannot_send(self) -> None:
        """The account goes while MAIL is open: the chunk is still read."""
        c = self.begin()
        with self.h.users.editing() as users:
            del users[LOGIN]
        c.send(bdat(b"QUIT\r\n") + b"NOOP\r\n")
        self.assertEqual(c.codes(), [535, 250])
        self.assertFalse(c.closed)
        self.assertEqual(self.h.spool.messages, {})

    def test_write_failure_at_a_middle_chunk(self) -> None:
        self.h.spool.fail_write = StorageError("EIO")
        c = self.begin()
        c.send(bdat(MESSAGE) + bdat(b"more\r\n", last=True))
        self.assertEqual(c.codes(), [451, 451])
        self.assertEqual(self.h.spool.messages, {})

    def test_message_checks_run(self) -> None:
        """The message hooks see the BDAT message as they see a DATA one."""

        @implementer(IMessageHook)
        class Look:
            name = "look"
            seen: list[bytes] = []

            def on_message(self, session: SessionInfo, message: Any) -> Verdict:
                with message.open() as f:
                    data = f.read()
                Look.seen.append(data)
                return reject("No chunks today", 554, "5.7.1") if b"refuse" in data else CONTINUE

        self.h.use(checks=checkhost.Checks([checkhost.Loaded("look", Look(), 5.0)], self.h.clock))
        c = self.begin()
        c.send(bdat(MESSAGE + b"please refuse\r\n", last=True))
        self.assertEqual(c.replies(), [(554, "5.7.1 No chunks today")])
        self.assertEqual(self.h.spool.messages, {})
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.send(bdat(MESSAGE, last=True))
        self.stored(c.replies()[0])
        self.assertTrue(Look.seen[-1].startswith(b"Received: "))
        self.assertTrue(Look.seen[-1].endswith(b"..\r\nthe end\r\n"))


class ChunkReaderTests(SynchronousTestCase):
    """ChunkReader by itself: octets taken verbatim, the same result for every split of the input,
    and the error a chunk's octets show the same however they arrive in packets."""

    def read(self, *chunks: bytes, max_size: int = 10_000, mode: str = "normalize") -> ChunkReader:
        self.out: list[bytes] = []
        r = ChunkReader(self.out.append, max_size, bare_newline=mode)
        for chunk in chunks:
            r.feed(chunk)
        r.finish()
        return r

    def test_verbatim(self) -> None:
        r = self.read(b".\r\n..x\r\n", b"a\r", b"\nb")
        self.assertIsNone(r.error)
        self.assertEqual(b"".join(self.out), b".\r\n..x\r\na\r\nb\r\n")
        self.assertEqual(r.size, len(b"".join(self.out)))

    def test_every_split(self) -> None:
        data = b"a\r\n.\r\n\r\nb\nc\r\n..\r\n"
        for i in range(len(data) + 1):
            with self.subTest(split=i):
                r = self.read(data[:i], data[i:])
                self.assertIsNone(r.error)
                self.assertEqual(b"".join(self.out), b"a\r\n.\r\n\r\nb\r\nc\r\n..\r\n")

    def test_the_error_after_a_chunk_does_not_depend_on_the_packets(self) -> None:
        """The reply to a chunk is the error its octets show, however they
        arrived: whole, or one at a time, where an over-long line is found
        before the NUL or bare CR that ends the chunk (found by the fuzzer,
        tests/test_fuzz_smtp.py)."""
        long = b"text" + b"x" * (2 * MAX_LINE)
        for tail, expected in [(b"\x00", NUL_OCTET), (b"\ra", BARE_CR), (b"", LINE_TOO_LONG)]:
            chunk = long + tail
            errors = []
            for pieces in ([chunk], [chunk[i : i + 1] for i in range(len(chunk))]):
                r = ChunkReader(lambda _: None, 10_000_000)
                for piece in pieces:
                    r.feed(piece)
                errors.append(r.error)  # the session replies now (not LAST)
            with self.subTest(tail=tail):
                self.assertEqual(errors, [expected, expected])
