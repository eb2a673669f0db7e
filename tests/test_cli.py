"""mtactl (L{mta.cli}): users and queue inspection, in process and as a real command."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mta import cli
from mta.bounce import DEFAULT_RULES
from mta.cli import main
from mta.envelope import Envelope, ProgressRecord, Recipient, RecipientState
from mta.spool import journal
from mta.spool.fs import FileStore, Spool, SpoolLock
from mta.spool.queueid import QueueIdGenerator
from mta.testing import FailingOps, run_inline, write_users
from mta.users import UserFile, verify_password

HEADERS = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: quarterly numbers\r\n"
BODY = b"the secret body text\r\n"
MESSAGE_BYTES = HEADERS + b"\r\n" + BODY
PASSWORD = "a long enough password"


def write_config(path: str, spool: str, users_file: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        # JSON string syntax is valid TOML basic-string syntax for these paths.
        f.write(f"[server]\nspool = {json.dumps(spool)}\nusers_file = {json.dumps(users_file)}\n")


class CLITestCase(SynchronousTestCase):
    """Runs C{main} against a configuration in a fresh directory."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.spool_path = os.path.join(self.base, "spool")
        self.users_path = os.path.join(self.base, "users.json")
        self.config = os.path.join(self.base, "mta.toml")
        write_config(self.config, self.spool_path, self.users_path)
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def mtactl(self, *argv: str, stdin: str | None = None) -> tuple[int, str]:
        if stdin is not None:
            self.patch(sys, "stdin", io.StringIO(stdin))
        out = io.StringIO()
        code = main(["--config", self.config, *argv], out=out)
        return code, out.getvalue()

    def assert_one_line_error(self, *words: str) -> None:
        text = self.err.getvalue()
        self.assertTrue(text.startswith("mtactl: "), text)
        self.assertTrue(text.endswith("\n"), text)
        self.assertEqual(text.count("\n"), 1, text)
        for word in words:
            self.assertIn(word, text)


# -- users ---------------------------------------------------------------------


