"""The documentation states every option and its real default, and its spool examples are real."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import replace
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mta import cli, config
from mta.envelope import Envelope, ProgressRecord, QueueState, Recipient, RecipientState
from mta.spool import FileStore, journal, open_store, receiver
from mta.spool.format import full_record, to_json
from mta.spool.queueid import QueueIdGenerator
from mta.testing import run_inline
from tests.haproxy import HAPROXY
from tests.test_spool_upgrade import old_spool

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float | int):
        return repr(value)
    return json.dumps(value, separators=(", ", ": "))


class ConfigurationDocTests(SynchronousTestCase):
    """docs/configuration.md against mta.config: every option documented with its real default and
    no documented option that does not exist; docs/mta.example.toml valid and scanning every
    message it accepts (clamd's max_size not below message_size when oversize is reject)."""

    def setUp(self) -> None:
        with open(os.path.join(DOCS, "configuration.md"), encoding="utf-8") as f:
            self.text = f.read()

    def section(self, name: str) -> str:
        start = self.text.index(f"## `[{name}]`")
        end = self.text.find("\n## ", start + 1)
        return self.text[start : end if end >= 0 else None]

    def test_every_option_documented_with_its_default(self) -> None:
        for section, options in config.defaults().items():
            body = self.section(section)
            for key, default in options.items():
                row = re.search(rf"^\| `{key}` \| `([^`]*)` \|", body, re.M)
                self.assertIsNotNone(row, f"[{section}] {key} is not documented")
                assert row is not None
                self.assertEqual(row.group(1), toml_literal(default), f"[{section}] {key}")

    def test_no_documented_option_that_does_not_exist(self) -> None:
        for section, options in config.defaults().items():
            documented = re.findall(r"^\| `(\w+)` \|", self.section(section), re.M)
            self.assertEqual(sorted(documented), sorted(options), section)

    def test_example_configuration_is_valid(self) -> None:
        with open(os.path.join(DOCS, "mta.example.toml"), "rb") as f:
            doc = tomllib.load(f)
        parsed = config.parse(doc, "mta.example.toml", "/etc/mta")
        self.assertEqual(parsed.listen.submissions, ["tcp:465"])

    def test_example_scans_every_message_it_accepts(self) -> None:
        # With oversize = "reject", a clamd max_size below message_size
        # refuses mail between the two with a permanent 552.
        with open(os.path.join(DOCS, "mta.example.toml"), "rb") as f:
            doc = tomllib.load(f)
        [clamd] = [p for p in doc["plugins"] if p["name"] == "clamd"]
        options = clamd.get("options", {})
        if options.get("oversize", "reject") == "reject":
            self.assertGreaterEqual(
                options.get("max_size", 25 * 1024 * 1024), doc["limits"]["message_size"]
            )


class SeveralInstancesDocTests(SynchronousTestCase):
    """docs/operations.md's "Running several instances": its configurations work."""

    def setUp(self) -> None:
        with open(os.path.join(DOCS, "operations.md"), encoding="utf-8") as f:
            text = f.read()
        self.section = text[text.index("## Running several instances") :]

    def block(self, language: str) -> str:
        match = re.search(rf"```{language}\n(.*?)```", self.section, re.S)
        assert match is not None, f"no {language} block"
        return match.group(1)

    def test_the_instance_configuration_is_valid(self) -> None:
        parsed = config.parse(tomllib.loads(self.block("toml")), "operations.md", "/etc/mta")
        self.assertEqual(parsed.listen.proxy_submissions, ["tcp:10465"])
        self.assertEqual(parsed.cluster.users, "redis")

    def test_the_haproxy_configuration_is_valid(self) -> None:
        """Checked by the real haproxy (-c: parse and check, bind nothing)."""
        text = self.block("haproxy")
        self.assertIn("send-proxy-v2", text)
        self.assertIn("option httpchk GET /health", text)
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        result = subprocess.run(
            [HAPROXY, "-c", "-f", path], capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


JQ = shutil.which("jq") or "/usr/bin/jq"
EXAMPLE_T0 = 1_796_400_000.0  # 2026-12-04T16:00:00Z, the time of the examples


def example_spool(root: str) -> tuple[FileStore, str]:
    """The spool of docs/spool-format.md's examples, made by the code: a message
    committed through a spool transaction, then two delivery rounds filed."""
    store = open_store(root, create=True)
    spool = receiver(store, run_inline, QueueIdGenerator(lambda: EXAMPLE_T0, lambda bits: 0x5A5A5))
    txn = spool.begin()
    txn.write(b"From: alice@example.com\r\nTo: bob@example.net, carol@example.org\r\n"
              b"Subject: hi\r\n\r\nHello.\r\n")  # fmt: skip
    envelope = Envelope(
        queue_id="", sender="alice@example.com",
        recipients=[Recipient("bob@example.net"), Recipient("carol@example.org")],
        arrival=EXAMPLE_T0, size=0, auth_user="alice@example.com", client_address="192.0.2.10",
        client_helo="laptop", tls="TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)",
    )  # fmt: skip
    ids: list[str] = []
    txn.commit(envelope).addCallback(ids.append)
    [queue_id] = ids
    t0 = EXAMPLE_T0
    env = store.activate(queue_id)
    assert env is not None
    bob, carol = env.recipients
    bob.state, bob.attempts, bob.last_attempt = RecipientState.DEFERRED, 1, t0 + 1
    bob.next_attempt = t0 + 301
    bob.reply, bob.dsn_status = "451 4.7.1 Greylisted, try again later", "4.7.1"
    bob.relay, bob.category = "mx.example.net[192.0.2.25]:25", "greylist"
    carol.state, carol.attempts, carol.last_attempt = RecipientState.SENT, 1, t0 + 1
    carol.reply, carol.dsn_status = "250 2.0.0 Ok: queued as 4Xy", "2.0.0"
    carol.relay = "mx.example.org[198.51.100.7]:25"
    store.journal([ProgressRecord(queue_id, 0, replace(bob)),
                   ProgressRecord(queue_id, 1, replace(carol))])  # fmt: skip
    assert store.file([(env, QueueState.DEFERRED, t0 + 301)]) == [None]
    env = store.activate(queue_id)
    assert env is not None
    bob = env.recipients[0]
    bob.attempts, bob.last_attempt, bob.next_attempt = 2, t0 + 302, t0 + 902
    store.journal([ProgressRecord(queue_id, 0, replace(bob))])
    assert store.file([(env, QueueState.DEFERRED, t0 + 902)]) == [None]
    return store, queue_id


class SpoolFormatDocTests(SynchronousTestCase):
    """docs/spool-format.md: its examples are what the code writes, its
    commands run, and its jq recipe gives the state mtactl reads."""

    def setUp(self) -> None:
        with open(os.path.join(DOCS, "spool-format.md"), encoding="utf-8") as f:
            self.text = f.read()
        self.assertTrue(os.path.exists(JQ), "jq is not installed (scripts/install-test-deps.sh)")
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.store, self.queue_id = example_spool(os.path.join(self.base, "spool"))
        self.path = self.store.path(QueueState.DEFERRED, self.queue_id)

    def block(self, after: str, language: str = "") -> str:
        start = self.text.index(after)
        match = re.compile(rf"```{language}\n(.*?)```", re.S).search(self.text, start)
        assert match is not None, f"no code block after {after!r}"
        return match.group(1)

    def sh(self, command: str) -> subprocess.CompletedProcess[bytes]:
        """Run a documented command in the directory that holds the spool."""
        config = os.path.join(self.base, "mta.toml")
        with open(config, "w") as f:
            f.write(f"[server]\nspool = {json.dumps(self.store.root)}\n")
        bin_dir = os.path.dirname(sys.executable)
        env = {**os.environ, "MTA_CONFIG": config, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        return subprocess.run(["bash", "-c", command.replace("ID", self.queue_id)], cwd=self.base,
                              env=env, capture_output=True, timeout=60, check=False)  # fmt: skip

    def test_the_committed_file_is_what_the_code_writes(self) -> None:
        shown = self.block("`cat -A` shows CRLF")
        with open(self.path, "rb") as f:
            data = f.read()
        first = data[: data.index(b"}]}\n") + 4]  # the message and the commit's record
        as_cat_a = first.decode().replace("\r", "^M").replace("\n", "$\n")
        self.assertEqual(shown, as_cat_a)
        self.assertIn(f'"size":{len(first.split(b"{", 1)[0])}', shown)

    def test_the_records_after_two_rounds_are_what_the_code_writes(self) -> None:
        shown = self.block("ends\nwith these three lines").splitlines()
        with open(self.path, "rb") as f:
            lines = f.read().decode().split("\n")[-4:-1]
        self.assertEqual(shown[1:], lines[1:])
        position = 0
        for piece in shown[0].split("..."):
            position = lines[0].index(piece, position) + len(piece)

    def test_the_journal_example_is_what_the_code_writes(self) -> None:
        shown = self.block("`journal/progress-N.log` holds").splitlines()
        [segment] = journal.segments(journal.directory(self.store.root))
        with open(segment) as f:
            self.assertEqual(shown, f.read().splitlines()[:2])

    def test_the_reading_commands_run(self) -> None:
        commands = self.block("## Reading a spool by hand", "sh").strip().splitlines()
        self.assertEqual(len(commands), 5)
        outputs = []
        for command in commands:
            result = self.sh(command)
            self.assertEqual((result.returncode, result.stderr), (0, b""), command)
            outputs.append(result.stdout)
        listing, last = (o.decode() for o in outputs[:2])
        journaled, shown = (o.decode() for o in outputs[3:])
        self.assertEqual(listing, f"{self.queue_id}\n")
        self.assertEqual(json.loads(last)["update"]["0"]["attempts"], 2)
        self.assertEqual(outputs[2], b"From: alice@example.com\r\nTo: bob@example.net, "
                         b"carol@example.org\r\nSubject: hi\r\n\r\nHello.\r\n")  # fmt: skip
        self.assertEqual(len(journaled.splitlines()), 3)
        self.assertTrue(shown.startswith(f"# state: deferred\n# envelope: {self.path}\n"), shown)

    def current_state(self) -> Any:
        result = self.sh(self.block("A message's current state with `jq`", "sh"))
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        return json.loads(result.stdout)

    def test_the_current_state_recipe(self) -> None:
        _, envelope = self.store.load(self.queue_id)
        self.assertEqual(self.current_state(), to_json(envelope))
        self.assertEqual(envelope.recipients[0].attempts, 2, "the update is applied")
        # A torn last line (a power loss while appending) changes nothing.
        with open(self.path, "ab") as f:
            f.write(b'{"format":"mta-envelope/2","id":"' + self.queue_id.encode() + b'","si')
        self.assertEqual(self.current_state(), to_json(envelope))

    def test_the_recipe_is_not_fooled_by_the_message(self) -> None:
        fake = full_record(replace(self.store.load(self.queue_id)[1], sender="mallory@example.com"))
        self.store.add(replace(self.store.load(self.queue_id)[1], queue_id="1K1T3VXZR00B9D6",
                               size=len(fake)), fake)  # fmt: skip
        self.queue_id = "1K1T3VXZR00B9D6"
        self.path = self.store.path(QueueState.INCOMING, self.queue_id)
        text = self.block("A message's current state with `jq`", "sh").replace(
            "deferred", "incoming"
        )
        result = self.sh(text)
        self.assertEqual(json.loads(result.stdout)["sender"], "alice@example.com")

    def test_the_upgrade_output(self) -> None:
        shown = self.block("beforehand, with no daemon running, by\n")
        command, *expected = shown.splitlines()
        self.assertEqual(command, "$ mtactl spool upgrade --spool /var/spool/mta")
        root = old_spool(self)
        out = io.StringIO()
        self.assertEqual(cli.main(["spool", "upgrade", "--spool", root], out=out), 0)
        self.assertEqual(out.getvalue().splitlines(),
                         [line.replace("/var/spool/mta", root) for line in expected])  # fmt: skip


class NoOldSpoolPathsTests(SynchronousTestCase):
    """The mta-spool/1 names appear only where the upgrade from it is described."""

    def test_no_envelope_json_or_sent_journal(self) -> None:
        root = os.path.dirname(DOCS)
        for name in ("README.md", "docs/flow.md", "docs/operations.md", "docs/configuration.md"):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
            for old in ("envelope.json", "sent journal", "active/"):
                self.assertNotIn(old, text, name)
