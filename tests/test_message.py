"""Tests for L{mta.smtp.message}: what the submission server does to headers."""

from __future__ import annotations

import dataclasses
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mta.errors import SMTPReplyError, StorageError
from mta.smtp.message import (
    MessageBuilder,
    TraceInfo,
    field_value,
    from_address,
    received_field,
    split_fields,
)
from mta.users import User

TRACE = TraceInfo(
    hostname="mx.example.net",
    queue_id="0123456789ABCDE",
    helo="client.example.org",
    client_address="192.0.2.7",
    tls="TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)",
    smtputf8=False,
    recipients=("bob@example.com",),
    when=1700000000.0,  # Tue, 14 Nov 2023 22:13:20 +0000
)
DATE = b"Tue, 14 Nov 2023 22:13:20 +0000"

ALICE = User(
    "alice@example.com",
    "$argon2id$v=19$m=64,t=1,p=1$not-a-real-hash",
    aliases=["Sales@Example.org"],
    domains=["Example.NET"],
)

# A complete header section: nothing is added to it but the trace field.
HEAD = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: a folded\r\n"
    b"\tsubject  with  odd   spacing \r\n"
    b"Date: Mon, 13 Nov 2023 10:00:00 +0100\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"X-Weird:no space\r\n"
    b"MIME-Version: 1.0\r\n"
)
BODY = b"\r\nHello Bob,\r\n\r\n trailing space \r\n.dot line after unstuffing\r\n"


def assertReplyError(case: SynchronousTestCase, call, code: int, enhanced: str) -> str:
    error = case.assertRaises(SMTPReplyError, call)
    case.assertEqual((error.reply.code, error.reply.enhanced), (code, enhanced))
    return error.reply.text


class Built:
    """A MessageBuilder with a list as its output."""

    def __init__(
        self,
        *,
        user: User = ALICE,
        trace: TraceInfo = TRACE,
        max_received: int = 25,
        max_header_size: int = 64 * 1024,
    ) -> None:
        self.written: list[bytes] = []
        self.builder = MessageBuilder(
            trace,
            user,
            self.written.append,
            max_received=max_received,
            max_header_size=max_header_size,
        )

    def feed(self, *chunks: bytes) -> Built:
        for chunk in chunks:
            self.builder.write(chunk)
        self.builder.finish()
        return self

    def bytewise(self, message: bytes) -> Built:
        return self.feed(*[message[i : i + 1] for i in range(len(message))])

    @property
    def output(self) -> bytes:
        return b"".join(self.written)


class SplitFieldsTests(SynchronousTestCase):
    """L{split_fields}: RFC 5322 section 2.2 header fields."""

    def test_fields_with_continuations(self) -> None:
        fields = split_fields(HEAD)
        self.assertEqual(
            [name for name, _ in fields],
            [b"from", b"to", b"subject", b"date", b"message-id", b"x-weird", b"mime-version"],
        )
        self.assertEqual(fields[2][1], b"Subject: a folded\r\n\tsubject  with  odd   spacing \r\n")

    def test_raw_bytes_reproduce_input(self) -> None:
        self.assertEqual(b"".join(raw for _, raw in split_fields(HEAD)), HEAD)

    def test_space_continuation(self) -> None:
        fields = split_fields(b"To: a@example.com,\r\n b@example.com\r\n")
        self.assertEqual(fields, [(b"to", b"To: a@example.com,\r\n b@example.com\r\n")])

    def test_space_before_colon(self) -> None:
        """RFC 5322 section 4.5 obsolete syntax allows white space before the colon."""
        self.assertEqual(split_fields(b"Subject : x\r\n"), [(b"subject", b"Subject : x\r\n")])

    def test_empty_section(self) -> None:
        self.assertEqual(split_fields(b""), [])

    def test_continuation_first(self) -> None:
        text = assertReplyError(self, lambda: split_fields(b" folded\r\nTo: a@b\r\n"), 550, "5.6.0")
        self.assertIn("continuation", text)

    def test_malformed_lines(self) -> None:
        for line in [b"no colon here", b"Bad Name: x", b": empty name", b"Caf\xc3\xa9: x"]:
            with self.subTest(line=line):
                assertReplyError(
                    self, lambda ln=line: split_fields(b"To: a@b\r\n" + ln + b"\r\n"), 550, "5.6.0"
                )

    def test_field_value_unfolds(self) -> None:
        self.assertEqual(field_value(b"Subject: a folded\r\n\tsubject\r\n"), "a folded\tsubject")


