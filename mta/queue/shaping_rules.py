"""Which replies are traffic-shaping signals, and what each one asks for.

A receiver that finds us too fast says so in its replies: Gmail's
C{421 4.7.28 ... rate limited}, Yahoo's C{421 4.7.0 [TSS04] ... temporarily
deferred}, Microsoft's C{451 4.7.650 ... temporarily rate limited}, a greeting
of C{421 Too many connections}.  The classifier (L{mta.bounce}) already says
such a reply is to be retried; this table says what it means for the
destination as a whole: lower its concurrency and its message rate, by how
much, and for how long before recovery may start
(L{mta.queue.shaping.Shaper} does it).

The rules are data, as the bounce rules are: an ordered table of
L{ShapingRule}s, first match wins, the operator's rules
(C{[[shaping.rules]]}, L{rules_from_config}) before the built-in
L{DEFAULT_RULES}.  A rule matches on the reply code, the enhanced status
code and a pattern exactly as a L{mta.bounce.Rule} does, and also on the
I{stage}: C{connect} for a reply before any transaction (the greeting,
EHLO or STARTTLS: the receiver refused the session itself), C{transaction}
for one to MAIL, RCPT or the message, C{any} for both.  Its action is
C{decrease} (multiply the concurrency and the rate by the rule's factors, or
by C{[shaping] decrease_factor}, and hold them for C{duration}, or
C{[shaping] hold_time}) or C{ignore} (the reply is no shaping signal: a rule
that stops later, broader ones from matching it).

The built-in rules follow what the providers document (the replies are in
C{tests/golden/replies/}, each with its source page): a throttle of our IP
or of our traffic lowers both limits; a limit on connections lowers the
concurrency only; a limit one mailbox reaches ("receiving mail too quickly")
lowers the rate a little; a rate limit I{because} SPF, DKIM, DMARC or TLS
failed is ignored (slowing down fixes nothing; the operator must).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mta.bounce import Rule, check_rule_table
from mta.delivery.job import RecipientResult
from mta.errors import ConfigError, ErrorKind, Reply

STAGES = ("any", "connect", "transaction")
DECREASE = "decrease"
IGNORE = "ignore"
ACTIONS = (DECREASE, IGNORE)


def stage_of(result: RecipientResult) -> str | None:
    """When the receiver said it: C{connect}, C{transaction}, or None for a
    result that is not the receiver's reply (a refused connection, DNS, ours)."""
    if result.kind != ErrorKind.REMOTE or result.ok:
        return None
    return "transaction" if result.connected else "connect"


def _check_factor(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"must be more than 0 and at most 1 (a factor), got {value!r}")
    return float(value)


