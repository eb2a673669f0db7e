"""DNS lookups for delivery: dnspython in a thread pool, and a TTL cache.

Delivery needs two questions answered (RFC 5321 section 5.1): the MX
records of a domain and the A/AAAA records of a host; the TLS policies
need two more, the C{_mta-sts} TXT record (RFC 8461 section 3.1) and the
TLSA records of an MX host (RFC 7672 section 2.2).  All go through the
L{IResolver} seam so that the next-hop logic (L{mta.delivery.mx}) can be
tested against a table (L{mta.delivery.fakedns.FakeResolver}) and run in
production against real servers.

L{DNSPythonResolver} uses dnspython's synchronous stub resolver, which
blocks, so every query runs through an injected I{runner} (the service
passes C{partial(deferToThreadPool, reactor, pool)}); the reactor thread
never waits for the network.  dnspython's own cache is switched off:
L{CachingResolver} caches in the reactor thread, where it can also share
one query between concurrent identical lookups.

Failures are L{DNSError}s with one of three kinds, because that is all the
caller needs to decide between bouncing and retrying:

  - C{"nxdomain"}: the name does not exist (RCODE 3, RFC 1035 section
    4.1.1), which is permanent;
  - C{"nodata"}: the name exists but has no record of the asked type
    (RFC 2308 section 2.2), permanent for that type;
  - C{"temporary"}: SERVFAIL, REFUSED, a timeout, no server reachable;
    the answer may be different next time.

Negative answers carry the negative-caching TTL of RFC 2308 section 5
(the smaller of the SOA record's TTL and its MINIMUM field) when the
server sent the SOA.

With C{dnssec=True} (C{[delivery] dnssec}) every query asks for DNSSEC
(the AD bit and EDNS0 DO, RFC 6840 section 5.7 and RFC 3225) and an
answer is L{Answer.secure} when the server set the AD bit.  Nothing here
validates signatures: like Postfix's C{smtp_dns_support_level = dnssec},
this trusts the configured recursive resolver, which must validate and
must be reached over a path an attacker cannot touch (the loopback
interface, normally).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.errors import ConfigError
from mta.interfaces import IResolver

T = TypeVar("T")

#: The kinds of L{DNSError}.
NXDOMAIN = "nxdomain"
NODATA = "nodata"
TEMPORARY = "temporary"
KINDS = (NXDOMAIN, NODATA, TEMPORARY)

#: The record types L{IResolver.lookup_addresses} accepts.
ADDRESS_TYPES = ("A", "AAAA")

#: The EDNS0 payload size to offer with the DO bit (the DNS flag day 2020 value).
EDNS_PAYLOAD = 1232


@dataclass(frozen=True)
class MXRecord:
    """One MX record (RFC 1035 section 3.3.9).

    C{exchange} is lower-case without the trailing dot; the null MX of
    RFC 7505 (exchange C{"."}) has C{exchange == ""}.
    """

    preference: int
    exchange: str


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record (RFC 6698 section 2.1): usage, selector, matching type, data.

    The numbers are kept as published, also the ones this MTA cannot use
    (L{mta.delivery.dane.usable} sorts those out, RFC 7672 section 3.1.3).
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        """The presentation form, C{"3 1 1 0A1B..."}, digests cut for the log."""
        text = self.data.hex().upper()
        if len(text) > 16:
            text = text[:16] + "..."
        return f"{self.usage} {self.selector} {self.mtype} {text}"


@dataclass(frozen=True)
class Answer(Generic[T]):
    """A positive answer: the records and how many seconds it may be cached.

    C{ttl} is the smallest TTL along the answer's CNAME chain (RFC 2181
    section 5.2 makes all records of one RRset share a TTL; a CNAME may
    expire earlier than its target).  C{secure} is whether the resolver
    said the answer was DNSSEC-validated (the AD bit, RFC 4035 section
    3.2.3); it is only ever True from a resolver asked to use DNSSEC.
    """

    records: tuple[T, ...]
    ttl: float
    secure: bool = False


class DNSError(Exception):
    """A lookup that produced no records.

    C{kind} is one of L{KINDS}; C{name} and C{rdtype} say what was asked;
    C{detail} is what the resolver reported (for the log); C{ttl} is the
    negative-caching time in seconds for C{"nxdomain"} and C{"nodata"}
    when the server sent its SOA (RFC 2308 section 5), else None.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        rdtype: str,
        detail: str = "",
        *,
        ttl: float | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"bad DNSError kind {kind!r}")
        self.kind = kind
        self.name = name
        self.rdtype = rdtype
        self.detail = detail
        self.ttl = ttl
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One readable line, e.g. C{"example.com/MX: no such domain"}.

        For temporary failures the resolver's own report follows the name
        (C{"example.com/MX: no answer within 10 s"}).
        """
        prefix = f"{self.name}/{self.rdtype}"
        if self.kind == TEMPORARY:
            return f"{prefix}: {self.detail or 'temporary failure'}"
        what = "no such domain" if self.kind == NXDOMAIN else f"no {self.rdtype} record"
        return f"{prefix}: {what} ({self.detail})" if self.detail else f"{prefix}: {what}"

    @property
    def temporary(self) -> bool:
        return self.kind == TEMPORARY

    def __repr__(self) -> str:
        return f"DNSError({self.kind!r}, {self.name!r}, {self.rdtype!r}, ttl={self.ttl!r})"


class Runner(Protocol):
    """Runs blocking work off the reactor thread: C{deferToThreadPool} curried."""

    def __call__(self, work: Callable[[], T], /) -> Deferred[T]: ...


def _negative_ttl(response: dns.message.Message | None) -> float | None:
    """The RFC 2308 section 5 negative TTL of a response, if it has an SOA."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            soa: Any = rrset[0]
            return float(min(rrset.ttl, soa.minimum))
    return None


