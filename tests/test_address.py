"""Tests for L{mta.address}: envelope address and ESMTP parameter syntax."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mta.address import (
    Mailbox,
    normalize_for_alignment,
    parse_envid,
    parse_mailbox,
    parse_notify,
    parse_orcpt,
    parse_params,
    split_path,
    valid_domain,
    xtext_decode,
    xtext_encode,
)
from mta.errors import Reply, SMTPReplyError


class ReplyAssertions(SynchronousTestCase):
    """Helpers shared by the test cases of this module."""

    def assertReply(self, call, code: int, enhanced: str) -> Reply:
        """Assert that C{call()} raises L{SMTPReplyError} with the given codes."""
        error = self.assertRaises(SMTPReplyError, call)
        self.assertEqual((error.reply.code, error.reply.enhanced), (code, enhanced))
        return error.reply


class ParseMailboxTests(ReplyAssertions):
    """L{parse_mailbox}: RFC 5321 section 4.1.2 C{Mailbox}."""

    def test_dot_string(self) -> None:
        mailbox = parse_mailbox("first.last+tag@mail.example.com", utf8=False)
        self.assertEqual(mailbox, Mailbox("first.last+tag", "mail.example.com"))
        self.assertEqual(str(mailbox), "first.last+tag@mail.example.com")
        self.assertTrue(mailbox.ascii)

    def test_every_atext_character(self) -> None:
        """All of RFC 5322 section 3.2.3 C{atext} is allowed in a dot-string."""
        local = "!#$%&'*+/=?^_`{|}~-09AZaz"
        self.assertEqual(parse_mailbox(f"{local}@example.com", utf8=False).local, local)

    def test_bad_dot_strings(self) -> None:
        for text in [
            ".a@example.com",
            "a.@example.com",
            "a..b@example.com",
            "a b@example.com",
            "a(b)@example.com",
            "a,b@example.com",
            "a@b@example.com",
        ]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: parse_mailbox(t, utf8=False), 501, "5.1.3")

    def test_missing_parts(self) -> None:
        for text in ["", "@example.com", "user@", "user", "@"]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: parse_mailbox(t, utf8=False), 501, "5.1.3")

    def test_quoted_local_part(self) -> None:
        mailbox = parse_mailbox('"john smith"@example.com', utf8=False)
        self.assertEqual(mailbox, Mailbox('"john smith"', "example.com"))

    def test_quoted_local_part_with_at_and_angle_bracket(self) -> None:
        """Specials are plain text inside quotes; the last C{@} splits."""
        mailbox = parse_mailbox('"a@b>c"@example.com', utf8=False)
        self.assertEqual(mailbox, Mailbox('"a@b>c"', "example.com"))

    def test_quoted_local_part_escapes(self) -> None:
        """RFC 5321 C{quoted-pairSMTP}: a backslash and any printable ASCII."""
        for local in [r'"a\"b"', r'"a\\b"', r'"\ "', r'"a\b"']:
            with self.subTest(local=local):
                self.assertEqual(parse_mailbox(f"{local}@example.com", utf8=False).local, local)

    def test_empty_quoted_local_part(self) -> None:
        """C{Quoted-string = DQUOTE *QcontentSMTP DQUOTE} may be empty."""
        self.assertEqual(parse_mailbox('""@example.com', utf8=False).local, '""')

    def test_bad_quoted_local_parts(self) -> None:
        for local in [
            '"a"b"',  # an unescaped quote inside
            '"a\\"',  # the closing quote is escaped
            '"a\tb"',  # a control character
            '"a\x7fb"',  # DEL
            '"unterminated',
            'a"b"',
            '"a\\\x01"',  # an escaped control character
        ]:
            with self.subTest(local=local):
                self.assertReply(
                    lambda t=f"{local}@example.com": parse_mailbox(t, utf8=False), 501, "5.1.3"
                )

    def test_local_part_of_64_octets(self) -> None:
        """RFC 5321 section 4.5.3.1.1: a local part may have 64 octets."""
        local = "a" * 64
        self.assertEqual(parse_mailbox(f"{local}@example.com", utf8=False).local, local)

    def test_local_part_of_65_octets(self) -> None:
        reply = self.assertReply(
            lambda: parse_mailbox("a" * 65 + "@example.com", utf8=False), 501, "5.1.3"
        )
        self.assertIn("64", reply.text)

    def test_local_part_limit_counts_octets(self) -> None:
        """The limit is in octets: 33 two-octet characters are 66 octets."""
        self.assertEqual(parse_mailbox("é" * 32 + "@example.com", utf8=True).local, "é" * 32)
        self.assertReply(lambda: parse_mailbox("é" * 33 + "@example.com", utf8=True), 501, "5.1.3")

    def test_domain_of_255_octets(self) -> None:
        """RFC 5321 section 4.5.3.1.2: a domain may have 255 octets."""
        domain = ".".join(["a" * 63] * 4)
        self.assertEqual(len(domain), 255)
        self.assertEqual(parse_mailbox(f"a@{domain}", utf8=False).domain, domain)

    def test_domain_of_256_octets(self) -> None:
        domain = ".".join(["a" * 63] * 3 + ["a" * 61, "aa"])
        self.assertEqual(len(domain), 256)
        self.assertReply(lambda: parse_mailbox(f"a@{domain}", utf8=False), 501, "5.1.3")

    def test_label_of_64_octets(self) -> None:
        self.assertTrue(valid_domain("a" * 63 + ".example"))
        self.assertFalse(valid_domain("a" * 64 + ".example"))

    def test_bad_domains(self) -> None:
        for domain in [
            "-example.com",
            "example-.com",
            "exa_mple.com",
            "example..com",
            ".example.com",
            "example.com.",
            "exa mple.com",
            "example.com:25",
            "[1.2.3.4",
            "[1.2.3.999]",
            "[01.2.3.4]",
            "[IPv6:1.2.3.4]",
            "[IPv6:::g]",
            "[::1]",
            "[Foo:bar]",
        ]:
            with self.subTest(domain=domain):
                self.assertReply(lambda d=domain: parse_mailbox(f"a@{d}", utf8=False), 501, "5.1.3")

    def test_address_literals(self) -> None:
        """RFC 5321 section 4.1.3 IPv4 and IPv6 address literals."""
        for domain in ["[192.0.2.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[ipv6:::ffff:1.2.3.4]"]:
            with self.subTest(domain=domain):
                self.assertEqual(parse_mailbox(f"postmaster@{domain}", utf8=False).domain, domain)

    def test_ipv6_literal_with_zone_index(self) -> None:
        self.assertFalse(valid_domain("[IPv6:fe80::1%eth0]"))

    def test_domain_with_trailing_newline(self) -> None:
        """A newline must never pass as part of a domain (it would end up in
        the C{Received:} field built from the HELO name)."""
        self.assertFalse(valid_domain("example.com\n"))
        self.assertFalse(valid_domain("example.com\n", utf8=True))

    def test_non_ascii_needs_smtputf8(self) -> None:
        """RFC 6531 section 3.4: without SMTPUTF8 the reply is 553 5.6.7."""
        for text in ["jörg@example.com", "jorg@exämple.com", '"jö rg"@example.com']:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: parse_mailbox(t, utf8=False), 553, "5.6.7")

    def test_non_ascii_with_smtputf8(self) -> None:
        mailbox = parse_mailbox("jörg@exämple.com", utf8=True)
        self.assertEqual(mailbox, Mailbox("jörg", "exämple.com"))
        self.assertFalse(mailbox.ascii)
        self.assertEqual(parse_mailbox('"jö rg"@example.com', utf8=True).local, '"jö rg"')

    def test_non_ascii_domain_labels_still_checked(self) -> None:
        self.assertReply(lambda: parse_mailbox("a@-exämple.com", utf8=True), 501, "5.1.3")
        self.assertReply(lambda: parse_mailbox("a@ex ämple.com", utf8=True), 501, "5.1.3")


class SplitPathTests(ReplyAssertions):
    """L{split_path}: the C{FROM:<path> params} argument of MAIL and RCPT."""

    def test_plain(self) -> None:
        self.assertEqual(split_path("FROM:<a@example.com>", "FROM:"), ("a@example.com", ""))

    def test_prefix_is_case_insensitive(self) -> None:
        self.assertEqual(split_path("to:<a@example.com>", "TO:"), ("a@example.com", ""))

    def test_wrong_prefix(self) -> None:
        self.assertReply(lambda: split_path("TO:<a@example.com>", "FROM:"), 501, "5.5.4")

    def test_null_path(self) -> None:
        self.assertEqual(split_path("FROM:<>", "FROM:"), ("", ""))

    def test_angle_brackets_required(self) -> None:
        """RFC 5321 section 4.1.2: C{Path = "<" ... ">"}."""
        self.assertReply(lambda: split_path("FROM:a@example.com", "FROM:"), 501, "5.5.4")
        self.assertReply(lambda: split_path("FROM:<a@example.com", "FROM:"), 501, "5.5.4")

    def test_space_after_colon_tolerated(self) -> None:
        self.assertEqual(split_path("FROM: <a@example.com>", "FROM:"), ("a@example.com", ""))
        self.assertEqual(split_path("FROM:   <a@example.com>", "FROM:"), ("a@example.com", ""))

    def test_params(self) -> None:
        self.assertEqual(
            split_path("FROM:<a@example.com> SIZE=100 BODY=8BITMIME", "FROM:"),
            ("a@example.com", "SIZE=100 BODY=8BITMIME"),
        )

    def test_params_need_a_space(self) -> None:
        self.assertReply(lambda: split_path("FROM:<a@example.com>SIZE=100", "FROM:"), 501, "5.5.4")

    def test_extra_spaces_around_params_stripped(self) -> None:
        self.assertEqual(
            split_path("FROM:<a@example.com>  SIZE=100 ", "FROM:"), ("a@example.com", "SIZE=100")
        )

    def test_angle_bracket_inside_quotes(self) -> None:
        """A C{>} inside a quoted local part does not end the path."""
        self.assertEqual(
            split_path('TO:<"a>b"@example.com> NOTIFY=NEVER', "TO:"),
            ('"a>b"@example.com', "NOTIFY=NEVER"),
        )

    def test_escaped_quote_inside_quotes(self) -> None:
        """C{\\"} does not close the quoted string, so the C{>} after it is quoted."""
        self.assertEqual(
            split_path(r'TO:<"a\">b"@example.com>', "TO:"), (r'"a\">b"@example.com', "")
        )

    def test_unterminated_quote(self) -> None:
        self.assertReply(lambda: split_path('TO:<"a>@example.com>', "TO:"), 501, "5.5.4")

    def test_source_route_refused(self) -> None:
        """RFC 5321 section 4.1.2 A-d-l: never relay on a source route's say."""
        for args in ["TO:<@relay.example:a@example.com>", "TO:<@a.example,@b.example:u@c.example>"]:
            with self.subTest(args=args):
                self.assertReply(lambda a=args: split_path(a, "TO:"), 553, "5.1.3")

    def test_path_over_256_octets(self) -> None:
        path = "a" * 64 + "@" + "b" * 192 + ".example"
        self.assertGreater(len(path), 256)
        self.assertReply(lambda: split_path(f"TO:<{path}>", "TO:"), 501, "5.1.3")

    def test_path_of_256_octets_with_brackets(self) -> None:
        path = "a" * 64 + "@" + "b" * 181 + ".example"
        self.assertEqual(len(f"<{path}>"), 256)
        self.assertEqual(split_path(f"TO:<{path}>", "TO:"), (path, ""))

    def test_path_of_257_octets_with_brackets(self) -> None:
        path = "a" * 64 + "@" + "b" * 182 + ".example"
        self.assertEqual(len(f"<{path}>"), 257)
        self.assertReply(lambda: split_path(f"TO:<{path}>", "TO:"), 501, "5.1.3")

    def test_path_limit_counts_octets(self) -> None:
        path = "a@" + "é" * 127 + ".example"  # 264 octets, 137 characters
        self.assertReply(lambda: split_path(f"TO:<{path}>", "TO:"), 501, "5.1.3")


class ParseParamsTests(ReplyAssertions):
    """L{parse_params}: RFC 5321 section 4.1.2 C{Mail-parameters}."""

    def test_empty(self) -> None:
        self.assertEqual(parse_params(""), {})

    def test_keywords_upper_cased_values_kept(self) -> None:
        self.assertEqual(
            parse_params("size=100 body=8bitmime SMTPUTF8"),
            {"SIZE": "100", "BODY": "8bitmime", "SMTPUTF8": None},
        )

    def test_several_spaces(self) -> None:
        self.assertEqual(parse_params("SIZE=1   RET=HDRS"), {"SIZE": "1", "RET": "HDRS"})

    def test_duplicate_keyword(self) -> None:
        """Keywords compare case-insensitively, so C{size} repeats C{SIZE}."""
        reply = self.assertReply(lambda: parse_params("SIZE=1 size=2"), 501, "5.5.4")
        self.assertIn("SIZE", reply.text)

    def test_bad_syntax(self) -> None:
        for text in [
            "=1",  # no keyword
            "-SIZE=1",  # keyword must start with a letter or digit
            "SI_ZE=1",
            "SIZE=",  # empty value
            "SIZE=1=2",  # "=" inside a value
            "ENVID=a\x7fb",  # DEL
            "ENVID=a\x01b",  # a control character
        ]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: parse_params(t), 501, "5.5.4")

    def test_non_ascii_value(self) -> None:
        """RFC 6531 section 3.3 allows UTF-8 values only with SMTPUTF8."""
        self.assertReply(lambda: parse_params("ORCPT=rfc822;jörg@example.com"), 501, "5.5.4")
        self.assertEqual(
            parse_params("ORCPT=rfc822;jörg@example.com", utf8=True),
            {"ORCPT": "rfc822;jörg@example.com"},
        )

    def test_non_ascii_keyword(self) -> None:
        self.assertReply(lambda: parse_params("SIZÉ=1", utf8=True), 501, "5.5.4")


