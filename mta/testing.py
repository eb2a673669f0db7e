"""Public test doubles.  Each fake implements the same interface as the real
part and is checked with C{verifyObject} in the tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import IO, Any, TypeVar

from argon2 import PasswordHasher
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport

from mta.spool.fs import FileOps
from mta.users import User, UserFile

T = TypeVar("T")

# Cheap argon2id parameters so that tests check real hashes quickly.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


def run_inline(work: Callable[[], T]) -> Deferred[T]:
    """A runner that does the work at once in the calling thread."""
    try:
        return succeed(work())
    except BaseException:
        return fail()


def write_users(path: str, users: dict[str, str], **rights: dict[str, list[str]]) -> UserFile:
    """Create a users file: C{users} maps login to password.

    C{aliases={"login": [...]}} and C{domains={"login": [...]}} add rights.
    """
    user_file = UserFile(path)
    with user_file.editing() as table:
        for email, password in users.items():
            table[email] = User(
                email,
                FAST_HASHER.hash(password),
                aliases=list(rights.get("aliases", {}).get(email, [])),
                domains=list(rights.get("domains", {}).get(email, [])),
            )
    return user_file


class FailingOps(FileOps):
    """File operations that fail on the Nth call of one kind with an errno.

    C{FailingOps("fsync_dir", errno.EIO, after=1)} lets one directory fsync
    succeed and fails the next one; C{times} bounds how often it fails.
    """

    def __init__(self, operation: str, code: int = errno.EIO, after: int = 0, times: int = 1):
        self.operation = operation
        self.code = code
        self.after = after
        self.times = times
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, name: str) -> None:
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        if name == self.operation and self.after <= count < self.after + self.times:
            raise OSError(self.code, os.strerror(self.code))

    def mkdir(self, path: str) -> None:
        self._maybe_fail("mkdir")
        super().mkdir(path)

    def open_new(self, path: str) -> IO[bytes]:
        self._maybe_fail("open_new")
        return super().open_new(path)

    def fsync(self, f: IO[bytes]) -> None:
        self._maybe_fail("fsync")
        super().fsync(f)

    def fsync_dir(self, path: str) -> None:
        self._maybe_fail("fsync_dir")
        super().fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename")
        super().rename(src, dst)


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.tls_started_with: object | None = None
        self.written_before_tls = b""

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
        self.written_before_tls = self.value()  # type: ignore[no-untyped-call]
