"""The documentation states every option and its real default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from mta import config
from tests.haproxy import HAPROXY

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