def _check_duration(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a number of seconds, at least 0, got {value!r}")
    return float(value)


def _check_choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")

    return check


def _check_text(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"expected a non-empty string, got {value!r}")


@dataclass(frozen=True)
class ShapingRule:
    """One row of the shaping table (see the module docstring).

    C{concurrency} and C{rate} are the factors (more than 0, at most 1; 1
    leaves that limit alone) and C{duration} the seconds the lowered limits
    hold; None means the C{[shaping]} default.  C{origin} names the
    configuration entry of an operator's rule ("" for a built-in one).
    """

    name: str
    provider: str = ""
    codes: tuple[str, ...] = ()
    enhanced: tuple[str, ...] = ()
    pattern: str | None = None
    stage: str = "any"
    action: str = DECREASE
    concurrency: float | None = None
    rate: float | None = None
    duration: float | None = None
    origin: str = field(default="", compare=False)
    _match: Rule = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_text(self.name)
        _check_choice(STAGES)(self.stage)
        _check_choice(ACTIONS)(self.action)
        for name in ("concurrency", "rate"):
            object.__setattr__(self, name, _check_factor(getattr(self, name)))
        object.__setattr__(self, "duration", _check_duration(self.duration))
        # The reply conditions are the bounce rules' own (same syntax, same checks).
        match = Rule(self.name, "rate", codes=self.codes, enhanced=self.enhanced,
                     pattern=self.pattern)  # fmt: skip
        object.__setattr__(self, "codes", match.codes)
        object.__setattr__(self, "enhanced", match.enhanced)
        object.__setattr__(self, "_match", match)

    def matches(self, reply: Reply, stage: str) -> bool:
        """Whether this rule applies to C{reply}, given at C{stage}."""
        if self.stage not in ("any", stage):
            return False
        return self._match.matches(reply)

    def describe(self) -> str:
        """The rule's name and provider, for logs and C{mtactl queue shaping}."""
        return f"{self.name} ({self.provider})" if self.provider else self.name


def _any(*alternatives: str) -> str:
    return "(?:" + "|".join(alternatives) + ")"


_HALF = 0.5
_QUARTER = 0.25
_MILD = 0.75  # one mailbox's limit: the destination slows a little

# Order matters: first match wins.  Provider rules first (their codes and
# wordings are specific), then the ignored ones, then the generic wordings.
DEFAULT_RULES: tuple[ShapingRule, ...] = (
    # Sender authentication failed (RFC 7372: DKIM, SPF, reverse DNS): a
    # receiver that rate-limits for it wants the cause fixed, not less mail.
    ShapingRule(
        "sender-authentication",
        enhanced=tuple(f"4.7.{n}" for n in range(20, 27)),
        action=IGNORE,
    ),
    # Gmail ("Gmail SMTP errors and codes"): rate limits that ask the
    # sender to slow down, unless SPF, DKIM, DMARC or TLS is the reason.
    ShapingRule(
        "gmail-authentication",
        "Gmail",
        enhanced=("4.7.27", "4.7.29", "4.7.30", "4.7.32", "4.7.40"),
        action=IGNORE,
    ),
    ShapingRule("gmail-rate-limited", "Gmail", codes=("4xx",), enhanced=("4.7.28",)),
    ShapingRule(
        "gmail-unusual-rate", "Gmail", codes=("4xx",), pattern=r"detected an unusual rate of"
    ),
    ShapingRule(
        "gmail-low-reputation",
        "Gmail",
        codes=("421",),
        pattern=r"very low reputation of the sending ip",
        rate=_QUARTER,
    ),
    ShapingRule(
        "gmail-try-again-later",
        "Gmail",
        codes=("421",),
        pattern=r"try again later, closing connection",
    ),
    ShapingRule("gmail-relay-limit", "Gmail", codes=("4xx",), pattern=r"peak smtp relay limit"),
    ShapingRule(
        "gmail-receiving-too-fast",
        "Gmail",
        codes=("45x",),
        enhanced=("4.2.1",),
        pattern=_any(r"receiving (?:e-?mail|mail) too quickly", r"at a rate that prevents"),
        concurrency=1.0,
        rate=_MILD,
    ),
    # Yahoo and AOL: TSS04 defers our IP for volume or complaints.
    ShapingRule(
        "yahoo-tss04",
        "Yahoo/AOL",
        codes=("4xx",),
        pattern=r"\[TSS04\]",
        concurrency=_QUARTER,
        rate=_QUARTER,
    ),
    ShapingRule(
        "yahoo-receiving-too-fast",
        "Yahoo/AOL",
        codes=("45x",),
        pattern=r"user is receiving mail too quickly",
        concurrency=1.0,
        rate=_MILD,
    ),
    # Microsoft (Exchange Online, Outlook.com): IP throttling codes.
    ShapingRule(
        "microsoft-ip-rate-limited",
        "Microsoft",
        codes=("4xx",),
        enhanced=("4.7.650", "4.7.651"),
        rate=_QUARTER,
    ),
    ShapingRule("microsoft-s77x", "Microsoft", codes=("4xx",), pattern=r"\(?\bS77\d+\b"),
    ShapingRule(
        "microsoft-throttled",
        "Microsoft",
        codes=("4xx",),
        enhanced=("4.7.500", "4.7.850"),
        pattern=_any(r"access denied, please try again later", r"server busy\. please try again"),
    ),
    ShapingRule(
        "microsoft-concurrent-connections",
        "Microsoft",
        codes=("4xx",),
        pattern=r"maximum number of concurrent connections",
        rate=1.0,
    ),
    ShapingRule("outlook-rp-rate", "Outlook.com", codes=("4xx",), pattern=r"\bRP-00[12]\b"),
    ShapingRule(
        "outlook-rp-connections", "Outlook.com", codes=("4xx",), pattern=r"\bRP-003\b", rate=1.0
    ),
    # Apple iCloud Mail.
    ShapingRule(
        "icloud-excessive-volume",
        "Apple iCloud",
        codes=("4xx",),
        pattern=r"deferred due to excessive volume",
    ),
    # Comcast: RLxxxxxx throttles, session limits.
    ShapingRule(
        "comcast-throttled", "Comcast", codes=("4xx",), pattern=_any(r"\bRL\d{6}\b", r"throttled")
    ),
    ShapingRule(
        "comcast-sessions", "Comcast", codes=("4xx",), pattern=r"too many sessions opened", rate=1.0
    ),
    ShapingRule(
        "comcast-recent-messages",
        "Comcast",
        codes=("4xx",),
        pattern=r"too many recent messages",
        concurrency=1.0,
        rate=_MILD,
    ),
    # Yandex: one recipient's message rate.
    ShapingRule(
        "yandex-recipient-rate",
        "Yandex",
        codes=("45x",),
        enhanced=("4.2.1",),
        pattern=r"exceeded message rate limit",
        concurrency=1.0,
        rate=_MILD,
    ),
    # Any receiver (GMX/WEB.DE and Mail.ru among them, which publish no rate
    # replies of their own): a reply that names our authentication or our
    # host's DNS is about those; then wordings of connection and rate limits.
    ShapingRule(
        "authentication-text",
        codes=("4xx",),
        pattern=_any(
            r"\bptr\b",
            r"reverse dns",
            r"\bspf\b",
            r"\bdkim\b",
            r"\bdmarc\b",
            r"unauthenticated",
            r"\btls\b",
        ),
        action=IGNORE,
    ),
    ShapingRule(
        "too-many-connections",
        codes=("4xx",),
        pattern=r"too many (?:concurrent |simultaneous |open )?(?:connections|sessions)",
        rate=1.0,
    ),
    ShapingRule(
        "rate-limited",
        codes=("4xx",),
        pattern=_any(
            r"rate[ -]?limit",
            r"throttl",
            r"too fast\b",
            r"slow down",
            r"too many (?:messages|mails|emails)",
            r"unexpected volume",
        ),
    ),
    # A refused session: the receiver is busy or limits connections.
    ShapingRule(
        "connect-try-again-later",
        codes=("4xx",),
        stage="connect",
        pattern=_any(
            r"try again later",
            r"(?:server|system|service) (?:is )?busy",
            r"temporarily (?:unavailable|deferred|rejected)",
        ),
    ),
    ShapingRule("connect-refused-421", codes=("421",), stage="connect", rate=1.0),
)


def find(rules: Sequence[ShapingRule], reply: Reply, stage: str) -> ShapingRule | None:
    """The first rule of C{rules} for C{reply} at C{stage}, or None."""
    for rule in rules:
        if rule.matches(reply, stage):
            return rule
    return None


def explain(rules: Sequence[ShapingRule], reply: Reply, factor: float, hold: float) -> list[str]:
    """What traffic shaping makes of C{reply}, for C{mtactl classify --explain}.

    One line when the greeting and a transaction get the same answer, else
    one for each; C{factor} and C{hold} are the C{[shaping]} defaults.
    """
    found = {stage: find(rules, reply, stage) for stage in ("transaction", "connect")}
    if found["transaction"] is found["connect"]:
        return [f"shaping: {_verdict(found['connect'], factor, hold)}"]
    return [
        f"shaping, in reply to MAIL, RCPT or DATA: {_verdict(found['transaction'], factor, hold)}",
        f"shaping, at the greeting: {_verdict(found['connect'], factor, hold)}",
    ]


def _verdict(rule: ShapingRule | None, factor: float, hold: float) -> str:
    if rule is None:
        return "no rule matches: not a traffic-shaping signal"
    where = rule.origin or "built-in, mta.queue.shaping_rules.DEFAULT_RULES"
    name = f"rule {rule.describe()} ({where})"
    if rule.action == IGNORE:
        return f"{name}: not a traffic-shaping signal (ignore)"
    concurrency = factor if rule.concurrency is None else rule.concurrency
    rate = factor if rule.rate is None else rule.rate
    duration = hold if rule.duration is None else rule.duration
    return (
        f"{name}: the destination's concurrency x{concurrency:g}, its rate x{rate:g}, "
        f"for at least {duration:g} s"
    )


# -- configuration ---------------------------------------------------------

_RULE_KEYS = (
    "name", "provider", "pattern", "codes", "enhanced", "stage", "action", "concurrency",
    "rate", "duration",
)  # fmt: skip
_FACTORS: dict[str, Callable[[Any], object]] = {
    "name": _check_text,
    "provider": _check_text,
    "stage": _check_choice(STAGES),
    "action": _check_choice(ACTIONS),
    "concurrency": _check_factor,
    "rate": _check_factor,
    "duration": _check_duration,
}


def _check_condition(key: str, value: Any) -> None:
    """C{codes}, C{enhanced} and C{pattern} are checked as the bounce rules' are."""
    Rule("check", "rate", **{key: value})


def rules_from_config(entries: object, source: str) -> list[ShapingRule]:
    """Operator rules from C{[[shaping.rules]]} tables, validated.

    Each entry is one TOML table such as::

        {name = "acme-busy", provider = "Acme", pattern = "acme is busy", codes = ["4xx"],
         stage = "connect", concurrency = 0.5, rate = 1.0, duration = 600}

    C{name} is required, and at least one of C{pattern}, C{codes},
    C{enhanced}; the rest have defaults (stage C{any}, action C{decrease},
    factors and duration from C{[shaping]}).

    @raise ConfigError: for a non-table entry, an unknown key, a bad value
        (regular expression, code pattern, stage, action, a factor outside
        (0, 1], a negative duration), a rule with no reply condition, an
        ignore rule with factors, or a duplicate name.  The one-line message
        names C{source}, the rule's number (from 1) and name, and the key.
    """
    if not isinstance(entries, list):
        raise ConfigError(
            f"{source}: [shaping] rules must be an array of tables ([[shaping.rules]])"
        )
    rules: list[ShapingRule] = []
    for index, entry in enumerate(entries, 1):
        where = f"{source}: shaping rule #{index}"
        values = _rule_values(entry, where)
        if any(r.name == values["name"] for r in rules):
            raise ConfigError(f"{where} {values['name']!r}: name: used by an earlier rule")
        rules.append(ShapingRule(**values, origin=f"{source}, [[shaping.rules]] #{index}"))
    return rules


def _rule_values(entry: object, where: str) -> dict[str, Any]:
    entry, where = check_rule_table(entry, where, _RULE_KEYS, ("name",))
    values: dict[str, Any] = {}
    for key, value in entry.items():
        try:
            if key in _FACTORS:
                values[key] = _FACTORS[key](value)
            else:
                _check_condition(key, value)
                values[key] = tuple(value) if key != "pattern" else value
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    if values.get("action", DECREASE) == IGNORE and any(
        k in values for k in ("concurrency", "rate", "duration")
    ):
        raise ConfigError(f"{where}: action: an ignore rule takes no concurrency, rate or duration")
    return values
