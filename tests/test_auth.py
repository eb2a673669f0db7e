"""Tests for L{mta.smtp.auth}: SASL decoding, password checks, throttling."""

from __future__ import annotations

import os
import shutil
import tempfile
from base64 import b64encode
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mta.errors import SMTPReplyError
from mta.smtp.auth import (
    PASSWORD_CHALLENGE,
    USERNAME_CHALLENGE,
    UserFileChecker,
    client_key,
    decode_login_field,
    decode_plain,
)
from mta.testing import run_inline, write_users


def b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


class DecodeTestCase(SynchronousTestCase):
    def assertReply(self, call: Callable[[], object], code: int, enhanced: str) -> str:
        error = self.assertRaises(SMTPReplyError, call)
        self.assertEqual((error.reply.code, error.reply.enhanced), (code, enhanced))
        return error.reply.text


class DecodePlainTests(DecodeTestCase):
    """RFC 4616 PLAIN: C{[authzid] NUL authcid NUL passwd}."""

    def test_empty_authzid(self) -> None:
        self.assertEqual(
            decode_plain(b64(b"\0alice@example.com\0s3cret pass")),
            ("alice@example.com", "s3cret pass"),
        )

    def test_authzid_equal_to_username(self) -> None:
        """Some clients (e.g. older Outlook) repeat the username as authzid."""
        self.assertEqual(
            decode_plain(b64(b"Alice@Example.com\0alice@example.com\0pw")),
            ("alice@example.com", "pw"),
        )

    def test_authzid_different(self) -> None:
        """Acting for another user (RFC 4954 section 4) is not allowed."""
        text = self.assertReply(
            lambda: decode_plain(b64(b"bob@example.com\0alice@example.com\0pw")), 535, "5.7.8"
        )
        self.assertIn("Authorization identity", text)

    def test_utf8(self) -> None:
        self.assertEqual(
            decode_plain(b64("\0jörg@exämple.com\0pässwörd".encode())),
            ("jörg@exämple.com", "pässwörd"),
        )

    def test_bad_base64(self) -> None:
        for text in ["not base64!", "AGFsaWN", "AGFsaWNl=", "AGFsaWNl AHB3", "é"]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: decode_plain(t), 501, "5.5.2")

    def test_wrong_number_of_parts(self) -> None:
        for raw in [b"alice@example.com", b"alice@example.com\0pw", b"\0a@example.com\0pw\0x"]:
            with self.subTest(raw=raw):
                self.assertReply(lambda r=raw: decode_plain(b64(r)), 501, "5.5.2")

    def test_empty_parts(self) -> None:
        for raw in [b"\0\0pw", b"\0alice@example.com\0", b"\0\0"]:
            with self.subTest(raw=raw):
                self.assertReply(lambda r=raw: decode_plain(b64(r)), 501, "5.5.2")

    def test_empty_response(self) -> None:
        """C{=} is the empty response (RFC 4954 section 4); PLAIN needs more."""
        self.assertReply(lambda: decode_plain("="), 501, "5.5.2")

    def test_not_utf8(self) -> None:
        self.assertReply(lambda: decode_plain(b64(b"\0al\xffice\0pw")), 501, "5.5.2")


class DecodeLoginFieldTests(DecodeTestCase):
    def test_challenges(self) -> None:
        self.assertEqual(decode_login_field(USERNAME_CHALLENGE), "Username:")
        self.assertEqual(decode_login_field(PASSWORD_CHALLENGE), "Password:")

    def test_field(self) -> None:
        self.assertEqual(decode_login_field(b64("jörg@exämple.com".encode())), "jörg@exämple.com")

    def test_empty_response(self) -> None:
        self.assertEqual(decode_login_field("="), "")

    def test_bad_base64(self) -> None:
        for text in ["YWxpY2U", "YW*pY2U=", "é"]:
            with self.subTest(text=text):
                self.assertReply(lambda t=text: decode_login_field(t), 501, "5.5.2")

    def test_not_utf8(self) -> None:
        self.assertReply(lambda: decode_login_field(b64(b"\xff\xfe")), 501, "5.5.2")


