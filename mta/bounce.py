"""Bounce classification: is a failure worth retrying, and what kind is it?

Every failed delivery attempt ends here as a L{Classification}: C{retry}
(temporary) or C{bounce} (permanent), plus one category from the spec's
closed list (L{CATEGORIES}) that the log, the metrics and the DSN carry.
The module is pure: no reactor, no I/O, no clock.  It classifies either a
remote SMTP reply (L{Classifier.classify}) or a whole-attempt failure raised
by next-hop lookup or the outbound client (L{Classifier.classify_error}).

The rules (spec section 6, the seed's "Dummy-proofed for reliability" and
the practice of large senders):

  - RFC 5321 section 4.2.1: a 4yz reply is a I{transient} negative
    completion, so every 4xx is retried, whatever its text says.  Network,
    DNS, TLS and protocol failures of our own attempt are retried too.
  - A 5xx that names a DNS blocklist or says the sending IP is blocked is
    retried (category C{blocklist}): the listing concerns our address, not
    the message, and is lifted by delisting.  The seed: "if a blocklist is
    detected, the email is retried".
  - Mailbox full (RFC 3463 X.2.2, "over quota") is retried even on a 5xx
    (C{capacity}); the seed: "if the recipient's mailbox is full, the system
    retries later".  So are greylisting and rate limits.
  - Rejections about our sending host rather than the message (no reverse
    DNS, IP not authorised, HELO, dynamic space) and sender authentication
    (SPF/DKIM/DMARC, RFC 7372 X.7.23-X.7.26) are retried: the operator
    can fix them (PTR, SPF include, DKIM key) within the queue lifetime.
    So are TLS demands and SMTP AUTH refusals at a smarthost, as Postfix
    does by default (C{smtp_sasl_auth_soft_bounce = yes}).
  - Unknown users (X.1.1), bad or null-MX domains (X.1.2, RFC 7505
    X.1.10), messages too large (X.3.4), spam and virus verdicts on the
    content -- including URIBL/SURBL/DBL listings, which list domains
    I{in the message} rather than our IP -- are permanent.
  - Anything else follows the reply code: 4xx retry, 5xx bounce, C{other}.

The category says what the receiver means, which the queue acts on: a
receiver that throttles our IP ("temporarily rate limited", Yahoo's TSS04
deferral) is C{rate} even when reputation is its reason, and only a block
of our IP is C{blocklist}; a reply that says it rate-limits I{because} SPF,
DKIM, TLS or our PTR failed takes the cause's category, which is what the
operator fixes.

The rules are data: an ordered table of L{Rule}s, first match wins.  The
built-in table L{DEFAULT_RULES} is checked against the corpus of real
replies in C{tests/golden/replies/}; it was written from providers' published
reply texts (Google Workspace "Gmail SMTP errors and codes", Microsoft
"Email non-delivery reports in Exchange Online" and the Outlook.com
postmaster pages, Yahoo's "SMTP error codes", Apple's "Postmaster
information for iCloud Mail", Comcast's "Mail delivery error codes"),
DNSBL operators' wordings, Postfix's and Exim's default reply texts, and
the collected production replies in ZoneMTA's C{config/bounces.txt} and
sisimai's C{Sisimai::Rhost::*} (patterns written afresh here, not copied).
An operator adds rules from the configuration (L{rules_from_config}); they
are tried before the built-in ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mta.errors import ConfigError, DeliveryError, Reply

RETRY = "retry"
BOUNCE = "bounce"
ACTIONS: tuple[str, ...] = (RETRY, BOUNCE)

#: The spec's categories (section 6), in its order.
CATEGORIES: tuple[str, ...] = (
    "network",
    "dns",
    "protocol",
    "tls",
    "blocklist",
    "greylist",
    "rate",
    "capacity",
    "recipient",
    "message",
    "spam",
    "virus",
    "policy",
    "dmarc",
    "auth",
    "envelope",
    "config",
    "other",
)


# -- parsing ---------------------------------------------------------------

_CODE_LINE = re.compile(r"([2-5]\d\d)(?:[ -](.*))?\Z", re.DOTALL)
_ENHANCED_AT = re.compile(r"#?([245]\.\d{1,3}\.\d{1,3})(?=\s|\Z)")
_DIAGNOSTIC_PREFIX = re.compile(r"\A(?:diagnostic-code:\s*)?smtp\s*;\s*", re.IGNORECASE)


def parse_reply(text: str) -> Reply:
    """Parse an SMTP reply as it appears on the wire, in a log or in a bounce.

    Accepted shapes (RFC 5321 section 4.2, RFC 3463 enhanced codes):

      - C{"550 5.1.1 text"} and C{"550 text"} (no enhanced code);
      - multi-line C{"550-5.1.1 one\\n550 5.1.1 two"}: one L{Reply} whose
        text has one line per reply line, the codes taken off each;
      - the same reply flattened onto one line, as Postfix logs it
        (C{"450-4.2.1 one 450-4.2.1 two 450 4.2.1 three"});
      - a DSN C{Diagnostic-Code} value (RFC 3464 section 2.3.6): a leading
        C{"smtp;"} is dropped, and lines without a code are folded into
        the line before;
      - Exchange's C{"550 #5.1.1 text"}.

    An enhanced code whose class differs from the reply code's first digit
    (C{"550 4.2.2"}) is left in the text rather than trusted.

    @raise ValueError: for empty text, for text that does not start with a
        three-digit reply code 200-599 -- a bare C{"5.1.1 text"} (a DSN
        C{Status} value) included, since inventing a reply code would
        report one the remote never sent -- and for reply lines with
        different codes.
    """
    body = _DIAGNOSTIC_PREFIX.sub("", text.strip())
    raw = [ln.strip() for ln in body.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    raw = [ln for ln in raw if ln]
    if not raw:
        raise ValueError("empty SMTP reply: expected text like '550 5.1.1 user unknown'")
    first = _CODE_LINE.match(raw[0])
    if first is None:
        if _ENHANCED_AT.match(raw[0]):
            raise ValueError(
                f"{raw[0][:60]!r} has an enhanced status code (RFC 3463) but no 3-digit "
                "SMTP reply code; write it as the server sent it, e.g. '550 5.1.1 ...'"
            )
        raise ValueError(
            f"{raw[0][:60]!r} does not start with a 3-digit SMTP reply code "
            "(expected text like '550 5.1.1 user unknown')"
        )
    code = first.group(1)
    contents: list[str] = []
    for line in raw:
        m = _CODE_LINE.match(line)
        if m is None:
            # A folded continuation of the line before (a wrapped bounce).
            contents[-1] = f"{contents[-1]} {line}".strip()
            continue
        if m.group(1) != code:
            raise ValueError(f"reply lines have different codes: {code} and {m.group(1)}")
        contents.append((m.group(2) or "").strip())

    enhanced: str | None = None
    m = _ENHANCED_AT.match(contents[0])
    if m is not None and m.group(1)[0] == code[0]:
        enhanced = m.group(1)
    lines: list[str] = []
    if enhanced is not None:
        flattened = re.compile(rf"\s+{code}[ -]#?{re.escape(enhanced)}(?=\s|\Z)")
        prefix = re.compile(rf"#?{re.escape(enhanced)}(?=\s|\Z)")
    else:
        flattened = re.compile(rf"\s+{code}-(?=\S)")
        prefix = None
    for content in contents:
        for part in flattened.split(content):
            at = prefix.match(part) if prefix is not None else None
            lines.append((part[at.end() :] if at else part).strip())
    return Reply(int(code), enhanced, "\n".join(lines))


# -- rules ----------------------------------------------------------------

_CODE_PATTERN = re.compile(r"[45][0-9x]{2}")
_ENHANCED_PATTERN = re.compile(r"([245x*])\.(\d{1,3}|[x*])\.(\d{1,3}|[x*])")


def _check_action(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ACTIONS:
        return value
    raise ValueError(f"must be one of {', '.join(ACTIONS)}, got {value!r}")


def _check_category(value: object) -> str:
    if isinstance(value, str) and value in CATEGORIES:
        return value
    raise ValueError(f"must be one of {', '.join(CATEGORIES)}, got {value!r}")


def _check_codes(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"expected a list like ['5xx', '552'], got {value!r}")
    out = []
    for item in value:
        text = str(item).lower() if isinstance(item, int | str) else None
        if isinstance(item, bool) or text is None or not _CODE_PATTERN.fullmatch(text):
            raise ValueError(
                f"{item!r} is not a reply code or class: expected 4xx/5xx, 55x or 552 "
                "(2xx and 3xx replies are never failures)"
            )
        out.append(text)
    return tuple(out)


def _check_enhanced(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"expected a list like ['5.1.1', 'x.2.2', '5.7.*'], got {value!r}")
    out = []
    for item in value:
        text = item.lower() if isinstance(item, str) else None
        if text is None or not _ENHANCED_PATTERN.fullmatch(text):
            raise ValueError(
                f"{item!r} is not an enhanced status code pattern (RFC 3463 class.subject.detail; "
                "x or * for any part, e.g. '5.1.1', 'x.2.2', '5.7.*')"
            )
        out.append(text)
    return tuple(out)


def _check_pattern(value: object) -> re.Pattern[str] | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty regular expression, got {value!r}")
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None


def _part_matches(pattern: str, actual: str) -> bool:
    return pattern in ("x", "*") or int(pattern) == int(actual)


@dataclass(frozen=True)
class Rule:
    """One row of the classification table.

    A rule matches a reply when every condition it has holds: C{codes} (any
    of, e.g. C{"5xx"}, C{"55x"}, C{"552"}), C{enhanced} (any of, RFC 3463
    C{class.subject.detail} with C{x} or C{*} for any part: C{"5.1.1"},
    C{"x.2.2"}, C{"5.7.*"}; a reply without an enhanced code never matches
    one) and C{pattern} (a case-insensitive regular expression searched in
    the reply text with its lines joined and white space squeezed).  A rule
    with no condition matches everything.

    C{action} is C{"retry"}, C{"bounce"} or C{None} for "by the reply
    code".  A 4xx reply is always retried (RFC 5321 section 4.2.1) whatever
    the rule says; the rule's category still applies.

    C{origin} says where an operator's rule was configured (file and
    C{[[bounce.rules]]} entry, set by L{rules_from_config}); empty for the
    built-in ones.  C{mtactl classify --explain} shows it; it takes no part
    in matching or in equality.
    """

    name: str
    category: str
    action: str | None = None
    codes: tuple[str, ...] = ()
    enhanced: tuple[str, ...] = ()
    pattern: str | None = None
    origin: str = field(default="", compare=False)
    _regex: re.Pattern[str] | None = field(
        init=False, repr=False, compare=False, hash=False, default=None
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a rule needs a non-empty name, got {self.name!r}")
        _check_category(self.category)
        _check_action(self.action)
        object.__setattr__(self, "codes", _check_codes(self.codes))
        object.__setattr__(self, "enhanced", _check_enhanced(self.enhanced))
        object.__setattr__(self, "_regex", _check_pattern(self.pattern))

    def matches(self, reply: Reply) -> bool:
        """Whether this rule applies to C{reply}."""
        return self._matches(reply, _flatten(reply.text))

    def _matches(self, reply: Reply, text: str) -> bool:
        if self.codes:
            code = str(reply.code)
            if not any(
                all(p in ("x", c) for p, c in zip(pattern, code, strict=True))
                for pattern in self.codes
            ):
                return False
        if self.enhanced:
            if reply.enhanced is None:
                return False
            actual = reply.enhanced.split(".")
            if not any(
                all(_part_matches(p, a) for p, a in zip(pattern.split("."), actual, strict=True))
                for pattern in self.enhanced
            ):
                return False
        return self._regex is None or self._regex.search(text) is not None

    @property
    def alternatives(self) -> tuple[str, ...]:
        """The top-level alternatives of C{pattern} (empty without one).

        A built-in pattern is a list of alternatives (L{_any}); each is a
        regular expression of its own, which L{explain} searches alone to
        say which wording decided.
        """
        return () if self.pattern is None else tuple(_alternatives(self.pattern))

    def explain(self, reply: Reply) -> tuple[str, ...] | None:
        """What each condition of this rule matched in C{reply}, one line each.

        For the pattern, the line names the alternative that matched (a
        built-in pattern is a list of alternatives, see L{_any}) and the text
        it found, so that an operator can tell which wording decided and
        override it with a rule of their own.  C{None} if the rule does not
        apply to C{reply}.
        """
        text = _flatten(reply.text)
        if not self._matches(reply, text):
            return None
        found: list[str] = []
        if self.codes:
            found.append(f"reply code {reply.code} matches {', '.join(self.codes)}")
        if self.enhanced:
            found.append(f"enhanced code {reply.enhanced} matches {', '.join(self.enhanced)}")
        if self.pattern is not None:
            alternative, matched = _matching_alternative(self.pattern, self.alternatives, text)
            found.append(f"pattern /{alternative}/ found {matched!r}")
        return tuple(found) or ("no condition: the rule matches every reply",)


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a regular expression.

    One enclosing C{(?:...)} group, as L{_any} builds, is unwrapped first.
    The split skips escapes, character classes and nested groups; it only
    serves the explanation, so a pattern it gets wrong is shown whole.
    """
    depth, in_class, closes_at = 0, False, -1
    positions: list[tuple[int, int]] = []  # (index of a top-level "|", depth)
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and closes_at < 0:
                closes_at = i
        elif ch == "|":
            positions.append((i, depth))
        i += 1
    wrapped = pattern.startswith("(?:") and closes_at == len(pattern) - 1
    level = 1 if wrapped else 0
    body_start, body_end = (3, len(pattern) - 1) if wrapped else (0, len(pattern))
    parts, start = [], body_start
    for index, at_depth in positions:
        if at_depth == level:
            parts.append(pattern[start:index])
            start = index + 1
    parts.append(pattern[start:body_end])
    return parts


