"""SMTP AUTH (RFC 4954): SASL PLAIN and LOGIN, password checking, throttling.

The session (L{mta.smtp.server}) drives the exchange; this module holds the
parts that are not about the wire: decoding the SASL messages, checking a
password against the users file off the reactor thread (argon2 is slow on
purpose), and remembering wrong passwords per client address.
"""

from __future__ import annotations

import binascii
import hashlib
import ipaddress
import secrets
from base64 import b64decode
from collections.abc import Callable
from functools import cache
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.cluster import FailureCounts
from mta.errors import Reply, SharedStateError, SMTPReplyError
from mta.interfaces import ISharedState, IUserDirectory
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


def client_key(address: str) -> str:
    """The unit of throttling: the IPv4 address, or the IPv6 /64 network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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
        self,
        clock: IReactorTime,
        max_failures: int,
        window: float,
        delay: float,
        delay_max: float,
        *,
        state: ISharedState,
    ) -> None:
        self._clock = clock
        self._max = max_failures
        self._window = window
        self._delay = delay
        self._delay_max = delay_max
        self._key = secrets.token_bytes(16)
        self._state = state

    def _since(self) -> float:
        return self._clock.seconds() - self._window

    def _digest(self, username: str, password: str, stored: str) -> bytes:
        data = f"{normalize_login(username)}\0{password}\0{stored}".encode()
        return hashlib.blake2b(data, key=self._key, digest_size=16).digest()

    def blocked(self, address: str) -> Deferred[bool]:
        d = self._state.auth_failures(client_key(address), self._since())
        d.addCallback(lambda c: c.distinct >= self._max or c.attempts >= 3 * self._max).addErrback(
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
        d = self._state.add_auth_failure(
            client_key(address), digest, self._clock.seconds(), self._window
        )

        def delay(counts: FailureCounts) -> float:
            value: float = self._delay * 2 ** (counts.distinct - 1)
            return min(value, self._delay_max)

        def unrecorded(f: Failure) -> float:
            # The password was wrong all the same (the client is told so);
            # as it could not be counted, it earns the longest delay.
            f.trap(SharedStateError)
            log.error("cannot record an AUTH failure: {e}", e=f.getErrorMessage())
            return self._delay_max

        return d.addCallbacks(delay, unrecorded)


def _unavailable(f: Failure) -> Failure:
    """The shared state did not answer: a temporary reply, never a pass."""
    f.trap(SharedStateError)
    log.error("cannot check AUTH failures: {e}", e=f.getErrorMessage())
    return Failure(LoginUnavailable(LOGIN_UNAVAILABLE))
