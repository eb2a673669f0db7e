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
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mta.errors import Reply, SMTPReplyError
from mta.users import UserFile, hash_password, normalize_login, verify_password

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


@implementer(ICredentialsChecker)
class UserFileChecker:
    """Checks username/password against the users file in a worker thread.

    Fires with the normalised login address, or fails with
    L{UnauthorizedLogin}.  An unknown user costs the same hashing work as a
    known one, so response time does not reveal which logins exist.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: UserFile,
        runner: Callable[[Callable[[], Any]], Deferred[Any]],
    ) -> None:
        self._users = users
        self._runner = runner

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        assert isinstance(credentials, UsernamePassword)
        username = credentials.username
        password = credentials.password
        login = normalize_login(
            username.decode("utf-8") if isinstance(username, bytes) else username
        )
        secret = password.decode("utf-8") if isinstance(password, bytes) else password
        user = self._users.get(login)
        stored = user.password if user is not None else _dummy_hash()

        def check() -> bool:
            return verify_password(stored, secret) and user is not None

        def result(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin(login)
            return login

        return self._runner(check).addCallback(result)


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
    """Counts distinct wrong passwords per client; blocks after too many.

    A client is blocked while it has C{max_failures} distinct wrong
    (username, password) pairs younger than C{window} seconds: a mail client
    retrying one saved wrong password does not lock itself out, a guesser
    does.  Each failure also earns a growing delay before the reply.  Only
    keyed hashes of the attempts are kept, never the passwords.
    """

    MAX_CLIENTS = 100_000

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int,
        window: float,
        delay: float,
        delay_max: float,
    ) -> None:
        self._clock = clock
        self._max = max_failures
        self._window = window
        self._delay = delay
        self._delay_max = delay_max
        self._key = secrets.token_bytes(16)
        self._failures: OrderedDict[str, dict[bytes, float]] = OrderedDict()

    def _recent(self, client: str) -> dict[bytes, float]:
        attempts = self._failures.get(client)
        if attempts is None:
            return {}
        cutoff = self._clock.seconds() - self._window
        for digest in [d for d, t in attempts.items() if t <= cutoff]:
            del attempts[digest]
        if not attempts:
            del self._failures[client]
        return attempts

    def blocked(self, address: str) -> bool:
        return len(self._recent(client_key(address))) >= self._max

    def failure(self, address: str, username: str, password: str) -> float:
        """Record a wrong password; returns the delay before replying."""
        client = client_key(address)
        attempts = self._recent(client)
        digest = hashlib.blake2b(
            f"{username}\0{password}".encode(), key=self._key, digest_size=16
        ).digest()
        attempts[digest] = self._clock.seconds()
        self._failures[client] = attempts
        self._failures.move_to_end(client)
        while len(self._failures) > self.MAX_CLIENTS:
            self._failures.popitem(last=False)
        delay: float = self._delay * 2 ** (len(attempts) - 1)
        return min(delay, self._delay_max)
