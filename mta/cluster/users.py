"""The submission users in Redis (C{[cluster] users = "redis"}), for every instance.

Two keys under C{[cluster] prefix}:

  - C{PREFIX:users}: a hash, login address -> the same JSON object a user
    has in C{users.json} (C{{"password": "$argon2id$...", "aliases": [...],
    "domains": [...], "daily_limit": N}}, L{mta.users.User.to_json});
  - C{PREFIX:users:version}: an integer, incremented by every change.

C{mtactl user ...} (L{RedisUserStore}, blocking) reads the hash and the
version, lets the command change its copy, and writes the changes back in
one Lua script that first checks that the version is still the one it
read (so two concurrent edits cannot undo each other: the second is
refused and can be run again), then increments it.

Each daemon (L{RedisUsers}) keeps a copy in memory, which the sessions
read as they read the file (synchronously).  Every C{users_refresh}
seconds it reads the version (one C{GET}) and, when it changed, the whole
hash with its version in one atomic script: a change made on any host is
seen by every instance within that time, without a restart.  While Redis
cannot be reached the copy is kept as it was (and logins are refused
anyway, as the AUTH throttle fails closed); an instance that has never
read the users answers logins with a temporary reply (L{ready}).  A
malformed entry (written by hand) is skipped with an error in the log;
the others stay usable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.cluster.blocking import BlockingRedis
from mta.cluster.client import RedisClient
from mta.errors import ConfigError, SharedStateError
from mta.interfaces import IUserDirectory
from mta.users import User, normalize_login, user_from_json

log = Logger(namespace="mta.cluster.users")

READ_ALL = """
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
"""

APPLY = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
    return -1
end
for i = 2, #ARGV, 3 do
    if ARGV[i] == 'set' then
        redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    else
        redis.call('HDEL', KEYS[1], ARGV[i + 1])
    end
end
return redis.call('INCR', KEYS[2])
"""


def keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}:users", f"{prefix}:users:version"


def encode_user(user: User) -> bytes:
    return json.dumps(user.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")


def decode_users(reply: Any, where: str) -> tuple[bytes, dict[str, User]]:
    """(version, users) from L{READ_ALL}'s reply; bad entries are skipped and logged."""
    if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)):
        raise SharedStateError(f"unexpected reply from Redis: {reply!r:.60}")
    version, flat = reply
    users: dict[str, User] = {}
    for name, doc in zip(flat[::2], flat[1::2], strict=True):
        try:
            email = name.decode("utf-8")
            users[normalize_login(email)] = user_from_json(where, email, json.loads(doc))
        except (UnicodeDecodeError, ValueError, ConfigError) as e:
            log.error("skipping user {name!r} in {where}: {e}", name=name, where=where, e=str(e))
    return (version if isinstance(version, bytes) else str(version).encode()), users


@implementer(IUserDirectory)
class RedisUsers:
    """The daemon's copy of the users in Redis, refreshed by itself."""

    def __init__(self, client: RedisClient, clock: IReactorTime, prefix: str, refresh: float):
        self.client = client
        self.refresh_interval = refresh
        self._keys = keys(prefix)
        self._where = f"Redis {client.name} {self._keys[0]}"
        self._users: dict[str, User] = {}
        self._version: bytes | None = None
        self._failing = False
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.refresh_interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> Deferred[None]:
        """Read the version and, if it changed, every user; never fails."""
        users, version = self._keys
        d = self.client.execute("GET", version)

        def changed(current: Any) -> Deferred[Any] | None:
            if self._version is not None and (current or b"0") == self._version:
                return None
            return self.client.execute("EVAL", READ_ALL, 2, users, version).addCallback(load)

        def load(reply: Any) -> None:
            self._version, self._users = decode_users(reply, self._where)
            log.info("read {n} users from {where}", n=len(self._users), where=self._where)

        def ok(_: object) -> None:
            if self._failing:
                log.info("the users in {where} can be read again", where=self._where)
            self._failing = False

        def failed(f: Failure) -> None:
            if not self._failing:
                log.error(
                    "cannot read the users from {where} ({e}); keeping the {n} known",
                    where=self._where,
                    e=f.getErrorMessage(),
                    n=len(self._users),
                )
            self._failing = True

        return d.addCallback(changed).addCallbacks(ok, failed)

    def users(self) -> dict[str, User]:
        return self._users

    def get(self, email: str) -> User | None:
        return self._users.get(normalize_login(email))

    def ready(self) -> bool:
        return self._version is not None

    def close(self) -> Deferred[None]:
        self.stop()
        return succeed(None)


class RedisUserStore:
    """C{mtactl}'s view: the users file's reading and editing API, on Redis."""

    def __init__(self, redis: BlockingRedis, prefix: str) -> None:
        self.redis = redis
        self._keys = keys(prefix)
        self.path = f"Redis {redis.description} {self._keys[0]}"  # for messages

    def _read(self) -> tuple[bytes, dict[str, User]]:
        users, version = self._keys
        try:
            return decode_users(self.redis.execute("EVAL", READ_ALL, 2, users, version), self.path)
        except SharedStateError as e:
            raise ConfigError(str(e)) from None

    def users(self) -> dict[str, User]:
        return self._read()[1]

    def get(self, email: str) -> User | None:
        return self.users().get(normalize_login(email))

    def ready(self) -> bool:
        return True

    @contextmanager
    def editing(self) -> Iterator[dict[str, User]]:
        """Read, let the caller change the mapping, write the differences back
        if nobody changed the users meanwhile (else L{ConfigError})."""
        version, before = self._read()
        old = {email: encode_user(user) for email, user in before.items()}
        users = dict(before)
        yield users
        changes: list[bytes | str] = []
        for email, user in users.items():
            doc = encode_user(user)
            if old.get(email) != doc:
                changes += ["set", email, doc]
        for email in old.keys() - users.keys():
            changes += ["del", email, ""]
        if not changes:
            return
        names, counter = self._keys
        try:
            result = self.redis.execute("EVAL", APPLY, 2, names, counter, version, *changes)
        except SharedStateError as e:
            raise ConfigError(str(e)) from None
        if result == -1:
            raise ConfigError(
                f"{self.path}: the users were changed meanwhile; run the command again"
            )