class FromAddressTests(SynchronousTestCase):
    """L{from_address}: exactly one From: field with exactly one address."""

    def from_(self, value: bytes) -> str:
        return from_address([b"From: " + value + b"\r\n"])

    def test_bare_address(self) -> None:
        self.assertEqual(self.from_(b"alice@example.com"), "alice@example.com")

    def test_display_names(self) -> None:
        for value in [
            b"Alice <alice@example.com>",
            b'"Smith, Alice" <alice@example.com>',
            b"alice@example.com (Alice Smith)",
            b"Alice\r\n <alice@example.com>",
        ]:
            with self.subTest(value=value):
                self.assertEqual(self.from_(value), "alice@example.com")

    def test_encoded_display_name(self) -> None:
        """RFC 2047 encoded words in the display name."""
        self.assertEqual(
            self.from_(b"=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jorg@example.com>"), "jorg@example.com"
        )

    def test_utf8_address(self) -> None:
        """RFC 6532: UTF-8 in the header with SMTPUTF8."""
        self.assertEqual(self.from_("Jörg <jörg@exämple.com>".encode()), "jörg@exämple.com")

    def test_missing(self) -> None:
        text = assertReplyError(self, lambda: from_address([]), 550, "5.6.0")
        self.assertIn("no From", text)

    def test_two_fields(self) -> None:
        raw = [b"From: a@example.com\r\n", b"From: b@example.com\r\n"]
        text = assertReplyError(self, lambda: from_address(raw), 550, "5.6.0")
        self.assertIn("more than one", text)

    def test_not_exactly_one_address(self) -> None:
        for value in [
            b"a@example.com, b@example.com",
            b"Team: a@example.com;",  # group syntax
            b"Team: ;",
            b"",
            b"alice",
            b"<>",
            b"<a@example.com> <b@example.com>",
        ]:
            with self.subTest(value=value):
                assertReplyError(self, lambda v=value: self.from_(v), 550, "5.6.0")


class ReceivedFieldTests(SynchronousTestCase):
    """L{received_field}: the RFC 5321 section 4.4 trace field."""

    def test_format(self) -> None:
        self.assertEqual(
            received_field(TRACE),
            b"Received: from client.example.org ([192.0.2.7])\r\n"
            b"\t(using TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
            b"\tby mx.example.net (mta) with ESMTPSA id 0123456789ABCDE\r\n"
            b"\tfor <bob@example.com>;\r\n"
            b"\t" + DATE + b"\r\n",
        )

    def test_utf8smtpsa(self) -> None:
        """RFC 6531 section 3.7.4: UTF8SMTPSA when SMTPUTF8 was used."""
        field = received_field(dataclasses.replace(TRACE, smtputf8=True))
        self.assertIn(b" with UTF8SMTPSA id ", field)
        self.assertNotIn(b"ESMTPSA", field)

    def test_several_recipients_not_named(self) -> None:
        """Naming one of several recipients could reveal a Bcc recipient."""
        trace = dataclasses.replace(TRACE, recipients=("bob@example.com", "carol@example.com"))
        field = received_field(trace)
        self.assertNotIn(b"for <", field)
        self.assertNotIn(b"bob@", field)
        self.assertIn(b" id 0123456789ABCDE;\r\n", field)

    def test_without_tls(self) -> None:
        field = received_field(dataclasses.replace(TRACE, tls=None))
        self.assertNotIn(b"using", field)
        self.assertTrue(
            field.startswith(b"Received: from client.example.org ([192.0.2.7])\r\n\tby ")
        )

    def test_bad_helo_replaced(self) -> None:
        """A HELO name that is not a domain cannot inject text into the field."""
        for helo in ["bad name", "x(comment", "evil;by fake", "a..b", ""]:
            with self.subTest(helo=helo):
                field = received_field(dataclasses.replace(TRACE, helo=helo))
                self.assertTrue(field.startswith(b"Received: from unknown ([192.0.2.7])\r\n"))

    def test_address_literal_helo(self) -> None:
        field = received_field(dataclasses.replace(TRACE, helo="[192.0.2.7]"))
        self.assertTrue(field.startswith(b"Received: from [192.0.2.7] ([192.0.2.7])\r\n"))

    def test_utf8_helo(self) -> None:
        field = received_field(dataclasses.replace(TRACE, helo="exämple.org", smtputf8=True))
        self.assertTrue(field.startswith("Received: from exämple.org (".encode()))

    def test_lines_end_in_crlf_and_fold(self) -> None:
        lines = received_field(TRACE).split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        self.assertTrue(all(ln.startswith(b"\t") for ln in lines[1:-1]))
        self.assertNotIn(b"\n", b"".join(lines))

    def test_ipv6_client_address(self) -> None:
        field = received_field(dataclasses.replace(TRACE, client_address="2001:db8::7"))
        self.assertTrue(
            field.startswith(b"Received: from client.example.org ([IPv6:2001:db8::7])\r\n")
        )