def _exchange_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return ""
    return str(name.to_text(omit_final_dot=True)).lower()


@implementer(IResolver)
class DNSPythonResolver:
    """L{IResolver} on dnspython's stub resolver, each query run by C{runner}.

    @param runner: runs one blocking query and returns a Deferred of its
        result, e.g. C{partial(deferToThreadPool, reactor, pool)}.
    @param nameservers: IP addresses of the recursive servers to ask, or
        None for those in C{/etc/resolv.conf}.
    @param port: the servers' port (tests run a server on a high port).
    @param timeout: total seconds one lookup may take, over all servers
        and retries (dnspython's I{lifetime}); when it passes the lookup
        fails as C{"temporary"}.
    @param dnssec: ask for DNSSEC and report the AD bit of each answer as
        L{Answer.secure} (see the module docstring).

    dnspython retries over TCP by itself when a UDP answer is truncated
    (RFC 7766 section 5).  The search list is never applied: mail domains
    are always absolute.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 10.0,
        dnssec: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"DNS timeout must be positive, not {timeout!r}")
        if nameservers is None:
            try:
                resolver = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as e:
                raise ConfigError(
                    "no DNS server: [delivery] dns_servers is empty and the system's "
                    f"/etc/resolv.conf names none ({e})"
                ) from e
        else:
            if not nameservers:
                raise ValueError("nameservers must name at least one server (or be None)")
            for server in nameservers:
                try:
                    ipaddress.ip_address(server)
                except ValueError:
                    raise ValueError(f"DNS server {server!r} is not an IP address") from None
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.lifetime = timeout
        # One attempt per server may not take the whole lifetime, or a
        # single silent server would leave no time to ask the next one.
        resolver.timeout = min(resolver.timeout, timeout)
        resolver.cache = None
        if dnssec:
            # RFC 6840 section 5.7: AD in a query asks for AD in the answer;
            # DO (RFC 3225) is what older validating resolvers wait for.
            resolver.flags = dns.flags.RD | dns.flags.AD
            resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._resolver = resolver
        self._runner = runner
        self.timeout = timeout
        self.dnssec = dnssec

    @property
    def nameservers(self) -> list[str]:
        """The servers this resolver asks, as text."""
        return [str(ns) for ns in self._resolver.nameservers]

    def lookup_mx(self, domain: str) -> Deferred[Answer[MXRecord]]:
        """Fire with the MX records of C{domain}, or fail with L{DNSError}."""
        return self._runner(partial(self._query, domain, "MX"))

    def lookup_addresses(self, host: str, rdtype: str) -> Deferred[Answer[str]]:
        """Fire with the addresses (text form) of C{host}, or fail with L{DNSError}."""
        if rdtype not in ADDRESS_TYPES:
            raise ValueError(f"address lookups are A or AAAA, not {rdtype!r}")
        return self._runner(partial(self._query, host, rdtype))

    def lookup_txt(self, name: str) -> Deferred[Answer[str]]:
        """Fire with the TXT records of C{name}, each one's strings joined."""
        return self._runner(partial(self._query, name, "TXT"))

    def lookup_tlsa(self, name: str) -> Deferred[Answer[TLSARecord]]:
        """Fire with the TLSA records of C{name} (e.g. C{_25._tcp.mx.example.com})."""
        return self._runner(partial(self._query, name, "TLSA"))

    def _query(self, name: str, rdtype: str) -> Answer[Any]:
        """One blocking lookup; runs in the runner's thread."""
        try:
            qname = dns.name.from_text(name, idna_codec=dns.name.IDNA_2008_Practical)
        except (dns.exception.DNSException, ValueError, UnicodeError) as e:
            # A name that cannot be written in DNS cannot exist in it.
            raise DNSError(NXDOMAIN, name, rdtype, f"invalid name: {e}") from None
        try:
            answer = self._resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as e:
            responses: dict[Any, dns.message.Message] = e.kwargs.get("responses") or {}
            ttl = _negative_ttl(next(reversed(responses.values()), None))
            raise DNSError(NXDOMAIN, name, rdtype, ttl=ttl) from None
        except dns.resolver.NoAnswer:  # not raised with raise_on_no_answer=False
            raise DNSError(NODATA, name, rdtype) from None
        except dns.resolver.LifetimeTimeout:
            raise DNSError(
                TEMPORARY, name, rdtype, f"no answer within {self.timeout:g} s"
            ) from None
        except (dns.exception.DNSException, OSError) as e:
            # NoNameservers (SERVFAIL, REFUSED, unreachable), YXDOMAIN,
            # malformed answers: a later attempt may succeed.
            raise DNSError(TEMPORARY, name, rdtype, str(e) or type(e).__name__) from None
        if answer.rrset is None:
            raise DNSError(NODATA, name, rdtype, ttl=_negative_ttl(answer.response))
        ttl = float(answer.chaining_result.minimum_ttl)
        records: tuple[Any, ...]
        if rdtype == "MX":
            records = tuple(
                MXRecord(int(rr.preference), _exchange_text(rr.exchange)) for rr in answer.rrset
            )
        elif rdtype == "TXT":
            # RFC 7208 section 3.3 and RFC 8461 section 3.1: the strings of
            # one record are joined without anything between them.
            records = tuple(b"".join(rr.strings).decode("utf-8", "replace") for rr in answer.rrset)
        elif rdtype == "TLSA":
            records = tuple(
                TLSARecord(int(rr.usage), int(rr.selector), int(rr.mtype), bytes(rr.cert))
                for rr in answer.rrset
            )
        else:
            records = tuple(str(rr.address) for rr in answer.rrset)
        secure = self.dnssec and bool(answer.response.flags & dns.flags.AD)
        return Answer(records, ttl, secure)


