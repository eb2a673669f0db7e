"""A fuzz target for the submission server's command and DATA parsing.

A Hypothesis state machine drives three sessions of the real
L{SubmissionSession} (on StringTransports, with a Clock and an in-memory
spool) with the same bytes: whole, in random chunks, and one octet at a
time.  The bytes are command lines from an SMTP-shaped alphabet with
every kind of line end, raw binary, over-long lines, logins, and whole
transactions whose bodies are built from the pieces SMTP smuggling is
made of.  After every step:

  - the three sessions said exactly the same (chunking changes nothing);
  - everything written is well-formed SMTP replies: CRLF-terminated lines
    of printable ASCII, a code 2xx-5xx, continuation lines with one code;
  - no internal error (451 4.3.0, or a logged failure, which trial turns
    into an error) and no exception out of C{dataReceived};
  - every "queued as" reply names a message committed to the spool and
    every committed message had one: at most one message per DATA;
  - for a transaction the machine knows it started, the message is
    committed if and only if its content has no bare CR, NUL or
    over-long line, and then its stored bytes are the dot-unstuffed input
    with every line ending in CRLF (bare LF normalized) after one
    Received: field; nothing after a false end of data (a smuggling
    attempt) is ever taken as a command;
  - a message sent in BDAT chunks (RFC 3030) cut at random points gets
    one reply per chunk, the last one C{250} exactly when a line-by-line
    model takes the message (no dot-unstuffing, bare LF normalized), and
    is then stored as the model says; once a chunk fails, every later
    chunk gets the same reply;
  - when a session is closed, every spool transaction it opened was
    committed or aborted.

Bounded for CI: C{FUZZ_EXAMPLES} examples (default 1000) of at most 25
steps, no deadline: about 20 seconds.  Set the
environment variable C{MTA_FUZZ_EXAMPLES} to run longer.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from mta.smtp.dataread import MAX_LINE
from mta.spool.memory import MemorySpool
from mta.spool.queueid import PATTERN as QUEUE_ID
from tests.support import LOGIN, PASSWORD, Client, Harness, plain

FUZZ_EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "1000"))

# RFC 5321 textstring (HT, printable ASCII), and UTF-8 (RFC 6531): the
# server echoes addresses and parameters, which may be UTF-8.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])((?:[\t\x20-\x7e]|[\x80-\xff])*)")
_QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as (" + QUEUE_ID.pattern.encode() + rb")\r\n")

# -- the alphabet ----------------------------------------------------------------

VERBS = [
    "EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "QUIT", "HELP",
    "VRFY", "EXPN", "BDAT 10", "STARTTLS", "AUTH PLAIN", "AUTH LOGIN", "AUTH CRAM-MD5",
    "ehlo", "mail from:", "Rcpt To:", "GET / HTTP/1.0", "", ".",
]  # fmt: skip
ARGS = [
    "", " ", " client.test", f"<{LOGIN}>", "<someone@example.net>", "<>", " SIZE=100",
    " SIZE=99999999999", " BODY=8BITMIME", " BODY=7BIT", " SMTPUTF8", " RET=HDRS",
    " NOTIFY=SUCCESS,FAILURE", " ORCPT=rfc822;a@b", " ENVID=x+2Bz", " FOO=bar",
    "<a@b@c>", "no-brackets@example.net", "<@relay.example:u@example.net>",
    "<host!user>", "<u%example.net@localhost>", '<"q u"@example.net>', "<" + "l" * 65 + "@x.net>",
    f" {plain(LOGIN, PASSWORD)}", f" {plain(LOGIN, 'wrong')}", " *", " =", " !!!",
    " dXNlcg==", "\x00", "é", "<ü@example.net>", "\t", "\x7f", " " + "x" * 600,
]  # fmt: skip
ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r"]

command_line = st.builds(
    lambda verb, args, end: (verb + "".join(args)).encode() + end,
    st.sampled_from(VERBS),
    st.lists(st.sampled_from(ARGS), max_size=3),
    st.sampled_from(ENDS),
)
long_line = st.builds(
    lambda n, end: b"NOOP " + b"a" * n + end,
    st.sampled_from([500, 505, 506, 507, 1000, 12_280, 12_300, 20_000]),
    st.sampled_from(ENDS),
)
step_bytes = st.one_of(
    st.lists(command_line, min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=60),
    long_line,
)

BODY_PIECES = [
    b"text", b"\r\n", b"\r\n", b".", b"..", b"\r\n.", b"\r\n..", b"\n", b"\r", b"\x00",
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r\n\x00.\r\n",
    b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n",
    b"\r\n.\r\nNOOP\r\n", b"\xc3\xa9", b"\xff", b" ", b"Subject: x\r\n", b"x" * 998,
    b"y" * 999, b"\r\n\r\n", b"QUIT\r\n",
]  # fmt: skip
body = st.lists(st.sampled_from(BODY_PIECES), max_size=12).map(b"".join)

HEADER = (
    f"From: <{LOGIN}>\r\nTo: <someone@example.net>\r\nSubject: fuzz\r\n"
    "Message-ID: <fuzz@example.com>\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n\r\n"
).encode()


def data_outcome(stream: bytes) -> tuple[bytes | None, bytes]:
    """What a strict reader makes of the bytes after 354 (with the default
    C{bare_newline = "normalize"}): (message or None if refused, the bytes
    after the end of data).  Assumes the end is in C{stream}.

    Written line by line, unlike the reader: a line ends at LF; the end
    is a line "." that ends in CRLF after a line that ended in CRLF; a
    line that ended in a bare LF is stored with CRLF; a bare CR, a NUL or
    an over-long line refuses the message; a line of one dot that is not
    the end is kept, other lines lose one leading dot."""
    lines: list[bytes] = []
    pos, after_crlf = 0, True
    while True:
        lf = stream.index(b"\n", pos)
        raw, pos = stream[pos : lf + 1], lf + 1
        crlf = raw.endswith(b"\r\n")
        text = raw[:-2] if crlf else raw[:-1]
        if text == b"." and crlf and after_crlf:
            break
        lines.append(text)
        after_crlf = crlf
    rest = stream[pos:]
    out = []
    for text in lines:
        if b"\r" in text or b"\x00" in text:
            return None, rest
        line = text[1:] if text.startswith(b".") and text != b"." else text
        if len(line) > MAX_LINE - 2:
            return None, rest
        out.append(line + b"\r\n")
    return b"".join(out), rest


def chunks_outcome(message: bytes) -> bytes | None:
    """What BDAT makes of a message (RFC 3030: no end marker, no dot-stuffing):
    None if refused, else the stored form, every line ending in CRLF."""
    lines = message.split(b"\n")
    unterminated = lines.pop()  # "" when the message ends in LF
    ended = [(line, True) for line in lines] + ([(unterminated, False)] if unterminated else [])
    out = []
    for line, lf in ended:
        # Only a CR that an LF follows is half of a line end.
        text = line[:-1] if lf and line.endswith(b"\r") else line
        if b"\r" in text or b"\x00" in text or len(text) > MAX_LINE - 2:
            return None
        out.append(text + b"\r\n")
    return b"".join(out)


def normalized(data: bytes) -> bytes:
    """Output with queue IDs (random in part) and their time stamps made equal."""
    return QUEUE_ID.sub("Q", data.decode("latin-1")).encode("latin-1")


def check_replies(output: bytes) -> list[tuple[int, str]]:
    """Parse everything a session wrote; fail on anything that is not a reply."""
    assert output == b"" or output.endswith(b"\r\n"), output[-80:]
    replies: list[tuple[int, str]] = []
    code: bytes | None = None
    for raw in output.split(b"\r\n")[:-1]:
        m = _REPLY_LINE.fullmatch(raw)
        assert m, f"not an SMTP reply line: {raw!r}"
        raw.decode("utf-8")  # no broken UTF-8 either
        assert len(raw) + 2 <= 512, raw
        if code is not None:
            assert m.group(1) == code, f"continuation with another code: {raw!r}"
        code = m.group(1) if m.group(2) == b"-" else None
        if m.group(2) == b" ":
            replies.append((int(m.group(1)), m.group(3).decode()))
    assert code is None, "unfinished multi-line reply"
    return replies


class Session:
    """One harness and its current connection."""

    def __init__(self, directory: str) -> None:
        self.h = Harness(directory)
        self.client: Client = self.h.connect()
        self.clients = [self.client]

    @property
    def spool(self) -> MemorySpool:
        return self.h.spool

    def reconnect(self) -> None:
        self.client.protocol.connectionLost()
        self.client = self.h.connect()
        self.clients.append(self.client)


class SMTPMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="mta-fuzz-")
        self.sessions = [Session(os.path.join(self.tmp, str(i))) for i in range(3)]
        self.rng = random.Random(0)
        self.read = 0  # how much of session 0's output the last step saw
        self.transaction_open = False  # the last step ended with 354 for a known DATA
        self.chunks_open = False  # the last step ended with MAIL and RCPT accepted, no DATA

    def teardown(self) -> None:
        for s in self.sessions:
            s.client.protocol.connectionLost()
        self.check_spool_transactions()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- driving -------------------------------------------------------------

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        """Send C{data} to all three sessions, each chunked its own way;
        returns the replies session 0 wrote for it."""
        whole, chunked, octets = self.sessions
        self.send(whole, [data])
        cuts = sorted(self.rng.sample(range(len(data) + 1), min(len(data) + 1, 8)))
        bounds = [0, *cuts, len(data)]
        self.send(chunked, [data[a:b] for a, b in itertools.pairwise(bounds)])
        # Octet by octet (in 100-octet pieces beyond 2000: the session's own
        # buffering is quadratic in that case, bounded by the line limits).
        step = 1 if len(data) <= 2000 else 100
        self.send(octets, [data[i : i + step] for i in range(0, len(data), step)])
        output = whole.client.transport.value()
        new, self.read = output[self.read :], len(output)
        return check_replies(new) if new.endswith(b"\r\n") or not new else []

    @staticmethod
    def send(session: Session, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if chunk:
                session.client.protocol.dataReceived(chunk)

    @initialize(seed=st.integers(0, 2**32))
    def seed(self, seed: int) -> None:
        self.rng.seed(seed)

    @rule(data=step_bytes)
    def send_bytes(self, data: bytes) -> None:
        self.feed(data)
        self.transaction_open = self.chunks_open = False

    @rule()
    def login(self) -> None:
        self.feed(f"EHLO client.test\r\nAUTH PLAIN {plain(LOGIN, PASSWORD)}\r\n".encode())
        self.transaction_open = self.chunks_open = False

    @rule(recipients=st.integers(1, 3), params=st.sampled_from(["", " BODY=8BITMIME"]))
    def start_transaction(self, recipients: int, params: str) -> None:
        lines = f"MAIL FROM:<{LOGIN}>{params}\r\n" + "".join(
            f"RCPT TO:<r{n}@example.net>\r\n" for n in range(recipients)
        )
        replies = self.feed((lines + "DATA\r\n").encode())
        self.chunks_open = False
        # Known to be in DATA only when every command got its expected reply.
        self.transaction_open = [c for c, _ in replies] == [250] * (recipients + 1) + [354]

    @rule(recipients=st.integers(1, 3))
    def start_chunked_transaction(self, recipients: int) -> None:
        # Logged in first (the EHLO also ends any transaction), so that the
        # chunks are often taken: BDAT steps are rare otherwise.
        self.feed(f"EHLO client.test\r\nAUTH PLAIN {plain(LOGIN, PASSWORD)}\r\n".encode())
        lines = f"MAIL FROM:<{LOGIN}>\r\n" + "".join(
            f"RCPT TO:<r{n}@example.net>\r\n" for n in range(recipients)
        )
        replies = self.feed(lines.encode())
        self.transaction_open = False
        self.chunks_open = [c for c, _ in replies] == [250] * (recipients + 1)

    @precondition(lambda self: self.chunks_open)
    @rule(
        content=body,
        cuts=st.lists(st.integers(0, 2000), max_size=4),
        empty_last=st.booleans(),
        after=st.sampled_from([b"", b"NOOP\r\n", b"RSET\r\nNOOP\r\n"]),
    )
    def send_chunks(self, content: bytes, cuts: list[int], empty_last: bool, after: bytes) -> None:
        """The message in BDAT chunks cut anywhere (RFC 3030), the last one
        maybe empty: replies one per chunk, the last one 250 exactly when
        the model takes the message, which is then stored as it says."""
        self.chunks_open = False
        message = HEADER + content
        bounds = sorted({0, len(message), *(min(c, len(message)) for c in cuts)})
        chunks = [message[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
        if empty_last:
            chunks.append(b"")
        stream = b"".join(
            b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
            for i, chunk in enumerate(chunks)
        )
        before = dict(self.sessions[0].spool.messages)
        expected = chunks_outcome(message)
        replies = self.feed(stream + after)
        codes = [code for code, _ in replies]
        new = {k: v for k, v in self.sessions[0].spool.messages.items() if k not in before}
        if self.sessions[0].client.closed:
            return  # too many errors before: nothing more to say
        assert len(replies) == len(chunks) + after.count(b"\n"), (replies, chunks)
        chunk_replies = replies[: len(chunks)]
        failed = [r for r in chunk_replies if r[0] != 250]
        # Once a chunk fails, every later chunk gets the same reply.
        assert all(r == failed[0] for r in failed), chunk_replies
        assert failed == chunk_replies[len(chunk_replies) - len(failed) :], chunk_replies
        if expected is None:
            assert codes[len(chunks) - 1] == 550, (chunk_replies, message)
            assert failed[0][1].startswith("5.6."), failed
            assert new == {}
        else:
            assert failed == [], (chunk_replies, message)
            assert chunk_replies[-1][1].startswith("2.0.0 Ok: queued as "), chunk_replies
            [(_, _, stored)] = new.values()
            received, _, stored_message = stored.partition(b";\r\n\t")
            assert received.startswith(b"Received: from ")
            assert stored_message.partition(b"\r\n")[2] == expected, (stored, expected)

    @precondition(lambda self: self.transaction_open)
    @rule(content=body, after=st.sampled_from([b"", b"NOOP\r\n", b"RSET\r\nNOOP\r\n"]))
    def send_message(self, content: bytes, after: bytes) -> None:
        self.transaction_open = False
        stream = HEADER + content + b"\r\n.\r\n" + after
        before = dict(self.sessions[0].spool.messages)
        expected, rest = data_outcome(stream)
        replies = self.feed(stream)
        assert replies, "no reply to the end of data"
        code, text = replies[0]
        new = {k: v for k, v in self.sessions[0].spool.messages.items() if k not in before}
        if expected is None:
            assert code == 550, (code, text, stream)
            assert text.startswith("5.6."), (code, text, stream)
            assert new == {}
        else:
            assert code == 250, (code, text, stream)
            [(_, _, stored)] = new.values()
            received, _, message = stored.partition(b";\r\n\t")
            assert received.startswith(b"Received: from ")
            message = message.partition(b"\r\n")[2]  # the date line of Received:
            assert message == expected, (message, expected)
        # What followed the real end of data, and only that, was read as
        # commands: one reply for each of its lines (which end at LF).
        # (Fewer if one of them ended the session: QUIT, or too many errors,
        # whose last error reply is followed by a 421.)
        if self.sessions[0].client.closed:
            assert len(replies) <= 2 + rest.count(b"\n"), (replies, rest)
        else:
            assert len(replies) == 1 + rest.count(b"\n"), (replies, rest)

    @rule(seconds=st.sampled_from([0.05, 1.0, 8.0, 299.0, 301.0]))
    def wait(self, seconds: float) -> None:
        for s in self.sessions:
            s.h.clock.advance(seconds)
        self.feed(b"")
        self.transaction_open = self.chunks_open = False

    @rule()
    def reconnect(self) -> None:
        for s in self.sessions:
            s.reconnect()
        self.check_spool_transactions()
        self.read = 0
        self.feed(b"")
        self.transaction_open = self.chunks_open = False

    # -- invariants ------------------------------------------------------------

    @invariant()
    def sessions_agree(self) -> None:
        outputs = [normalized(s.client.transport.value()) for s in self.sessions]
        assert outputs[0] == outputs[1] == outputs[2], outputs
        closed = [s.client.closed for s in self.sessions]
        assert closed[0] == closed[1] == closed[2], closed
        stored = [
            sorted(normalized(data) for _, _, data in s.spool.messages.values())
            for s in self.sessions
        ]
        assert stored[0] == stored[1] == stored[2]

    @invariant()
    def replies_well_formed_and_commits_match(self) -> None:
        for s in self.sessions:
            queued = []
            for c in s.clients:
                output = c.transport.value()
                check_replies(output[: output.rfind(b"\r\n") + 2])
                assert b"Internal error" not in output, output
                queued += _QUEUED.findall(output)
            assert sorted(q.decode() for q in queued) == sorted(s.spool.messages)

    def check_spool_transactions(self) -> None:
        for s in self.sessions:
            for txn in s.spool.transactions:
                assert txn.aborted or txn.queue_id in s.spool.messages, txn.queue_id


class FuzzTests(SynchronousTestCase):
    """Runs the Hypothesis state machine described in the module docstring against the submission
    session, and checks its two oracles: the reference DATA reader (a smuggled end is no end,
    stuffing undone) and check_replies (malformed output refused)."""

    def test_submission_session_state_machine(self) -> None:
        run_state_machine_as_test(
            SMTPMachine,
            settings=settings(
                max_examples=FUZZ_EXAMPLES,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            ),
        )

    def test_reference_reader(self) -> None:
        """The oracle itself: a smuggled end is no end; stuffing is undone."""
        self.assertEqual(data_outcome(b"a\r\n..b\r\n.\r\nX"), (b"a\r\n.b\r\n", b"X"))
        self.assertEqual(data_outcome(b"a\n.\nb\r\n.\r\n"), (b"a\r\n.\r\nb\r\n", b""))
        self.assertEqual(data_outcome(b"a\n.\r\n.\r\nX"), (b"a\r\n.\r\n", b"X"))
        self.assertEqual(data_outcome(b"a\n..\r\n.\r\n"), (b"a\r\n.\r\n", b""))
        self.assertEqual(data_outcome(b"a\r.\rb\r\n.\r\n"), (None, b""))
        self.assertEqual(data_outcome(b"a\x00\r\n.\r\n"), (None, b""))
        self.assertEqual(data_outcome(b".\r\nX"), (b"", b"X"))

    def test_check_replies_rejects_malformed_output(self) -> None:
        self.assertEqual(check_replies(b"250-a\r\n250 b\r\n"), [(250, "b")])
        bad_replies = [b"250 ok", b"25 x\r\n", b"250-a\r\n251 b\r\n", b"250 \x00\r\n", b"hello\r\n"]
        for bad in bad_replies:
            with self.subTest(bad=bad):
                self.assertRaises(AssertionError, check_replies, bad)
        self.assertRaises(UnicodeDecodeError, check_replies, b"250 \xff\r\n")
