"""Tests for L{mta.smtp.dataread}: the strict DATA body reader.

The reader must agree with every other server about where a message ends,
whatever the chunking: that is what SMTP smuggling (CVE-2023-51764, -51765,
-51766) exploits.  Lines end only at CRLF (RFC 5321 section 2.3.8) and the
end of data is only C{CRLF "." CRLF} (section 4.1.1.4).
"""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mta.smtp.dataread import (
    BARE_CR,
    BARE_NEWLINE,
    LINE_TOO_LONG,
    MAX_LINE,
    NUL_OCTET,
    DataReader,
    too_big,
)

BIG = 10_000_000


class Reading:
    """One DataReader with a sink that records what it was given."""

    def __init__(self, max_size: int = BIG, bare_newline: str = "normalize") -> None:
        self.received: list[bytes] = []
        self.reader = DataReader(self.received.append, max_size, bare_newline=bare_newline)

    @property
    def output(self) -> bytes:
        return b"".join(self.received)

    def feed(self, *chunks: bytes) -> bytes | None:
        """Feed chunks in order, as the session does; return all bytes after
        the end of data (None when the end was not seen)."""
        for i, chunk in enumerate(chunks):
            rest = self.reader.feed(chunk)
            if rest is not None:
                return rest + b"".join(chunks[i + 1 :])
        return None


def stuff(lines: list[bytes]) -> bytes:
    """Dot-stuff lines and add the end of data (RFC 5321 section 4.5.2)."""
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


def every_split(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(data[:i], data[i:]) for i in range(len(data) + 1)]


