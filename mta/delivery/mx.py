"""Next hops: which hosts and addresses to try for a destination.

For a recipient domain this is RFC 5321 section 5.1: look up the MX
records, sort them by preference, shuffle hosts of equal preference, and
look up the addresses of each host; with no MX records, the domain itself
is the only, implicit, MX.  RFC 7505's null MX says the domain takes no
mail at all.  For a configured route (a smarthost), L{route_hops} does the
same for the relay named in Postfix's relayhost syntax.

The result is a list of L{NextHop}s in the order to try them, each with
the addresses to try for that host.  The delivery agent walks that list,
connecting to at most C{session_limit} of the addresses; this module caps
the addresses at C{address_limit} in total, as Postfix's
C{smtp_mx_address_limit} does (default 5).

Every failure is a L{DeliveryError} of kind C{"dns"} with a reply that
already says whether it is temporary (4xx: retry later) or permanent (5xx:
bounce), so that the caller does not have to interpret DNS.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.delivery.dns import ADDRESS_TYPES, NODATA, NXDOMAIN, Answer, DNSError, MXRecord
from mta.errors import DeliveryError, Reply
from mta.hostnames import is_ip as _is_ip
from mta.hostnames import parse_address_literal, parse_relay, to_ascii
from mta.interfaces import IResolver

log = Logger()

#: At most this many MX hosts (after sorting) have their addresses looked
#: up in one attempt.  Postfix has no such limit, but only the first few
#: hosts can ever be used (C{address_limit} addresses in total), and a
#: hostile domain must not make one delivery attempt send hundreds of
#: queries.
MX_HOST_LIMIT = 16


@dataclass(frozen=True)
class NextHop:
    """One host to try and the addresses to try it at, in order.

    C{mx} is False when the host is not from an MX record: the implicit
    MX of RFC 5321 section 5.1, an address literal, or a route given as
    C{[host]}.  C{host} is the A-label (ASCII) form, or the IP address
    for a literal; it is the name to log and to check a certificate
    against.

    C{secure} is whether the DNS said so with DNSSEC all the way: the MX
    answer (for an MX host) and every address answer of the host were
    validated (L{Answer.secure}).  Only then may its TLSA records be
    used (RFC 7672 sections 2.2.1 and 2.2.2).
    """

    host: str
    preference: int
    addresses: tuple[str, ...]
    port: int = 25
    mx: bool = True
    secure: bool = False


async def next_hops(
    resolver: IResolver,
    domain: str,
    *,
    port: int = 25,
    families: tuple[str, ...] = ("A", "AAAA"),
    shuffle: Callable[[list[Any]], None] = random.shuffle,
    address_limit: int = 5,
) -> list[NextHop]:
    """The hosts to try for mail to C{domain}, best first (RFC 5321 section 5.1).

    - An address literal (C{[192.0.2.1]}, C{[IPv6:...]}) is one hop with
      that address and no DNS query (RFC 5321 section 4.1.3).
    - The domain is converted to ASCII (L{to_ascii}); a domain that
      cannot be is permanent C{550 5.1.2}.
    - MX records are sorted by preference; hosts of equal preference are
      put in random order with C{shuffle} (section 5.1: "randomize them
      to spread the load").  MX records whose exchange is an IP address
      or the root are skipped (they name no host); a host listed twice
      keeps its best preference.
    - No MX records (NODATA): the domain itself is the implicit MX with
      preference 0 (section 5.1), a hop with C{mx=False}.
    - A null MX (RFC 7505 section 3: the only MX has exchange C{"."}) is
      permanent C{556 5.1.10}, without any address lookup (RFC 7505
      section 4; the 556 code is from RFC 7504).
    - NXDOMAIN for the domain is permanent C{550 5.1.2}; a temporary
      failure of the MX query is C{451 4.4.3} (no fallback to address
      records: that would skip the MX hosts on a transient error).
    - Each host's addresses are looked up for each of C{families} in that
      order (C{("AAAA", "A")} prefers IPv6); the records of one type are
      shuffled too (Postfix's C{smtp_randomize_addresses}).  Hosts are
      looked up concurrently; an address already listed for a better host
      is not listed again.
    - At most C{address_limit} addresses are returned in total
      (Postfix's C{smtp_mx_address_limit}), in MX order.  When both
      families are present and do not all fit, both keep a share as in
      Postfix's C{smtp_balance_inet_protocols} (on by default), so that a
      destination with many IPv6 addresses stays reachable over IPv4.
    - A host whose address lookups fail is skipped as long as another
      host has an address (Postfix: "as long as we are able to look up
      any host address, we ignore problems with DNS lookups").  If none
      has: C{451 4.4.3} when any lookup failed temporarily (a soft error
      dominates, as in Postfix's C{smtp_addr_one}), else a permanent
      C{550 5.4.4} "host not found" -- Postfix's default
      (C{smtp_defer_if_no_mx_address_found = no}) and its status code:
      RFC 3463 X.4.4 is "unable to route", which is what a domain whose
      every mail host is missing from the DNS amounts to.  The same
      applies to the implicit MX, whose address lookups failing
      permanently also give C{550 5.4.4}.
    """
    _check_arguments(families, address_limit)
    if domain.startswith("["):
        try:
            address = parse_address_literal(domain)
        except ValueError as e:
            raise DeliveryError(Reply(550, "5.1.2", str(e)), "dns") from None
        return [_literal_hop(address, port, families)]
    try:
        name = to_ascii(domain)
    except ValueError as e:
        raise DeliveryError(Reply(550, "5.1.2", str(e)), "dns") from None
    try:
        answer: Answer[MXRecord] = await resolver.lookup_mx(name)
    except DNSError as e:
        if e.kind == NXDOMAIN:
            raise DeliveryError(
                Reply(550, "5.1.2", f"Domain {domain} does not exist"), "dns"
            ) from None
        if e.kind != NODATA:
            raise DeliveryError(Reply(451, "4.4.3", f"DNS lookup failed: {e}"), "dns") from None
        answer = Answer((), 0)
    records = [MXRecord(r.preference, r.exchange.lower().rstrip(".")) for r in answer.records]
    if not records:
        return await _host_hops(
            resolver,
            name,
            port=port,
            families=families,
            shuffle=shuffle,
            address_limit=address_limit,
            missing=f"Domain {domain} has no MX and no address record",
        )
    if all(r.exchange == "" for r in records):
        raise DeliveryError(Reply(556, "5.1.10", "Recipient address has null MX"), "dns")
    candidates = _order_mx(records, shuffle)
    if not candidates:
        raise DeliveryError(Reply(550, "5.4.4", f"No MX record of {domain} names a host"), "dns")
    hops, errors = await _resolve_hosts(
        resolver,
        candidates[:MX_HOST_LIMIT],
        port=port,
        families=families,
        shuffle=shuffle,
        address_limit=address_limit,
        mx=True,
        secure=answer.secure,
    )
    if hops:
        return hops
    hosts = ", ".join(host for host, _ in candidates[:3])
    more = ", ..." if len(candidates) > 3 else ""
    raise _no_address(errors, f"No MX host of {domain} has an address ({hosts}{more})")


async def route_hops(
    resolver: IResolver,
    spec: str,
    *,
    families: tuple[str, ...] = ("A", "AAAA"),
    shuffle: Callable[[list[Any]], None] = random.shuffle,
    address_limit: int = 5,
) -> list[NextHop]:
    """The hosts to try for a configured relay (see L{parse_relay}).

    C{"host:port"} is looked up like a recipient domain (L{next_hops});
    C{"[host]:port"} is the address records of C{host} (C{mx=False});
    an IP address is used as it is.

    Every failure is temporary: a relay that does not resolve is the
    operator's configuration problem, not a reason to bounce the mail.
    Postfix does the same for C{relayhost} (C{smtp_connect.c}: "pretend
    that these are recoverable rather than bouncing the mail") and uses
    status 4.3.5 ("system incorrectly configured", RFC 3463), keeping the
    original text.  An unparsable C{spec} is 4.3.5 too, kind C{"config"}.
    """
    _check_arguments(families, address_limit)
    try:
        host, port, mx_lookup = parse_relay(spec)
    except ValueError as e:
        raise DeliveryError(Reply(451, "4.3.5", str(e)), "config") from None
    try:
        if _is_ip(host):
            return [_literal_hop(host, port, families)]
        if mx_lookup:
            return await next_hops(
                resolver,
                host,
                port=port,
                families=families,
                shuffle=shuffle,
                address_limit=address_limit,
            )
        return await _host_hops(
            resolver,
            host,
            port=port,
            families=families,
            shuffle=shuffle,
            address_limit=address_limit,
            missing=f"Relay host {host} has no address record",
        )
    except DeliveryError as e:
        if e.temporary:
            raise
        raise DeliveryError(
            Reply(451, "4.3.5", f"{e.reply.text} (relay {spec.strip()})"), e.kind
        ) from None


async def _host_hops(
    resolver: IResolver,
    host: str,
    *,
    port: int,
    families: tuple[str, ...],
    shuffle: Callable[[list[Any]], None],
    address_limit: int,
    missing: str,
) -> list[NextHop]:
    """One host that is not an MX (an implicit MX, a [relay]): its addresses."""
    hops, errors = await _resolve_hosts(
        resolver,
        [(host, 0)],
        port=port,
        families=families,
        shuffle=shuffle,
        address_limit=address_limit,
        mx=False,
        secure=True,
    )
    if hops:
        return hops
    raise _no_address(errors, missing)


def _check_arguments(families: tuple[str, ...], address_limit: int) -> None:
    if not families or len(set(families)) != len(families):
        raise ValueError(f"families must name A and/or AAAA once each, not {families!r}")
    for family in families:
        if family not in ADDRESS_TYPES:
            raise ValueError(f"unknown address family {family!r}: use A or AAAA")
    if address_limit < 1:
        raise ValueError(f"address_limit must be at least 1, not {address_limit}")


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return "A" if address.version == 4 else "AAAA"


def _literal_hop(address: str, port: int, families: tuple[str, ...]) -> NextHop:
    """The one hop for an IP address given directly (no DNS query)."""
    family = _family(ipaddress.ip_address(address))
    if family not in families:
        version = "IPv4" if family == "A" else "IPv6"
        raise DeliveryError(
            Reply(550, "5.4.4", f"Cannot deliver to {address}: {version} delivery is disabled"),
            "config",
        )
    return NextHop(address, 0, (address,), port, mx=False)


def _order_mx(
    records: Sequence[MXRecord], shuffle: Callable[[list[Any]], None]
) -> list[tuple[str, int]]:
    """Usable MX hosts as (host, preference), sorted, equal preferences shuffled."""
    groups: dict[int, list[str]] = {}
    seen: set[str] = set()
    for record in sorted(records, key=lambda r: r.preference):
        host = record.exchange
        if not host or host in seen:
            continue
        if _is_ip(host) or host.startswith("["):
            # RFC 5321 section 5.1 wants a domain name here; Postfix
            # refuses such records too ("numeric domain name").
            log.info("skipping MX record with an address as its name: {host}", host=host)
            continue
        seen.add(host)
        groups.setdefault(record.preference, []).append(host)
    ordered: list[tuple[str, int]] = []
    for preference, hosts in groups.items():
        if len(hosts) > 1:
            shuffle(hosts)
        ordered.extend((host, preference) for host in hosts)
    return ordered


def _settle(d: Deferred[Any]) -> Deferred[Any]:
    """The Deferred's result, with a DNSError failure turned into a value."""

    def trap(failure: Failure) -> DNSError:
        failure.trap(DNSError)
        assert isinstance(failure.value, DNSError)
        return failure.value

    return d.addErrback(trap)


async def _resolve_hosts(
    resolver: IResolver,
    candidates: list[tuple[str, int]],
    *,
    port: int,
    families: tuple[str, ...],
    shuffle: Callable[[list[Any]], None],
    address_limit: int,
    mx: bool,
    secure: bool,
) -> tuple[list[NextHop], list[DNSError]]:
    """Look up the addresses of C{candidates}; returns the hops and the errors.

    C{secure} is whether the answer that named the candidates was
    DNSSEC-validated; a hop is secure when that and all of its address
    answers were.
    """
    # Start every lookup before waiting for any, so they run concurrently.
    pending = [
        [_settle(resolver.lookup_addresses(host, family)) for family in families]
        for host, _ in candidates
    ]
    errors: list[DNSError] = []
    entries: list[tuple[int, str, str]] = []  # (candidate index, family, address)
    seen: set[str] = set()
    validated = [secure] * len(candidates)
    for index, lookups in enumerate(pending):
        for family, lookup in zip(families, lookups, strict=True):
            result = await lookup
            if isinstance(result, DNSError):
                errors.append(result)
                continue
            validated[index] = validated[index] and result.secure
            addresses = [a for a in result.records if _is_ip(a, family)]
            if len(addresses) > 1:
                shuffle(addresses)
            for text in addresses:
                address = str(ipaddress.ip_address(text))
                if address not in seen:
                    seen.add(address)
                    entries.append((index, family, address))
    kept = _limit(entries, address_limit)
    hops: list[NextHop] = []
    for index, (host, preference) in enumerate(candidates):
        found = tuple(a for i, _, a in kept if i == index)
        if found:
            hops.append(NextHop(host, preference, found, port, mx, validated[index]))
        elif not any(i == index for i, _, _ in entries):
            log.info("skipping host {host}: no address", host=host)
    return hops, errors


def _limit(entries: list[tuple[int, str, str]], limit: int) -> list[tuple[int, str, str]]:
    """At most C{limit} entries, in order, with both families balanced.

    Postfix's C{smtp_balance_inet_proto}: when there are addresses of both
    families and not all fit, the family with few addresses keeps all of
    them (if they fill at most half), else the first-listed family gets
    the larger half.
    """
    if len(entries) <= limit:
        return entries
    counts: dict[str, int] = {}
    for _, family, _ in entries:
        counts[family] = counts.get(family, 0) + 1
    if len(counts) < 2:
        return entries[:limit]
    first = entries[0][1]
    other = next(f for f in counts if f != first)
    if counts[other] <= limit // 2:
        targets = {other: counts[other], first: limit - counts[other]}
    elif counts[first] <= limit // 2:
        targets = {first: counts[first], other: limit - counts[first]}
    else:
        targets = {first: (limit + 1) // 2, other: limit // 2}
    kept = []
    for entry in entries:
        if targets[entry[1]] > 0:
            targets[entry[1]] -= 1
            kept.append(entry)
    return kept


def _no_address(errors: list[DNSError], text: str) -> DeliveryError:
    """The error when no host had an address: soft if any failure was soft."""
    for error in errors:
        if error.temporary:
            return DeliveryError(Reply(451, "4.4.3", f"DNS lookup failed: {error}"), "dns")
    return DeliveryError(Reply(550, "5.4.4", f"Host or domain name not found: {text}"), "dns")