class UserLimitTests(CLITestCase):
    """mtactl user limit: setting and clearing a user's daily limit, and its errors."""

    def test_set_and_clear(self) -> None:
        self.mtactl("user", "add", "alice@example.com", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(
            self.mtactl("user", "limit", "ALICE@example.com", "2000"),
            (0, "daily limit of alice@example.com: 2000 a day\n"),
        )
        user = UserFile(self.users_path).get("alice@example.com")
        assert user is not None
        self.assertEqual(user.daily_limit, 2000)
        self.assertTrue(verify_password(user.password, PASSWORD), "the password was kept")
        code, out = self.mtactl("user", "limit", "alice@example.com", "default")
        self.assertEqual(code, 0)
        self.assertIn("the default", out)
        self.assertIsNone(UserFile(self.users_path).users()["alice@example.com"].daily_limit)

    def test_errors(self) -> None:
        self.mtactl("user", "add", "alice@example.com", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(self.mtactl("user", "limit", "bob@example.com", "5")[0], 1)
        self.assert_one_line_error("no user bob@example.com")
        for bad in ("many", "-1"):
            self.err.truncate(0)
            self.err.seek(0)
            self.assertEqual(self.mtactl("user", "limit", "alice@example.com", bad)[0], 2)
            self.assert_one_line_error(bad)


class UserAddTests(CLITestCase):
    """mtactl user add: a new user with a slow hash, the login normalized with aliases and domains
    kept, and the refusals (a duplicate, a short or empty password, an invalid address or alias,
    a negative daily limit, a users file in a missing directory)."""

    def test_add(self) -> None:
        code, out = self.mtactl(
            "user", "add", "alice@example.com", "--password-stdin", stdin=PASSWORD + "\n"
        )
        self.assertEqual((code, out, self.err.getvalue()), (0, "added alice@example.com\n", ""))
        user = UserFile(self.users_path).get("alice@example.com")
        assert user is not None
        self.assertTrue(verify_password(user.password, PASSWORD))
        self.assertFalse(verify_password(user.password, PASSWORD + "\n"))
        self.assertEqual(os.stat(self.users_path).st_mode & 0o777, 0o600)

    def test_add_normalizes_the_login_and_keeps_rights(self) -> None:
        code, out = self.mtactl(
            "user", "add", " Alice@Example.COM ",
            "--alias", "sales@example.com",
            "--alias", "info@example.com",
            "--domain", " Example.ORG ",
            "--daily-limit", "250",
            "--password-stdin",
            stdin=PASSWORD + "\r\n",
        )  # fmt: skip
        self.assertEqual((code, out), (0, "added alice@example.com\n"))
        user = UserFile(self.users_path).get("alice@example.com")
        assert user is not None
        self.assertEqual(user.email, "alice@example.com")
        self.assertEqual(user.aliases, ["sales@example.com", "info@example.com"])
        self.assertEqual(user.domains, ["example.org"])
        self.assertEqual(user.daily_limit, 250)
        self.assertTrue(verify_password(user.password, PASSWORD))

    def test_duplicate(self) -> None:
        write_users(self.users_path, {"alice@example.com": "old password"})
        with open(self.users_path, "rb") as f:
            before = f.read()
        code, out = self.mtactl(
            "user", "add", "ALICE@example.com", "--password-stdin", stdin=PASSWORD + "\n"
        )
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("alice@example.com", "already exists")
        with open(self.users_path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_short_password(self) -> None:
        code, out = self.mtactl(
            "user", "add", "alice@example.com", "--password-stdin", stdin="short12\n"
        )
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("8")
        self.assertEqual(UserFile(self.users_path).users(), {})

    def test_empty_stdin(self) -> None:
        code, _ = self.mtactl("user", "add", "alice@example.com", "--password-stdin", stdin="")
        self.assertEqual(code, 1)
        self.assert_one_line_error()
        self.assertEqual(UserFile(self.users_path).users(), {})

    def test_invalid_email(self) -> None:
        for bad in ("alice", "alice@", "@example.com", "a b@example.com"):
            self.err.truncate(0)
            self.err.seek(0)
            code, out = self.mtactl("user", "add", bad, "--password-stdin", stdin=PASSWORD)
            self.assertEqual((code, out), (1, ""), bad)
            self.assert_one_line_error("not a valid email address")
        self.assertFalse(os.path.exists(self.users_path))

    def test_invalid_alias(self) -> None:
        code, _ = self.mtactl(
            "user", "add", "alice@example.com", "--alias", "nobody",
            "--password-stdin", stdin=PASSWORD,
        )  # fmt: skip
        self.assertEqual(code, 1)
        self.assert_one_line_error("alias", "nobody")
        self.assertEqual(UserFile(self.users_path).users(), {})

    def test_negative_daily_limit_is_refused(self) -> None:
        write_users(self.users_path, {"bob@example.com": "bob password"})
        with self.assertRaises(SystemExit) as e:
            self.mtactl(
                "user", "add", "alice@example.com", "--daily-limit", "-1",
                "--password-stdin", stdin=PASSWORD,
            )  # fmt: skip
        self.assertEqual(e.exception.code, 2)
        self.assertIsNotNone(UserFile(self.users_path).get("bob@example.com"))
        self.assertIsNone(UserFile(self.users_path).get("alice@example.com"))

    def test_users_file_in_missing_directory(self) -> None:
        write_config(self.config, self.spool_path, os.path.join(self.base, "nope", "users.json"))
        code, _ = self.mtactl(
            "user", "add", "alice@example.com", "--password-stdin", stdin=PASSWORD
        )
        self.assertEqual(code, 1)
        self.assert_one_line_error("nope")


class UserEditTests(CLITestCase):
    """mtactl user passwd, del and list (text and JSON): changes to existing users, unknown users,
    short passwords, no users, and a broken users file."""

    def setUp(self) -> None:
        super().setUp()
        write_users(
            self.users_path,
            {"alice@example.com": "alice password", "bob@example.com": "bob password"},
            aliases={"alice@example.com": ["sales@example.com"]},
            domains={"alice@example.com": ["example.org"]},
        )

    def test_passwd(self) -> None:
        code, out = self.mtactl(
            "user", "passwd", "Alice@Example.com", "--password-stdin", stdin=PASSWORD + "\n"
        )
        self.assertEqual((code, out), (0, "changed the password of alice@example.com\n"))
        alice = UserFile(self.users_path).get("alice@example.com")
        assert alice is not None
        self.assertTrue(verify_password(alice.password, PASSWORD))
        self.assertFalse(verify_password(alice.password, "alice password"))
        self.assertEqual(alice.aliases, ["sales@example.com"])
        bob = UserFile(self.users_path).get("bob@example.com")
        assert bob is not None
        self.assertTrue(verify_password(bob.password, "bob password"))

    def test_passwd_unknown(self) -> None:
        code, _ = self.mtactl(
            "user", "passwd", "carol@example.com", "--password-stdin", stdin=PASSWORD
        )
        self.assertEqual(code, 1)
        self.assert_one_line_error("carol@example.com")
        self.assertEqual(
            sorted(UserFile(self.users_path).users()), ["alice@example.com", "bob@example.com"]
        )

    def test_passwd_short(self) -> None:
        code, _ = self.mtactl(
            "user", "passwd", "alice@example.com", "--password-stdin", stdin="tiny\n"
        )
        self.assertEqual(code, 1)
        self.assert_one_line_error()
        alice = UserFile(self.users_path).get("alice@example.com")
        assert alice is not None
        self.assertTrue(verify_password(alice.password, "alice password"))

    def test_del(self) -> None:
        code, out = self.mtactl("user", "del", "BOB@example.com")
        self.assertEqual((code, out), (0, "deleted bob@example.com\n"))
        self.assertEqual(list(UserFile(self.users_path).users()), ["alice@example.com"])

    def test_del_unknown(self) -> None:
        code, out = self.mtactl("user", "del", "carol@example.com")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("carol@example.com")
        self.assertEqual(len(UserFile(self.users_path).users()), 2)

    def test_list(self) -> None:
        code, out = self.mtactl("user", "list")
        self.assertEqual(code, 0)
        self.assertEqual(
            out,
            "alice@example.com  (aliases: sales@example.com; domains: example.org)\n"
            "bob@example.com\n",
        )

    def test_list_json(self) -> None:
        code, out = self.mtactl("user", "list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(
            json.loads(out),
            [
                {
                    "email": "alice@example.com",
                    "aliases": ["sales@example.com"],
                    "domains": ["example.org"],
                    "daily_limit": None,
                },
                {"email": "bob@example.com", "aliases": [], "domains": [], "daily_limit": None},
            ],
        )
        self.assertNotIn("argon2", out)

    def test_list_no_users(self) -> None:
        os.remove(self.users_path)
        self.assertEqual(self.mtactl("user", "list"), (0, ""))
        self.assertEqual(self.mtactl("user", "list", "--json"), (0, "[]\n"))

    def test_list_bad_users_file(self) -> None:
        with open(self.users_path, "w") as f:
            f.write("{broken")
        code, out = self.mtactl("user", "list")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(self.users_path)


# -- the queue -----------------------------------------------------------------


class SpoolTestCase(CLITestCase):
    """With a spool to commit messages to."""

    def setUp(self) -> None:
        super().setUp()
        self.store = FileStore(self.spool_path)
        self.store.open()
        self.spool = Spool(
            self.store, run_inline, QueueIdGenerator(lambda: 1_700_000_000.0, lambda bits: 0)
        )

    def break_envelope(self, state: str, queue_id: str, text: bytes = b"{not json") -> bytes:
        """Make a message's envelope unreadable; returns the file as it was."""
        path = self.store.path(state, queue_id)
        with open(path, "rb") as f:
            good = f.read()
        _, env = self.store.load(queue_id, state)
        with open(path, "wb") as f:
            f.write(good[: env.size] + text + b"\n")
        return good

    def commit(self, *recipients: str, data: bytes = MESSAGE_BYTES) -> str:
        txn = self.spool.begin()
        txn.write(data)
        envelope = Envelope(
            queue_id="",
            sender="alice@example.com",
            recipients=[Recipient(r) for r in (recipients or ("bob@example.net",))],
            arrival=1_700_000_000.0,
            size=len(data),
        )
        return self.successResultOf(txn.commit(envelope))


class QueueTests(SpoolTestCase):
    """mtactl queue list and show on a spool with no daemon: empty and full listings in text and
    JSON, the last reply, finished messages only with --all, and unreadable envelopes or missing
    message files reported in one line."""

    def test_list_empty(self) -> None:
        self.assertEqual(self.mtactl("queue", "list"), (0, "Mail queue is empty\n"))
        self.assertEqual(self.mtactl("queue", "list", "--json"), (0, "[]\n"))

    def test_list(self) -> None:
        queue_id = self.commit("bob@example.net", "carol@example.org")
        code, out = self.mtactl("queue", "list")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertIn("Queue ID", lines[0])
        row = lines[1].split()
        self.assertEqual(row[0], queue_id)
        self.assertEqual(row[1], str(len(MESSAGE_BYTES)))
        self.assertEqual(row[4], "incoming")
        self.assertEqual(row[-1], "alice@example.com")
        self.assertIn("2023-11-14 22:13:20", lines[1])
        self.assertEqual(lines[2].split(), ["bob@example.net", "[pending]"])
        self.assertEqual(lines[3].split(), ["carol@example.org", "[pending]"])
        self.assertEqual(lines[-1], "-- 1 Kbytes in 1 requests (1 incoming).")

    def test_list_json(self) -> None:
        queue_id = self.commit("bob@example.net")
        code, out = self.mtactl("queue", "list", "--json")
        self.assertEqual(code, 0)
        (row,) = json.loads(out)
        self.assertEqual(row["id"], queue_id)
        self.assertEqual(row["state"], "incoming")
        self.assertEqual(row["sender"], "alice@example.com")
        self.assertEqual(row["size"], len(MESSAGE_BYTES))
        self.assertEqual(
            row["recipients"],
            [
                {
                    "address": "bob@example.net",
                    "state": "pending",
                    "attempts": 0,
                    "reply": None,
                    "next_attempt": None,
                }
            ],
        )

    def test_list_shows_the_last_reply(self) -> None:
        queue_id = self.commit("bob@example.net")
        _, envelope = self.store.load(queue_id)
        envelope.recipients[0].state = RecipientState.DEFERRED
        envelope.recipients[0].reply = "451 4.7.1 greylisted, try later"
        envelope.recipients[0].attempts = 2
        envelope.recipients[0].next_attempt = 1_700_000_600.0
        self.store.settle(envelope, "incoming", "deferred")
        code, out = self.mtactl("queue", "list")
        self.assertEqual(code, 0)
        self.assertIn("(451 4.7.1 greylisted, try later)", out)
        self.assertIn("bob@example.net [deferred, 2 attempts, next 2023-11-14 22:23:20]", out)
        self.assertIn("deferred alice@example.com", " ".join(out.split()))
        self.assertIn("(1 deferred)", out)

    def test_done_only_with_all(self) -> None:
        queue_id = self.commit()
        self.store.move(queue_id, "incoming", "done")
        self.assertEqual(self.mtactl("queue", "list"), (0, "Mail queue is empty\n"))
        code, out = self.mtactl("queue", "list", "--all", "--json")
        self.assertEqual(code, 0)
        self.assertEqual([(r["id"], r["state"]) for r in json.loads(out)], [(queue_id, "done")])

    def test_list_unreadable_envelope(self) -> None:
        broken = self.commit("bob@example.net")
        good = self.commit("carol@example.org")
        self.break_envelope("incoming", broken)
        code, out = self.mtactl("queue", "list")
        self.assertEqual(code, 0)
        self.assertIn(f"{broken}", out)
        self.assertIn("unreadable", out)
        self.assertIn("carol@example.org", out)
        code, out = self.mtactl("queue", "list", "--json")
        rows = {r["id"]: r for r in json.loads(out)}
        self.assertIn("error", rows[broken])
        self.assertNotIn("error", rows[good])

    def split_show(self, out: str) -> tuple[list[str], dict[str, object], str | None]:
        """The comment lines, the envelope document and the message part of C{show}."""
        head, sep, message = out.partition("\n# message\n")
        lines = head.split("\n")
        comments = [ln for ln in lines if ln.startswith("# ")]
        document = "\n".join(ln for ln in lines if not ln.startswith("# "))
        return comments, json.loads(document), message if sep else None

    def test_show(self) -> None:
        queue_id = self.commit("bob@example.net")
        code, out = self.mtactl("queue", "show", queue_id)
        self.assertEqual(code, 0)
        comments, envelope, message = self.split_show(out)
        self.assertIn("# state: incoming", comments)
        self.assertIn(f"# envelope: {self.store.path('incoming', queue_id)}", comments)
        self.assertEqual(envelope["id"], queue_id)
        self.assertEqual(envelope["sender"], "alice@example.com")
        self.assertEqual(message, HEADERS.decode().replace("\r\n", "\n"))
        self.assertNotIn("secret body", out)

    def test_show_body(self) -> None:
        queue_id = self.commit()
        code, out = self.mtactl("queue", "show", queue_id, "--body")
        self.assertEqual(code, 0)
        _, _, message = self.split_show(out)
        self.assertEqual(message, MESSAGE_BYTES.decode().replace("\r\n", "\n"))

    def test_show_envelope_only(self) -> None:
        queue_id = self.commit()
        code, out = self.mtactl("queue", "show", queue_id, "--envelope-only")
        self.assertEqual(code, 0)
        _, envelope, message = self.split_show(out)
        self.assertEqual(envelope["id"], queue_id)
        self.assertIsNone(message)
        self.assertNotIn("Subject", out)

    def test_show_in_another_state(self) -> None:
        queue_id = self.commit()
        self.store.move(queue_id, "incoming", "hold")
        code, out = self.mtactl("queue", "show", queue_id)
        self.assertEqual(code, 0)
        self.assertIn("# state: hold", out)
        self.assertIn("Subject: quarterly numbers", out)

    def test_show_unknown(self) -> None:
        self.commit()
        for queue_id in ("0000000000Z0000", "not-an-id", "../spool.json"):
            self.err.truncate(0)
            self.err.seek(0)
            code, out = self.mtactl("queue", "show", queue_id)
            self.assertEqual((code, out), (1, ""), queue_id)
            self.assert_one_line_error(queue_id)

    def test_show_unreadable_envelope(self) -> None:
        queue_id = self.commit()
        self.break_envelope("incoming", queue_id, b"[]")
        code, out = self.mtactl("queue", "show", queue_id)
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(queue_id)

    def test_show_missing_message_file(self) -> None:
        queue_id = self.commit()
        os.remove(self.store.path("incoming", queue_id))
        code, _ = self.mtactl("queue", "show", queue_id)
        self.assertEqual(code, 1)
        self.assert_one_line_error(queue_id)


class QueueFilterTests(QueueTests):
    """mtactl queue list filters: --state (repeatable), --domain, --sender, and an unknown state as
    a usage error. As a subclass of QueueTests it runs those tests again."""

    def test_filters(self) -> None:
        net = self.commit("bob@example.net")
        org = self.commit("carol@EXAMPLE.org")
        self.store.move(org, "incoming", "hold")

        def ids(*argv: str) -> list[str]:
            code, out = self.mtactl("queue", "list", "--json", *argv)
            self.assertEqual(code, 0)
            return [row["id"] for row in json.loads(out)]

        self.assertEqual(ids("--state", "hold"), [org])
        self.assertEqual(ids("--state", "hold", "--state", "incoming"), [net, org])
        self.assertEqual(ids("--domain", "example.org."), [org])
        self.assertEqual(ids("--sender", "ALICE@example.com"), [net, org])
        self.assertEqual(ids("--sender", "mallory@example.com"), [])
        e = self.assertRaises(SystemExit, self.mtactl, "queue", "list", "--state", "limbo")
        self.assertEqual(e.code, 2)


class OfflineActionTests(QueueTests):
    """With no daemon running, mtactl changes the spool itself, under the spool lock."""

    def deferred(self) -> str:
        queue_id = self.commit("bob@example.net")
        _, envelope = self.store.load(queue_id)
        envelope.recipients[0].state = RecipientState.DEFERRED
        envelope.recipients[0].next_attempt = 1_900_000_000.0
        self.store.settle(envelope, "incoming", "deferred", 1_900_000_000.0)
        return queue_id

    def test_hold_release(self) -> None:
        queue_id = self.deferred()
        self.assertEqual(self.mtactl("queue", "hold", queue_id), (0, f"{queue_id}: put on hold\n"))
        self.assertEqual(self.store.locate(queue_id), "hold")
        code, _ = self.mtactl("queue", "hold", queue_id)
        self.assertEqual(code, 1)
        self.assert_one_line_error(queue_id, "on hold")
        self.assertEqual(self.mtactl("queue", "release", queue_id), (0, f"{queue_id}: released\n"))
        self.assertEqual(self.store.locate(queue_id), "deferred")
        self.assertEqual(os.stat(self.store.path("deferred", queue_id)).st_mtime, 1_900_000_000.0)

    def test_delete_several_with_one_unknown(self) -> None:
        first, second = self.deferred(), self.commit()
        code, out = self.mtactl("queue", "delete", first, "0000000000Z0000", second)
        self.assertEqual(code, 1)
        self.assertEqual(out, f"{first}: deleted\n{second}: deleted\n")
        self.assert_one_line_error("no message 0000000000Z0000")
        for queue_id in (first, second):
            self.assertRaises(KeyError, self.store.locate, queue_id)

    def test_flush_rewrites_the_schedule(self) -> None:
        queue_id = self.deferred()
        code, out = self.mtactl("queue", "flush", "--all")
        self.assertEqual((code, out), (0, "flushed 1 deferred message(s)\n"))
        _, envelope = self.store.load(queue_id)
        self.assertLess(envelope.recipients[0].next_attempt, 1_900_000_000.0)
        self.assertEqual(self.mtactl("queue", "flush", "--domain", "example.org"),
                         (0, "flushed 0 deferred message(s) for example.org\n"))  # fmt: skip

    def test_flush_all_goes_past_a_corrupt_envelope(self) -> None:
        first, broken, last = self.deferred(), self.deferred(), self.deferred()
        self.break_envelope("deferred", broken)
        code, out = self.mtactl("queue", "flush", "--all")
        self.assertEqual((code, out), (1, "flushed 2 deferred message(s)\n"))
        self.assert_one_line_error(broken, "unreadable")
        for queue_id in (first, last):
            _, envelope = self.store.load(queue_id)
            self.assertLess(envelope.recipients[0].next_attempt, 1_900_000_000.0)

    def test_flush_usage(self) -> None:
        for argv in ((), ("--all", "--domain", "example.com"), ("--domain", "not a domain")):
            code, _ = self.mtactl("queue", "flush", *argv)
            self.assertEqual(code, 2, argv)

    def test_bounce_marks_failures_for_the_daemon(self) -> None:
        queue_id = self.deferred()
        code, out = self.mtactl("queue", "bounce", queue_id)
        self.assertEqual(code, 0)
        self.assertIn("the daemon sends the report when it starts", out)
        state, envelope = self.store.load(queue_id)
        self.assertEqual(state, "incoming")
        self.assertEqual(envelope.recipients[0].state, RecipientState.FAILED)
        self.assertEqual(envelope.recipients[0].dsn_status, "5.4.7")
        self.assertFalse(envelope.recipients[0].final_notified)

    def test_requeue_corrupt_needs_a_repair(self) -> None:
        queue_id = self.deferred()
        self.store.move(queue_id, "deferred", "corrupt")
        path = self.store.path("corrupt", queue_id)
        good = self.break_envelope("corrupt", queue_id)
        code, _ = self.mtactl("queue", "requeue", queue_id)
        self.assertEqual(code, 1)
        self.assert_one_line_error(queue_id, "unreadable")
        with open(path, "wb") as f:
            f.write(good)
        self.assertEqual(self.mtactl("queue", "requeue", queue_id), (0, f"{queue_id}: requeued\n"))
        self.assertEqual(self.store.locate(queue_id), "incoming")

    def test_locked_spool_without_a_daemon_answering(self) -> None:
        queue_id = self.deferred()
        lock = SpoolLock(self.store.root)
        lock.acquire()
        self.addCleanup(lock.release)
        code, _ = self.mtactl("queue", "hold", queue_id)
        self.assertEqual(code, 1)
        self.assert_one_line_error("does not answer")
        self.assertEqual(self.store.locate(queue_id), "deferred")


class NotASpoolTests(CLITestCase):
    """mtactl on a directory that is not a spool, a missing one, or a spool of another format: one
    line naming the problem, and no spool created."""

    def test_plain_directory(self) -> None:
        os.makedirs(self.spool_path)
        for argv in (("queue", "list"), ("queue", "list", "--json"), ("queue", "show", "0" * 15)):
            self.err.truncate(0)
            self.err.seek(0)
            code, out = self.mtactl(*argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assert_one_line_error(self.spool_path, "not an mta spool")
        self.assertEqual(os.listdir(self.spool_path), [], "mtactl must not create a spool")

    def test_missing_directory(self) -> None:
        code, out = self.mtactl("queue", "list")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(self.spool_path)
        self.assertFalse(os.path.exists(self.spool_path))

    def test_other_format(self) -> None:
        FileStore(self.spool_path).open()
        with open(os.path.join(self.spool_path, "spool.json"), "w") as f:
            f.write('{"format": "mta-spool/7"}\n')
        code, _ = self.mtactl("queue", "list")
        self.assertEqual(code, 1)
        self.assert_one_line_error("mta-spool/7")


class CommandLineTests(CLITestCase):
    """mtactl's own command line: a missing or broken configuration file, MTA_CONFIG from the
    environment, and usage errors exiting with status 2."""

    def test_missing_config_file(self) -> None:
        os.remove(self.config)
        code, out = self.mtactl("user", "list")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(self.config)

    def test_bad_config_file(self) -> None:
        with open(self.config, "w") as f:
            f.write("[server]\nspool = \n")
        code, _ = self.mtactl("queue", "list")
        self.assertEqual(code, 1)
        self.assert_one_line_error(self.config, "TOML")

    def test_config_from_environment(self) -> None:
        FileStore(self.spool_path).open()
        old = os.environ.get("MTA_CONFIG")

        def restore() -> None:
            if old is None:
                del os.environ["MTA_CONFIG"]
            else:
                os.environ["MTA_CONFIG"] = old

        os.environ["MTA_CONFIG"] = self.config
        self.addCleanup(restore)
        out = io.StringIO()
        self.assertEqual(main(["queue", "list"], out=out), 0)
        self.assertEqual(out.getvalue(), "Mail queue is empty\n")

    def test_usage_errors_exit_2(self) -> None:
        for argv in (
            [],
            ["bogus"],
            ["user"],
            ["queue", "show"],
            ["user", "add", "x@y", "--daily-limit", "many"],
        ):
            e = self.assertRaises(SystemExit, main, argv, io.StringIO())
            self.assertEqual(e.code, 2, argv)


class ExecutableTests(SynchronousTestCase):
    """The installed command and C{python -m mta.cli}, as real processes."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}

    def run_command(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.base,
            env=self.env,
            timeout=60,
            check=False,
        )

    def mtactl_path(self) -> str:
        path = os.path.join(os.path.dirname(sys.executable), "mtactl")
        self.assertTrue(os.access(path, os.X_OK), f"{path} is not installed")
        return path

    def test_module_help(self) -> None:
        result = self.run_command([sys.executable, "-m", "mta.cli", "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("usage: mtactl", result.stdout)

    def test_installed_help(self) -> None:
        result = self.run_command([self.mtactl_path(), "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("usage: mtactl", result.stdout)

    def test_bad_subcommand(self) -> None:
        for argv in ([self.mtactl_path(), "bogus"], [sys.executable, "-m", "mta.cli", "bogus"]):
            result = self.run_command(argv)
            self.assertEqual(result.returncode, 2, argv)
            self.assertIn("invalid choice", result.stderr)
            self.assertEqual(result.stdout, "")

    def test_real_run(self) -> None:
        spool = os.path.join(self.base, "spool")
        users = os.path.join(self.base, "users.json")
        config = os.path.join(self.base, "mta.toml")
        write_config(config, spool, users)
        FileStore(spool).open()
        mtactl = self.mtactl_path()

        result = self.run_command([mtactl, "--config", config, "queue", "list"])
        self.assertEqual((result.returncode, result.stdout), (0, "Mail queue is empty\n"))

        # Without --password-stdin a password is read from a stdin that is not a terminal.
        result = self.run_command(
            [mtactl, "--config", config, "user", "add", "dave@example.com"], stdin=PASSWORD + "\n"
        )
        self.assertEqual((result.returncode, result.stdout), (0, "added dave@example.com\n"))
        dave = UserFile(users).get("dave@example.com")
        assert dave is not None
        self.assertTrue(verify_password(dave.password, PASSWORD))

        result = self.run_command([mtactl, "--config", config, "user", "del", "erin@example.com"])
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class ClassifyTests(CLITestCase):
    """mtactl classify: how replies are classified (an unknown user bounces, a blocklist 5xx
    retries, a multi-line reply from stdin, an operator rule from the configuration), --explain
    naming the rule and what it matched (with no control characters), and bad or success replies
    refused."""

    def classify(self, *argv: str, stdin: str | None = None) -> dict[str, object]:
        code, out = self.mtactl("classify", *argv, stdin=stdin)
        self.assertEqual(code, 0)
        return dict(json.loads(out))

    def test_unknown_user_bounces(self) -> None:
        verdict = self.classify(
            "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown"
        )
        self.assertEqual(
            {k: verdict[k] for k in ("action", "category", "code", "enhanced")},
            {"action": "bounce", "category": "recipient", "code": 550, "enhanced": "5.1.1"},
        )

    def test_blocklist_on_5xx_retries(self) -> None:
        verdict = self.classify(
            "554",
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        )
        self.assertEqual((verdict["action"], verdict["category"]), ("retry", "blocklist"))

    def test_multi_line_from_stdin(self) -> None:
        verdict = self.classify(
            "-", stdin="452-4.2.2 The email account that you tried to reach is over quota.\n"
            "452 4.2.2 Please direct the recipient to the help page.\n",
        )  # fmt: skip
        self.assertEqual((verdict["action"], verdict["category"]), ("retry", "capacity"))

    def test_operator_rule_from_config(self) -> None:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write(
                '\n[[bounce.rules]]\nname = "acme"\npattern = "acme says no"\n'
                'category = "capacity"\naction = "retry"\n'
            )
        verdict = self.classify("550 5.1.1 acme says no")
        self.assertEqual((verdict["action"], verdict["rule"]), ("retry", "acme"))

    def test_explain_names_the_built_in_rule_and_what_it_matched(self) -> None:
        code, out = self.mtactl(
            "classify",
            "--explain",
            "421 4.7.28 Gmail has detected an unusual rate of email. To protect our users from "
            "spam, email has been temporarily rate limited.",
        )
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(lines[1], "verdict: retry, category rate")
        self.assertRegex(lines[2], r"^rule: rate-limited \(built-in rule \d+ of \d+, ")
        self.assertEqual(lines[3], "  pattern /\\brate[ -]limited\\b/ found 'rate limited'")
        self.assertEqual(lines[-2], "action: retry, as the rule says")
        self.assertEqual(
            lines[-1],
            "shaping: rule gmail-rate-limited (Gmail) (built-in, mta.queue.shaping_rules."
            "DEFAULT_RULES): the destination's concurrency x0.5, its rate x0.5, for at least 300 s",
        )

    def test_explain_names_the_operator_rule_and_its_configuration_entry(self) -> None:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write(
                '\n[[bounce.rules]]\nname = "acme"\npattern = "acme says no"\n'
                'category = "capacity"\naction = "retry"\n'
            )
        code, out = self.mtactl("classify", "--explain", "550 5.1.1 acme says no")
        self.assertEqual(code, 0)
        self.assertIn(
            f"rule: acme (operator rule 1 of 1, {self.config}, [[bounce.rules]] #1)\n"
            "  pattern /acme says no/ found 'acme says no'\n"
            "action: retry, as the rule says\n",
            out,
        )

    def test_explain_when_no_rule_matches(self) -> None:
        code, out = self.mtactl("classify", "--explain", "-", stdin="554 nothing we know\n")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines()[1:],
            [
                "verdict: bounce, category other",
                f"rule: none of the {len(DEFAULT_RULES)} rules matched",
                "action: bounce: the reply code decides (a 5xx is permanent)",
                "shaping: no rule matches: not a traffic-shaping signal",
            ],
        )

    def test_explain_prints_no_control_characters(self) -> None:
        code, out = self.mtactl("classify", "--explain", "550 5.1.1 user unknown \x1b[31mred")
        self.assertEqual(code, 0)
        self.assertNotIn("\x1b", out)

    def test_bad_reply_is_a_usage_error(self) -> None:
        code, out = self.mtactl("classify", "no code here")
        self.assertEqual((code, out), (2, ""))
        self.assert_one_line_error("3-digit")

    def test_success_reply_is_refused(self) -> None:
        code, _ = self.mtactl("classify", "250 2.0.0 Ok")
        self.assertEqual(code, 2)
        self.assert_one_line_error("success")


class JournalTests(SpoolTestCase):
    """A daemon killed after a delivery, before it filed it: the journal says so."""

    def killed_after_delivery(self) -> str:
        queue_id = self.commit("bob@example.net", "carol@example.org")
        carol = Recipient("carol@example.org", state=RecipientState.SENT, attempts=1,
                          last_attempt=1_700_000_060.0, reply="250 2.0.0 Ok",
                          dsn_status="2.0.0", relay="mx[x]:25")  # fmt: skip
        line = journal.line(ProgressRecord(queue_id, 1, carol))
        with open(os.path.join(journal.directory(self.store.root), "progress-1.log"), "wb") as f:
            f.write(line)
        return queue_id

    def test_list_shows_what_the_journal_says(self) -> None:
        queue_id = self.killed_after_delivery()
        code, out = self.mtactl("queue", "list")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(lines[1].split()[4], "incoming")
        self.assertEqual(lines[2].split(), ["bob@example.net", "[pending]"])
        self.assertEqual(lines[3].split(), ["carol@example.org", "[sent,", "1", "attempt]"])
        (row,) = json.loads(self.mtactl("queue", "list", "--json")[1])
        self.assertEqual([r["state"] for r in row["recipients"]], ["pending", "sent"])
        # Only reading: the envelope and the journal stay as they are.
        _, envelope = self.store.load(queue_id)
        self.assertEqual(envelope.recipients[1].state, RecipientState.PENDING)
        self.assertEqual(len(journal.segments(journal.directory(self.store.root))), 1)

    def test_show_says_what_the_journal_says(self) -> None:
        queue_id = self.killed_after_delivery()
        code, out = self.mtactl("queue", "show", queue_id, "--envelope-only")
        self.assertEqual(code, 0)
        self.assertIn(
            "# journal: carol@example.org sent at 2023-11-14T22:14:20.000000Z (250 2.0.0 Ok), "
            "not yet in the message file\n",
            out,
        )

    def test_offline_action_applies_the_journal_first(self) -> None:
        queue_id = self.killed_after_delivery()
        code, _ = self.mtactl("queue", "bounce", queue_id)
        self.assertEqual(code, 0)
        _, envelope = self.store.load(queue_id)
        # Only bob is bounced; carol was delivered, and stays so.
        self.assertEqual(
            [r.state for r in envelope.recipients], [RecipientState.FAILED, RecipientState.SENT]
        )
        self.assertEqual(journal.segments(journal.directory(self.store.root)), [])

    def test_offline_action_refused_while_the_journal_cannot_be_applied(self) -> None:
        queue_id = self.killed_after_delivery()
        self.store.ops = FailingOps("append", errno.ENOSPC)
        self.patch(cli, "_store", lambda config: self.store)
        code, _ = self.mtactl("queue", "hold", queue_id)
        self.assertEqual(code, 1)
        self.assert_one_line_error("journal", "only delete")
        self.assertEqual(self.store.locate(queue_id), "incoming")
        # Delete does not need it (and may be what frees the disk).
        self.assertEqual(self.mtactl("queue", "delete", queue_id), (0, f"{queue_id}: deleted\n"))