class ClientKeyTests(SynchronousTestCase):
    """L{client_key}: the unit that failures are counted for."""

    def test_ipv4(self) -> None:
        self.assertEqual(client_key("192.0.2.1"), "192.0.2.1")
        self.assertNotEqual(client_key("192.0.2.1"), client_key("192.0.2.2"))

    def test_ipv6_grouped_by_64(self) -> None:
        """One host usually has a whole /64, so single IPv6 addresses are too cheap."""
        self.assertEqual(client_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(client_key("2001:db8::ffff:1"), client_key("2001:db8::1"))
        self.assertEqual(client_key("2001:DB8:0:0:1::1"), "2001:db8::/64")
        self.assertNotEqual(client_key("2001:db8:0:1::1"), client_key("2001:db8::1"))

    def test_ipv4_mapped(self) -> None:
        """A v4-mapped address (dual-stack socket) counts as the IPv4 address."""
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertNotEqual(client_key("::ffff:192.0.2.1"), client_key("::ffff:192.0.2.2"))

    def test_not_an_address(self) -> None:
        self.assertEqual(client_key("unknown"), "unknown")


# AuthThrottle's rules are tested against every ISharedState in
# tests/test_shared_state.py (in this process and in Redis).


class UserFileCheckerTests(SynchronousTestCase):
    """L{UserFileChecker} against a real users file with cheap argon2 hashes."""

    def setUp(self) -> None:
        # A real directory outside the checkout (trial's mktemp is relative
        # to the working directory when pytest runs the tests).
        directory = tempfile.mkdtemp(prefix="mta-test-auth-")
        self.addCleanup(shutil.rmtree, directory)
        self.users = write_users(
            os.path.join(directory, "users.json"),
            {"alice@example.com": "correct horse", "Jörg@Exämple.com": "pässwörd"},
        )
        self.runs: list[Callable[[], Any]] = []
        self.checker = UserFileChecker(self.users, self.runner)

    def runner(self, work: Callable[[], Any]) -> Deferred[Any]:
        self.runs.append(work)
        return run_inline(work)

    def login(self, username: bytes | str, password: bytes | str) -> Deferred[Any]:
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_right_password(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login(b"alice@example.com", b"correct horse")),
            "alice@example.com",
        )

    def test_password_checked_through_runner(self) -> None:
        """The slow hash runs in the runner (a thread in the daemon)."""
        self.successResultOf(self.login(b"alice@example.com", b"correct horse"))
        self.assertEqual(len(self.runs), 1)

    def test_str_credentials(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login("alice@example.com", "correct horse")),
            "alice@example.com",
        )

    def test_wrong_password(self) -> None:
        self.failureResultOf(self.login(b"alice@example.com", b"correct horsE"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"alice@example.com", b""), UnauthorizedLogin)

    def test_unknown_user(self) -> None:
        self.failureResultOf(
            self.login(b"mallory@example.com", b"correct horse"), UnauthorizedLogin
        )

    def test_unknown_user_costs_a_hash(self) -> None:
        """Response time must not tell which logins exist: the runner still works."""
        self.failureResultOf(self.login(b"mallory@example.com", b"x"), UnauthorizedLogin)
        self.assertEqual(len(self.runs), 1)

    def test_login_case_insensitive(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login(b"ALICE@Example.COM", b"correct horse")),
            "alice@example.com",
        )

    def test_password_case_sensitive(self) -> None:
        self.failureResultOf(self.login(b"alice@example.com", b"CORRECT HORSE"), UnauthorizedLogin)

    def test_utf8_login(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login("jörg@exämple.com".encode(), "pässwörd".encode())),
            "jörg@exämple.com",
        )

    def test_user_added_later(self) -> None:
        """The users file is re-read when it changes: no restart needed."""
        self.failureResultOf(self.login(b"carol@example.com", b"new password"), UnauthorizedLogin)
        write_users(
            self.users.path,
            {"alice@example.com": "correct horse", "carol@example.com": "new password"},
        )
        self.assertEqual(
            self.successResultOf(self.login(b"carol@example.com", b"new password")),
            "carol@example.com",
        )