class MessageBuilderTests(SynchronousTestCase):
    """L{MessageBuilder}: the stored form of a submitted message."""

    def test_only_received_added(self) -> None:
        """With Date and Message-ID present, the message is kept byte for byte
        behind the new trace field."""
        built = Built().feed(HEAD + BODY)
        self.assertIsNone(built.builder.error)
        self.assertEqual(built.output, received_field(TRACE) + HEAD + BODY)
        self.assertEqual(built.builder.message_id, "<m1@example.com>")

    def test_byte_by_byte(self) -> None:
        built = Built().bytewise(HEAD + BODY)
        self.assertIsNone(built.builder.error)
        self.assertEqual(built.output, received_field(TRACE) + HEAD + BODY)

    def test_blank_line_split_across_writes(self) -> None:
        message = HEAD + BODY
        end = len(HEAD)
        for cut in range(end - 3, end + 3):
            with self.subTest(cut=cut):
                built = Built().feed(message[:cut], message[cut:])
                self.assertEqual(built.output, received_field(TRACE) + HEAD + BODY)

    def test_nothing_written_before_header_section_complete(self) -> None:
        built = Built()
        built.builder.write(HEAD)
        self.assertEqual(built.written, [])
        built.builder.write(b"\r\n")
        self.assertTrue(built.output.startswith(b"Received: "))

    def test_bcc_removed(self) -> None:
        head = (
            b"From: alice@example.com\r\n"
            b"Bcc: secret@example.com,\r\n"
            b"  other-secret@example.com\r\n"
            b"To: bob@example.com\r\n"
            b"BCC: third@example.com\r\n"
            b"Date: Mon, 13 Nov 2023 10:00:00 +0100\r\n"
            b"Message-ID: <m2@example.com>\r\n"
        )
        built = Built().feed(head + BODY)
        self.assertNotIn(b"secret", built.output)
        self.assertNotIn(b"third", built.output)
        self.assertEqual(
            built.output,
            received_field(TRACE)
            + b"From: alice@example.com\r\n"
            + b"To: bob@example.com\r\n"
            + b"Date: Mon, 13 Nov 2023 10:00:00 +0100\r\n"
            + b"Message-ID: <m2@example.com>\r\n"
            + BODY,
        )

    def test_bcc_in_body_kept(self) -> None:
        body = b"\r\nBcc: not a header\r\n"
        built = Built().feed(HEAD + body)
        self.assertTrue(built.output.endswith(body))

    def test_message_id_and_date_added(self) -> None:
        head = b"From: alice@example.com\r\nSubject: x\r\n"
        built = Built().feed(head + BODY)
        self.assertEqual(built.builder.message_id, "<0123456789ABCDE@mx.example.net>")
        self.assertEqual(
            built.output,
            received_field(TRACE)
            + head
            + b"Message-ID: <0123456789ABCDE@mx.example.net>\r\n"
            + b"Date: "
            + DATE
            + b"\r\n"
            + BODY,
        )

    def test_present_fields_not_duplicated(self) -> None:
        """Field names compare case-insensitively."""
        head = b"from: alice@example.com\r\nDATE: x\r\nmessage-id: <a@b>\r\n"
        built = Built().feed(head + BODY)
        self.assertEqual(built.output, received_field(TRACE) + head + BODY)
        self.assertEqual(built.builder.message_id, "<a@b>")

    def test_header_only_message(self) -> None:
        """A message without an empty line is all header section (RFC 5322 3.5)."""
        head = b"From: alice@example.com\r\nSubject: x\r\n"
        built = Built().feed(head)
        self.assertIsNone(built.builder.error)
        self.assertTrue(built.output.startswith(received_field(TRACE) + head))
        self.assertIn(b"\r\nDate: " + DATE + b"\r\n", built.output)

    def test_header_only_byte_by_byte(self) -> None:
        head = b"From: alice@example.com\r\nDate: x\r\nMessage-ID: <a@b>\r\n"
        built = Built().bytewise(head)
        self.assertEqual(built.output, received_field(TRACE) + head)

    def test_empty_header_section(self) -> None:
        """A message that starts with the empty line has no From: field."""
        built = Built().feed(b"\r\nbody\r\n")
        self.assertEqual(built.builder.error.code, 550)
        self.assertEqual(built.builder.error.enhanced, "5.6.0")
        self.assertEqual(built.written, [])

    def test_malformed_header(self) -> None:
        built = Built().feed(b"From: alice@example.com\r\nthis is not a field\r\n\r\nbody\r\n")
        self.assertEqual((built.builder.error.code, built.builder.error.enhanced), (550, "5.6.0"))
        self.assertEqual(built.written, [])

    def test_writes_after_error_dropped(self) -> None:
        built = Built()
        built.builder.write(b"bad line\r\n\r\n")
        error = built.builder.error
        self.assertIsNotNone(error)
        built.builder.write(b"more body\r\n")
        built.builder.finish()
        self.assertIs(built.builder.error, error)
        self.assertEqual(built.written, [])

    def test_25_received_accepted(self) -> None:
        received = b"Received: from a by b; Mon, 13 Nov 2023 10:00:00 +0000\r\n" * 25
        built = Built().feed(received + HEAD + BODY)
        self.assertIsNone(built.builder.error)
        self.assertEqual(built.output, received_field(TRACE) + received + HEAD + BODY)

    def test_26_received_is_a_loop(self) -> None:
        """More than 25 trace fields means a mail loop (RFC 5321 section 6.3)."""
        received = b"Received: from a\r\n\tby b; Mon, 13 Nov 2023 10:00:00 +0000\r\n" * 26
        built = Built().feed(received + HEAD + BODY)
        self.assertEqual((built.builder.error.code, built.builder.error.enhanced), (554, "5.4.6"))
        self.assertEqual(built.written, [])

    def test_max_received_configurable(self) -> None:
        received = b"received: x\r\n" * 3
        built = Built(max_received=2).feed(received + HEAD + BODY)
        self.assertEqual(built.builder.error.code, 554)


