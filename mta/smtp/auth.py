"""SMTP AUTH (RFC 4954): SASL PLAIN and LOGIN, password checking, throttling.

The session (L{mta.smtp.server}) sees the AUTH command and then hands the
client's lines to a L{SASLExchange} until the exchange yields a L{Result};
everything in between is here: the challenges, decoding the SASL messages,
C{*} to cancel, initial responses, checking a password against the users
off the reactor thread (argon2 is slow on purpose), and remembering wrong
passwords per client address (L{AuthThrottle}) with the delay they earn.
"""

from __future__ import annotations

import binascii
import hashlib
import ipaddress
import secrets
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.address import client_ip
from mta.cluster import FailureCounts
from mta.errors import Reply, SharedStateError, SMTPReplyError
from mta.interfaces import ISharedState, IUserDirectory
from mta.metrics import Metrics
from mta.users import hash_password, normalize_login, verify_password

log = Logger(namespace="mta.smtpd")

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 section 4: a SASL line may be up to 12288 octets.
MAX_AUTH_LINE = 12288

USERNAME_CHALLENGE = "VXNlcm5hbWU6"  # base64 "Username:"
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # noqa: S105 - base64 "Password:", a prompt


def decode_base64(text: str) -> bytes:
    """Strict base64 as RFC 4954 requires; C{=} is the empty response."""
    if text == "=":
        return b""
    try:
        return b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SMTPReplyError(Reply(501, "5.5.2", "Cannot decode the AUTH response")) from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPReplyError(Reply(501, "5.5.2", "AUTH data must be UTF-8")) from None


def decode_plain(response: str) -> tuple[str, str]:
    """Decode a PLAIN message (RFC 4616) into (username, password).

    An authorization identity different from the username would mean acting
    for another user, which this server does not allow.
    """
    parts = decode_base64(response).split(b"\0")
    if len(parts) != 3:
        raise SMTPReplyError(Reply(501, "5.5.2", "Malformed PLAIN response"))
    authzid, authcid, password = (_utf8(p) for p in parts)
    if not authcid or not password:
        raise SMTPReplyError(Reply(501, "5.5.2", "Malformed PLAIN response"))
    if authzid and normalize_login(authzid) != normalize_login(authcid):
        raise SMTPReplyError(
            Reply(535, "5.7.8", "Authorization identity must be empty or equal the username")
        )
    return authcid, password


def decode_login_field(response: str) -> str:
    """Decode one LOGIN step (the username or the password)."""
    return _utf8(decode_base64(response))


@cache
def _dummy_hash() -> str:
    """A hash to check unknown logins against, made once per process."""
    return hash_password(secrets.token_hex(16))


