"""Which replies are traffic-shaping signals (L{mta.queue.shaping_rules}): tables, no reactor.

The built-in rules are read against the receivers' own replies in
C{tests/golden/replies/}: every rate limit a provider documents there either
lowers the destination's limits with the provider's rule or is named below
with the reason it does not.
"""

from __future__ import annotations

import glob
import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from mta.bounce import parse_reply
from mta.config import parse
from mta.delivery.job import RecipientResult
from mta.errors import ConfigError, ErrorKind, Reply
from mta.queue.shaping_rules import (
    DECREASE,
    DEFAULT_RULES,
    IGNORE,
    ShapingRule,
    explain,
    find,
    rules_from_config,
    stage_of,
)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "replies")

# What the provider rules make of the providers' documented rate replies
# (the start of the reply -> the rule).
EXPECTED = {
    "421 4.7.28 Gmail has detected an unusual rate of email.": "gmail-rate-limited",
    "421 4.7.0 Try again later, closing connection. (EHLO)": "gmail-try-again-later",
    "421 4.7.0 This message is suspicious due to the very low reputation of the sending IP": (
        "gmail-low-reputation"
    ),
    "450 4.2.1 Peak SMTP relay limit exceeded": "gmail-relay-limit",
    "450 4.2.1 The user you are trying to contact is receiving email too quickly": (
        "gmail-receiving-too-fast"
    ),
    "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume": (
        "yahoo-tss04"
    ),
    "450 User is receiving mail too quickly": "yahoo-receiving-too-fast",
    "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited": (
        "microsoft-ip-rate-limited"
    ),
    "451 4.7.500 Access denied, please try again later": "microsoft-throttled",
    "451 4.7.500 Server busy. Please try again later from [192.0.2.1].": "microsoft-throttled",
    "421 4.3.2 The maximum number of concurrent connections": "microsoft-concurrent-connections",
    "421 RP-001 The mail server IP connecting to Outlook.com": "outlook-rp-rate",
    "421 RP-003 The mail server IP connecting to Outlook.com": "outlook-rp-connections",
    "421 4.7.1 Messages to example@icloud.com deferred due to excessive volume": (
        "icloud-excessive-volume"
    ),
    "451 4.2.0 Throttled": "comcast-throttled",
    "421 Too many sessions opened": "comcast-sessions",
    "452 4.1.1 <example@comcast.net> too many recent messages": "comcast-recent-messages",
    "450 4.2.1 The recipient has exceeded message rate limit": "yandex-recipient-rate",
}

# Rate replies of the corpus that are no signal for the destination as a
# whole, and why: (start of the reply, reason).
NOT_SIGNALS = {
    "452 4.5.3": "too many recipients: one transaction's size, sent again in smaller ones",
    "432 4.3.2 STOREDRV.Deliver; recipient thread limit": "one mailbox inside Exchange",
    "451 account service is temporarily unavailable": "one Mimecast account",
    "452 too many recipients": "one transaction's size",
    "421 Max message per connection reached": "messages per connection: a new one follows",
}


def corpus() -> list[tuple[str, dict[str, str]]]:
    out = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.toml"))):
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        out += [(os.path.basename(path), entry) for entry in doc["reply"]]
    return out


def rule_for(text: str, stage: str = "transaction") -> ShapingRule | None:
    return find(DEFAULT_RULES, parse_reply(text), stage)