_Key = tuple[str, str]


@implementer(IResolver)
class CachingResolver:
    """An L{IResolver} that remembers the answers of another one.

    Positive answers are kept for their TTL, at most C{max_ttl} seconds.
    C{"nxdomain"} and C{"nodata"} are kept for C{negative_ttl} seconds, or
    the answer's own negative TTL (RFC 2308 section 5) when that is
    smaller.  Temporary failures are never kept: the next lookup asks
    again.  A TTL of zero means "do not cache" (RFC 1035 section 3.2.1).

    Lookups of the same name and type that overlap in time share one
    query to the wrapped resolver.  At most C{max_entries} answers are
    kept; when a new one would exceed that, the oldest one is dropped.

    Answers served from the cache carry their remaining TTL and keep
    whether they were DNSSEC-validated.
    """

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        *,
        max_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        max_entries: int = 10_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._resolver = resolver
        self._clock = clock
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        # key -> (expiry time, Answer or DNSError), oldest insertion first
        self._entries: OrderedDict[_Key, tuple[float, Answer[Any] | DNSError]] = OrderedDict()
        # key -> the callers waiting for the one query in flight
        self._in_flight: dict[_Key, list[Deferred[Any]]] = {}

    def __len__(self) -> int:
        """The number of cached answers, including expired ones not yet dropped."""
        return len(self._entries)

    def lookup_mx(self, domain: str) -> Deferred[Any]:
        return self._lookup(domain, "MX", lambda: self._resolver.lookup_mx(domain))

    def lookup_addresses(self, host: str, rdtype: str) -> Deferred[Any]:
        if rdtype not in ADDRESS_TYPES:
            raise ValueError(f"address lookups are A or AAAA, not {rdtype!r}")
        return self._lookup(host, rdtype, lambda: self._resolver.lookup_addresses(host, rdtype))

    def lookup_txt(self, name: str) -> Deferred[Any]:
        return self._lookup(name, "TXT", lambda: self._resolver.lookup_txt(name))

    def lookup_tlsa(self, name: str) -> Deferred[Any]:
        return self._lookup(name, "TLSA", lambda: self._resolver.lookup_tlsa(name))

    def clear(self) -> None:
        """Forget every cached answer (lookups in flight are unaffected)."""
        self._entries.clear()

    def _lookup(self, name: str, rdtype: str, query: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        key = (name.lower().rstrip("."), rdtype)
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            expires, result = entry
            if now < expires:
                return self._from_cache(result, expires - now)
            del self._entries[key]
        mine: Deferred[Any] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._in_flight[key] = [mine]
        # The query starts only after the waiter is registered, so that a
        # resolver that answers at once still reaches this caller.
        maybeDeferred(query).addBoth(self._done, key, waiters)
        return mine

    def _from_cache(self, result: Answer[Any] | DNSError, remaining: float) -> Deferred[Any]:
        if isinstance(result, Answer):
            return succeed(Answer(result.records, remaining, result.secure))
        ttl = None if result.ttl is None else remaining
        return fail(DNSError(result.kind, result.name, result.rdtype, result.detail, ttl=ttl))

    def _done(self, result: Any, key: _Key, waiters: list[Deferred[Any]]) -> None:
        if self._in_flight.get(key) is waiters:
            del self._in_flight[key]
        self._store(key, result)
        for d in waiters:
            # A caller that cancelled its own Deferred is simply skipped
            # (Deferred.cancel without a canceller ignores later results);
            # the shared query is never cancelled on its behalf.
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _store(self, key: _Key, result: Any) -> None:
        ttl: float
        value: Answer[Any] | DNSError
        if isinstance(result, Answer):
            ttl, value = min(result.ttl, self.max_ttl), result
        elif isinstance(result, Failure) and isinstance(result.value, DNSError):
            error = result.value
            if error.temporary:
                return
            ttl = self.negative_ttl if error.ttl is None else min(error.ttl, self.negative_ttl)
            value = error
        else:
            return
        if ttl <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self._clock.seconds() + ttl, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