def _matching_alternative(pattern: str, alternatives: Sequence[str], text: str) -> tuple[str, str]:
    """The first of C{pattern}'s alternatives found in C{text}, and what it found."""
    for alternative in alternatives:
        try:
            found = re.search(alternative, text, re.IGNORECASE)
        except re.error:
            break
        if found is not None:
            return alternative, found.group(0)
    whole = re.search(pattern, text, re.IGNORECASE)
    return pattern, whole.group(0) if whole else ""


def _flatten(text: str) -> str:
    return " ".join(text.split())


def _any(*alternatives: str) -> str:
    """One regular expression matching any of C{alternatives}."""
    return "(?:" + "|".join(alternatives) + ")"


# Built-in table.  Order matters: first match wins.  In outline: greylisting
# and content listings (before IP listings, because "dbl.spamhaus.org" also
# names Spamhaus); what is about our client, the recipient's own rules and
# our sending host or authentication (TLS, SPF/DKIM/DMARC, PTR, AUTH: the
# cause the operator fixes, even when the receiver says it rate-limited
# for it); the receiver's faults; rate limits before blocklistings (a
# throttle for reputation is still a throttle); then the content verdicts,
# mailbox, envelope and recipient, and the catch-alls by enhanced code.
# tests/golden/replies/ holds the receivers' replies these rules are
# checked against.
DEFAULT_RULES: tuple[Rule, ...] = (
    # postgrey "Greylisted, see http://postgrey.schweikert.ch/...";
    # milter-greylist "Greylisting in action, please come back later";
    # Mimecast's greylisting answer "451 Internal resource temporarily
    # unavailable" (Mimecast SMTP Error Codes; also "is temporarily").
    Rule(
        "greylist",
        "greylist",
        RETRY,
        pattern=_any(r"gr[ae]y-?list", r"internal resources? (?:is |are )?temporarily unavailable"),
    ),
    # URIBL/SURBL/Spamhaus DBL/ZRD list domains found in the message (or the
    # sender's domain): a content verdict, the same message fails again.
    # Postfix reject_rhsbl_sender: "Sender address [...] blocked using ...";
    # Exchange Online "MailFrom domain is listed in Spamhaus" (S8002) and
    # "Helo domain is listed in Spamhaus" (S8001).
    Rule(
        "content-listing",
        "spam",
        BOUNCE,
        pattern=_any(
            r"\buribl\b",
            r"\bsurbl\b",
            r"\bdbl\b",
            r"\bzrd\b",
            r"\brhsbl\b",
            r"ivmuri",
            r"sender address \[[^\]]*\] blocked using",
            r"(?:mail ?from|helo) domain is listed",
        ),
    ),
    # Protocol errors of our client that would otherwise read as TLS, sender
    # authentication or rate (Gmail "no commands allowed to pipeline after
    # STARTTLS" with X.7.10, "Too many unauthenticated commands", "Multiple
    # destination domains per transaction is unsupported"): by the code.
    Rule(
        "protocol-violation",
        "protocol",
        None,
        pattern=_any(
            r"protocol violation",
            r"too many unauthenticated commands",
            r"multiple destination domains",
        ),
    ),
    # The recipient's own rules, not our IP and not the recipient's
    # existence: Exchange Online's restricted recipients (5.7.12 "Sender was
    # not authenticated by organization", 5.7.124, 5.7.133-136: not SMTP
    # AUTH), Zoho's "Mailbox delivery failure policy error" (with 5.1.1),
    # GMX's "Reject due to policy restrictions" (after "mailbox
    # unavailable"), Zoho's "Mail rejected by destination domain" (X.4.1).
    # By the code.
    Rule(
        "recipient-policy",
        "policy",
        None,
        pattern=_any(
            r"sender (?:was )?not authenticated (?:by organization|for (?:group|mailbox))",
            r"sender not in allowed-senders list",
            r"mailbox delivery (?:failure|restricted)",
            r"reject due to policy restrictions(?! \(ip based\))",
            r"rejected by destination domain",
        ),
    ),
    Rule(
        "recipient-policy-code",
        "policy",
        None,
        enhanced=("x.7.12", "x.7.13", "x.7.124", "x.7.133", "x.7.134", "x.7.135", "x.7.136"),
        pattern=r"\bsender\b",
    ),
    # The peer demands TLS we did not give, or TLS/DANE failed: our side or
    # a transient fault; retried like a failed handshake (spec section 6).
    # Gmail 4.7.29/5.7.29 ("not using a TLS connection"), Mimecast "this
    # route requires encryption (TLS)".
    Rule(
        "tls",
        "tls",
        RETRY,
        pattern=_any(
            r"starttls",
            r"\btls\b[^.;]{0,20}\brequired",
            r"(?:encryption|encrypted connection) (?:is )?(?:required|needed)",
            r"must (?:use|issue) (?:a )?(?:tls|starttls|encryption)",
            r"\btlsa\b|\bdane\b|mta-sts",
            r"(?:not using|wasn't sent over|not sent over) a tls connection|use tls/ssl",
            r"requires? (?:encryption|tls)\b",
        ),
    ),
    # Sender authentication (SPF, DKIM, DMARC; RFC 7372 X.7.20-X.7.26,
    # Gmail 5.7.26, Exchange Online 5.7.509/5.7.515, Yahoo 5.7.9
    # "sender is unauthenticated", Apple [HME1]): our IP or signature is
    # not authorised for the From domain -- fixable DNS, so retried.  Before
    # the rate and blocklist rules: Gmail's 2024 replies say "rate limited
    # because" the check failed, and the cause is what the operator fixes.
    # "Your SPF domain"/"DKIM domain" in Gmail's 4.7.28 only names the
    # identity whose volume is counted.
    Rule(
        "dmarc",
        "dmarc",
        RETRY,
        pattern=_any(
            r"\bdmarc\b",
            r"\bspf\b(?! domain)",
            r"\bdkim\b(?! domain)",
            r"sender policy framework",
            r"domainkeys",
            r"(?:sender|it) is unauthenticated|unauthenticated (?:e-?mail|mail|message)",
            r"authentication checks",
            r"authenticate with",
            r"required authentication level",
        ),
    ),
    # Rejections about our sending host, not the message: reverse DNS /
    # PTR (RFC 7372 X.7.25), Postfix's "Client host rejected" and "Helo
    # command rejected", Gmail's NotAuthorizedError, dynamic/residential
    # space, geography (Mimecast "host network not allowed"), allow lists
    # of IPs (Gmail "IP not in whitelist for RCPT domain"), WEB.DE's "(IP
    # based)" policy, Exchange Online's block of a tenant sending from
    # unregistered domains.  The spec: policy rejections that concern our
    # sending IP are temporary.
    Rule(
        "sending-host",
        "policy",
        RETRY,
        pattern=_any(
            r"client host rejected",
            r"helo command rejected|bad helo|invalid helo",
            r"cannot find your (?:reverse )?hostname",
            r"reverse (?:dns|lookup|hostname|mapping)",
            r"\bptr\b",
            r"\brdns\b",
            r"\bip\b[^;]{0,40}?\bnot (?:authori[sz]ed|allowed|permitted)",
            r"notauthorizederror",
            r"ipv6 sending guidelines|does not accept email over ipv6",
            r"not allowed to connect",
            r"\bcountry\b|geographic",
            r"dynamic (?:ip|address|pool|range|space)|residential|dial-?up",
            r"\bdy-001\b|\bes0000(?:01|10)\b|\brtr:(?:rd|du)\b",
            r"not in (?:the )?(?:white|allow) ?list",
            r"policy restrictions \(ip based\)",
            r"host network not allowed",
            r"from unregistered domains",
        ),
    ),
    Rule("tls-code", "tls", RETRY, enhanced=("x.7.10", "x.7.11")),
    Rule(
        "dmarc-code",
        "dmarc",
        RETRY,
        enhanced=("x.7.20", "x.7.21", "x.7.22", "x.7.23", "x.7.24", "x.7.26"),
    ),
    Rule("sending-host-code", "policy", RETRY, enhanced=("x.7.25",)),
    # SMTP AUTH refused (RFC 4954: 530 5.7.0, 535 5.7.8, 534 5.7.9): our
    # credentials at a smarthost.  Postfix defers these by default.
    Rule(
        "auth",
        "auth",
        RETRY,
        pattern=_any(
            r"authentication (?:is )?required",
            r"must authenticate",
            r"\bnot authenticated\b",
            r"authentication (?:failed|unsuccessful|credentials)",
            r"(?:username and password|credentials) (?:not accepted|invalid)",
            r"invalid credentials|bad credentials",
            r"\bsasl\b",
            r"cannot authenticate|too many login attempts",
            r"log in (?:through|with) your web browser|application-specific password",
        ),
    ),
    Rule("auth-code", "auth", RETRY, enhanced=("x.7.8", "x.7.57")),
    # A fault of the receiving system itself (Gmail "Temporary System
    # Problem", Exchange Online "Temporary server error" PRX, Yahoo
    # "Resources temporarily unavailable", Zoho "Temporary System Error"
    # with X.3.1, Barracuda's with X.4.3): not greylisting, not storage.
    # By the code (these are 4xx).  After the auth rule: Gmail's "Cannot
    # authenticate due to a temporary system problem" is an AUTH answer.
    Rule(
        "remote-system",
        "other",
        None,
        pattern=_any(
            r"temporary system (?:problem|error)",
            r"temporary server error",
            r"(?<!internal )resources temporarily unavailable",
        ),
    ),
    # The receiver throttles our IP or traffic -- a rate limit, even when
    # reputation is the reason, not a blocklisting: "temporarily rate
    # limited" (Gmail 4.7.28, 4.7.0 for IP reputation; Exchange Online
    # 4.7.650/4.7.651), Yahoo's TSS04 deferral for volume or complaints,
    # Exchange Online's 4.7.500-699/4.7.850-899 IP throttling ("Access
    # denied, please try again later", "Server busy. Please try again later
    # from [IP]").  After the PTR, TLS and authentication rules, whose
    # causes the operator fixes; before the blocklist rule.
    Rule(
        "rate-limited",
        "rate",
        RETRY,
        pattern=_any(
            r"\brate[ -]limited\b",
            r"temporarily deferred due to (?:unexpected volume|user complaints)",
            r"access denied, please try again later",
            r"server busy\. please try again later from",
        ),
    ),
    # Our IP is listed (DNSBLs by name, Postfix's default_rbl_reply "Client
    # host [...] blocked using ...", Exim's "is in a black list at ...",
    # Sendmail's "refused by blackhole site"), or the provider's own IP
    # block: Outlook.com S3140/S3150, SC-00x, OU-001, Exchange Online
    # 5.7.511/5.7.513/5.7.606-649/5.7.705/5.7.708, Outlook.com DY-002 (an
    # infected host), Mimecast's "Sender address blocked" (the IP, by a
    # Blocked Senders policy), Yahoo [TSSxx]/[TSxx]/[BLxx],
    # Comcast BLxxxxxx, AOL RTR/RLY/CON codes, IP reputation blocks.
    Rule(
        "blocklist",
        "blocklist",
        RETRY,
        pattern=_any(
            r"(?:black|block|deny)[ -]?list(?:ed)?(?! by (?:the )?recipient)",
            r"black ?hole",
            r"\b(?:dns)?rbl\b",
            r"\bdnsbls?\b",
            r"real-?time (?:block|black)",
            r"blocked using\b",
            r"rejected using\b",
            r"(?<!not )\blisted (?:at|in|on|by)\b",
            r"spamhaus",
            r"spamcop",
            r"\bsorbs\b",
            r"uceprotect",
            r"barracuda(?:central|networks\.com/reputation| reputation)",
            r"cloudmark",
            r"\bcsi\b",
            r"\bpsbl\b",
            r"mailspike",
            r"hostkarma|junkemailfilter",
            r"spamrats",
            r"abuseat\.org|\bcbl\b",
            r"\b(?:sbl|xbl|pbl)\b",
            r"invaluement|ivmsip",
            r"abusix",
            r"mail-abuse\.(?:com|org)|trend micro rbl",
            r"senderscore",
            r"backscatterer",
            r"ipcheck\.proofpoint|dnsbl-lookup",
            r"\ba?s3\d{3}\b",
            r"\b(?:sc-00[1-4]|ou-001)\b",
            r"\bdy-002\b",
            r"tenant has exceeded threshold",
            r"\Asender address blocked\Z",
            r"banned send(?:ing ip|er)",
            r"traffic not accepted from this ip",
            r"\[(?:tss?|bl|ipts|gl)\d\d\]",
            r"\bbl\d{3,6}\b",
            r"\b(?:rtr:(?:bb|sc|bl)|rly:(?:b2|bl)|con:b1)\b",
            r"\bclient\b[^;]{0,60}?\bblocked\b",
            r"\bip\b(?: address)?[^;]{0,50}?\b(?:is|has been|was|are) "
            r"(?:(?:temporarily|permanently) )?(?:blocked|banned|blacklisted|blocklisted|listed)",
            r"connections (?:will )?not (?:be )?accepted from",
            r"messages from \[?[\d.:a-f]+\]? (?:will be )?(?:temporarily |permanently )?deferred",
            r"unsolicited mail originating from your",
            r"ip reputation|reputation of the sending ip|poor reputation sender",
            r"sending mta's poor reputation",
            r"\bip\b[^;]{0,40}?(?:poor|bad|low) reputation",
        ),
    ),
    # Exchange Online 5.7.507 "Access denied, rejected by recipient": the
    # recipient's organization blocks our IP (Microsoft's NDR reference).
    Rule("blocklist-code", "blocklist", RETRY, enhanced=("x.7.507",)),
    # Malware verdicts on the content (Gmail 552 5.7.0 "potential security
    # issue", Exim's "This message contains a virus (...)", Yahoo's PH*
    # "content based blocks" for viruses, phishing and malware links).
    Rule(
        "virus",
        "virus",
        BOUNCE,
        pattern=_any(
            r"(?<![a-z])(?:virus|malware|trojan|ransomware|phishing)(?![a-z])",
            r"\binfected\b",
            r"potential security issue",
            r"unsafe (?:content|attachment)",
            r"\[ph\d\d\]",
        ),
    ),
    # Message too large by its code: RFC 3463 X.2.3, X.3.4 (Gmail 5.3.4
    # "exceeds Google's limit of N attachments").  Before the rate rule,
    # which would read "limit" in it.
    Rule("message-size", "message", BOUNCE, enhanced=("x.2.3", "x.3.4")),
    # RFC 5321 section 4.5.3.1.10: "too many recipients" is 452; a 552 for
    # it (RFC 821's mistake) SHOULD be treated as temporary.
    Rule(
        "too-many-recipients",
        "rate",
        RETRY,
        enhanced=("x.5.3",),
    ),
    Rule("too-many-recipients-text", "rate", RETRY, pattern=r"too many recipients"),
    # Rate limits: Gmail 4.2.1 "receiving mail at a rate"/ReceivingRatePerm,
    # "Daily user sending limit exceeded" (5.4.5), Outlook.com RP-00x,
    # Comcast RLxxxxxx, AOL DYN:Tx/RLY:B1, Apple "excessive volume",
    # Exchange Online per-hour limits (5.2.121/5.2.122, 5.7.508) and
    # "recipient thread limit exceeded", Gmail's per-Message-ID quota and
    # its DoS throttle at HELO ("Try again later, closing connection"),
    # Mimecast's per-account connection limit.
    Rule(
        "rate",
        "rate",
        RETRY,
        pattern=_any(
            r"rate[ -]?limit",
            r"too many (?:\w+ )?(?:messages|mails|emails|connections|sessions|concurrent|requests)",
            r"(?:daily|hourly)(?: user)?(?: sending)? (?:quota|limit)",
            r"(?:sending|submission|receiving) (?:quota|limit|rate)",
            r"\b(?:message|connection) (?:rate|limit)s? exceeded",
            r"mail too quickly|at a rate that|too fast\b|slow down",
            r"throttl",
            r"excessive volume|unexpected volume",
            r"max(?:imum)? (?:number of )?(?:concurrent )?(?:connections|messages? per connection)",
            r"peak smtp relay limit",
            r"(?:thread|connection|recipient|message) limit exceeded",
            r"limit for the number of messages|exceeded (?:the )?permitted limits",
            r"quota for sending",
            r"try again later, closing connection",
            r"account service is temporarily unavailable",
            r"\brp-00\d\b|\brl\d{3,6}\b|\bdyn:t\d\b|\brly:b1\b",
        ),
    ),
    # Mailbox full: RFC 3463 X.2.2, and X.3.1 "mail system full"; Dovecot
    # "Quota exceeded (mailbox for user is full)", Gmail "over quota" / "out
    # of storage space", Exchange QuotaExceededException.
    Rule("capacity", "capacity", RETRY, enhanced=("x.2.2", "x.3.1")),
    Rule(
        "capacity-text",
        "capacity",
        RETRY,
        pattern=_any(
            r"mailbox[^.;]{0,20}\bfull\b",
            r"\bfull mailbox",
            r"inbox is full",
            r"over ?quota",
            r"quota ?exceeded|quota (?:full|reached)",
            r"exceeded (?:its|his|her|their|the|your) (?:storage|quota|mailbox)",
            r"(?:storage|disk) (?:quota|space|limit)",
            r"out of storage",
            r"insufficient (?:system )?storage",
            r"mailbox size limit",
            r"not enough (?:storage|space)",
            r"quota violation",
        ),
    ),
    # Message too large (Postfix "Message size exceeds fixed limit", Exim
    # "Message size exceeds maximum permitted", Mimecast "maximum email
    # size exceeded") and malformed: X.6.x, missing From:, not RFC 5322
    # compliant, bare LF, long lines.  Before the spam rule: Gmail's
    # format rejections add "To reduce the amount of spam sent to Gmail".
    Rule(
        "message-text",
        "message",
        BOUNCE,
        pattern=_any(
            r"message (?:size|length) (?:exceeds|too)",
            r"message (?:is )?too (?:big|large|long)",
            r"exceed(?:s|ed)? [^;]{0,30}(?:message )?size limit",
            r"maximum (?:message )?size",
            r"\bfrom:? header",
            r"rfc ?(?:5322|2822|822)",
            r"not rfc[- ]?compliant",
            r"(?:missing|invalid|duplicate|multiple|malformed|illegal|disallowed) "
            r"[^.;]{0,30}header",
            r"header[^.;]{0,30}(?:missing|invalid|malformed|too long)",
            r"bare (?:lf|line ?feed)|invalid characters|line too long",
            r"message-id",
            r"encoded-word",
            r"(?:email|message) size exceeded",
        ),
    ),
    # Spam verdicts on the content: Gmail UnsolicitedMessageError, Exchange
    # 5.7.350, rspamd "Spam message rejected", Apple [HMxx], AOL HVU.
    Rule(
        "spam",
        "spam",
        BOUNCE,
        pattern=_any(
            r"spam",
            r"unsolicited",
            r"junk ?mail",
            r"bulk mail",
            r"content (?:was )?(?:rejected|denied|blocked|filter)",
            r"nature of the content",
            r"\[hm\d\d\]",
            r"\bhvu:",
            r"dt:spm",
            r"\bou-002\b",
            r"rejected due to security polic(?:y|ies)",
            r"spoofed message",
        ),
    ),
    Rule("message-content", "message", BOUNCE, enhanced=("x.6.x", "x.3.3")),
    # Our envelope sender: X.1.7 (sender syntax), X.1.8 (sender system),
    # RFC 7505 X.7.27 (sender domain has a null MX), Postfix "Sender address
    # rejected", Exim "Sender verify failed".  Before the recipient rules
    # because Exim's sender-verify reply also says "Unrouteable address".
    Rule("envelope", "envelope", BOUNCE, enhanced=("x.1.7", "x.1.8", "x.1.3", "x.7.27")),
    Rule(
        "envelope-text",
        "envelope",
        BOUNCE,
        pattern=_any(
            r"sender address rejected",
            r"sender verify failed|verification failed for",
            r"(?:bad|invalid|unknown) sender",
            r"sender (?:domain|address) (?:is )?(?:invalid|unknown|not found)",
            r"malformed address|address syntax",
            r"\bsender denied\b",
            r"unresolvable rfc\.?5321 from domain",
            r"invalid dns mx or a",
        ),
    ),
    # Exchange Online Directory-Based Edge Blocking: "550 5.4.1 Recipient
    # address rejected: Access denied" (also 5.7.504, and "All recipient
    # addresses rejected : Access denied") means the recipient does not
    # exist.
    Rule(
        "recipient-dbeb",
        "recipient",
        BOUNCE,
        enhanced=("x.4.1", "x.7.504"),
        pattern=r"recipient address(?:es)? rejected ?: access denied",
    ),
    # Unknown, moved or disabled mailbox: X.1.1, X.1.6, X.2.1 (RFC 3463),
    # Postfix "User unknown in local recipient table", Exim "Unrouteable
    # address", Gmail NoSuchUser, Exchange RecipientNotFound (5.1.10),
    # Yahoo "This user doesn't have a ... account", Comcast "Not our
    # Customer", cPanel "No Such User Here".
    Rule(
        "recipient-text",
        "recipient",
        BOUNCE,
        pattern=_any(
            r"user unknown|unknown user|unknown recipient|recipient unknown|addressee unknown",
            r"no such (?:user|mailbox|recipient|address|account)",
            r"(?<!domain )(?:does not|doesn't|does no longer) exist",
            r"recipient ?not ?found|user not found|mailbox not found",
            r"invalid (?:recipient|mailbox|user)",
            r"not a valid (?:mailbox|recipient|user)",
            r"mailbox (?:is )?(?:unavailable|disabled|inactive)",
            r"account (?:is |has been )?(?:disabled|deactivated|suspended|closed|inactive)",
            r"inactive (?:user|account|email address)",
            r"unrouteable address|undeliverable address",
            r"unknown or illegal alias",
            r"doesn't have an? [^;]{0,40}account",
            r"no longer (?:valid|available|active|on server)",
            r"not our customer",
            r"no mailbox here",
            r"recipient (?:is )?unavailable",
            r"banned recipient",
            r"address is marked as invalid",
            r"policy rejection on the target address",
        ),
    ),
    Rule("recipient", "recipient", BOUNCE, enhanced=("x.1.1", "x.1.6", "x.2.1")),
    # Bad destination domain: X.1.2, RFC 7505 null MX X.1.10, X.4.3/X.4.4
    # (routing), Postfix "Domain not found", "does not accept mail (nullMX)".
    Rule(
        "bad-domain",
        "dns",
        BOUNCE,
        pattern=_any(
            r"domain not found|host (?:or domain name )?not found|host unknown",
            r"no such domain|unknown domain|domain (?:does not|doesn't) exist",
            r"nxdomain|non-?existent ?domain",
            r"null ?mx|does not accept mail",
            r"name service error",
            r"unroutable domain|unrouteable (?:mail )?domain",
        ),
    ),
    Rule("bad-domain-code", "dns", BOUNCE, enhanced=("x.1.2", "x.1.10", "x.4.3", "x.4.4")),
    # Policy refusals that are not about our IP: relaying denied, Exim's
    # "Administrative prohibition", "local policy", Postfix "Access denied".
    Rule(
        "policy-text",
        "policy",
        BOUNCE,
        pattern=_any(
            r"relay(?:ing)? (?:access )?(?:denied|not permitted|prohibited|not allowed|disallowed)",
            r"not permitted to relay|we do not relay|unable to relay",
            r"administrative prohibition",
            r"\bpolicy\b|\bpolicies\b",
            r"access denied",
            r"(?:blocked|rejected) by (?:the )?recipient",
            r"blocked senders|envelope blocked",
            r"banned content",
        ),
    ),
    # Network and routing (RFC 3463 X.4.x): by the reply code.
    Rule("network", "network", None, enhanced=("x.4.x",)),
    Rule(
        "network-text",
        "network",
        None,
        pattern=_any(
            r"connection (?:refused|timed out|reset|dropped|lost)",
            r"timed? ?out",
            r"network (?:is )?unreachable|no route to host",
            r"mail loop|loop detected|too many hops",
            r"connection expired",
        ),
    ),
    # RFC 5321 section 4.2.1's advice to retry, on a 4xx only (the spec:
    # "try again later" with 4xx is greylisting).
    Rule(
        "try-again-later",
        "greylist",
        RETRY,
        codes=("4xx",),
        pattern=_any(r"try (?:again )?later", r"come back later", r"please retry", r"retry later"),
    ),
    # Protocol (X.5.x) and the remaining security/policy codes (X.7.x).
    Rule("protocol", "protocol", None, enhanced=("x.5.x",)),
    Rule(
        "protocol-text",
        "protocol",
        None,
        pattern=_any(
            r"syntax error",
            r"command (?:not )?(?:recogni[sz]ed|unrecogni[sz]ed|implemented)",
            r"unrecogni[sz]ed command",
            r"bad sequence|out of sequence",
            r"synchroni[sz]ation error",
        ),
    ),
    Rule("policy", "policy", None, enhanced=("x.7.x",)),
)


