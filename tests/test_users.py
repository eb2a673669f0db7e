"""The users file (L{mta.users}): format, cache, lookups, sender rights, passwords."""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from mta.errors import ConfigError
from mta.testing import FAST_HASHER, write_users
from mta.users import FORMAT, User, UserFile, hash_password, verify_password


def new_path(case: SynchronousTestCase) -> str:
    """A users file path in a fresh directory."""
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    return os.path.join(directory, "users.json")


def read_json(path: str) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class EditingTests(SynchronousTestCase):
    """UserFile.editing: a private (0600), versioned JSON file, round trips, the existing users seen
    while editing, nothing written after an error inside, mode 0600 even over a stale temporary
    file, and a missing file as no users."""

    def setUp(self) -> None:
        self.path = new_path(self)

    def test_writes_private_versioned_json(self) -> None:
        hashed = FAST_HASHER.hash("correct horse")
        with UserFile(self.path).editing() as users:
            self.assertEqual(users, {})
            users["alice@example.com"] = User(
                "alice@example.com",
                hashed,
                aliases=["sales@example.com"],
                domains=["example.org"],
                daily_limit=500,
            )
            users["bob@example.com"] = User("bob@example.com", hashed)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(
            read_json(self.path),
            {
                "format": FORMAT,
                "users": {
                    "alice@example.com": {
                        "password": hashed,
                        "aliases": ["sales@example.com"],
                        "domains": ["example.org"],
                        "daily_limit": 500,
                    },
                    "bob@example.com": {"password": hashed},
                },
            },
        )
        self.assertEqual(FORMAT, "mta-users/1")
        self.assertFalse(os.path.exists(self.path + ".tmp"))

    def test_round_trip(self) -> None:
        write_users(
            self.path,
            {"alice@example.com": "pw-alice-1"},
            aliases={"alice@example.com": ["a@example.com"]},
            domains={"alice@example.com": ["example.org"]},
        )
        user = UserFile(self.path).get("alice@example.com")
        assert user is not None
        self.assertEqual(user.email, "alice@example.com")
        self.assertEqual(user.aliases, ["a@example.com"])
        self.assertEqual(user.domains, ["example.org"])
        self.assertIsNone(user.daily_limit)
        self.assertTrue(verify_password(user.password, "pw-alice-1"))

    def test_editing_sees_existing_users(self) -> None:
        write_users(self.path, {"alice@example.com": "pw-alice-1"})
        with UserFile(self.path).editing() as users:
            self.assertEqual(list(users), ["alice@example.com"])
            del users["alice@example.com"]
        self.assertEqual(read_json(self.path), {"format": FORMAT, "users": {}})

    def test_error_inside_editing_writes_nothing(self) -> None:
        write_users(self.path, {"alice@example.com": "pw-alice-1"})
        with open(self.path, "rb") as f:
            before = f.read()

        def edit() -> None:
            with UserFile(self.path).editing() as users:
                users.clear()
                raise ValueError("changed my mind")

        self.assertRaises(ValueError, edit)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_mode_is_0600_even_over_a_stale_temporary_file(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            f.write("left over\n")
        os.chmod(self.path + ".tmp", 0o644)
        write_users(self.path, {"alice@example.com": "pw-alice-1"})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_missing_file_is_empty(self) -> None:
        users = UserFile(self.path)
        self.assertEqual(users.users(), {})
        self.assertIsNone(users.get("alice@example.com"))
        self.assertFalse(os.path.exists(self.path))


class CacheTests(SynchronousTestCase):
    """The users file cache: users added or removed by another writer seen, the file disappearing
    seen, and the cache following the file's status."""

    def setUp(self) -> None:
        self.path = new_path(self)
        write_users(self.path, {"alice@example.com": "pw-alice-1"})

    def test_sees_users_added_by_another_writer(self) -> None:
        reader = UserFile(self.path)
        self.assertIsNone(reader.get("bob@example.com"))
        write_users(self.path, {"bob@example.com": "pw-bob-12"})
        self.assertIsNotNone(reader.get("bob@example.com"))

    def test_sees_users_removed_by_another_writer(self) -> None:
        reader = UserFile(self.path)
        self.assertIsNotNone(reader.get("alice@example.com"))
        with UserFile(self.path).editing() as users:
            del users["alice@example.com"]
        self.assertIsNone(reader.get("alice@example.com"))

    def test_sees_the_file_disappear(self) -> None:
        reader = UserFile(self.path)
        self.assertIsNotNone(reader.get("alice@example.com"))
        os.remove(self.path)
        self.assertEqual(reader.users(), {})

    def test_cache_follows_the_file_status(self) -> None:
        reader = UserFile(self.path)
        old = reader.get("alice@example.com")
        assert old is not None
        new_hash = FAST_HASHER.hash("pw-alice-2")
        self.assertEqual(len(new_hash), len(old.password))
        st = os.stat(self.path)
        with open(self.path, "rb") as f:
            data = f.read()
        # Rewrite in place: same inode, same size, same mtime: not re-read.
        with open(self.path, "r+b") as f:
            f.write(data.replace(old.password.encode(), new_hash.encode()))
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        cached = reader.get("alice@example.com")
        assert cached is not None
        self.assertEqual(cached.password, old.password)
        # A new modification time is a change: re-read.
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        fresh = reader.get("alice@example.com")
        assert fresh is not None
        self.assertEqual(fresh.password, new_hash)


class LookupTests(SynchronousTestCase):
    """get() ignores case and surrounding spaces in the login."""

    def test_get_ignores_case_and_spaces(self) -> None:
        path = new_path(self)
        write_users(path, {"Alice@Example.COM": "pw-alice-1"})
        users = UserFile(path)
        for login in ("alice@example.com", "ALICE@EXAMPLE.COM", " Alice@example.com\n"):
            user = users.get(login)
            assert user is not None, login
            self.assertEqual(user.email, "Alice@Example.COM")
        self.assertIsNone(users.get("alice@example.org"))
        self.assertIsNone(users.get("alic@example.com"))
        self.assertEqual(list(users.users()), ["alice@example.com"])


class MaySendAsTests(SynchronousTestCase):
    """Sender alignment (User.may_send_as): the login itself, with a +tag, an alias, an address in
    one of its domains, and nobody else's; no rights beyond the login without aliases or domains."""

    def setUp(self) -> None:
        self.user = User(
            "Alice@Example.com",
            "hash",
            aliases=["sales@example.com"],
            domains=["Example.ORG"],
        )

    def test_login(self) -> None:
        self.assertTrue(self.user.may_send_as("alice@example.com"))
        self.assertTrue(self.user.may_send_as("ALICE@EXAMPLE.COM"))

    def test_plus_tag(self) -> None:
        self.assertTrue(self.user.may_send_as("alice+news@example.com"))
        self.assertTrue(self.user.may_send_as("sales+2024@example.com"))

    def test_alias(self) -> None:
        self.assertTrue(self.user.may_send_as("sales@example.com"))
        self.assertTrue(self.user.may_send_as("Sales@EXAMPLE.com"))

    def test_domain(self) -> None:
        self.assertTrue(self.user.may_send_as("anyone@example.org"))
        self.assertTrue(self.user.may_send_as("Someone.Else@EXAMPLE.ORG"))

    def test_not_others(self) -> None:
        for address in (
            "bob@example.com",  # same domain, no right to it
            "alice@example.net",
            "alice@example.com.evil.test",
            "alice@sub.example.com",
            "anyone@sub.example.org",  # a granted domain does not cover subdomains
            "anyone@example.org.evil.test",
            "anyone@notexample.org",
            "salesx@example.com",
            "presales@example.com",  # an alias is a whole address, not a suffix
            "xalice@example.com",
            "",
        ):
            self.assertFalse(self.user.may_send_as(address), address)

    def test_no_rights_beyond_login(self) -> None:
        plain = User("carol@example.com", "hash")
        self.assertTrue(plain.may_send_as("carol@example.com"))
        self.assertFalse(plain.may_send_as("sales@example.com"))
        self.assertFalse(plain.may_send_as("x@example.com"))


class BadFileTests(SynchronousTestCase):
    """Users files that are refused with an error naming the file: not JSON or not UTF-8, empty, not
    an object, a wrong or missing format, users not an object, a user without a password or with
    one that is not a string, bad aliases, domains or daily limits (and good daily limits
    accepted); editing refuses a bad file too."""

    def setUp(self) -> None:
        self.path = new_path(self)

    def assert_rejected(self, content: bytes, *words: str) -> None:
        with open(self.path, "wb") as f:
            f.write(content)
        users = UserFile(self.path)
        e = self.assertRaises(ConfigError, users.users)
        self.assertIn(self.path, str(e))
        for word in words:
            self.assertIn(word, str(e))
        self.assertNotIn("\n", str(e))
        self.assertRaises(ConfigError, users.get, "alice@example.com")

    def with_user(self, user: object) -> bytes:
        doc = {"format": FORMAT, "users": {"alice@example.com": user}}
        return json.dumps(doc).encode()

    def test_not_json(self) -> None:
        self.assert_rejected(b"{this is not json")

    def test_not_utf8(self) -> None:
        self.assert_rejected(b'{"format": "mta-users/1", "users": {"\xff": {}}}')

    def test_empty_file(self) -> None:
        self.assert_rejected(b"")

    def test_not_an_object(self) -> None:
        self.assert_rejected(b'["mta-users/1"]', FORMAT)

    def test_wrong_format(self) -> None:
        self.assert_rejected(b'{"format": "mta-users/2", "users": {}}', FORMAT)

    def test_no_format(self) -> None:
        self.assert_rejected(b'{"users": {}}', FORMAT)

    def test_users_not_an_object(self) -> None:
        self.assert_rejected(b'{"format": "mta-users/1", "users": []}', "users")

    def test_user_without_password(self) -> None:
        self.assert_rejected(self.with_user({"aliases": []}), "alice@example.com", "password")

    def test_password_not_a_string(self) -> None:
        self.assert_rejected(self.with_user({"password": 12345}), "alice@example.com")

    def test_user_not_an_object(self) -> None:
        self.assert_rejected(self.with_user("$argon2id$..."), "alice@example.com")

    def test_bad_aliases(self) -> None:
        for aliases in ("sales@example.com", ["ok@example.com", 7], {"a": "b"}):
            self.assert_rejected(
                self.with_user({"password": "h", "aliases": aliases}),
                "alice@example.com",
                "aliases",
            )

    def test_bad_domains(self) -> None:
        for domains in ("example.org", [None]):
            self.assert_rejected(
                self.with_user({"password": "h", "domains": domains}),
                "alice@example.com",
                "domains",
            )

    def test_bad_daily_limit(self) -> None:
        for limit in ("100", -1, True, 1.5, [10]):
            self.assert_rejected(
                self.with_user({"password": "h", "daily_limit": limit}),
                "alice@example.com",
                "daily_limit",
            )

    def test_good_daily_limits(self) -> None:
        for limit in (0, 1, None):
            with open(self.path, "wb") as f:
                f.write(self.with_user({"password": "h", "daily_limit": limit}))
            user = UserFile(self.path).get("alice@example.com")
            assert user is not None
            self.assertEqual(user.daily_limit, limit)

    def test_editing_refuses_a_bad_file(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"garbage")

        def edit() -> None:
            with UserFile(self.path).editing() as users:
                users["x@example.com"] = User("x@example.com", "h")

        self.assertRaises(ConfigError, edit)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")


class PasswordTests(SynchronousTestCase):
    """Password hashes: verify, hash_password with a given hasher, and a garbage hash that is simply
    false."""

    def test_verify(self) -> None:
        stored = FAST_HASHER.hash("correct horse")
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horsE"))
        self.assertFalse(verify_password(stored, ""))

    def test_hash_password_with_a_hasher(self) -> None:
        stored = hash_password("pässwörd-1", FAST_HASHER)
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertNotIn("pässwörd", stored)
        self.assertTrue(verify_password(stored, "pässwörd-1"))
        self.assertFalse(verify_password(stored, "passwort-1"))
        self.assertNotEqual(stored, hash_password("pässwörd-1", FAST_HASHER), "salted")

    def test_garbage_hash_is_false(self) -> None:
        good = FAST_HASHER.hash("pw")
        for stored in (
            "",
            "not a hash",
            "pw",
            "$2b$12$abcdefghijklmnopqrstuuJ6Yxv0Y6vZ4Vz2i5rC0lE1G8tV7xO2",  # bcrypt-like
            good[:-10],
            good.replace("$argon2id$", "$argon2x$"),
            "$argon2id$v=19$m=64,t=1,p=1$!!!$!!!",
        ):
            self.assertFalse(verify_password(stored, "pw"), stored)
