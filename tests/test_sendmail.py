"""mta-sendmail (L{mta.sendmail}): input handling, headers, and the spool it writes."""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from mta import sendmail
from mta.sendmail import read_message
from mta.spool.fs import FileStore
from tests.test_cli import write_config


class ReadMessageTests(SynchronousTestCase):
    """read_message: line ends become CRLF, a line of one dot ends the input unless -i, and the size
    limit."""

    def read(self, data: bytes, dot_ends: bool = True, limit: int = 10_000) -> bytes:
        return read_message(io.BytesIO(data), dot_ends=dot_ends, limit=limit)

    def test_line_ends_become_crlf(self) -> None:
        self.assertEqual(self.read(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd\r\n")

    def test_lone_dot_ends_input_unless_i(self) -> None:
        self.assertEqual(self.read(b"a\n.\nb\n"), b"a\r\n")
        self.assertEqual(self.read(b"a\n.\nb\n", dot_ends=False), b"a\r\n.\r\nb\r\n")
        self.assertEqual(self.read(b"a\n..\n"), b"a\r\n..\r\n")

    def test_limit(self) -> None:
        e = self.assertRaises(sendmail.SendmailError, self.read, b"x" * 200 + b"\n", limit=100)
        self.assertEqual(e.status, sendmail.EX_DATAERR)
        # One endless line: refused after reading just over the limit.
        endless = io.BytesIO(b"x" * 10_000_000)
        self.assertRaises(sendmail.SendmailError, read_message, endless, dot_ends=False, limit=1000)
        self.assertEqual(endless.tell(), 1001)


class SendmailTests(SynchronousTestCase):
    """mta-sendmail into a real spool: recipients from the header with -t, a From: field added with
    the full name (which cannot inject fields, and is encoded when not ASCII), input without a
    header section sent as the body, the null sender, and its errors: usage errors (EX_USAGE) for
    no or bad recipients, a bad -f or an unknown option, and a missing spool."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.spool = os.path.join(base, "spool")
        self.config = os.path.join(base, "mta.toml")
        write_config(self.config, self.spool, os.path.join(base, "users.json"))
        with open(self.config, "a", encoding="utf-8") as f:
            f.write('hostname = "host.example"\n')
        self.store = FileStore(self.spool)
        self.store.open()
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def run_sendmail(self, stdin: bytes, *argv: str) -> int:
        return sendmail.main(["--config", self.config, *argv], stdin=io.BytesIO(stdin))

    def queued(self) -> list[tuple[object, bytes]]:
        out = []
        for queue_id in self.store.ids("incoming"):
            _, env = self.store.load(queue_id, "incoming")
            with self.store.open_message(queue_id) as f:
                out.append((env, f.read()))
        return out

    def test_recipients_from_headers(self) -> None:
        message = (
            b"From: Cron <cron@host.example>\n"
            b"To: Ops <ops@example.com>, dev@example.org\n"
            b"Bcc: secret@example.net\n"
            b"Subject: nightly\n\nAll fine.\n"
        )
        self.assertEqual(self.run_sendmail(message, "-t", "-oi", "-f", "cron@host.example"), 0)
        [(env, data)] = self.queued()
        self.assertEqual(env.sender, "cron@host.example")  # type: ignore[attr-defined]
        self.assertEqual(
            [r.address for r in env.recipients],  # type: ignore[attr-defined]
            ["ops@example.com", "dev@example.org", "secret@example.net"],
        )
        self.assertNotIn(b"Bcc", data)
        self.assertNotIn(b"secret", data)
        self.assertTrue(data.startswith(b"Received: by host.example (mta-sendmail"))
        self.assertIn(b"\r\nMessage-ID: <", data)
        self.assertIn(b"\r\nDate: ", data)
        self.assertTrue(data.endswith(b"\r\n\r\nAll fine.\r\n"))
        self.assertIn("no daemon is running", self.err.getvalue())

    def test_from_added_with_full_name(self) -> None:
        code = self.run_sendmail(b"Subject: hi\n\nbody\n", "-F", "Backup Job", "admin@example.com")
        self.assertEqual(code, 0)
        [(env, data)] = self.queued()
        self.assertIn(b"\r\nFrom: Backup Job <", data)
        self.assertTrue(env.sender.endswith("@host.example"))  # type: ignore[attr-defined]

    def test_full_name_cannot_inject_fields(self) -> None:
        name = "Joe\r\nBcc: injected@evil.example\r\nX-Evil: 1"
        code = self.run_sendmail(b"To: a@example.com\n\nbody\n", "-F", name, "-t")
        self.assertEqual(code, 0)
        [(env, data)] = self.queued()
        self.assertEqual([r.address for r in env.recipients], ["a@example.com"])  # type: ignore[attr-defined]
        head = data.split(b"\r\n\r\n")[0]
        self.assertNotIn(b"\r\nBcc:", head)
        self.assertNotIn(b"\r\nX-Evil", head)
        self.assertIn(b'From: "JoeBcc: injected@evil.exampleX-Evil: 1" <', head)

    def test_non_ascii_full_name_is_encoded(self) -> None:
        self.assertEqual(self.run_sendmail(b"\nbody\n", "-F", "Bjørn Ås", "a@example.com"), 0)
        [(_, data)] = self.queued()
        self.assertIn(b"From: =?utf-8?", data)
        self.assertTrue(data.split(b"\r\n\r\n")[0].isascii())

    def test_body_without_header_section(self) -> None:
        """As with sendmail, "echo text | mta-sendmail addr" sends text as the body."""
        code = self.run_sendmail(b"Backup report: ok\nall 12 volumes\n", "a@example.com")
        self.assertEqual(code, 0)
        [(_, data)] = self.queued()
        self.assertTrue(data.endswith(b"\r\n\r\nBackup report: ok\r\nall 12 volumes\r\n"))
        self.assertIn(b"\r\nFrom: ", data)

    def test_null_sender_gets_a_from_field(self) -> None:
        self.assertEqual(self.run_sendmail(b"Subject: auto\n\nx\n", "-f", "<>", "a@example.com"), 0)
        [(env, data)] = self.queued()
        self.assertEqual(env.sender, "")  # type: ignore[attr-defined]
        self.assertRegex(data, rb"\r\nFrom: [^\r\n]+@host\.example\r\n")

    def test_errors(self) -> None:
        cases = [
            ((b"Subject: x\n\n",), sendmail.EX_USAGE),  # no recipients
            ((b"Subject: x\n\n", "not an address"), sendmail.EX_USAGE),
            ((b"Subject: x\n\n", "-f", "a@@b", "ops@example.com"), sendmail.EX_USAGE),
            ((b"Subject: x\n\n", "-bp", "ops@example.com"), sendmail.EX_USAGE),
        ]
        for (stdin, *argv), status in cases:
            self.err.truncate(0)
            self.err.seek(0)
            self.assertEqual(self.run_sendmail(stdin, *argv), status, argv)
            self.assertTrue(self.err.getvalue().startswith("mta-sendmail: "), argv)
            self.assertEqual(self.err.getvalue().count("\n"), 1)
        self.assertEqual(self.queued(), [])
        self.assertEqual(os.listdir(self.store.path("tmp")), [])

    def test_missing_spool(self) -> None:
        write_config(self.config, self.spool + "-nowhere", "users.json")
        self.assertEqual(
            self.run_sendmail(b"Subject: x\n\n", "ops@example.com"), sendmail.EX_CANTCREAT
        )