class CorpusTests(SynchronousTestCase):
    """The built-in rules against the documented replies."""

    def setUp(self) -> None:
        self.replies = corpus()

    def test_the_corpus_is_there(self) -> None:
        # A walk that finds nothing would pass every test below.
        self.assertGreater(len(self.replies), 200)

    def test_provider_rate_replies_get_their_provider_rule(self) -> None:
        seen = set()
        for _, entry in self.replies:
            for start, name in EXPECTED.items():
                if entry["reply"].startswith(start):
                    rule = rule_for(entry["reply"])
                    self.assertIsNotNone(rule, entry["reply"])
                    assert rule is not None
                    self.assertEqual((rule.name, rule.action), (name, DECREASE), entry["reply"])
                    seen.add(start)
        self.assertEqual(sorted(set(EXPECTED) - seen), [], "expected replies not in the corpus")

    def test_every_temporary_rate_reply_is_a_signal_or_named_as_none(self) -> None:
        missing = []
        for name, entry in self.replies:
            text = entry["reply"]
            if entry["category"] != "rate" or not text.startswith("4"):
                continue
            rule = rule_for(text)
            excused = any(text.startswith(start) for start in NOT_SIGNALS)
            if excused:
                self.assertIsNone(rule, f"{text[:60]} is named as no signal")
            elif rule is None or rule.action != DECREASE:
                missing.append(f"{name}: {text[:80]}")
        self.assertEqual(missing, [])

    def test_rate_limits_for_authentication_are_ignored(self) -> None:
        """Gmail 4.7.26/27/29/30/32/40, RFC 7372 codes, a PTR or SPF wording:
        fixing the cause helps, slowing down does not."""
        found = 0
        for _, entry in self.replies:
            text = entry["reply"]
            named = entry["category"] in ("dmarc", "tls", "auth") or "PTR" in text
            if text[:1] == "4" and named:
                rule = rule_for(text)
                if rule is not None:
                    found += 1
                    self.assertEqual(rule.action, IGNORE, text[:80])
        self.assertGreaterEqual(found, 10)

    def test_permanent_replies_are_no_signal(self) -> None:
        for _, entry in self.replies:
            if entry["reply"].startswith("5"):
                self.assertIsNone(rule_for(entry["reply"]), entry["reply"][:80])
                self.assertIsNone(rule_for(entry["reply"], "connect"), entry["reply"][:80])


class StageTests(SynchronousTestCase):
    """A rule's stage: the greeting (and EHLO, STARTTLS) or the transaction."""

    def test_stage_of_a_result(self) -> None:
        busy = Reply(421, None, "Too busy")
        table = [
            (RecipientResult("a@x", busy, ErrorKind.REMOTE, connected=False), "connect"),
            (RecipientResult("a@x", busy, ErrorKind.REMOTE, connected=True), "transaction"),
            (RecipientResult("a@x", Reply(250, "2.0.0", "Ok"), ErrorKind.REMOTE), None),
            (RecipientResult("a@x", Reply(451, "4.4.1", "refused"), ErrorKind.NETWORK), None),
            (RecipientResult("a@x", Reply(451, "4.4.2", "timeout"), ErrorKind.TIMEOUT), None),
            (RecipientResult("a@x", Reply(451, "4.3.0", "ours"), ErrorKind.LOCAL), None),
        ]
        for result, stage in table:
            self.assertEqual(stage_of(result), stage, result)

    def test_try_again_later_counts_at_the_greeting_only(self) -> None:
        text = "421 mx.example.net Service temporarily unavailable, try again later"
        rule = rule_for(text, "connect")
        assert rule is not None
        self.assertEqual(rule.name, "connect-try-again-later")
        self.assertIsNone(rule_for("451 4.3.0 Try again later", "transaction"))

    def test_a_bare_421_greeting_lowers_the_concurrency_only(self) -> None:
        rule = rule_for("421 mx.example.net closing connection", "connect")
        assert rule is not None
        self.assertEqual(
            (rule.name, rule.concurrency, rule.rate), ("connect-refused-421", None, 1.0)
        )
        self.assertIsNone(rule_for("421 mx.example.net closing connection", "transaction"))

    def test_generic_wordings(self) -> None:
        for text, name in [
            ("421 4.7.0 Too many connections from your IP", "too-many-connections"),
            ("451 4.7.1 You are being rate limited, slow down", "rate-limited"),
            ("450 4.7.1 Throttling failure: too many messages", "rate-limited"),
            ("451 4.7.650 temporarily rate limited due to IP reputation (S775)",
             "microsoft-ip-rate-limited"),
            ("421 4.7.0 Server busy, IP throttled (S77719)", "microsoft-s77x"),
        ]:  # fmt: skip
            rule = rule_for(text)
            self.assertEqual(rule.name if rule else None, name, text)