class XtextTests(ReplyAssertions):
    """RFC 3461 section 4 xtext."""

    def test_encode(self) -> None:
        self.assertEqual(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtext_encode("plain!~"), "plain!~")

    def test_decode(self) -> None:
        self.assertEqual(xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d")

    def test_decode_lower_case_hex(self) -> None:
        """Lenient: RFC 3461 says upper case, but lower case is unambiguous."""
        self.assertEqual(xtext_decode("+2b"), "+")

    def test_decode_errors(self) -> None:
        for text in ["+", "+2", "+2G", "a=b", "a b", "a\x7f", "+ 2"]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: xtext_decode(t), 501, "5.5.4")

    @given(st.text(alphabet=st.characters(max_codepoint=127)))
    def test_round_trip(self, text: str) -> None:
        encoded = xtext_encode(text)
        self.assertTrue(all(33 <= ord(c) <= 126 and c != "=" for c in encoded))
        self.assertEqual(xtext_decode(encoded), text)

    def test_round_trip_beyond_latin1(self) -> None:
        try:
            encoded = xtext_encode("€")
        except ValueError:
            return  # refusing is an acceptable answer too
        self.assertEqual(xtext_decode(encoded), "€")


class DSNParameterTests(ReplyAssertions):
    """RFC 3461 NOTIFY, ORCPT and ENVID."""

    def test_notify_never(self) -> None:
        self.assertEqual(parse_notify("never"), ("NEVER",))

    def test_notify_list(self) -> None:
        self.assertEqual(parse_notify("success,DELAY,Failure"), ("DELAY", "FAILURE", "SUCCESS"))
        self.assertEqual(parse_notify("FAILURE"), ("FAILURE",))

    def test_notify_errors(self) -> None:
        """NEVER cannot be combined (RFC 3461 section 4.1); no repeats or blanks."""
        for value in [None, "", "NEVER,SUCCESS", "SUCCESS,SUCCESS", "SUCCESS,", "ALWAYS"]:
            with self.subTest(value=value):
                self.assertReply(lambda v=value: parse_notify(v), 501, "5.5.4")

    def test_orcpt(self) -> None:
        self.assertEqual(
            parse_orcpt("RFC822;user+2Btag@example.com"), "rfc822;user+tag@example.com"
        )

    def test_orcpt_errors(self) -> None:
        for value in [None, "", "rfc822", ";a@example.com", "rfc822;", "rf c822;a@b", "rfc822;a+G"]:
            with self.subTest(value=value):
                self.assertReply(lambda v=value: parse_orcpt(v), 501, "5.5.4")

    def test_orcpt_length(self) -> None:
        self.assertEqual(len(parse_orcpt("rfc822;" + "a" * 500)), len("rfc822;") + 500)
        self.assertReply(lambda: parse_orcpt("rfc822;" + "a" * 501), 501, "5.5.4")

    def test_envid(self) -> None:
        self.assertEqual(parse_envid("QQ314159+2Bx"), "QQ314159+x")

    def test_envid_of_100_characters(self) -> None:
        """RFC 3461 section 4.4: at most 100 characters."""
        self.assertEqual(parse_envid("e" * 100), "e" * 100)
        self.assertReply(lambda: parse_envid("e" * 101), 501, "5.5.4")

    def test_envid_limit_after_decoding(self) -> None:
        """C{+2B} is one character of the ENVID, not three."""
        self.assertEqual(parse_envid("+2B" * 100), "+" * 100)

    def test_envid_errors(self) -> None:
        for value in [None, "", "a+0Ab", "a+00", "+C3+A9"]:
            with self.subTest(value=value):
                self.assertReply(lambda v=value: parse_envid(v), 501, "5.5.4")


class NormalizeForAlignmentTests(SynchronousTestCase):
    """L{normalize_for_alignment}: how a sender is compared with a login (tags: test_users)."""

    def test_case(self) -> None:
        self.assertEqual(normalize_for_alignment("Alice@Example.COM"), "alice@example.com")

    def test_only_ascii_is_folded(self) -> None:
        """KELVIN SIGN (U+212A) must not become "k" (a look-alike mailbox)."""
        self.assertEqual(normalize_for_alignment("\u212aate@example.com"), "\u212aate@example.com")

    def test_tag_kept_by_normalize(self) -> None:
        self.assertEqual(
            normalize_for_alignment("alice+news@example.com"), "alice+news@example.com"
        )

    def test_different_users_stay_different(self) -> None:
        self.assertNotEqual(
            normalize_for_alignment("alice@example.com"),
            normalize_for_alignment("alicia@example.com"),
        )
