"""Security review of the submission path: demonstrations of real problems.

Every test marked C{xfail(strict=True)} shows a bug that exists today; when
the bug is fixed the test passes and strict xfail turns that into a failure,
so the mark must be removed together with the fix.  The unmarked tests pin
down behaviour that the review checked and found right.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import time
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mta.config import parse
from mta.service import MTAService
from mta.smtp.auth import UserFileChecker
from mta.smtp.dataread import DataReader
from mta.smtp.message import MessageBuilder, TraceInfo
from mta.smtp.server import SubmissionFactory, SubmissionSession, _Refuse
from mta.spool.fs import FileStore, Spool
from mta.spool.queueid import QueueIdGenerator
from mta.testing import FAST_HASHER, run_inline, write_users
from mta.users import User, UserFile
from tests.support import LOGIN, Client, Harness, plain

RCPT = "someone@example.net"


def _fs_harness(directory: str) -> tuple[Harness, FileStore]:
    """A Harness whose sessions write to a real on-disk spool."""
    h = Harness(directory)
    store = FileStore(os.path.join(directory, "spool"))
    store.open()
    h.use(spool=Spool(store, run_inline, QueueIdGenerator(h.clock.seconds)))
    return h, store


def _send_message(c: Client, message: bytes) -> tuple[int, str]:
    c.send(f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n")
    c.send(message + b".\r\n")
    return c.replies()[-1]


# -- 1. Hostile From: values crash or stall the header parser ----------------

# 2700 nested "(" over three folded lines: deeper than Python's recursion
# limit in email._header_value_parser.
NESTED_COMMENTS = b"From: " + b"\r\n ".join([b"(" * 900] * 3) + b"\r\n"
# email._header_value_parser raises AttributeError on an unclosed literal.
UNCLOSED_LITERAL = b"From: a@[xxxx\r\n"


@pytest.mark.parametrize("field", [NESTED_COMMENTS, UNCLOSED_LITERAL], ids=["nested", "literal"])
def test_unparseable_from_is_refused_and_leaks_nothing(tmp_path: Any, field: bytes) -> None:
    h, store = _fs_harness(str(tmp_path))
    c = h.connect()
    c.login()
    # Header section only (no empty line): parsed at the end of data.
    code, text = _send_message(c, field)
    assert (code, text[:5]) == (550, "5.6.0")
    assert os.listdir(store.path("tmp")) == []


def test_unparseable_from_inside_data_gets_a_reply(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    c = h.connect()
    c.login()
    code, _ = _send_message(c, NESTED_COMMENTS + b"\r\nbody\r\n")
    assert code == 550


def test_from_parsing_is_not_quadratic() -> None:
    # 60 folded lines of '"' (59 kB): ~5 s today; 1 MB would be ~1300 s.
    value = b"\r\n ".join([b'"' * 990] * 60)
    builder = _builder()
    start = time.monotonic()
    builder.write(b"From: " + value + b"\r\n\r\n")
    assert builder.error is not None
    assert time.monotonic() - start < 1.0


# -- 2. Header section accumulation is quadratic -----------------------------


def _builder() -> MessageBuilder:
    trace = TraceInfo("mx.test", "QID", "client.test", "192.0.2.1", None, False, (RCPT,), 0.0)
    return MessageBuilder(
        trace, None, lambda data: None, max_received=25, max_header_size=1024 * 1024
    )


def test_header_accumulation_is_linear() -> None:
    builder = _builder()
    start = time.monotonic()
    # 1 MB in 8-byte lines: 1.5-16 s today (malloc state), ~0.15 s if linear.
    for _ in range(131000):
        builder.write(b"X-A: b\r\n")
    assert time.monotonic() - start < 0.75


# -- 3. Non-UTF-8 Message-ID breaks the commit and leaks the transaction ------


def test_message_id_with_8bit_garbage(tmp_path: Any) -> None:
    h, store = _fs_harness(str(tmp_path))
    c = h.connect()
    c.login()
    code, _ = _send_message(
        c, f"From: {LOGIN}\r\nMessage-ID: <\xff@x>\r\n\r\nhi\r\n".encode("latin-1")
    )
    assert os.listdir(store.path("tmp")) == []
    assert code == 250


# -- 4. Sender alignment -----------------------------------------------------


def _users_with(tmp_path: Any, **users: User) -> UserFile:
    uf = UserFile(os.path.join(str(tmp_path), "u.json"))
    with uf.editing() as table:
        for user in users.values():
            table[user.email] = user
    return uf


def test_login_with_plus_may_not_send_as_its_base_address() -> None:
    user = User("team+billing@example.com", "x")
    assert user.may_send_as("team+billing+2024@example.com")
    assert not user.may_send_as("team@example.com")
    assert not user.may_send_as("team+ceo@example.com")


def test_unicode_case_folding_does_not_align_other_addresses() -> None:
    assert not User("kate@example.com", "x").may_send_as("\u212aate@example.com")
    assert not User("a@x.org", "x", domains=["kiosk.example"]).may_send_as("x@\u212aiosk.example")


def test_from_header_tricks_are_refused(tmp_path: Any) -> None:
    """Checked and fine: the From tricks of "Composition Kills" (USENIX 2020)."""
    h = Harness(str(tmp_path))
    c = h.connect()
    c.login()
    for value in [
        b"victim@bank.example <alice@example.com>",
        b"<alice@example.com> <victim@bank.example>",
        b"<alice@example.com>, victim@bank.example",
        b"alice@example.com\x00<victim@bank.example>",
        b"alice@example.com\r\n <victim@bank.example>",
        b"g: alice@example.com;",
        b"=?utf-8?q?alice=40example.com?=",
        b'"alice@example.com"@bank.example',
    ]:
        code, _ = _send_message(c, b"From: " + value + b"\r\n\r\nx\r\n")
        assert code == 550, value
    for header in [b"From: a@example.com\r\nFrom : victim@bank.example\r\n",
                   b"From: a@example.com\r\nfROM:victim@bank.example\r\n"]:  # fmt: skip
        code, _ = _send_message(c, header + b"\r\nx\r\n")
        assert code == 550, header


# -- 5. AUTH: a repeated wrong password costs argon2 every time ---------------


def test_repeated_wrong_password_does_not_cost_a_hash_each_time(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    inner = h.settings.auth.checker
    calls = []

    class Counting:
        credentialInterfaces = UserFileChecker.credentialInterfaces

        def requestAvatarId(self, credentials: Any) -> Any:
            calls.append(credentials.username)
            return inner.requestAvatarId(credentials)

    h.use_checker(Counting())
    attempts = 50
    for _ in range(attempts // 10):
        c = h.connect()
        c.replies()
        c.command("EHLO client.test")
        for _ in range(10):
            c.send(f"AUTH PLAIN {plain(LOGIN, 'the same wrong password')}\r\n")
            h.clock.advance(60)
        c.replies()
    assert len(calls) <= h.config.auth.max_failures


# -- 6. Connection limit per client ---------------------------------------


def test_ipv6_connection_limit_is_per_prefix(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    factory = SubmissionFactory(h.settings, implicit_tls=True)
    limit = h.config.limits.connections_per_ip
    protocols = [
        factory.buildProtocol(IPv6Address("TCP", f"2001:db8:1:2::{i + 1:x}", 40000))
        for i in range(limit + 1)
    ]
    assert isinstance(protocols[-1], _Refuse)


# -- 7. Replies to a client that does not read are buffered without bound -----


class OutputBuffer(TestCase):
    """A client that floods commands and never reads its replies, on a real socket: the server's
    output buffer stays bounded by flow control alone (the junk-command limit set out of reach)."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[no-untyped-call]
        os.makedirs(self.dir)
        write_users(os.path.join(self.dir, "users.json"), {LOGIN: "irrelevant password"})
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {"submissions": [], "submission": "tcp:0:interface=127.0.0.1"},
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": 9, "dns_timeout": 1},
            "routes": {"*": "[127.0.0.1]:9"},
            # Not the junk-command limit: flow control alone must bound this.
            "limits": {"junk_commands": 1_000_000_000},
        }
        self.service = MTAService(parse(doc, "test.toml", self.dir), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.ports[0].getHost().port  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_output_buffer_is_bounded(self) -> Any:
        def flood() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", self.port))
            s.settimeout(3)
            chunk = b"EHLO x\r\n" * 8192
            try:
                for _ in range(64):  # 4 MB
                    s.sendall(chunk)
            except OSError:  # the send blocked (timeout) or the server hung up
                pass
            return s

        s = yield deferToThread(flood)
        self.addCleanup(s.close)
        yield deferLater(reactor, 0.5, lambda: None)
        buffered = 0
        for obj in gc.get_objects():
            if not isinstance(obj, SubmissionSession):
                continue
            t: Any = obj.transport
            if hasattr(t, "dataBuffer"):
                buffered = max(buffered, len(t.dataBuffer) + sum(map(len, t._tempDataBuffer)))
        assert buffered < 4 * 1024 * 1024, buffered


# -- 8. Small robustness bugs -------------------------------------------------


def test_size_with_superscript_digit(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    c = h.connect()
    c.login()
    assert c.command(f"MAIL FROM:<{LOGIN}> SMTPUTF8 SIZE=\u00b2")[0] == 501


def test_received_is_ascii_for_non_smtputf8_messages(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    c = h.connect()
    c.replies()
    c.command("EHLO b\u00fccher-pc")
    c.command(f"AUTH PLAIN {plain(LOGIN, 'correct horse battery')}")
    code, _ = _send_message(c, f"From: {LOGIN}\r\n\r\nhi\r\n".encode())
    assert code == 250
    [(_, _, data)] = h.spool.messages.values()
    assert data.isascii()


def test_daily_limit_is_enforced(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    users = _users_with(
        tmp_path, a=User(LOGIN, FAST_HASHER.hash("correct horse battery"), daily_limit=1)
    )
    h.use_users(users)
    c = h.connect()
    c.login()
    assert _send_message(c, f"From: {LOGIN}\r\n\r\nhi\r\n".encode())[0] == 250
    c.send(f"MAIL FROM:<{LOGIN}>\r\n")
    assert 400 <= c.replies()[-1][0] < 500


# -- Checked and fine ---------------------------------------------------------


def test_data_reader_matches_a_strict_reference_under_any_chunking() -> None:
    """End of data only at CRLF.CRLF; bare CR/LF refused when so configured;
    same at every split."""
    pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"..", b".\r\n"]
    rng = random.Random(5)
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) + b"\r\n.\r\nT"
        e = 0 if data.startswith(b".\r\n") else data.find(b"\r\n.\r\n") + 2
        lines = data[:e].split(b"\r\n")[:-1] if e else []
        bare = any(b"\r" in ln or b"\n" in ln for ln in lines)
        expect_body = b"".join((ln[1:] if ln[:1] == b"." else ln) + b"\r\n" for ln in lines)
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9, bare_newline="reject")
        pos, rest = 0, None
        while rest is None:
            n = rng.randint(1, 4)
            rest = reader.feed(data[pos : pos + n])
            pos += n
        assert rest + data[pos:] == data[e + 3 :]
        assert (reader.error is not None) == bare, data
        if not bare:
            assert b"".join(out) == expect_body


def test_normalizing_data_reader_matches_a_reference_under_any_chunking() -> None:
    """The default (bare LF stored as CRLF): the end of data is still only a
    dot line with CRLF after a line with CRLF; bare CR refused; same at every
    split.  The reference reads line by line, the reader in blocks."""
    pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"..", b".\r\n"]
    rng = random.Random(6)
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) + b"\r\n.\r\nT"
        lines, pos, after_crlf = [], 0, True
        while True:
            lf = data.index(b"\n", pos)
            raw, pos = data[pos : lf + 1], lf + 1
            text = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if text == b"." and raw.endswith(b"\r\n") and after_crlf:
                break
            lines.append(text)
            after_crlf = raw.endswith(b"\r\n")
        end = pos
        bare_cr = any(b"\r" in ln for ln in lines)
        expect_body = b"".join(
            (ln[1:] if ln[:1] == b"." and ln != b"." else ln) + b"\r\n" for ln in lines
        )
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9)
        pos, rest = 0, None
        while rest is None:
            n = rng.randint(1, 4)
            rest = reader.feed(data[pos : pos + n])
            pos += n
        assert rest + data[pos:] == data[end:], data
        assert (reader.error is not None) == bare_cr, data
        if not bare_cr:
            assert b"".join(out) == expect_body, data
