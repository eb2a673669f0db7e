"""The reply corpus: what large receivers really say, through the classifier.

C{tests/golden/replies/} holds one TOML file per receiver (see its
README.md): each entry is a reply as the receiver documents or sends it,
the page it comes from, and the action and category it should get.  The
tests check that the corpus is well formed and big enough, then run every
reply through the default classifier and report the accuracy per
category.  Action accuracy must be 100 %: a retried bounce costs five days
of retries, a bounced retry loses mail.  Category accuracy must be at
least 95 %: the category drives the queue (a blocklisted destination
rests, a rate-limited one slows down) and the DSN's wording.

The report is printed; see it with::

    .venv/bin/pytest tests/test_reply_corpus.py -q -rP
    .venv/bin/python -m tests.test_reply_corpus
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mta.bounce import ACTIONS, CATEGORIES, Classifier, Rule, parse_reply

CORPUS = Path(__file__).parent / "golden" / "replies"

#: Every receiver the corpus must cover, by file name.
PROVIDER_FILES = (
    "gmail.toml",
    "microsoft.toml",
    "yahoo.toml",
    "icloud.toml",
    "comcast.toml",
    "gmx-webde.toml",
    "mailru.toml",
    "yandex.toml",
    "zoho.toml",
    "proton.toml",
    "fastmail.toml",
    "mimecast.toml",
    "proofpoint.toml",
    "barracuda.toml",
    "cisco.toml",
    "dnsbl.toml",
)

MIN_ENTRIES = 200
MIN_CATEGORY_ACCURACY = 0.95
_KEYS = {"reply", "source", "action", "category", "note", "seen"}
_REQUIRED = {"reply", "source", "action", "category"}
_URL = re.compile(r"https?://\S+\Z")


@dataclass(frozen=True)
class Entry:
    """One corpus reply with what it should be classified as."""

    file: str
    index: int
    reply: str
    source: str
    action: str
    category: str
    note: str = ""
    seen: str = ""

    @property
    def where(self) -> str:
        return f"{self.file} #{self.index}"


def load_corpus(directory: Path = CORPUS) -> list[Entry]:
    """All entries of every C{*.toml} file in C{directory}, in file order.

    @raise ValueError: for a file without a C{provider} name or
        C{[[reply]]} tables, and for an entry with an unknown or missing key
        or a non-string value (the message names the file and entry).
    """
    entries: list[Entry] = []
    for path in sorted(directory.glob("*.toml")):
        with path.open("rb") as f:
            doc = tomllib.load(f)
        if set(doc) != {"provider", "reply"} or not isinstance(doc["reply"], list):
            raise ValueError(f"{path.name}: expected a provider name and [[reply]] tables")
        for index, table in enumerate(doc["reply"], 1):
            where = f"{path.name} #{index}"
            unknown = set(table) - _KEYS
            missing = _REQUIRED - set(table)
            if unknown or missing:
                raise ValueError(
                    f"{where}: unknown keys {unknown or '{}'}, missing {missing or '{}'}"
                )
            if not all(isinstance(value, str) for value in table.values()):
                raise ValueError(f"{where}: every value must be a string")
            entries.append(Entry(path.name, index, **table))
    return entries


@dataclass
class Report:
    """How a classifier did on a corpus: counts per expected category, misses."""

    total: Counter[str] = field(default_factory=Counter)
    right: Counter[str] = field(default_factory=Counter)
    action_misses: list[str] = field(default_factory=list)
    category_misses: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        return sum(self.total.values())

    @property
    def action_accuracy(self) -> float:
        return 1 - len(self.action_misses) / self.entries if self.entries else 0.0

    @property
    def category_accuracy(self) -> float:
        return sum(self.right.values()) / self.entries if self.entries else 0.0


def evaluate(entries: Sequence[Entry], classifier: Classifier) -> Report:
    """Classify every entry and count what came out right."""
    report = Report()
    for entry in entries:
        verdict = classifier.classify(parse_reply(entry.reply))
        report.total[entry.category] += 1
        first_line = entry.reply.splitlines()[0][:90]
        if verdict.action != entry.action:
            report.action_misses.append(
                f"{entry.where}: {verdict.action} (rule {verdict.rule}), "
                f"expected {entry.action}: {first_line}"
            )
        if verdict.category == entry.category:
            report.right[entry.category] += 1
        else:
            report.category_misses.append(
                f"{entry.where}: {verdict.category} (rule {verdict.rule}), "
                f"expected {entry.category}: {first_line}"
            )
    return report


def format_report(report: Report) -> str:
    """The accuracy table, then every miss."""
    lines = [
        f"reply corpus: {report.entries} replies, "
        f"action {report.action_accuracy:.1%}, category {report.category_accuracy:.1%}",
        f"{'category':<10} {'right':>5} {'of':>4} {'accuracy':>9}",
    ]
    for category in CATEGORIES:
        if report.total[category]:
            right, total = report.right[category], report.total[category]
            lines.append(f"{category:<10} {right:>5} {total:>4} {right / total:>9.1%}")
    lines += [f"action miss: {miss}" for miss in report.action_misses]
    lines += [f"category miss: {miss}" for miss in report.category_misses]
    return "\n".join(lines)


class CorpusFormatTests(SynchronousTestCase):
    """The corpus files: present, well formed, honest about their sources."""

    def setUp(self) -> None:
        self.entries = load_corpus()

    def test_every_receiver_has_a_file(self) -> None:
        present = {path.name for path in CORPUS.glob("*.toml")}
        self.assertEqual(sorted(set(PROVIDER_FILES) - present), [])
        for name in PROVIDER_FILES:
            with self.subTest(file=name):
                self.assertTrue(any(entry.file == name for entry in self.entries))

    def test_corpus_is_large(self) -> None:
        self.assertGreaterEqual(len(self.entries), MIN_ENTRIES)

    def test_entries_are_well_formed(self) -> None:
        for entry in self.entries:
            with self.subTest(entry=entry.where):
                self.assertIn(entry.action, ACTIONS)
                self.assertIn(entry.category, CATEGORIES)
                self.assertRegex(entry.source, _URL)
                reply = parse_reply(entry.reply)
                self.assertGreaterEqual(reply.code, 400)
                self.assertEqual(entry.reply, entry.reply.strip())

    def test_a_4xx_is_always_retried(self) -> None:
        # RFC 5321 section 4.2.1: an entry that says otherwise is a typo.
        for entry in self.entries:
            if parse_reply(entry.reply).code < 500:
                with self.subTest(entry=entry.where):
                    self.assertEqual(entry.action, "retry")

    def test_a_5xx_retried_says_why(self) -> None:
        # Retrying a 5xx goes against the receiver's own reply code: the
        # entry must say which rule of the spec decides so.
        for entry in self.entries:
            if parse_reply(entry.reply).code >= 500 and entry.action == "retry":
                with self.subTest(entry=entry.where):
                    self.assertTrue(entry.note, "a retried 5xx needs a note")

    def test_no_reply_twice(self) -> None:
        replies = Counter(" ".join(entry.reply.split()).lower() for entry in self.entries)
        self.assertEqual([text for text, count in replies.items() if count > 1], [])

    def test_loader_refuses_unknown_keys(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "x.toml").write_text(
            'provider = "X"\n[[reply]]\nreply = "550 x"\nsource = "https://x"\n'
            'action = "bounce"\ncategory = "other"\nreason = "typo of note"\n'
        )
        error = self.assertRaises(ValueError, load_corpus, directory)
        self.assertIn("x.toml #1", str(error))
        self.assertIn("reason", str(error))


class CorpusAccuracyTests(SynchronousTestCase):
    """The default classifier on the corpus."""

    def setUp(self) -> None:
        self.report = evaluate(load_corpus(), Classifier())

    def test_every_action_is_right(self) -> None:
        print(format_report(self.report))
        self.assertEqual(self.report.action_misses, [], format_report(self.report))

    def test_category_accuracy(self) -> None:
        self.assertGreaterEqual(
            self.report.category_accuracy, MIN_CATEGORY_ACCURACY, format_report(self.report)
        )

    def test_the_evaluation_can_fail(self) -> None:
        # A classifier that bounces everything as "other" must score badly:
        # the accuracy figures are computed, not assumed.
        report = evaluate(load_corpus(), Classifier(rules=[Rule("all", "other", "bounce")]))
        self.assertLess(report.action_accuracy, 0.9)
        self.assertLess(report.category_accuracy, 0.1)
        self.assertEqual(len(report.category_misses), report.entries - report.total["other"])
        self.assertIn("action miss: ", format_report(report))


if __name__ == "__main__":
    print(format_report(evaluate(load_corpus(), Classifier())))