class SenderAlignmentTests(SynchronousTestCase):
    """The From: address must belong to the login (SPEC section 2)."""

    def check(self, address: bytes) -> MessageBuilder:
        head = b"From: Someone <" + address + b">\r\nDate: x\r\nMessage-ID: <a@b>\r\n"
        return Built().feed(head + BODY).builder

    def test_allowed(self) -> None:
        for address in [
            b"alice@example.com",
            b"ALICE@Example.Com",
            b"alice+newsletter@example.com",
            b"sales@example.org",  # an alias
            b"Sales+x@EXAMPLE.org",
            b"anyone@example.net",  # a domain
            b"Anyone@Example.Net",
        ]:
            with self.subTest(address=address):
                self.assertIsNone(self.check(address).error)

    def test_refused(self) -> None:
        for address in [
            b"bob@example.com",
            b"alice@example.org",
            b"alice@sub.example.com",
            b"alicex@example.com",
            b"sales2@example.org",
            b"anyone@sub.example.net",
            b"anyone@example.net.evil.com",
            b'"alice@example.com"@evil.com',
        ]:
            with self.subTest(address=address):
                error = self.check(address).error
                self.assertIsNotNone(error)
                self.assertEqual((error.code, error.enhanced), (550, "5.7.1"))

    def test_refusal_names_both_addresses(self) -> None:
        error = self.check(b"bob@example.com").error
        self.assertIn("<bob@example.com>", error.text)
        self.assertIn("<alice@example.com>", error.text)
        self.assertIn("From", error.text)

    def test_loop_checked_before_sender(self) -> None:
        head = b"Received: x\r\n" * 26 + b"From: bob@example.com\r\n"
        error = Built().feed(head + BODY).builder.error
        self.assertEqual(error.code, 554)


