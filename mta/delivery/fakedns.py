"""A table-driven L{IResolver} for tests: L{FakeResolver}.

It lives here rather than in L{mta.testing} only so that the DNS layer
could be written without touching that module; it is a public test double
like the ones there, checked with C{verifyObject}, and may move there.

The table has the shape of the loopback test DNS server's zone
(C{tests/dnsserver.py}), so a test can move between the two::

    FakeResolver({
        "example.com": {"MX": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        "mx1.example.com": {"A": ["192.0.2.1"], "AAAA": "temporary"},
        "null.example": {"MX": [(0, ".")]},
        "broken.example": {"servfail": True},
        "_mta-sts.example.com": {"TXT": ["v=STSv1; id=1"]},
        "_25._tcp.mx1.example.com": {"TLSA": [(3, 1, 1, "0a1b...")], "secure": True},
    })

A name that is not in the table is C{"nxdomain"} for every type; a name
without the asked type is C{"nodata"}.  Instead of records a type may
map to an error kind: C{"nxdomain"}, C{"nodata"}, C{"temporary"} (or
C{"servfail"}, the same).  C{"servfail": True} (or a list of types) makes
every (or those) lookups of the name temporary failures.  C{"ttl"} sets
the TTL of a name's answers.  C{"secure": True} marks a name's answers as
DNSSEC-validated (L{Answer.secure}).  TXT records are strings (or lists of
strings, joined); TLSA records are (usage, selector, matching type, data
as hex).  CNAMEs are not modelled.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mta.delivery.dns import (
    ADDRESS_TYPES,
    KINDS,
    NODATA,
    NXDOMAIN,
    TEMPORARY,
    Answer,
    DNSError,
    MXRecord,
    TLSARecord,
)
from mta.interfaces import IResolver

_ERRORS = {**{kind: kind for kind in KINDS}, "servfail": TEMPORARY}


@implementer(IResolver)
class FakeResolver:
    """Answers lookups from a table (see the module docstring).

    @param table: name -> {type: records or error kind, "ttl": seconds,
        "servfail": True or [types]}.  Names are matched case-insensitively
        and without a trailing dot.  May be changed between lookups.
    @param ttl: the TTL of answers whose name sets none.
    @param negative_ttl: the C{ttl} of the C{"nxdomain"}/C{"nodata"}
        errors (what a server's SOA would say), None for unknown.

    C{queries} lists every lookup as (name, type), in order.  With
    C{hold = True}, lookups return Deferreds that fire only when
    L{release} is called, so that a test can see what happens while
    queries are in flight.
    """

    def __init__(
        self,
        table: dict[str, dict[str, Any]] | None = None,
        *,
        ttl: float = 300.0,
        negative_ttl: float | None = None,
    ) -> None:
        self.table: dict[str, dict[str, Any]] = dict(table or {})
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self.hold = False
        self.held: list[tuple[str, str, Deferred[Any]]] = []

    def lookup_mx(self, domain: str) -> Deferred[Any]:
        return self._lookup(domain, "MX")

    def lookup_addresses(self, host: str, rdtype: str) -> Deferred[Any]:
        if rdtype not in ADDRESS_TYPES:
            raise ValueError(f"address lookups are A or AAAA, not {rdtype!r}")
        return self._lookup(host, rdtype)

    def lookup_txt(self, name: str) -> Deferred[Any]:
        return self._lookup(name, "TXT")

    def lookup_tlsa(self, name: str) -> Deferred[Any]:
        return self._lookup(name, "TLSA")

    def release(self) -> int:
        """Answer every held lookup from the table as it is now; returns how many."""
        held, self.held = self.held, []
        for name, rdtype, d in held:
            try:
                d.callback(self.answer(name, rdtype))
            except DNSError as e:
                d.errback(e)
        return len(held)

    def answer(self, name: str, rdtype: str) -> Answer[Any]:
        """The table's answer for C{name}/C{rdtype}; raises L{DNSError}."""
        key = name.lower().rstrip(".")
        entry = self.table.get(key)
        if entry is None:
            entry = next((v for k, v in self.table.items() if k.lower().rstrip(".") == key), None)
        if entry is None:
            raise DNSError(NXDOMAIN, name, rdtype, ttl=self.negative_ttl)
        servfail = entry.get("servfail", False)
        if servfail is True or (isinstance(servfail, list | tuple) and rdtype in servfail):
            raise DNSError(TEMPORARY, name, rdtype, "SERVFAIL (fake)")
        value = entry.get(rdtype)
        if isinstance(value, str):
            kind = _ERRORS[value]
            ttl = None if kind == TEMPORARY else self.negative_ttl
            detail = "SERVFAIL (fake)" if kind == TEMPORARY else ""
            raise DNSError(kind, name, rdtype, detail, ttl=ttl)
        if not value:
            raise DNSError(NODATA, name, rdtype, ttl=self.negative_ttl)
        ttl = float(entry.get("ttl", self.ttl))
        secure = bool(entry.get("secure", False))
        records: tuple[Any, ...]
        if rdtype == "MX":
            records = tuple(MXRecord(int(p), str(x).lower().rstrip(".")) for p, x in value)
        elif rdtype == "TXT":
            records = tuple(v if isinstance(v, str) else "".join(v) for v in value)
        elif rdtype == "TLSA":
            records = tuple(
                TLSARecord(int(u), int(s), int(m), bytes.fromhex(d)) for u, s, m, d in value
            )
        else:
            records = tuple(str(a) for a in value)
        return Answer(records, ttl, secure)

    def _lookup(self, name: str, rdtype: str) -> Deferred[Any]:
        self.queries.append((name, rdtype))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((name, rdtype, d))
            return d
        try:
            return succeed(self.answer(name, rdtype))
        except DNSError as e:
            return fail(e)
