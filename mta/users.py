"""Submission users: a JSON file of argon2id password hashes and sender rights.

The file (C{users.json} by default) is written only by C{mtactl user ...},
atomically (temporary file, fsync, rename) under an advisory lock, with mode
0600.  The daemon re-reads it when it changes, so adding a user needs no
restart.  Passwords are never stored; only argon2id hashes, which embed
their own parameters and salt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zope.interface import implementer

from mta.address import ascii_lower, normalize_for_alignment
from mta.errors import ConfigError
from mta.interfaces import IUserDirectory

FORMAT = "mta-users/1"
MIN_PASSWORD = 8

# argon2-cffi's defaults follow RFC 9106's second recommendation
# (t=3, m=64 MiB, p=4): about 50 ms here, run off the reactor thread.
_HASHER = PasswordHasher()


def hash_password(password: str, hasher: PasswordHasher = _HASHER) -> str:
    return hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Check a password against a stored hash; slow by design (call in a thread)."""
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def normalize_login(email: str) -> str:
    return ascii_lower(email.strip())


@dataclass
class User:
    """One account: its login address and what else it may send as."""

    email: str
    password: str  # argon2id hash
    aliases: list[str] = field(default_factory=list)  # further addresses
    domains: list[str] = field(default_factory=list)  # any address @ these
    daily_limit: int | None = None  # None = the configured default

    def may_send_as(self, address: str) -> bool:
        """Sender alignment: the login or an alias, each also with any C{+tag}
        added, or any address in one of the user's domains.

        The tag is removed from the sender only: a login that has a tag
        itself (C{team+billing@}) may not send as the untagged address,
        which can be someone else's mailbox.
        """
        wanted = normalize_for_alignment(address)
        local, _, domain = wanted.rpartition("@")
        for own in (self.email, *self.aliases):
            own_local, _, own_domain = normalize_for_alignment(own).rpartition("@")
            if domain != own_domain:
                continue
            if local == own_local:
                return True
            if not local.startswith('"') and local.startswith(own_local + "+"):
                return True  # a sub-address of this one (RFC 5233)
        return domain in {ascii_lower(d) for d in self.domains}

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"password": self.password}
        if self.aliases:
            doc["aliases"] = self.aliases
        if self.domains:
            doc["domains"] = self.domains
        if self.daily_limit is not None:
            doc["daily_limit"] = self.daily_limit
        return doc


def user_from_json(path: str, email: str, doc: object) -> User:
    """One entry of the users file (or of Redis, L{mta.cluster.users}); C{path}
    names where it came from in the error."""
    if not isinstance(doc, dict) or not isinstance(doc.get("password"), str):
        raise ConfigError(f"{path}: user {email!r} has no password hash")
    aliases = doc.get("aliases", [])
    domains = doc.get("domains", [])
    limit = doc.get("daily_limit")
    if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise ConfigError(f"{path}: user {email!r}: aliases must be a list of strings")
    if not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise ConfigError(f"{path}: user {email!r}: domains must be a list of strings")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigError(f"{path}: user {email!r}: daily_limit must be a whole number")
    return User(email, doc["password"], list(aliases), list(domains), limit)


@implementer(IUserDirectory)
class UserFile:
    """The users file, re-read whenever it changes on disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, User] = {}

    def _read(self) -> dict[str, User]:
        try:
            with open(self.path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path}: cannot read users file: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"{self.path}: not an mta users file (format {FORMAT})")
        users = doc.get("users")
        if not isinstance(users, dict):
            raise ConfigError(f"{self.path}: 'users' must be an object")
        return {
            normalize_login(email): user_from_json(self.path, email, u)
            for email, u in users.items()
        }

    def users(self) -> dict[str, User]:
        """All users, from the cache unless the file changed since last read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            self._users = self._read()
            self._stamp = stamp
        return self._users

    def get(self, email: str) -> User | None:
        return self.users().get(normalize_login(email))

    def ready(self) -> bool:
        return True  # a missing file is no users, a broken one an error at start

    @contextmanager
    def editing(self) -> Iterator[dict[str, User]]:
        """Lock, read, let the caller change the mapping, write back atomically."""
        try:
            lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot lock the users file: {e.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            users = self._read()
            yield users
            try:
                self._write(users)
            except OSError as e:
                raise ConfigError(f"{self.path}: cannot write the users file: {e}") from None
        finally:
            os.close(lock_fd)

    def _write(self, users: dict[str, User]) -> None:
        doc = {
            "format": FORMAT,
            "users": {email: users[email].to_json() for email in sorted(users)},
        }
        directory = os.path.dirname(os.path.abspath(self.path))
        # mkstemp: a new file, mode 0600, whatever an old temporary file had.
        fd, tmp = tempfile.mkstemp(prefix=".users-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