# -- verdicts ------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """The outcome of classifying one failure.

    C{action} is C{"retry"} or C{"bounce"}; C{category} is one of
    L{CATEGORIES}; C{code} and C{enhanced} are the reply's (the local reply
    for errors made on our side, such as C{451 4.4.1} for a refused
    connection), C{None} when absent; C{rule} names the table row or the
    built-in decision that settled it, for the log and C{mtactl classify}.
    """

    action: str
    category: str
    code: int | None
    enhanced: str | None
    rule: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        _check_category(self.category)

    @property
    def temporary(self) -> bool:
        """Whether the delivery should be tried again later."""
        return self.action == RETRY

    def to_json(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict (C{mtactl classify} prints it)."""
        return {
            "action": self.action,
            "category": self.category,
            "code": self.code,
            "enhanced": self.enhanced,
            "rule": self.rule,
        }


# DeliveryError kinds whose failure is ours or the network's, retried
# whatever reply code describes it (spec section 6).
_ERROR_KINDS: dict[str, str] = {
    "network": "network",
    "timeout": "network",
    "tls": "tls",
    "protocol": "protocol",
    "config": "config",
    "auth": "auth",
}


class Classifier:
    """Classify SMTP replies and delivery errors with an ordered rule table.

    C{extra} (the operator's rules) are tried before C{rules} (by default
    L{DEFAULT_RULES}); the first matching rule decides.  When none matches,
    the reply code decides with category C{other}.
    """

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES, extra: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = (*extra, *rules)
        #: How many of L{rules}, at the front, are the operator's.
        self.operator_rules = len(extra)

    def classify(self, reply: Reply) -> Classification:
        """Classify a remote reply that refused a command or a message."""
        return self._decide(reply)[1]

    def explain(self, reply: Reply) -> Explanation:
        """Classify C{reply} and say why: which rule decided, and on what."""
        index, verdict = self._decide(reply)
        if index is None:
            return Explanation(reply, verdict, None, None, self)
        rule = self.rules[index]
        return Explanation(reply, verdict, rule, index + 1, self, rule.explain(reply) or ())

    def _decide(self, reply: Reply) -> tuple[int | None, Classification]:
        """The index of the deciding rule (C{None}: none did) and the verdict."""
        code, enhanced = reply.code, reply.enhanced
        if code < 400:
            # A positive reply where a failure was concluded (a 354 to RCPT,
            # say) is a protocol disagreement, not the remote's refusal.
            return None, Classification(RETRY, "protocol", code, enhanced, "unexpected-reply")
        text = _flatten(reply.text)
        for index, rule in enumerate(self.rules):
            if rule._matches(reply, text):
                action = _action(rule.action, code)
                return index, Classification(action, rule.category, code, enhanced, rule.name)
        return None, Classification(_action(None, code), "other", code, enhanced, "default")

    def classify_error(self, error: DeliveryError) -> Classification:
        """Classify a failure of a whole delivery attempt.

        C{error.kind} decides first: C{"dns"} is retried unless its reply is
        a 5xx (NXDOMAIN C{5.1.2}, null MX C{556 5.1.10}, RFC 7505), then it
        bounces; C{"network"}, C{"timeout"}, C{"tls"}, C{"protocol"},
        C{"config"} and C{"auth"} are always retried, in the category of the
        same name (C{network} for timeouts).  C{"remote"} (and any other
        kind, such as C{"message"} for our own SIZE check) is the remote's
        or our reply, classified by L{classify}.
        """
        reply = error.reply
        if error.kind == "dns":
            if reply.code >= 500:
                return Classification(BOUNCE, "dns", reply.code, reply.enhanced, "dns-permanent")
            return Classification(RETRY, "dns", reply.code, reply.enhanced, "dns-temporary")
        category = _ERROR_KINDS.get(error.kind)
        if category is not None:
            return Classification(
                RETRY, category, reply.code, reply.enhanced, f"{error.kind}-error"
            )
        return self.classify(reply)