class HeaderSizeTests(SynchronousTestCase):
    """The header section is held in memory, so its size is limited."""

    LONG_HEAD = HEAD + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 60) for i in range(80))

    def test_limit_byte_by_byte(self) -> None:
        self.assertGreater(len(self.LONG_HEAD), 4096)
        built = Built(max_header_size=1024).bytewise(self.LONG_HEAD + BODY)
        self.assertEqual((built.builder.error.code, built.builder.error.enhanced), (552, "5.3.4"))
        self.assertIn("1024", built.builder.error.text)
        self.assertEqual(built.written, [])

    def test_limit_without_end_of_header(self) -> None:
        built = Built(max_header_size=1024)
        built.builder.write(self.LONG_HEAD)
        self.assertEqual(built.builder.error.code, 552)

    def test_under_limit(self) -> None:
        built = Built(max_header_size=len(self.LONG_HEAD) + 2).bytewise(self.LONG_HEAD + BODY)
        self.assertIsNone(built.builder.error)

    def test_limit_one_write(self) -> None:
        built = Built(max_header_size=1024).feed(self.LONG_HEAD + BODY)
        self.assertIsNotNone(built.builder.error)
        self.assertEqual(built.builder.error.code, 552)


class StorageErrorTests(SynchronousTestCase):
    """A failing output is recorded, not raised (the reader must go on)."""

    def test_recorded(self) -> None:
        failure = StorageError("disk full", disk_full=True)
        calls: list[bytes] = []

        def out(data: bytes) -> None:
            calls.append(data)
            raise failure

        builder = MessageBuilder(TRACE, ALICE, out, max_received=25, max_header_size=65536)
        builder.write(HEAD)
        builder.finish()
        self.assertIs(builder.storage_error, failure)
        self.assertIsNone(builder.error)
        self.assertEqual(len(calls), 1)

    def test_failure_in_body(self) -> None:
        written: list[bytes] = []
        failure = StorageError("I/O error")

        def out(data: bytes) -> None:
            if written:
                raise failure
            written.append(data)

        builder = MessageBuilder(TRACE, ALICE, out, max_received=25, max_header_size=65536)
        builder.write(HEAD)
        builder.write(b"\r\n")
        builder.write(b"body\r\n")
        self.assertIs(builder.storage_error, failure)
        builder.write(b"more\r\n")
        self.assertEqual(len(written), 1)

    def test_no_write_after_failure(self) -> None:
        errors = [StorageError("disk full", disk_full=True), StorageError("closed")]
        calls: list[bytes] = []

        def out(data: bytes) -> None:
            calls.append(data)
            raise errors[len(calls) - 1]

        builder = MessageBuilder(TRACE, ALICE, out, max_received=25, max_header_size=65536)
        builder.write(HEAD + BODY)
        self.assertEqual(len(calls), 1)
        self.assertTrue(builder.storage_error.disk_full)


class FromFastPathTests(SynchronousTestCase):
    """The quick path for common From: forms agrees with the full RFC 5322 parser."""

    @settings(max_examples=300, deadline=None)
    @given(
        local=st.from_regex(r"[A-Za-z0-9_+-]{1,10}(\.[A-Za-z0-9_+-]{1,5}){0,2}", fullmatch=True),
        domain=st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,8}){1,2}", fullmatch=True),
        name=st.one_of(
            st.just(""),
            st.from_regex(r"[A-Za-z0-9 ]{1,20}", fullmatch=True),
            st.from_regex(r'"[A-Za-z0-9 ,.@:;<>]{0,20}"', fullmatch=True),
        ),
    )
    def test_same_address_as_the_full_parser(self, local: str, domain: str, name: str) -> None:
        address = f"{local}@{domain}"
        value = f"{name} <{address}>" if name else address
        header = email.policy.default.header_factory("from", value)
        expected = [a.addr_spec for a in header.addresses]
        self.assertEqual(expected, [address])
        self.assertEqual(from_address([f"From: {value}\r\n".encode()]), address)