class LoginUnavailable(Exception):  # noqa: N818 - a state, not an error of the caller
    """A login cannot be checked now; C{reply} is the temporary reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


BUSY = Reply(454, "4.7.0", "Too many logins in progress; try again shortly")
LOGIN_UNAVAILABLE = Reply(
    454, "4.3.0", "Logins cannot be checked right now (a server problem); try again later"
)
USERS_UNAVAILABLE = Reply(
    454, "4.3.0", "The list of users is not available right now; try again later"
)


class TooBusy(LoginUnavailable):
    """Too many password checks are in progress; the client should come back."""

    def __init__(self) -> None:
        super().__init__(BUSY)


@implementer(ICredentialsChecker)
class UserFileChecker:
    """Checks username/password against the users file in a worker thread.

    Fires with the normalised login address, or fails with
    L{UnauthorizedLogin}.  An unknown user costs the same hashing work as a
    known one, so response time does not reveal which logins exist.  At
    most C{max_in_flight} checks wait for the (small) thread pool at once;
    beyond that the check fails at once with L{TooBusy}, so that a flood
    of logins cannot queue without bound in front of the real ones.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: IUserDirectory,
        runner: Callable[[Callable[[], Any]], Deferred[Any]],
        max_in_flight: int = 32,
    ) -> None:
        self._users = users
        self._runner = runner
        self._max_in_flight = max_in_flight
        self.in_flight = 0

    def stored_hash(self, username: str) -> str:
        """The current hash of a login ("" for none): part of a failure's identity."""
        user = self._users.get(normalize_login(username))
        return user.password if user is not None else ""

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        assert isinstance(credentials, UsernamePassword)
        username = credentials.username
        password = credentials.password
        login = normalize_login(
            username.decode("utf-8") if isinstance(username, bytes) else username
        )
        secret = password.decode("utf-8") if isinstance(password, bytes) else password
        if not self._users.ready():
            return fail(LoginUnavailable(USERS_UNAVAILABLE))
        if self.in_flight >= self._max_in_flight:
            return fail(TooBusy())
        user = self._users.get(login)

        def check() -> bool:
            stored = user.password if user is not None else _dummy_hash()
            return verify_password(stored, secret) and user is not None

        def result(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin(login)
            return login

        def done(outcome: Any) -> Any:
            self.in_flight -= 1
            return outcome

        self.in_flight += 1
        checked: Deferred[Any] = self._runner(check)
        return checked.addBoth(done).addCallback(result)


@lru_cache(maxsize=4096)  # per connection; the same few clients
def client_key(address: str) -> str:
    """The unit of throttling: the IPv4 address, or the IPv6 /64 network."""
    ip = client_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class ThrottleSettings:
    """The limits of L{AuthThrottle} (C{[auth]}, built by L{mta.service})."""

    max_failures: int  # distinct wrong passwords in the window that block a client
    window: float  # seconds a failure is remembered
    delay: float  # seconds before the reply to the first failure, doubled for each next one
    delay_max: float  # the longest such delay


class AuthThrottle:
    """Counts wrong passwords per client; blocks after too many.

    A client is blocked while it has C{max_failures} distinct wrong
    (username, password) pairs younger than C{window} seconds (a guesser),
    or three times as many wrong attempts of any kind (a client hammering
    one wrong password): a mail client retrying one saved wrong password
    now and then does not lock itself out.  Each failure also earns a
    growing delay before the reply, and a pair already known to be wrong
    is answered without running the slow hash again (L{known_failure}).
    Only keyed hashes of the attempts are kept, never the passwords; the
    stored hash is part of the key, so a changed password is checked anew.

    The failures are kept in an L{ISharedState}: in this process
    (L{mta.cluster.local.LocalState}) or in Redis for a cluster, so that a
    guesser spreading over the instances is counted once.  Every answer is
    a Deferred; when the state cannot answer it fails with
    L{LoginUnavailable}, a temporary reply (fail closed: no login is
    checked while the failures cannot be counted).
    """

    def __init__(
        self, clock: IReactorTime, settings: ThrottleSettings, *, state: ISharedState
    ) -> None:
        self._clock = clock
        self.settings = settings
        self._key = secrets.token_bytes(16)
        self._state = state

    def configure(self, settings: ThrottleSettings) -> None:
        """New limits (a reload): the next question is answered with them.

        The failures already counted stay (and so does the key of their
        digests): a reload neither forgives a guesser nor blocks anyone anew
        except by the new numbers.
        """
        self.settings = settings

    def _since(self) -> float:
        return self._clock.seconds() - self.settings.window

    def _digest(self, username: str, password: str, stored: str) -> bytes:
        data = f"{normalize_login(username)}\0{password}\0{stored}".encode()
        return hashlib.blake2b(data, key=self._key, digest_size=16).digest()

    def blocked(self, address: str) -> Deferred[bool]:
        d = self._state.auth_failures(client_key(address), self._since())
        limit = self.settings.max_failures
        d.addCallback(lambda c: c.distinct >= limit or c.attempts >= 3 * limit).addErrback(
            _unavailable
        )
        return d

    def known_failure(
        self, address: str, username: str, password: str, stored: str
    ) -> Deferred[bool]:
        """Whether this client already failed with exactly these credentials."""
        digest = self._digest(username, password, stored)
        d = self._state.auth_failed_before(client_key(address), digest, self._since())
        return d.addErrback(_unavailable)

    def failure(
        self, address: str, username: str, password: str, stored: str = ""
    ) -> Deferred[float]:
        """Record a wrong password; fires with the delay before replying (never fails)."""
        digest = self._digest(username, password, stored)
        settings = self.settings
        d = self._state.add_auth_failure(
            client_key(address), digest, self._clock.seconds(), settings.window
        )

        def delay(counts: FailureCounts) -> float:
            value: float = settings.delay * 2 ** (counts.distinct - 1)
            return min(value, settings.delay_max)

        def unrecorded(f: Failure) -> float:
            # The password was wrong all the same (the client is told so);
            # as it could not be counted, it earns the longest delay.
            f.trap(SharedStateError)
            log.error("cannot record an AUTH failure: {e}", e=f.getErrorMessage())
            return settings.delay_max

        return d.addCallbacks(delay, unrecorded)


def _unavailable(f: Failure) -> Failure:
    """The shared state did not answer: a temporary reply, never a pass."""
    f.trap(SharedStateError)
    log.error("cannot check AUTH failures: {e}", e=f.getErrorMessage())
    return Failure(LoginUnavailable(LOGIN_UNAVAILABLE))


@dataclass(frozen=True)
class Challenge:
    """The exchange needs the client's next line: send C{reply} (a 334), then
    hand that line to L{SASLExchange.respond}."""

    reply: Reply


@dataclass(frozen=True)
class Result:
    """The exchange is over: send C{reply}.  C{login} is the authenticated
    (normalised) login after C{235}, None after any failure."""

    reply: Reply
    login: str | None = None


Step = Challenge | Result

UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type; use PLAIN or LOGIN")
BLOCKED = Reply(454, "4.7.0", "Too many failed login attempts from your address; try again later")
CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
SUCCESS = Reply(235, "2.7.0", "Authentication successful")
WRONG_PASSWORD = Reply(
    535,
    "5.7.8",
    "Authentication failed: wrong username or password (the username is your full email address)",
)


@dataclass(frozen=True)
class Authenticator:
    """What every AUTH exchange of the server shares (built by the service).

    C{users} gives a login's current password hash, which is part of a
    remembered failure's identity (L{AuthThrottle.known_failure}); the
    C{checker} runs the slow hash; C{clock} times the failure delay.
    """

    checker: ICredentialsChecker
    throttle: AuthThrottle
    users: IUserDirectory
    clock: IReactorTime
    metrics: Metrics = field(default_factory=Metrics)

    def exchange(self, peer: str) -> SASLExchange:
        """A new exchange for one AUTH command from the client at C{peer}."""
        return SASLExchange(self, peer)

    def stored_hash(self, username: str) -> str:
        """The login's current password hash, "" when there is no such login."""
        user = self.users.get(username)
        return user.password if user is not None else ""


class SASLExchange:
    """One AUTH command's SASL exchange (RFC 4954 section 4), as a small state machine.

    L{start} takes the AUTH arguments (the mechanism and an optional
    initial response); while a step is a L{Challenge}, L{respond} takes
    the client's next line.  The exchange ends with a L{Result}: C{235}
    with the login, or the error to send.  Each step is a L{Step} now or a
    Deferred of one (the throttle and the password check answer later).

    PLAIN (RFC 4616) takes one message, as an initial response or after
    an empty C{334}; LOGIN asks for the username, then the password, with
    the base64 prompts every client expects.  C{*} in answer to a
    challenge cancels (C{501 5.7.0}); an initial response is never a
    cancellation.  A message that does not decode ends the exchange with
    C{501 5.5.2}.  A client blocked by the L{AuthThrottle} gets C{454
    4.7.0} before any password is read; a wrong password is recorded and
    answered with C{535 5.7.8} only after its delay; a failure that cannot
    be checked now gets the temporary reply of L{LoginUnavailable}.
    """

    def __init__(self, authenticator: Authenticator, peer: str) -> None:
        self._auth = authenticator
        self._peer = peer
        self._next: Callable[[str], Step | Deferred[Step]] | None = None

    @property
    def waiting(self) -> bool:
        """Whether the last step was a challenge that L{respond} must answer."""
        return self._next is not None

    def start(self, args: str) -> Step | Deferred[Step]:
        """C{AUTH args}: C{MECHANISM [initial-response]}."""
        mechanism, _, initial = args.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in MECHANISMS:
            return Result(UNKNOWN_MECHANISM)

        def begin(blocked: bool) -> Step | Deferred[Step]:
            if blocked:
                log.info("AUTH refused for [{peer}]: too many failures", peer=self._peer)
                return Result(BLOCKED)
            if mechanism == "PLAIN":
                if initial:
                    return _decoded(self._plain, initial)
                return self._challenge(self._plain, Reply(334, None, ""))
            if initial:
                return _decoded(self._login_username, initial)
            return self._challenge(self._login_username, Reply(334, None, USERNAME_CHALLENGE))

        blocked = self._auth.throttle.blocked(self._peer)
        return blocked.addCallbacks(begin, self._unavailable)

    def respond(self, line: str) -> Step | Deferred[Step]:
        """The client's line in answer to the last challenge."""
        step, self._next = self._next, None
        if step is None:
            raise RuntimeError("no AUTH challenge is waiting for a response")
        if line == "*":
            return Result(CANCELLED)
        return _decoded(step, line)

    def _challenge(self, then: Callable[[str], Step | Deferred[Step]], reply: Reply) -> Challenge:
        self._next = then
        return Challenge(reply)

    def _plain(self, response: str) -> Deferred[Step]:
        username, password = decode_plain(response)
        return self._check("PLAIN", username, password)

    def _login_username(self, response: str) -> Challenge:
        username = decode_login_field(response)

        def password(resp: str) -> Deferred[Step]:
            return self._check("LOGIN", username, decode_login_field(resp))

        return self._challenge(password, Reply(334, None, PASSWORD_CHALLENGE))

    def _check(self, method: str, username: str, password: str) -> Deferred[Step]:
        """The password: known wrong, right, or wrong (recorded, after the delay)."""
        stored = self._auth.stored_hash(username)
        known = self._auth.throttle.known_failure(self._peer, username, password, stored)

        def check(known: bool) -> Deferred[Step]:
            if known:
                # Exactly this wrong password again: no need to run argon2.
                return self._wrong_password(method, username, password, stored)
            credentials = UsernamePassword(username.encode(), password.encode())
            d = self._auth.checker.requestAvatarId(credentials)
            return d.addCallbacks(ok, failed)

        def ok(login: str) -> Step:
            log.info(
                "[{peer}]: sasl_method={method}, sasl_username={login}",
                peer=self._peer,
                method=method,
                login=login,
            )
            return Result(SUCCESS, login)

        def failed(f: Failure) -> Deferred[Step] | Step:
            if f.check(LoginUnavailable):
                return self._unavailable(f)
            f.trap(UnauthorizedLogin)
            return self._wrong_password(method, username, password, stored)

        return known.addCallbacks(check, failed)

    def _wrong_password(
        self, method: str, username: str, password: str, stored: str
    ) -> Deferred[Step]:
        recorded = self._auth.throttle.failure(self._peer, username, password, stored)
        self._auth.metrics.auth_failures.inc()
        log.warn(
            "[{peer}]: SASL {method} authentication failed for {user!r}",
            peer=self._peer,
            method=method,
            user=username[:100],
        )

        def wait(delay: float) -> Deferred[Step]:
            later: Deferred[Step] = Deferred()
            self._auth.clock.callLater(delay, later.callback, Result(WRONG_PASSWORD))
            return later

        return recorded.addCallback(wait)

    def _unavailable(self, f: Failure) -> Step:
        """The throttle or the users cannot answer now: a temporary reply (fail closed)."""
        f.trap(LoginUnavailable)
        log.warn("[{peer}]: login not checked: {e}", peer=self._peer, e=f.getErrorMessage())
        return Result(f.value.reply)  # type: ignore[union-attr]


def _decoded(step: Callable[[str], Step | Deferred[Step]], response: str) -> Step | Deferred[Step]:
    """A step on a client's SASL message; one that does not decode ends the exchange."""
    try:
        return step(response)
    except SMTPReplyError as e:
        return Result(e.reply)