def _action(action: str | None, code: int) -> str:
    if code < 500:
        return RETRY  # RFC 5321 section 4.2.1: 4yz is transient
    return action or BOUNCE


@dataclass(frozen=True)
class Explanation:
    """Why a reply gets its verdict (L{Classifier.explain}), for people.

    C{rule} is the deciding row of the classifier's table and C{position}
    its place there (from 1; the operator's rules come first), both
    C{None} when no rule matched and the reply code decided; C{matched}
    says what each of the rule's conditions matched (L{Rule.explain}).
    L{lines} is what C{mtactl classify --explain} prints.
    """

    reply: Reply
    verdict: Classification
    rule: Rule | None
    position: int | None
    classifier: Classifier = field(repr=False, compare=False)
    matched: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """The explanation as short lines: reply, verdict, rule, conditions, action."""
        reply, verdict = self.reply, self.verdict
        codes = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
        lines = [
            f"reply: {codes} {_flatten(reply.text)}".rstrip(),
            f"verdict: {verdict.action}, category {verdict.category}",
        ]
        if verdict.rule == "unexpected-reply":
            return [*lines, "rule: none: a positive reply where a failure was concluded"]
        rule, position = self.rule, self.position
        total = len(self.classifier.rules)
        if rule is None or position is None:
            lines.append(f"rule: none of the {total} rules matched")
            by_code = "a 4xx is transient" if reply.code < 500 else "a 5xx is permanent"
            lines.append(f"action: {verdict.action}: the reply code decides ({by_code})")
            return lines
        operator = self.classifier.operator_rules
        if position <= operator:
            where = f"operator rule {position} of {operator}"
            lines.append(f"rule: {rule.name} ({where}, {rule.origin or 'given in code'})")
        else:
            built_in = total - operator
            where = f"built-in rule {position - operator} of {built_in}, mta.bounce.DEFAULT_RULES"
            lines.append(f"rule: {rule.name} ({where})")
        lines += [f"  {line}" for line in self.matched]
        if rule.action is None:
            by_code = "a 4xx is transient" if reply.code < 500 else "a 5xx is permanent"
            lines.append(
                f"action: {verdict.action}: the rule leaves it to the reply code ({by_code})"
            )
        elif rule.action != verdict.action:
            lines.append(
                f"action: {verdict.action}: the rule says {rule.action}, but a 4xx is always "
                "retried (RFC 5321 section 4.2.1)"
            )
        else:
            lines.append(f"action: {verdict.action}, as the rule says")
        return lines


