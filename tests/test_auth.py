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
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mta.cluster.local import LocalState
from mta.dailycount import DailyCounter
from mta.errors import Reply, SMTPReplyError
from mta.metrics import Metrics
from mta.smtp.auth import (
    PASSWORD_CHALLENGE,
    USERNAME_CHALLENGE,
    Authenticator,
    AuthThrottle,
    Challenge,
    Result,
    SASLExchange,
    Step,
    ThrottleSettings,
    UserFileChecker,
    client_key,
    decode_login_field,
    decode_plain,
)
from mta.testing import SwitchableState, run_inline, write_users


def b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


class DecodeTestCase(SynchronousTestCase):
    """Shared by the decoding tests: assertReply, that a call raises SMTPReplyError with a given
    code and enhanced status."""

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
    """decode_login_field, one step of LOGIN: the base64 challenges themselves, a UTF-8 field, = as
    the empty response, bad base64 and bytes that are not UTF-8 (501 5.5.2)."""

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


LOGIN = "alice@example.com"
PASSWORD = "correct horse"
WRONG = Reply(
    535,
    "5.7.8",
    "Authentication failed: wrong username or password (the username is your full email address)",
)


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}".encode())


class SASLExchangeTests(SynchronousTestCase):
    """L{SASLExchange} by itself, without a session: the steps of PLAIN and
    LOGIN, cancelling, initial responses, what it yields for wrong, blocked
    and uncheckable logins, and the failure delay on the clock."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="mta-test-sasl-")
        self.addCleanup(shutil.rmtree, directory)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.users = write_users(os.path.join(directory, "users.json"), {LOGIN: PASSWORD})
        self.state = SwitchableState(LocalState(DailyCounter(directory, self.clock)))
        self.throttle = AuthThrottle(
            self.clock,
            ThrottleSettings(max_failures=3, window=900, delay=1.0, delay_max=4.0),
            state=self.state,
        )
        self.checks: list[Callable[[], Any]] = []
        self.metrics = Metrics()
        self.auth = self.authenticator(UserFileChecker(self.users, self.runner))

    def runner(self, work: Callable[[], Any]) -> Deferred[Any]:
        self.checks.append(work)
        return run_inline(work)

    def authenticator(self, checker: Any) -> Authenticator:
        return Authenticator(checker, self.throttle, self.users, self.clock, self.metrics)

    def exchange(self, peer: str = "192.0.2.1") -> SASLExchange:
        return self.auth.exchange(peer)

    def now(self, step: Step | Deferred[Step]) -> Step:
        """The step, which must be there without waiting for the clock."""
        if isinstance(step, Deferred):
            return self.successResultOf(step)
        return step

    def failures(self) -> float:
        return self.metrics.registry.get_sample_value("mta_auth_failures_total") or 0.0

    def test_plain_initial_response(self) -> None:
        x = self.exchange()
        self.assertEqual(
            self.now(x.start(f"PLAIN {plain(LOGIN, PASSWORD)}")),
            Result(Reply(235, "2.7.0", "Authentication successful"), LOGIN),
        )
        self.assertFalse(x.waiting)

    def test_plain_after_an_empty_challenge(self) -> None:
        x = self.exchange()
        self.assertEqual(self.now(x.start("PLAIN")), Challenge(Reply(334, None, "")))
        self.assertTrue(x.waiting)
        self.assertEqual(self.now(x.respond(plain(LOGIN, PASSWORD))).login, LOGIN)
        self.assertFalse(x.waiting)

    def test_login_asks_username_then_password(self) -> None:
        x = self.exchange()
        self.assertEqual(
            self.now(x.start("LOGIN")), Challenge(Reply(334, None, USERNAME_CHALLENGE))
        )
        self.assertEqual(
            self.now(x.respond(b64(LOGIN.encode()))),
            Challenge(Reply(334, None, PASSWORD_CHALLENGE)),
        )
        step = self.now(x.respond(b64(PASSWORD.encode())))
        self.assertEqual(step, Result(Reply(235, "2.7.0", "Authentication successful"), LOGIN))

    def test_login_with_the_username_as_initial_response(self) -> None:
        x = self.exchange()
        self.assertEqual(
            self.now(x.start(f"LOGIN {b64(LOGIN.upper().encode())}")),
            Challenge(Reply(334, None, PASSWORD_CHALLENGE)),
        )
        self.assertEqual(self.now(x.respond(b64(PASSWORD.encode()))).login, LOGIN)

    def test_mechanism_and_spaces(self) -> None:
        """The mechanism in any case; spaces around the initial response do not count."""
        step = self.now(self.exchange().start(f"plain   {plain(LOGIN, PASSWORD)} "))
        self.assertEqual(step.login, LOGIN)

    def test_unknown_mechanism_is_answered_at_once(self) -> None:
        """Even with the throttle's state down: nothing needs asking."""
        self.state.down = True
        for args in ("CRAM-MD5", "", "XOAUTH2 dXNlcg=="):
            with self.subTest(args=args):
                self.assertEqual(
                    self.exchange().start(args),
                    Result(
                        Reply(504, "5.5.4", "Unrecognized authentication type; use PLAIN or LOGIN")
                    ),
                )

    def test_cancel_in_answer_to_a_challenge(self) -> None:
        cancelled = Result(Reply(501, "5.7.0", "Authentication cancelled"))
        plain_x = self.exchange()
        self.now(plain_x.start("PLAIN"))
        self.assertEqual(self.now(plain_x.respond("*")), cancelled)
        login_x = self.exchange()
        self.now(login_x.start("LOGIN"))
        self.now(login_x.respond(b64(LOGIN.encode())))
        self.assertEqual(self.now(login_x.respond("*")), cancelled)
        self.assertFalse(login_x.waiting)
        self.assertEqual((self.checks, self.failures()), ([], 0))

    def test_an_initial_response_is_not_a_cancellation(self) -> None:
        """C{*} cancels only in answer to a challenge (RFC 4954 section 4)."""
        self.assertEqual(
            self.now(self.exchange().start("PLAIN *")),
            Result(Reply(501, "5.5.2", "Cannot decode the AUTH response")),
        )

    def test_a_response_that_does_not_decode_ends_the_exchange(self) -> None:
        for mechanism, response, text in [
            ("PLAIN", "!!!", "Cannot decode the AUTH response"),
            ("PLAIN", b64(b"no separators"), "Malformed PLAIN response"),
            ("LOGIN", "YWxpY2U", "Cannot decode the AUTH response"),
            ("LOGIN", b64(b"\xff"), "AUTH data must be UTF-8"),
        ]:
            with self.subTest(mechanism=mechanism, response=response):
                x = self.exchange()
                self.now(x.start(mechanism))
                self.assertEqual(self.now(x.respond(response)), Result(Reply(501, "5.5.2", text)))
                self.assertFalse(x.waiting)

    def test_an_empty_login_username(self) -> None:
        """C{=} is the empty response: an empty username, then the password."""
        x = self.exchange()
        self.now(x.start("LOGIN"))
        self.assertEqual(self.now(x.respond("=")), Challenge(Reply(334, None, PASSWORD_CHALLENGE)))

    def test_other_authorization_identity(self) -> None:
        response = b64(f"bob@example.com\0{LOGIN}\0{PASSWORD}".encode())
        step = self.now(self.exchange().start(f"PLAIN {response}"))
        self.assertEqual(step.reply.code, 535)
        self.assertEqual(self.checks, [])

    def test_respond_without_a_challenge(self) -> None:
        x = self.exchange()
        self.assertRaises(RuntimeError, x.respond, "anything")
        self.now(x.start(f"PLAIN {plain(LOGIN, PASSWORD)}"))
        self.assertRaises(RuntimeError, x.respond, "anything")

    def test_wrong_password_waits_for_its_delay(self) -> None:
        d = self.exchange().start(f"PLAIN {plain(LOGIN, 'wrong')}")
        self.assertNoResult(d)
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), Result(WRONG))  # type: ignore[arg-type]
        self.assertEqual(self.failures(), 1)
        # The next distinct failure waits twice as long.
        d = self.exchange().start(f"PLAIN {plain(LOGIN, 'wrong again')}")
        self.clock.advance(1.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), Result(WRONG))  # type: ignore[arg-type]

    def test_unknown_user_is_a_wrong_password(self) -> None:
        d = self.exchange().start(f"PLAIN {plain('nobody@example.com', PASSWORD)}")
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), Result(WRONG))  # type: ignore[arg-type]
        self.assertEqual(len(self.checks), 1)  # the hash ran all the same

    def test_known_wrong_password_skips_the_hash(self) -> None:
        for _ in range(2):
            d = self.exchange().start(f"PLAIN {plain(LOGIN, 'wrong')}")
            self.clock.advance(4)
            self.assertEqual(self.successResultOf(d), Result(WRONG))  # type: ignore[arg-type]
        self.assertEqual(len(self.checks), 1)
        self.assertEqual(self.failures(), 2)

    def test_blocked_client_gets_454_before_a_challenge(self) -> None:
        for i in range(3):
            self.exchange().start(f"PLAIN {plain(LOGIN, f'guess {i}')}")
            self.clock.advance(4)
        blocked = Result(
            Reply(454, "4.7.0", "Too many failed login attempts from your address; try again later")
        )
        self.assertEqual(self.now(self.exchange().start("LOGIN")), blocked)
        self.assertEqual(
            self.now(self.exchange().start(f"PLAIN {plain(LOGIN, PASSWORD)}")), blocked
        )
        # Another address is not blocked.
        self.assertEqual(
            self.now(self.exchange("203.0.113.9").start(f"PLAIN {plain(LOGIN, PASSWORD)}")).login,
            LOGIN,
        )

    def test_throttle_state_down_fails_closed(self) -> None:
        unavailable = Result(
            Reply(
                454,
                "4.3.0",
                "Logins cannot be checked right now (a server problem); try again later",
            )
        )
        self.state.down = True
        self.assertEqual(self.now(self.exchange().start("PLAIN")), unavailable)
        # Down between the challenge and the response: no password is checked.
        self.state.down = False
        x = self.exchange()
        self.now(x.start("PLAIN"))
        self.state.down = True
        self.assertEqual(self.now(x.respond(plain(LOGIN, PASSWORD))), unavailable)
        self.assertEqual(self.checks, [])

    def test_too_many_checks_in_flight(self) -> None:
        self.auth = self.authenticator(UserFileChecker(self.users, self.runner, max_in_flight=0))
        self.assertEqual(
            self.now(self.exchange().start(f"PLAIN {plain(LOGIN, PASSWORD)}")),
            Result(Reply(454, "4.7.0", "Too many logins in progress; try again shortly")),
        )
        self.assertEqual(self.failures(), 0)

    def test_a_broken_checker_fails_the_step(self) -> None:
        """Anything but a wrong or uncheckable password is an error for the
        session to answer (451), not a verdict on the password."""
        self.auth = self.authenticator(
            UserFileChecker(self.users, lambda work: fail(OSError("no threads")))
        )
        d = self.exchange().start(f"PLAIN {plain(LOGIN, PASSWORD)}")
        self.failureResultOf(d, OSError)  # type: ignore[arg-type]
        self.assertEqual(self.failures(), 0)

    def test_changed_throttle_settings_apply_to_the_next_exchange(self) -> None:
        self.throttle.configure(ThrottleSettings(max_failures=1, window=900, delay=0, delay_max=0))
        d = self.exchange().start(f"PLAIN {plain(LOGIN, 'wrong')}")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), Result(WRONG))  # type: ignore[arg-type]
        self.assertEqual(self.now(self.exchange().start("PLAIN")).reply.code, 454)