class EndOfDataTests(SynchronousTestCase):
    """DataReader finding the end of data: only at CRLF.CRLF, an empty message and one of a blank
    line, nothing done without the terminator, the terminator split at every point and fed a byte
    at a time, pipelined commands after it returned to the session, a second terminator left
    over, and feeding after the end."""

    def test_simple(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), b"")
        self.assertEqual(r.output, b"Subject: hi\r\n\r\nbody\r\n")
        self.assertTrue(r.reader.done)
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.reader.size, len(r.output))

    def test_empty_message(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b".\r\n"), b"")
        self.assertEqual(r.output, b"")
        self.assertIsNone(r.reader.error)

    def test_blank_line_message(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(r.output, b"\r\n")

    def test_not_done_without_terminator(self) -> None:
        r = Reading()
        self.assertIsNone(r.feed(b"line\r\n", b".", b"x\r\n", b"\r\n"))
        self.assertFalse(r.reader.done)
        self.assertEqual(r.output, b"line\r\nx\r\n\r\n")

    def test_terminator_at_every_split(self) -> None:
        data = b"a\r\n.b\r\n..\r\n.\r\nNOOP\r\n"
        for first, second in every_split(data):
            with self.subTest(split=len(first)):
                r = Reading()
                self.assertEqual(r.feed(first, second), b"NOOP\r\n")
                self.assertEqual(r.output, b"a\r\nb\r\n.\r\n")

    def test_one_byte_chunks(self) -> None:
        data = b"a\r\n.\r\nRSET\r\n"
        r = Reading()
        self.assertEqual(r.feed(*[data[i : i + 1] for i in range(len(data))]), b"RSET\r\n")
        self.assertEqual(r.output, b"a\r\n")

    def test_pipelined_commands_returned(self) -> None:
        """RFC 2920: commands after the end of data belong to the session."""
        r = Reading()
        rest = r.feed(b"x\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(rest, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(r.output, b"x\r\n")

    def test_second_terminator_is_leftover(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"x\r\n.\r\ny\r\n.\r\n"), b"y\r\n.\r\n")
        self.assertEqual(r.output, b"x\r\n")

    def test_feed_after_end(self) -> None:
        r = Reading()
        r.feed(b".\r\n")
        self.assertRaises(RuntimeError, r.reader.feed, b"more")


class DotUnstuffingTests(SynchronousTestCase):
    """RFC 5321 section 4.5.2: the first dot of a line starting with one goes."""

    def test_double_dot_line(self) -> None:
        r = Reading()
        r.feed(b"..\r\n.\r\n")
        self.assertEqual(r.output, b".\r\n")

    def test_dot_text_lines(self) -> None:
        r = Reading()
        r.feed(b"..hidden\r\nmid.dle\r\n...three\r\n.\r\n")
        self.assertEqual(r.output, b".hidden\r\nmid.dle\r\n..three\r\n")

    def test_dot_line_at_chunk_boundary(self) -> None:
        """A chunk that ends right after a dot that starts a line."""
        r = Reading()
        self.assertIsNone(r.feed(b"a\r\n.", b".x\r\n", b"."))
        self.assertEqual(r.feed(b"y\r\n.", b"\r\n"), b"")
        self.assertEqual(r.output, b"a\r\n.x\r\ny\r\n")

    def test_double_dot_split_between_dots(self) -> None:
        """C{..CRLF} split after its first dot is still one dot, not the end."""
        r = Reading()
        self.assertIsNone(r.feed(b"a\r\n.", b".\r\n"))
        self.assertFalse(r.reader.done)
        self.assertEqual(r.feed(b".\r\n"), b"")
        self.assertEqual(r.output, b"a\r\n.\r\n")

    def test_size_counts_unstuffed_octets(self) -> None:
        r = Reading()
        r.feed(b"..\r\n.\r\n")
        self.assertEqual(r.reader.size, 3)


# The payloads of the SMTP smuggling advisories: each is taken by some
# server as the end of data, so here none of them may be.
SMUGGLING = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r\r\n"]
LF_ONLY = [p for p in SMUGGLING if b"\r" not in p.replace(b"\r\n", b"")]
WITH_BARE_CR = [p for p in SMUGGLING if p not in LF_ONLY]
SMUGGLED = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n"


class RejectBareNewlineTests(SynchronousTestCase):
    """C{bare_newline = "reject"}: a bare LF or CR anywhere makes the message
    refused (550 5.6.11)."""

    def reading(self) -> Reading:
        return Reading(bare_newline="reject")

    def test_reply(self) -> None:
        self.assertEqual((BARE_NEWLINE.code, BARE_NEWLINE.enhanced), (550, "5.6.11"))

    def test_smuggling_payloads_do_not_end_data(self) -> None:
        for payload in SMUGGLING:
            data = b"Subject: x\r\n\r\nhello" + payload + SMUGGLED + b"evil\r\n.\r\nQUIT\r\n"
            with self.subTest(payload=payload):
                r = self.reading()
                self.assertEqual(r.feed(data), b"QUIT\r\n")
                self.assertEqual(r.reader.error, BARE_NEWLINE)
                self.assertNotIn(b"evil", r.output)

    def test_smuggling_payloads_at_every_split(self) -> None:
        for payload in SMUGGLING:
            data = b"hello" + payload + b"NOOP\r\n.\r\nQUIT\r\n"
            for first, second in every_split(data):
                with self.subTest(payload=payload, split=len(first)):
                    r = self.reading()
                    self.assertEqual(r.feed(first, second), b"QUIT\r\n")
                    self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_smuggling_payload_one_byte_chunks(self) -> None:
        data = b"hello\n.\r\nNOOP\r\n.\r\nQUIT\r\n"
        r = self.reading()
        self.assertEqual(r.feed(*[data[i : i + 1] for i in range(len(data))]), b"QUIT\r\n")
        self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_bare_lf_in_line(self) -> None:
        r = self.reading()
        self.assertEqual(r.feed(b"a\nb\r\n.\r\n"), b"")
        self.assertEqual(r.reader.error, BARE_NEWLINE)
        self.assertEqual(r.reader.bare_lf, 1)

    def test_bare_cr_in_line(self) -> None:
        r = self.reading()
        self.assertEqual(r.feed(b"a\rb\r\n.\r\n"), b"")
        self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_cr_before_crlf(self) -> None:
        r = self.reading()
        self.assertEqual(r.feed(b"a\r\r\n.\r\n"), b"")
        self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_bare_lf_after_dot_line(self) -> None:
        """C{CRLF . LF} followed by more text is not the end either."""
        r = self.reading()
        self.assertIsNone(r.feed(b"a\r\n.\nb\r\n"))
        self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_nothing_passed_on_after_error(self) -> None:
        r = self.reading()
        self.assertIsNone(r.feed(b"good\r\n"))
        self.assertEqual(r.output, b"good\r\n")
        self.assertIsNone(r.feed(b"bad\n\r\n"))
        self.assertIsNone(r.feed(b"after\r\n"))
        self.assertEqual(r.feed(b".\r\n"), b"")
        self.assertEqual(r.output, b"good\r\n")
        self.assertEqual(r.reader.error, BARE_NEWLINE)

    def test_unknown_mode(self) -> None:
        self.assertRaises(ValueError, DataReader, lambda b: None, 10, bare_newline="strip")


class NormalizeBareNewlineTests(SynchronousTestCase):
    """The default, C{bare_newline = "normalize"} (Postfix 3.9): a line that
    ends in a bare LF is stored with CRLF; only CRLF "." CRLF ends the data;
    a bare CR is still refused."""

    def test_lf_message_stored_with_crlf(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"Subject: x\n\nline one\nline two\r\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, b"Subject: x\r\n\r\nline one\r\nline two\r\n")
        self.assertEqual(r.reader.size, len(r.output))
        self.assertEqual(r.reader.bare_lf, 3)

    def test_smuggling_payloads_are_content(self) -> None:
        """Every LF form of a false end stays in the message as a line of one
        dot; what follows it is message text, never commands."""
        for payload in LF_ONLY:
            data = b"Subject: x\r\n\r\nhello" + payload + SMUGGLED + b"evil\r\n.\r\nQUIT\r\n"
            with self.subTest(payload=payload):
                r = Reading()
                self.assertEqual(r.feed(data), b"QUIT\r\n")
                self.assertIsNone(r.reader.error)
                self.assertEqual(
                    r.output, b"Subject: x\r\n\r\nhello\r\n.\r\n" + SMUGGLED + b"evil\r\n"
                )

    def test_bare_cr_payloads_refused(self) -> None:
        for payload in WITH_BARE_CR:
            data = b"Subject: x\r\n\r\nhello" + payload + SMUGGLED + b"evil\r\n.\r\nQUIT\r\n"
            with self.subTest(payload=payload):
                r = Reading()
                self.assertEqual(r.feed(data), b"QUIT\r\n")
                self.assertEqual(r.reader.error, BARE_CR)
                self.assertEqual((BARE_CR.code, BARE_CR.enhanced), (550, "5.6.11"))
                self.assertNotIn(b"evil", r.output)

    def test_smuggling_payloads_at_every_split(self) -> None:
        for payload in SMUGGLING:
            data = b"hello" + payload + b"NOOP\r\n.\r\nQUIT\r\n"
            for first, second in every_split(data):
                with self.subTest(payload=payload, split=len(first)):
                    r = Reading()
                    self.assertEqual(r.feed(first, second), b"QUIT\r\n")
                    if payload in LF_ONLY:
                        self.assertIsNone(r.reader.error)
                        self.assertEqual(r.output, b"hello\r\n.\r\nNOOP\r\n")
                    else:
                        self.assertEqual(r.reader.error, BARE_CR)

    def test_smuggling_payload_one_byte_chunks(self) -> None:
        data = b"hello\n.\r\nNOOP\r\n.\r\nQUIT\r\n"
        r = Reading()
        self.assertEqual(r.feed(*[data[i : i + 1] for i in range(len(data))]), b"QUIT\r\n")
        self.assertEqual(r.output, b"hello\r\n.\r\nNOOP\r\n")

    def test_dot_line_after_lf_line_at_block_start(self) -> None:
        """The dot line is the first of a piece, the bare LF ended the last one."""
        r = Reading()
        self.assertIsNone(r.feed(b"a\n"))
        self.assertIsNone(r.feed(b".\r\n"))
        self.assertEqual(r.feed(b"b\r\n.\r\n"), b"")
        self.assertEqual(r.output, b"a\r\n.\r\nb\r\n")

    def test_stuffed_lines_after_bare_lf_unstuffed(self) -> None:
        """A client that sends LF line ends and stuffs dots gets them undone."""
        r = Reading()
        self.assertEqual(r.feed(b"a\n..b\n...\n..\r\n.\r\n"), b"")
        self.assertEqual(r.output, b"a\r\n.b\r\n..\r\n.\r\n")

    def test_crlf_dot_crlf_after_a_bare_lf_line_is_content(self) -> None:
        """The line before the dot must end in CRLF too."""
        r = Reading()
        self.assertIsNone(r.feed(b"a\n.\r\n"))
        self.assertFalse(r.reader.done)
        self.assertEqual(r.feed(b".\r\n"), b"")
        self.assertEqual(r.output, b"a\r\n.\r\n")

    def test_first_line_bare_lf_dot(self) -> None:
        """Right after 354, a dot with a bare LF is content too."""
        r = Reading()
        self.assertEqual(r.feed(b".\nx\r\n.\r\n"), b"")
        self.assertEqual(r.output, b".\r\nx\r\n")

    def test_empty_lf_lines(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"\n\n\r\n.\r\n"), b"")
        self.assertEqual(r.output, b"\r\n\r\n\r\n")

    def test_lf_line_length_counts_the_stored_crlf(self) -> None:
        r = Reading()
        r.feed(b"a" * (MAX_LINE - 2) + b"\n.\r\n", b"\r\n.\r\n")
        self.assertIsNone(r.reader.error)
        r = Reading()
        r.feed(b"a" * (MAX_LINE - 1) + b"\n\r\n.\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_size_counts_the_stored_crlf(self) -> None:
        """Eleven octets on the wire, twelve as stored: over a limit of eleven."""
        r = Reading(max_size=11)
        r.feed(b"12345678\n\r\n.\r\n")
        self.assertEqual(r.reader.error, too_big(11))
        r = Reading(max_size=11)
        r.feed(b"1234567\n\r\n.\r\n")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, b"1234567\r\n\r\n")

    def test_bare_cr_in_long_partial_line(self) -> None:
        r = Reading()
        self.assertIsNone(r.feed(b"a" * 600 + b"\r" + b"a" * 600))
        self.assertEqual(r.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(r.reader.error, BARE_CR)


class NulTests(SynchronousTestCase):
    """A NUL anywhere makes the message refused: a receiver that drops NULs
    would take C{CRLF NUL "." CRLF} for the end of data (found by the e2e
    attack tests, tests/e2e/test_attacks.py)."""

    def test_reply(self) -> None:
        self.assertEqual((NUL_OCTET.code, NUL_OCTET.enhanced), (550, "5.6.0"))

    def test_nul_dot_line_is_refused_not_passed_on(self) -> None:
        for payload in [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\x00\r\n"]:
            data = b"Subject: x\r\n\r\nhello" + payload + b"MAIL FROM:<e@example.com>\r\n.\r\nQ"
            for first, second in every_split(data):
                with self.subTest(payload=payload, split=len(first)):
                    r = Reading()
                    self.assertEqual(r.feed(first, second), b"Q")
                    self.assertEqual(r.reader.error, NUL_OCTET)
                    self.assertNotIn(b"\x00", r.output)
                    self.assertNotIn(b"MAIL", r.output)


class SizeLimitTests(SynchronousTestCase):
    """The message size limit in DataReader: the 552 reply, a message exactly at the limit, an
    oversize message read to its end so the session stays in step, the limit applied to the
    unstuffed size, and the graver error winning whatever the chunking."""

    def test_reply(self) -> None:
        reply = too_big(1000)
        self.assertEqual((reply.code, reply.enhanced), (552, "5.3.4"))
        self.assertIn("1000", reply.text)

    def test_exactly_at_limit(self) -> None:
        r = Reading(max_size=10)
        self.assertEqual(r.feed(b"12345678\r\n.\r\n"), b"")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, b"12345678\r\n")

    def test_over_limit_read_to_end(self) -> None:
        r = Reading(max_size=10)
        self.assertIsNone(r.feed(b"123456789\r\n"))
        self.assertEqual(r.reader.error, too_big(10))
        self.assertFalse(r.reader.done)
        self.assertIsNone(r.feed(b"more\r\n" * 100))
        self.assertEqual(r.feed(b".\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertTrue(r.reader.done)
        self.assertEqual(r.reader.error, too_big(10))
        self.assertEqual(r.output, b"")

    def test_limit_is_on_unstuffed_size(self) -> None:
        """Ten lines of C{..} are 40 octets on the wire but 30 in the message."""
        r = Reading(max_size=30)
        r.feed(b"..\r\n" * 10 + b".\r\n")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, b".\r\n" * 10)

    def test_graver_error_wins_whatever_the_chunking(self) -> None:
        """The reply must not depend on packet boundaries (found by the fuzz
        target, tests/test_fuzz_smtp.py): a bare LF outranks the size, a NUL
        and a long line, however the message was split."""
        for mode, bare, reply in [
            ("reject", b"\n", BARE_NEWLINE),
            ("reject", b"\r", BARE_NEWLINE),
            ("normalize", b"\r", BARE_CR),
        ]:
            data = b"0123456789abcdef\r\n" + b"x" * 1200 + b"\x00bare" + bare + b"\r\n.\r\n"
            for first, second in every_split(data):
                with self.subTest(mode=mode, bare=bare, split=len(first)):
                    r = Reading(max_size=10, bare_newline=mode)
                    r.feed(first, second)
                    self.assertEqual(r.reader.error, reply)
        r = Reading(max_size=10)
        r.feed(b"0123456789abcdef\r\n" + b"x" * 1200 + b"\x00\r\n.\r\n")
        self.assertEqual(r.reader.error, NUL_OCTET)
        r = Reading(max_size=10)
        r.feed(b"0123456789abcdef\r\n" + b"x" * 1200 + b"\r\n.\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)
        r = Reading(max_size=10)
        r.feed(b"0123456789abcdef\r\n.\r\n")
        self.assertEqual(r.reader.error, too_big(10))


class LineLengthTests(SynchronousTestCase):
    """RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF."""

    def test_reply(self) -> None:
        self.assertEqual((LINE_TOO_LONG.code, LINE_TOO_LONG.enhanced), (550, "5.6.0"))

    def test_998_characters(self) -> None:
        line = b"a" * (MAX_LINE - 2)
        r = Reading()
        self.assertEqual(r.feed(line + b"\r\n.\r\n"), b"")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, line + b"\r\n")

    def test_998_characters_in_pieces(self) -> None:
        line = b"a" * (MAX_LINE - 2)
        r = Reading()
        r.feed(line[:500], line[500:], b"\r", b"\n.\r\n")
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, line + b"\r\n")

    def test_999_characters(self) -> None:
        r = Reading()
        self.assertEqual(r.feed(b"x\r\n" + b"a" * 999 + b"\r\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_999_characters_in_pieces(self) -> None:
        """No single piece is too long; the line they make is."""
        r = Reading()
        self.assertEqual(r.feed(b"a" * 999, b"\r\n.\r\n"), b"")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_long_line_noticed_before_its_end(self) -> None:
        """An endless line is refused as it comes, not buffered until a CRLF
        that may never arrive."""
        r = Reading()
        self.assertIsNone(r.feed(b"a" * 600, b"a" * 600))
        self.assertEqual(r.reader.error, LINE_TOO_LONG)
        self.assertFalse(r.reader.done)

    def test_long_line_across_many_chunks(self) -> None:
        chunks = [b"a" * 100] * 50 + [b"\r\nnext\r\n.\r\nQUIT\r\n"]
        r = Reading()
        self.assertEqual(r.feed(*chunks), b"QUIT\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)
        self.assertEqual(r.output, b"")

    def test_long_line_one_byte_chunks(self) -> None:
        data = b"a" * 1500 + b"\r\n.\r\nQUIT\r\n"
        r = Reading()
        self.assertEqual(r.feed(*[data[i : i + 1] for i in range(len(data))]), b"QUIT\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_long_line_ending_in_dot(self) -> None:
        """Only the last octet of an over-long partial line is kept; if that
        is the C{.} before CRLF, it must not look like a line of its own."""
        data = b"a" * 1500 + b".\r\nafter\r\n.\r\nQUIT\r\n"
        for chunks in [
            (b"a" * 1500 + b".", b"\r\nafter\r\n.\r\nQUIT\r\n"),
            (b"a" * 1500 + b".", b"\r", b"\nafter\r\n.\r\nQUIT\r\n"),
            tuple([b"a" * 100] * 15 + [b".", b"\r\n", b"after\r\n.\r\nQUIT\r\n"]),
            tuple(data[i : i + 1] for i in range(len(data))),
        ]:
            with self.subTest(sizes=[len(c) for c in chunks][:5]):
                r = Reading()
                rest = r.feed(*chunks)
                self.assertEqual(rest, b"QUIT\r\n")
                self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_long_line_ending_in_cr(self) -> None:
        """The kept octet may be the CR of the CRLF that ends the long line."""
        r = Reading()
        self.assertEqual(r.feed(b"a" * 1500 + b"\r", b"\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertEqual(r.reader.error, LINE_TOO_LONG)

    def test_long_line_then_bare_lf(self) -> None:
        """A bare LF after an over-long piece is not a line end either."""
        r = Reading()
        self.assertIsNone(r.feed(b"a" * 1500 + b"\n", b".\r\n"))
        self.assertFalse(r.reader.done)
        self.assertEqual(r.feed(b"\r\n.\r\n"), b"")

    def test_stuffed_dot_not_counted(self) -> None:
        line = b"." + b"a" * (MAX_LINE - 3)
        r = Reading()
        r.feed(stuff([line]))
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, line + b"\r\n")


lines = st.lists(
    st.one_of(
        # Any octets but CR, LF and NUL (which make a message refused).
        st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00")),
        st.sampled_from([b".", b"..", b".x", b"..x", b"", b" ."]),
    ),
    max_size=20,
)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """Split C{data} at random points, from one chunk down to single octets."""
    if draw(st.booleans()):
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=len(data) + 1)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


class ChunkingPropertyTests(SynchronousTestCase):
    """Hypothesis over the packet boundaries: whatever the chunking, the sink gets the original
    message back from its dot-stuffed CRLF form, and from LF or CRLF line ends as clients stuff
    them (stored with CRLF)."""

    @given(lines=lines, leftover=st.binary(max_size=30), data=st.data())
    def test_any_chunking(self, lines: list[bytes], leftover: bytes, data: st.DataObject) -> None:
        """Whatever the chunking, the sink gets the original message and the
        caller the bytes after the end of data."""
        wire = stuff(lines) + leftover
        message = b"".join(ln + b"\r\n" for ln in lines)
        r = Reading()
        rest = r.feed(*data.draw(chunkings(wire)))
        self.assertIsNone(r.reader.error)
        self.assertTrue(r.reader.done)
        self.assertEqual(r.output, message)
        self.assertEqual(rest, leftover)
        self.assertEqual(r.reader.size, len(message))

    @given(
        lines=lines,
        ends=st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=20, max_size=20),
        leftover=st.binary(max_size=30),
        data=st.data(),
    )
    def test_any_chunking_with_lf_line_ends(
        self, lines: list[bytes], ends: list[bytes], leftover: bytes, data: st.DataObject
    ) -> None:
        """Lines that end in LF or CRLF, stuffed as a client stuffs them: the
        sink gets every line with CRLF, whatever the chunking (the empty
        line before the end makes the dot follow a CRLF)."""
        body = b"".join(
            (b"." + ln if ln.startswith(b".") else ln) + end
            for ln, end in zip(lines, ends, strict=False)
        )
        wire = body + b"\r\n.\r\n" + leftover
        message = b"".join(ln + b"\r\n" for ln in lines) + b"\r\n"
        r = Reading()
        rest = r.feed(*data.draw(chunkings(wire)))
        self.assertIsNone(r.reader.error)
        self.assertEqual(r.output, message)
        self.assertEqual(rest, leftover)