class RuleTests(SynchronousTestCase):
    """One rule's conditions, the bounce rules' own syntax."""

    def test_conditions(self) -> None:
        rule = ShapingRule("x", codes=("42x",), enhanced=("4.7.*",), pattern="busy")
        self.assertTrue(rule.matches(Reply(421, "4.7.0", "we are BUSY"), "transaction"))
        self.assertFalse(rule.matches(Reply(451, "4.7.0", "busy"), "transaction"))
        self.assertFalse(rule.matches(Reply(421, "4.3.0", "busy"), "transaction"))
        self.assertFalse(rule.matches(Reply(421, "4.7.0", "idle"), "transaction"))
        self.assertFalse(rule.matches(Reply(421, None, "busy"), "transaction"))

    def test_stage(self) -> None:
        rule = ShapingRule("x", codes=("421",), stage="connect")
        self.assertTrue(rule.matches(Reply(421, None, "x"), "connect"))
        self.assertFalse(rule.matches(Reply(421, None, "x"), "transaction"))

    def test_describe(self) -> None:
        self.assertEqual(ShapingRule("a", "Acme", codes=("4xx",)).describe(), "a (Acme)")
        self.assertEqual(ShapingRule("a", codes=("4xx",)).describe(), "a")

    def test_bad_rules_in_code(self) -> None:
        for kwargs in [
            {"name": ""},
            {"name": "x", "stage": "later"},
            {"name": "x", "action": "pause"},
            {"name": "x", "rate": 0},
            {"name": "x", "concurrency": 1.5},
            {"name": "x", "duration": -1},
            {"name": "x", "codes": ("2xx",)},
            {"name": "x", "pattern": "("},
        ]:
            self.assertRaises(ValueError, ShapingRule, **kwargs)

    def test_built_in_names_are_unique(self) -> None:
        names = [rule.name for rule in DEFAULT_RULES]
        self.assertEqual(len(names), len(set(names)))