# -- configuration ---------------------------------------------------------

_RULE_KEYS = ("name", "pattern", "category", "action", "codes", "enhanced")


def rules_from_config(entries: list[dict[str, Any]], source: str) -> list[Rule]:
    """Operator rules from configuration tables, validated.

    Each entry is one TOML table such as::

        {name = "acme-quota", pattern = "over quota at acme", category = "capacity",
         action = "retry", codes = ["5xx"], enhanced = ["5.2.*"]}

    C{name} and C{category} are required, and at least one of C{pattern},
    C{codes}, C{enhanced}; C{action} defaults to "by the reply code".
    Codes may be given as strings (C{"5xx"}, C{"55x"}, C{"552"}) or
    integers.

    @param source: where the entries came from (the file name, with the
        table when useful), the start of every error message.
    @raise ConfigError: for a non-table entry, an unknown or missing key,
        a bad value (regular expression, category, action, code pattern), a
        rule with no condition, a duplicate name, or C{action = "bounce"}
        on 4xx codes only (a 4xx is always retried, RFC 5321 section 4.2.1).
        The one-line message names C{source}, the rule's number (from 1)
        and name, and the key.
    """
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: bounce rules must be a list of tables")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, item in enumerate(entries, 1):
        entry, where = check_rule_table(
            item, f"{source}: bounce rule #{index}", _RULE_KEYS, ("name", "category")
        )
        checks: dict[str, Callable[[Any], object]] = {
            "name": _check_name,
            "category": _check_category,
            "action": _check_action,
            "codes": _check_codes,
            "enhanced": _check_enhanced,
            "pattern": _check_pattern,
        }
        values: dict[str, Any] = {}
        for key, value in entry.items():
            try:
                checked = checks[key](value)
            except ValueError as e:
                raise ConfigError(f"{where}: {key}: {e}") from None
            values[key] = value if key == "pattern" else checked
        if values["name"] in seen:
            raise ConfigError(f"{where}: name: {values['name']!r} is used by an earlier rule")
        seen.add(values["name"])
        codes = values.get("codes", ())
        if values.get("action") == BOUNCE and codes and all(c[0] == "4" for c in codes):
            raise ConfigError(
                f"{where}: action: a 4xx reply is always retried (RFC 5321 section 4.2.1), "
                "so bounce cannot apply to codes " + ", ".join(codes)
            )
        rules.append(Rule(**values, origin=f"{source}, [[bounce.rules]] #{index}"))
    return rules


def check_rule_table(
    entry: object, where: str, keys: Sequence[str], required: Sequence[str]
) -> tuple[dict[str, Any], str]:
    """Check the shape of one rule table from the configuration (bounce and
    shaping rules alike): a table, only C{keys}, every one of C{required},
    and at least one reply condition (C{pattern}, C{codes}, C{enhanced}).

    @return: the table, and C{where} with the rule's name for the messages
        about its values.
    @raise ConfigError: naming C{where} (and the name) and the key.
    """
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table, got {entry!r}"[:200])
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{where} {name!r}"
    for key in entry:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} (expected {', '.join(keys)})")
    for key in required:
        if key not in entry:
            raise ConfigError(f"{where}: {key}: missing")
    if not any(key in entry for key in ("pattern", "codes", "enhanced")):
        raise ConfigError(f"{where}: needs at least one of pattern, codes, enhanced")
    return entry, where


def _check_name(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"expected a non-empty string, got {value!r}")
