"""Users in Redis (L{mta.cluster.users}): mtactl writes where the daemons read.

A real, private redis-server; C{mtactl} is L{mta.cli.main} with a
configuration whose C{[cluster] users = "redis"}; the daemon's side is
L{RedisUsers} on the real reactor, refreshed by hand or by its loop.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mta import cli
from mta.cluster.blocking import BlockingRedis
from mta.cluster.users import RedisUsers, RedisUserStore
from mta.errors import ConfigError
from mta.interfaces import IUserDirectory
from mta.users import verify_password
from tests.redisserver import RedisFixture

Gen = Generator[Deferred[Any], Any, None]


class RedisUsersTests(RedisFixture, TestCase):
    """Users kept in a real redis-server: mtactl writes where the daemon's RedisUsers reads, the
    refresh loop sees changes without a restart, Redis down keeps the users already known, a bad
    entry is skipped, and concurrent edits do not undo each other (compare-and-set on the
    version)."""

    def setUp(self) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.config = os.path.abspath(self.mktemp() + ".toml")
        with open(self.config, "w") as f:
            f.write(
                f'[cluster]\nredis = "{self.server.endpoint}"\nprefix = "{self.prefix}"\n'
                'users = "redis"\n'
            )

    def mtactl(self, *args: str, stdin: str = "") -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        old_stdin, old_stderr = cli.sys.stdin, cli.sys.stderr
        cli.sys.stdin, cli.sys.stderr = io.StringIO(stdin), err
        try:
            code = cli.main(["--config", self.config, *args], out)
        finally:
            cli.sys.stdin, cli.sys.stderr = old_stdin, old_stderr
        return code, out.getvalue() + err.getvalue()

    def directory(self, refresh: float = 60) -> RedisUsers:
        users = RedisUsers(self.client(timeout=2, retry=0.1), reactor, self.prefix, refresh)
        self.addCleanup(users.stop)
        return users

    @inlineCallbacks
    def test_mtactl_writes_where_the_daemon_reads(self) -> Gen:
        users = self.directory()
        self.assertTrue(verifyObject(IUserDirectory, users))
        self.assertFalse(users.ready())
        yield users.refresh()
        self.assertTrue(users.ready())
        self.assertEqual(users.users(), {})
        code, text = self.mtactl(
            "user", "add", "Ann@Example.com", "--password-stdin", "--alias", "sales@example.com",
            stdin="first password\n",
        )  # fmt: skip
        self.assertEqual(code, 0, text)
        yield users.refresh()
        ann = users.get("ann@example.com")
        self.assertIsNotNone(ann)
        self.assertEqual(ann.aliases, ["sales@example.com"])
        self.assertTrue(verify_password(ann.password, "first password"))
        self.assertEqual(
            self.mtactl("user", "passwd", "ann@example.com", stdin="second pw\n")[0], 0
        )
        self.assertEqual(self.mtactl("user", "limit", "ann@example.com", "7")[0], 0)
        yield users.refresh()
        ann = users.get("ann@example.com")
        self.assertTrue(verify_password(ann.password, "second pw"))
        self.assertEqual(ann.daily_limit, 7)
        code, text = self.mtactl("user", "list")
        self.assertIn("ann@example.com", text)
        self.assertEqual(self.mtactl("user", "del", "ann@example.com")[0], 0)
        yield users.refresh()
        self.assertIsNone(users.get("ann@example.com"))
        self.assertEqual(self.mtactl("user", "del", "ann@example.com")[0], 1)

    @inlineCallbacks
    def test_the_loop_sees_changes_without_a_restart(self) -> Gen:
        users = self.directory(refresh=0.1)
        users.start()
        self.mtactl("user", "add", "bo@example.com", "--password-stdin", stdin="a password\n")
        for _ in range(50):
            if users.get("bo@example.com") is not None:
                break
            yield deferLater(reactor, 0.05)
        self.assertIsNotNone(users.get("bo@example.com"))

    @inlineCallbacks
    def test_redis_down_keeps_the_known_users(self) -> Gen:
        users = self.directory()
        self.mtactl("user", "add", "cy@example.com", "--password-stdin", stdin="a password\n")
        yield users.refresh()
        self.server.stop()
        try:
            yield users.refresh()  # never fails
            self.assertIsNotNone(users.get("cy@example.com"))
            code, text = self.mtactl("user", "list")
            self.assertEqual(code, 1)
            self.assertIn("cannot reach Redis", text)
        finally:
            self.server.start()
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_a_bad_entry_is_skipped(self) -> Gen:
        self.mtactl("user", "add", "di@example.com", "--password-stdin", stdin="a password\n")
        self.server.command("HSET", f"{self.prefix}:users", "bad@example.com", "{not json")
        self.server.command("INCR", f"{self.prefix}:users:version")
        users = self.directory()
        yield users.refresh()
        self.assertEqual(sorted(users.users()), ["di@example.com"])
        self.flushLoggedErrors()

    def test_concurrent_edits_do_not_undo_each_other(self) -> None:
        self.mtactl("user", "add", "ed@example.com", "--password-stdin", stdin="a password\n")
        store = RedisUserStore(BlockingRedis(self.server.endpoint, timeout=2), self.prefix)
        with self.assertRaises(ConfigError) as caught, store.editing() as users:
            users["ed@example.com"].daily_limit = 3
            self.mtactl("user", "limit", "ed@example.com", "9")  # meanwhile, elsewhere
        self.assertIn("changed meanwhile", str(caught.exception))
        self.assertEqual(store.get("ed@example.com").daily_limit, 9)  # type: ignore[union-attr]