class ConfigTests(SynchronousTestCase):
    """[[shaping.rules]]: validated with errors that name the file, the rule and the key."""

    def test_rules_from_config(self) -> None:
        [rule] = rules_from_config(
            [{"name": "acme", "provider": "Acme", "pattern": "acme is busy", "codes": [421],
              "stage": "connect", "concurrency": 0.5, "rate": 1, "duration": 600}],
            "mta.toml",
        )  # fmt: skip
        self.assertEqual(
            (rule.name, rule.provider, rule.codes, rule.stage, rule.concurrency, rule.rate),
            ("acme", "Acme", ("421",), "connect", 0.5, 1.0),
        )
        self.assertEqual(rule.duration, 600.0)
        self.assertEqual(rule.origin, "mta.toml, [[shaping.rules]] #1")
        self.assertTrue(rule.matches(Reply(421, None, "Acme is busy"), "connect"))

    def test_operator_rules_come_first(self) -> None:
        config = parse(
            {"shaping": {"rules": [{"name": "mine", "enhanced": ["4.7.28"], "action": "ignore"}]}},
            "mta.toml",
            "/etc/mta",
        )
        self.assertEqual([r.name for r in config.shaping_rules], ["mine"])

    def test_errors(self) -> None:
        table = [
            ("not a list", "must be an array of tables"),
            (["x"], "rule #1: must be a table"),
            ([{"pattern": "x"}], "rule #1: name: missing"),
            ([{"name": "x"}], "'x': needs at least one of pattern, codes, enhanced"),
            ([{"name": "x", "codes": ["4xx"], "colour": "red"}], "unknown key 'colour'"),
            ([{"name": "x", "codes": "4xx"}], "codes: expected a list"),
            ([{"name": "x", "codes": ["250"]}], "codes: '250' is not a reply code"),
            ([{"name": "x", "enhanced": ["4.7"]}], "enhanced: '4.7' is not an enhanced"),
            ([{"name": "x", "pattern": "(("}], "pattern: not a valid regular expression"),
            ([{"name": "x", "codes": ["4xx"], "stage": "data"}], "stage: must be one of"),
            ([{"name": "x", "codes": ["4xx"], "action": "stop"}], "action: must be one of"),
            ([{"name": "x", "codes": ["4xx"], "rate": 0}], "rate: must be more than 0"),
            ([{"name": "x", "codes": ["4xx"], "concurrency": True}], "concurrency: expected"),
            ([{"name": "x", "codes": ["4xx"], "duration": -5}], "duration: expected a number"),
            ([{"name": "x", "codes": ["4xx"], "action": "ignore", "rate": 0.5}], "ignore rule"),
            ([{"name": "x", "codes": ["4xx"]}, {"name": "x", "pattern": "y"}], "#2 'x': name"),
        ]
        for entries, words in table:
            with self.assertRaises(ConfigError) as caught:
                rules_from_config(entries, "mta.toml")
            text = str(caught.exception)
            self.assertTrue(text.startswith("mta.toml: "), text)
            self.assertIn(words, text)
            self.assertNotIn("\n", text)

    def test_errors_through_the_configuration(self) -> None:
        for doc, words in [
            ({"shaping": "on"}, "[shaping] must be a table"),
            ({"shaping": {"rules": [{"name": "x"}]}}, "shaping rule #1 'x'"),
            ({"shaping": {"decrease_factor": 1.0}}, "decrease_factor must be below 1"),
            ({"shaping": {"decrease_factor": 0}}, "decrease_factor: must be at least"),
            ({"shaping": {"max_rate": 10, "min_rate": 60}}, "min_rate must not exceed max_rate"),
            ({"shaping": {"min_concurrency": 50}}, "min_concurrency must not exceed"),
            ({"shaping": {"hold_time": "long"}}, "[shaping] hold_time: expected a number"),
            ({"shaping": {"enable": True}}, "[shaping] unknown key 'enable'"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse(doc, "mta.toml", "/etc/mta")
            self.assertIn(words, str(caught.exception))


class ExplainTests(SynchronousTestCase):
    """What C{mtactl classify --explain} says of shaping."""

    def test_one_line_when_the_stages_agree(self) -> None:
        [line] = explain(DEFAULT_RULES, parse_reply("421 4.7.0 [TSS04] deferred"), 0.5, 300)
        self.assertEqual(
            line,
            "shaping: rule yahoo-tss04 (Yahoo/AOL) (built-in, mta.queue.shaping_rules."
            "DEFAULT_RULES): the destination's concurrency x0.25, its rate x0.25, "
            "for at least 300 s",
        )

    def test_a_line_per_stage_when_they_differ(self) -> None:
        lines = explain(DEFAULT_RULES, parse_reply("421 mx busy, try again later"), 0.5, 60)
        self.assertEqual(
            lines,
            [
                "shaping, in reply to MAIL, RCPT or DATA: no rule matches: not a "
                "traffic-shaping signal",
                "shaping, at the greeting: rule connect-try-again-later (built-in, "
                "mta.queue.shaping_rules.DEFAULT_RULES): the destination's concurrency x0.5, "
                "its rate x0.5, for at least 60 s",
            ],
        )

    def test_operator_rules_and_ignore(self) -> None:
        rules = rules_from_config(
            [{"name": "acme", "pattern": "acme", "rate": 1, "duration": 5},
             {"name": "quiet", "pattern": "quiet", "action": "ignore"}],
            "mta.toml",
        )  # fmt: skip
        [line] = explain(rules, Reply(451, None, "acme says wait"), 0.5, 300)
        self.assertEqual(
            line,
            "shaping: rule acme (mta.toml, [[shaping.rules]] #1): the destination's "
            "concurrency x0.5, its rate x1, for at least 5 s",
        )
        [line] = explain(rules, Reply(451, None, "be quiet"), 0.5, 300)
        self.assertIn("rule quiet (mta.toml, [[shaping.rules]] #2): not a traffic-shaping", line)
