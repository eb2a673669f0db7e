"""Next hops (RFC 5321 section 5.1, RFC 7505) on a fake resolver and on loopback DNS."""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mta.delivery.dns import CachingResolver, DNSPythonResolver
from mta.delivery.fakedns import FakeResolver
from mta.delivery.mx import MX_HOST_LIMIT, NextHop, next_hops, route_hops
from mta.errors import DeliveryError
from mta.hostnames import parse_address_literal, parse_relay, to_ascii
from mta.interfaces import IResolver
from tests.dnsserver import DNSTestServer


def keep_order(items: list[Any]) -> None:
    """A shuffle that leaves the order as it is."""


def reverse(items: list[Any]) -> None:
    """A deterministic 'shuffle' that is easy to predict."""
    items.reverse()


class Shuffles:
    """A shuffle that records what it was given and reverses it."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def __call__(self, items: list[Any]) -> None:
        self.calls.append(list(items))
        items.reverse()


def hosts(hops: list[NextHop]) -> list[str]:
    return [hop.host for hop in hops]


def addresses(hops: list[NextHop]) -> list[str]:
    return [a for hop in hops for a in hop.addresses]


class NextHopsTestCase(SynchronousTestCase):
    """Shared by the next_hops tests: the hops for a domain on a FakeResolver in a fixed order, the
    DeliveryError of a failing lookup, and assertReply on its code and enhanced status (always of
    kind dns)."""

    def hops(self, resolver: FakeResolver, domain: str, **kwargs: Any) -> list[NextHop]:
        kwargs.setdefault("shuffle", keep_order)
        d = Deferred.fromCoroutine(next_hops(resolver, domain, **kwargs))
        result: list[NextHop] = self.successResultOf(d)
        return result

    def error(self, resolver: FakeResolver, domain: str, **kwargs: Any) -> DeliveryError:
        kwargs.setdefault("shuffle", keep_order)
        d = Deferred.fromCoroutine(next_hops(resolver, domain, **kwargs))
        value = self.failureResultOf(d, DeliveryError).value
        assert isinstance(value, DeliveryError)
        return value

    def assertReply(self, error: DeliveryError, code: int, enhanced: str) -> None:
        self.assertEqual((error.reply.code, error.reply.enhanced), (code, enhanced))
        self.assertEqual(error.kind, "dns")


class MXOrderTests(NextHopsTestCase):
    """MX hosts in order: by preference with equal preferences shuffled (at random by default), the
    port, a host listed twice keeping its best preference, exchanges normalized, MX records
    naming an IP address skipped (only such records is permanent), the number of host lookups
    capped and the lookups concurrent."""

    def test_sorted_by_preference(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(20, "b.mx"), (10, "a.mx"), (30, "c.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
                "b.mx": {"A": ["192.0.2.2"]},
                "c.mx": {"A": ["192.0.2.3"]},
            }
        )
        self.assertEqual(
            self.hops(resolver, "example.com"),
            [
                NextHop("a.mx", 10, ("192.0.2.1",)),
                NextHop("b.mx", 20, ("192.0.2.2",)),
                NextHop("c.mx", 30, ("192.0.2.3",)),
            ],
        )

    def test_equal_preferences_are_shuffled(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (10, "b.mx"), (10, "c.mx"), (20, "d.mx")]},
                **{f"{h}.mx": {"A": [f"192.0.2.{i}"]} for i, h in enumerate("abcd", 1)},
            }
        )
        shuffle = Shuffles()
        hops = self.hops(resolver, "example.com", shuffle=shuffle)
        self.assertEqual(hosts(hops), ["c.mx", "b.mx", "a.mx", "d.mx"])
        self.assertEqual(shuffle.calls, [["a.mx", "b.mx", "c.mx"]])

    def test_default_shuffle_is_random(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (10, "b.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
                "b.mx": {"A": ["192.0.2.2"]},
            }
        )
        firsts = set()
        for _ in range(64):
            d = Deferred.fromCoroutine(next_hops(resolver, "example.com"))
            firsts.add(self.successResultOf(d)[0].host)
        self.assertEqual(firsts, {"a.mx", "b.mx"})

    def test_port(self) -> None:
        resolver = FakeResolver(
            {"example.com": {"MX": [(10, "a.mx")]}, "a.mx": {"A": ["192.0.2.1"]}}
        )
        self.assertEqual(self.hops(resolver, "example.com", port=2525)[0].port, 2525)

    def test_host_listed_twice_keeps_best_preference(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(30, "a.mx"), (10, "a.mx"), (20, "b.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
                "b.mx": {"A": ["192.0.2.2"]},
            }
        )
        hops = self.hops(resolver, "example.com")
        self.assertEqual([(h.host, h.preference) for h in hops], [("a.mx", 10), ("b.mx", 20)])

    def test_exchange_is_normalized(self) -> None:
        resolver = FakeResolver(
            {"example.com": {"MX": [(10, "A.MX.")]}, "a.mx": {"A": ["192.0.2.1"]}}
        )
        self.assertEqual(hosts(self.hops(resolver, "example.com")), ["a.mx"])

    def test_mx_naming_an_ip_address_is_skipped(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(5, "192.0.2.9"), (6, "[192.0.2.8]"), (10, "a.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
            }
        )
        self.assertEqual(hosts(self.hops(resolver, "example.com")), ["a.mx"])
        self.assertNotIn(("192.0.2.9", "A"), resolver.queries)

    def test_only_ip_address_mx_records_is_permanent(self) -> None:
        resolver = FakeResolver({"example.com": {"MX": [(10, "192.0.2.9")]}})
        error = self.error(resolver, "example.com")
        self.assertReply(error, 550, "5.4.4")
        self.assertFalse(error.temporary)

    def test_mx_host_lookups_are_capped(self) -> None:
        names = [f"mx{i:02}.example.com" for i in range(MX_HOST_LIMIT + 4)]
        resolver = FakeResolver({"example.com": {"MX": [(i, n) for i, n in enumerate(names)]}})
        self.error(resolver, "example.com", families=("A",))
        looked_up = [name for name, rdtype in resolver.queries if rdtype == "A"]
        self.assertEqual(looked_up, names[:MX_HOST_LIMIT])

    def test_hosts_are_looked_up_concurrently(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
                "b.mx": {"A": ["192.0.2.2"]},
            }
        )
        resolver.hold = True
        d = Deferred.fromCoroutine(next_hops(resolver, "example.com", shuffle=keep_order))
        resolver.release()  # the MX answer
        self.assertEqual(
            resolver.queries[1:],
            [("a.mx", "A"), ("a.mx", "AAAA"), ("b.mx", "A"), ("b.mx", "AAAA")],
        )
        self.assertNoResult(d)
        resolver.release()
        self.assertEqual(hosts(self.successResultOf(d)), ["a.mx", "b.mx"])


class ImplicitAndNullMXTests(NextHopsTestCase):
    """No MX record (RFC 5321 section 5.1): the domain itself is the host, permanent when it has no
    address and temporary when its address lookup fails; a null MX (RFC 7505) is a permanent 556,
    and a null exchange among real ones is skipped."""

    def test_no_mx_means_the_domain_itself(self) -> None:
        resolver = FakeResolver({"example.com": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]}})
        self.assertEqual(
            self.hops(resolver, "example.com"),
            [NextHop("example.com", 0, ("192.0.2.1", "2001:db8::1"), 25, mx=False)],
        )

    def test_empty_mx_answer_means_the_domain_itself(self) -> None:
        resolver = FakeResolver({"example.com": {"MX": [], "A": ["192.0.2.1"]}})
        self.assertEqual(hosts(self.hops(resolver, "example.com")), ["example.com"])

    def test_no_mx_and_no_address_is_permanent(self) -> None:
        resolver = FakeResolver({"example.com": {"TXT": ["v=spf1 -all"]}})
        error = self.error(resolver, "example.com")
        self.assertReply(error, 550, "5.4.4")
        self.assertIn("example.com has no MX and no address record", error.reply.text)

    def test_no_mx_and_temporary_address_failure_is_temporary(self) -> None:
        resolver = FakeResolver({"example.com": {"A": "temporary"}})
        error = self.error(resolver, "example.com")
        self.assertReply(error, 451, "4.4.3")
        self.assertTrue(error.temporary)

    def test_null_mx_is_permanent_556(self) -> None:
        resolver = FakeResolver({"example.com": {"MX": [(0, ".")], "A": ["192.0.2.1"]}})
        error = self.error(resolver, "example.com")
        self.assertReply(error, 556, "5.1.10")
        self.assertEqual(error.reply.text, "Recipient address has null MX")
        self.assertFalse(error.temporary)
        self.assertEqual(resolver.queries, [("example.com", "MX")])

    def test_null_exchange_among_real_ones_is_skipped(self) -> None:
        resolver = FakeResolver(
            {"example.com": {"MX": [(0, "."), (10, "a.mx")]}, "a.mx": {"A": ["192.0.2.1"]}}
        )
        self.assertEqual(hosts(self.hops(resolver, "example.com")), ["a.mx"])


class DNSFailureTests(NextHopsTestCase):
    """DNS failures: NXDOMAIN is permanent, a temporary MX failure is temporary without falling back
    to the domain's address, a failing MX host is skipped, one failing address family keeps the
    other, all hosts failing is temporary if any failure was and permanent if none was found."""

    def test_nxdomain_is_permanent(self) -> None:
        error = self.error(FakeResolver({}), "nowhere.example")
        self.assertReply(error, 550, "5.1.2")
        self.assertEqual(error.reply.text, "Domain nowhere.example does not exist")
        self.assertFalse(error.temporary)

    def test_temporary_mx_failure_is_temporary_without_address_fallback(self) -> None:
        resolver = FakeResolver({"example.com": {"servfail": ["MX"], "A": ["192.0.2.1"]}})
        error = self.error(resolver, "example.com")
        self.assertReply(error, 451, "4.4.3")
        self.assertTrue(error.temporary)
        self.assertIn("example.com/MX", error.reply.text)
        self.assertEqual(resolver.queries, [("example.com", "MX")])

    def test_failing_mx_host_is_skipped(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx"), (30, "c.mx")]},
                "a.mx": {"servfail": True},
                "c.mx": {"A": ["192.0.2.3"]},
            }
        )
        self.assertEqual(self.hops(resolver, "example.com"), [NextHop("c.mx", 30, ("192.0.2.3",))])

    def test_host_with_one_family_failing_keeps_the_other(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx")]},
                "a.mx": {"A": "temporary", "AAAA": ["2001:db8::1"]},
            }
        )
        self.assertEqual(addresses(self.hops(resolver, "example.com")), ["2001:db8::1"])

    def test_all_hosts_failing_with_one_temporary_is_temporary(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx")]},
                "b.mx": {"A": "temporary", "AAAA": "nodata"},
            }
        )
        error = self.error(resolver, "example.com")
        self.assertReply(error, 451, "4.4.3")
        self.assertIn("b.mx/A", error.reply.text)

    def test_all_hosts_not_found_is_permanent(self) -> None:
        resolver = FakeResolver(
            {"example.com": {"MX": [(10, "a.mx"), (20, "b.mx")]}, "b.mx": {"TXT": ["x"]}}
        )
        error = self.error(resolver, "example.com")
        self.assertReply(error, 550, "5.4.4")
        self.assertFalse(error.temporary)
        self.assertIn("a.mx, b.mx", error.reply.text)


class AddressTests(NextHopsTestCase):
    """Addresses of the hosts: address_limit counted across hosts in MX order, the families' order
    per host, one family only, unknown families refused, a minority family keeping its addresses
    when both are large, addresses of a host shuffled, an address of a better host not repeated,
    malformed addresses from the resolver ignored."""

    def test_address_limit_counts_across_hosts_in_mx_order(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx"), (30, "c.mx")]},
                "a.mx": {"A": ["192.0.2.1", "192.0.2.2", "192.0.2.3"]},
                "b.mx": {"A": ["192.0.2.4", "192.0.2.5", "192.0.2.6"]},
                "c.mx": {"A": ["192.0.2.7"]},
            }
        )
        hops = self.hops(resolver, "example.com")
        self.assertEqual(
            hops,
            [
                NextHop("a.mx", 10, ("192.0.2.1", "192.0.2.2", "192.0.2.3")),
                NextHop("b.mx", 20, ("192.0.2.4", "192.0.2.5")),
            ],
        )

    def test_address_limit_parameter(self) -> None:
        resolver = FakeResolver(
            {"example.com": {"MX": [(10, "a.mx")]}, "a.mx": {"A": ["192.0.2.1", "192.0.2.2"]}}
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com", address_limit=1)), ["192.0.2.1"]
        )

    def test_families_order_per_host(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx")]},
                "a.mx": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
                "b.mx": {"A": ["192.0.2.2"], "AAAA": ["2001:db8::2"]},
            }
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com")),
            ["192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2"],
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com", families=("AAAA", "A"))),
            ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"],
        )

    def test_one_family_only(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx")]},
                "a.mx": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
            }
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com", families=("AAAA",))), ["2001:db8::1"]
        )
        self.assertNotIn(("a.mx", "A"), resolver.queries)

    def test_families_are_checked(self) -> None:
        resolver = FakeResolver({})
        for kwargs in [
            {"families": ()},
            {"families": ("A", "A")},
            {"families": ("MX",)},
            {"address_limit": 0},
        ]:
            d = Deferred.fromCoroutine(next_hops(resolver, "example.com", **kwargs))
            self.failureResultOf(d, ValueError)
        self.assertEqual(resolver.queries, [])

    def test_minority_family_keeps_its_addresses(self) -> None:
        # Postfix smtp_balance_inet_protocols: 2 IPv4 fit in half of 5.
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx")]},
                "a.mx": {"AAAA": [f"2001:db8::{i}" for i in range(1, 7)]},
                "b.mx": {"A": ["192.0.2.1", "192.0.2.2"]},
            }
        )
        hops = self.hops(resolver, "example.com", families=("AAAA", "A"))
        self.assertEqual(
            hops,
            [
                NextHop("a.mx", 10, ("2001:db8::1", "2001:db8::2", "2001:db8::3")),
                NextHop("b.mx", 20, ("192.0.2.1", "192.0.2.2")),
            ],
        )

    def test_both_families_large_share_the_limit(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx")]},
                "a.mx": {
                    "A": [f"192.0.2.{i}" for i in range(1, 5)],
                    "AAAA": [f"2001:db8::{i}" for i in range(1, 5)],
                },
            }
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com")),
            ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2"],
        )

    def test_addresses_of_a_host_are_shuffled(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx")]},
                "a.mx": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"]},
            }
        )
        self.assertEqual(
            addresses(self.hops(resolver, "example.com", shuffle=reverse)),
            ["192.0.2.2", "192.0.2.1", "2001:db8::1"],
        )

    def test_address_listed_for_a_better_host_is_not_repeated(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx"), (20, "b.mx"), (30, "c.mx")]},
                "a.mx": {"A": ["192.0.2.1"]},
                "b.mx": {"A": ["192.0.2.1", "192.0.2.2"]},
                "c.mx": {"A": ["192.0.2.1"]},
            }
        )
        self.assertEqual(
            self.hops(resolver, "example.com"),
            [NextHop("a.mx", 10, ("192.0.2.1",)), NextHop("b.mx", 20, ("192.0.2.2",))],
        )

    def test_malformed_addresses_from_the_resolver_are_ignored(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": {"MX": [(10, "a.mx")]},
                "a.mx": {"A": ["2001:db8::1", "not-an-ip", "192.0.2.1"]},
            }
        )
        self.assertEqual(addresses(self.hops(resolver, "example.com")), ["192.0.2.1"])


class DomainFormTests(NextHopsTestCase):
    """Domain forms: IPv4 and IPv6 address literals need no DNS, a bad literal or one of a disabled
    family is permanent, a UTF-8 domain is looked up by its A-labels, domains are lower-cased,
    and a domain IDNA cannot encode is permanent without a query."""

    def test_ipv4_literal_needs_no_dns(self) -> None:
        resolver = FakeResolver({})
        self.assertEqual(
            self.hops(resolver, "[192.0.2.1]", port=26),
            [NextHop("192.0.2.1", 0, ("192.0.2.1",), 26, mx=False)],
        )
        self.assertEqual(resolver.queries, [])

    def test_ipv6_literal(self) -> None:
        hops = self.hops(FakeResolver({}), "[IPv6:2001:DB8:0::1]")
        self.assertEqual(hops, [NextHop("2001:db8::1", 0, ("2001:db8::1",), 25, mx=False)])

    def test_bad_literal_is_permanent(self) -> None:
        for literal in ["[300.1.1.1]", "[IPv6:nonsense]", "[2001:db8::1]", "[tag:x]", "[1.2.3.4"]:
            self.assertReply(self.error(FakeResolver({}), literal), 550, "5.1.2")

    def test_literal_of_a_disabled_family_is_permanent(self) -> None:
        error = self.error(FakeResolver({}), "[IPv6:2001:db8::1]", families=("A",))
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.4.4"))
        self.assertIn("IPv6 delivery is disabled", error.reply.text)

    def test_utf8_domain_is_looked_up_as_a_labels(self) -> None:
        resolver = FakeResolver(
            {
                "xn--bcher-kva.example": {"MX": [(10, "mx.xn--bcher-kva.example")]},
                "mx.xn--bcher-kva.example": {"A": ["192.0.2.1"]},
            }
        )
        hops = self.hops(resolver, "Bücher.example")
        self.assertEqual(hosts(hops), ["mx.xn--bcher-kva.example"])
        self.assertEqual(resolver.queries[0], ("xn--bcher-kva.example", "MX"))

    def test_domain_is_lower_cased(self) -> None:
        resolver = FakeResolver({"example.com": {"A": ["192.0.2.1"]}})
        self.hops(resolver, "EXAMPLE.Com.")
        self.assertEqual(resolver.queries[0], ("example.com", "MX"))

    def test_unencodable_domain_is_permanent_without_a_query(self) -> None:
        resolver = FakeResolver({})
        for domain in ["☃.net", "a..example", "", "bad domain.example", "x" * 64 + ".com"]:
            self.assertReply(self.error(resolver, domain), 550, "5.1.2")
        self.assertEqual(resolver.queries, [])


class ToAsciiTests(SynchronousTestCase):
    """to_ascii and parse_address_literal: names converted to A-labels or refused (empty labels, a
    snowman, spaces, a label over 63 octets), and address literals parsed (IPv4, IPv6: with its
    tag) or refused."""

    def test_conversions(self) -> None:
        self.assertEqual(to_ascii("Bücher.Example."), "xn--bcher-kva.example")
        self.assertEqual(to_ascii("ß.de"), "xn--zca.de")
        self.assertEqual(to_ascii("MX_1.Example.COM"), "mx_1.example.com")
        self.assertEqual(to_ascii("xn--bcher-kva.example"), "xn--bcher-kva.example")

    def test_refusals(self) -> None:
        for bad in ["", ".", "@", "a..b", "☃.net", "a\\.b.com", "a b.com", "x" * 64 + ".com"]:
            with self.assertRaises(ValueError, msg=bad):
                to_ascii(bad)

    def test_address_literals(self) -> None:
        self.assertEqual(parse_address_literal("[192.0.2.1]"), "192.0.2.1")
        self.assertEqual(parse_address_literal("[ipv6:2001:DB8::1]"), "2001:db8::1")
        for bad in ["192.0.2.1", "[192.0.2]", "[IPv6:192.0.2.1]", "[01.2.3.4]"]:
            with self.assertRaises(ValueError, msg=bad):
                parse_address_literal(bad)


class FakeResolverTests(SynchronousTestCase):
    """The FakeResolver of mta.testing provides IResolver and gives the errors and TTLs it is told
    to."""

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IResolver, FakeResolver()))

    def test_errors_and_ttls(self) -> None:
        resolver = FakeResolver(
            {"a.test": {"A": ["192.0.2.1"], "AAAA": "nxdomain", "ttl": 7}}, negative_ttl=9
        )
        self.assertEqual(self.successResultOf(resolver.lookup_addresses("A.test", "A")).ttl, 7)
        error = self.failureResultOf(resolver.lookup_addresses("a.test", "AAAA")).value
        self.assertEqual((error.kind, error.ttl), ("nxdomain", 9))
        error = self.failureResultOf(resolver.lookup_mx("a.test")).value
        self.assertEqual((error.kind, error.ttl), ("nodata", 9))


class ParseRelayTests(SynchronousTestCase):
    """Relay strings of [routes]: valid forms (bracketed host or address, a host for its MX, a port)
    and invalid ones."""

    def test_valid(self) -> None:
        cases = {
            "[mail.example.com]:2525": ("mail.example.com", 2525, False),
            "[mail.example.com]": ("mail.example.com", 25, False),
            "mail.example.com:587": ("mail.example.com", 587, True),
            "mail.example.com": ("mail.example.com", 25, True),
            " Relay.Example.COM. ": ("relay.example.com", 25, True),
            "[192.0.2.1]:2525": ("192.0.2.1", 2525, False),
            "[IPv6:2001:db8::1]:25": ("2001:db8::1", 25, False),
            "[ipv6:2001:DB8::1]": ("2001:db8::1", 25, False),
            "[2001:db8::1]:26": ("2001:db8::1", 26, False),
            "192.0.2.1:25": ("192.0.2.1", 25, False),
            "[Bücher.example]": ("xn--bcher-kva.example", 25, False),
        }
        for spec, expected in cases.items():
            self.assertEqual(parse_relay(spec), expected, spec)

    def test_invalid(self) -> None:
        cases = {
            "": "empty",
            "   ": "empty",
            "[relay.example": "missing ']'",
            "[]:25": "empty host",
            "relay.example:": "expected ':port'",
            "relay.example:abc": "expected ':port'",
            "relay.example:0": "out of range",
            "relay.example:70000": "out of range",
            "[relay.example]x": "expected ':port'",
            "2001:db8::1": "[IPv6:address]",
            "[IPv6:nonsense]": "not an IPv6 address",
            "[IPv6:192.0.2.1]": "not an IPv6 address",
            ":25": "no host",
            "relay..example": "not a valid domain name",
            "bad host:25": "not a valid domain name",
        }
        for spec, message in cases.items():
            with self.assertRaises(ValueError, msg=spec) as caught:
                parse_relay(spec)
            self.assertIn(message, str(caught.exception), spec)


class RouteHopsTests(SynchronousTestCase):
    """Next hops for a route: a bracketed host by its addresses, a bare host by its MX, an address
    without DNS, families and address_limit applied, an unknown relay host as a temporary
    configuration problem, other temporary failures kept as they are, and a bad spec as a
    configuration error."""

    def setUp(self) -> None:
        self.resolver = FakeResolver(
            {
                "relay.example": {
                    "MX": [(10, "mx.relay.example")],
                    "A": ["192.0.2.10"],
                    "AAAA": ["2001:db8::10"],
                },
                "mx.relay.example": {"A": ["192.0.2.11"]},
                "flaky.example": {"servfail": True},
            }
        )

    def route(self, spec: str, **kwargs: Any) -> Deferred[list[NextHop]]:
        kwargs.setdefault("shuffle", keep_order)
        return Deferred.fromCoroutine(route_hops(self.resolver, spec, **kwargs))

    def error(self, spec: str) -> DeliveryError:
        value = self.failureResultOf(self.route(spec), DeliveryError).value
        assert isinstance(value, DeliveryError)
        return value

    def test_bracketed_host_uses_its_addresses(self) -> None:
        hops = self.successResultOf(self.route("[relay.example]:2525"))
        self.assertEqual(
            hops, [NextHop("relay.example", 0, ("192.0.2.10", "2001:db8::10"), 2525, mx=False)]
        )
        self.assertNotIn(("relay.example", "MX"), self.resolver.queries)

    def test_bare_host_uses_its_mx(self) -> None:
        hops = self.successResultOf(self.route("relay.example:2525"))
        self.assertEqual(hops, [NextHop("mx.relay.example", 10, ("192.0.2.11",), 2525)])

    def test_address_needs_no_dns(self) -> None:
        hops = self.successResultOf(self.route("[IPv6:2001:db8::7]:26"))
        self.assertEqual(hops, [NextHop("2001:db8::7", 0, ("2001:db8::7",), 26, mx=False)])
        self.assertEqual(self.resolver.queries, [])

    def test_families_and_limit_apply(self) -> None:
        hops = self.successResultOf(self.route("[relay.example]", families=("AAAA",)))
        self.assertEqual(addresses(hops), ["2001:db8::10"])

    def test_unknown_relay_is_a_temporary_configuration_problem(self) -> None:
        for spec in ["[nowhere.example]", "nowhere.example:25"]:
            error = self.error(spec)
            self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.5"), spec)
            self.assertTrue(error.temporary)
            self.assertEqual(error.kind, "dns")
            self.assertIn(f"(relay {spec})", error.reply.text)

    def test_temporary_failure_stays_as_it_is(self) -> None:
        error = self.error("[flaky.example]")
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.3"))

    def test_bad_spec_is_a_configuration_error(self) -> None:
        error = self.error("relay.example:http")
        self.assertEqual(
            (error.reply.code, error.reply.enhanced, error.kind), (451, "4.3.5", "config")
        )


ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
    "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.2"], "AAAA": "servfail"},
    "implicit.test": {"A": ["127.0.0.3"]},
    "null.test": {"MX": [[0, "."]]},
    "broken.test": {"servfail": True},
    "lame.test": {"MX": [[10, "gone.test"]]},
    "signed.test": {"MX": [[10, "mx.signed.test"], [20, "mx1.example.test"]], "secure": True},
    "mx.signed.test": {"A": ["127.0.0.4"], "AAAA": ["::4"], "secure": True},
    "implicit-signed.test": {"A": ["127.0.0.6"], "secure": True},
    "unsigned.test": {"MX": [[10, "mx.signed.test"]]},
}


class NextHopsOnLoopbackDNS(TestCase):
    """next_hops through DNSPythonResolver (in a thread pool) and a real DNS server."""

    def setUp(self) -> None:
        self.server = DNSTestServer(ZONE)
        port = self.server.start()
        self.addCleanup(self.server.stop)
        pool = ThreadPool(minthreads=0, maxthreads=4, name="mx-test")
        pool.start()
        self.addCleanup(pool.stop)
        self.runner = partial(deferToThreadPool, reactor, pool)
        self.resolver = DNSPythonResolver(
            self.runner,
            nameservers=["127.0.0.1"],
            port=port,
            timeout=2.0,
        )

    async def failed(self, domain: str) -> DeliveryError:
        try:
            result = await next_hops(self.resolver, domain, shuffle=keep_order)
        except DeliveryError as e:
            return e
        self.fail(f"expected DeliveryError, got {result!r}")

    async def test_mx_hosts_and_addresses(self) -> None:
        hops = await next_hops(self.resolver, "example.test", shuffle=keep_order)
        self.assertEqual(
            hops,
            [
                NextHop("mx1.example.test", 10, ("127.0.0.1", "::1")),
                NextHop("mx2.example.test", 20, ("127.0.0.2",)),
            ],
        )

    async def test_implicit_mx(self) -> None:
        hops = await next_hops(self.resolver, "implicit.test", port=2525)
        self.assertEqual(hops, [NextHop("implicit.test", 0, ("127.0.0.3",), 2525, mx=False)])

    async def test_null_mx(self) -> None:
        error = await self.failed("null.test")
        self.assertEqual((error.reply.code, error.reply.enhanced), (556, "5.1.10"))

    async def test_nxdomain(self) -> None:
        error = await self.failed("nowhere.test")
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.1.2"))

    async def test_servfail(self) -> None:
        error = await self.failed("broken.test")
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.3"))

    async def test_mx_host_that_does_not_exist(self) -> None:
        error = await self.failed("lame.test")
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.4.4"))

    async def test_hops_are_secure_only_with_validated_mx_and_addresses(self) -> None:
        # RFC 7672 sections 2.2.1 and 2.2.2: DANE needs the whole way validated.
        resolver = DNSPythonResolver(
            self.runner, nameservers=["127.0.0.1"], port=self.server.port, dnssec=True
        )
        hops = await next_hops(resolver, "signed.test", shuffle=keep_order)
        self.assertEqual([(h.host, h.secure) for h in hops],
                         [("mx.signed.test", True), ("mx1.example.test", False)])  # fmt: skip
        [hop] = await next_hops(resolver, "unsigned.test")
        self.assertFalse(hop.secure)  # validated addresses, but an MX that is not
        [hop] = await next_hops(resolver, "implicit-signed.test")
        self.assertEqual((hop.mx, hop.secure), (False, True))
        # Without dnssec nothing is secure.
        [first, _] = await next_hops(self.resolver, "signed.test", shuffle=keep_order)
        self.assertFalse(first.secure)

    async def test_cache_spares_the_server(self) -> None:
        cached = CachingResolver(self.resolver, Clock())
        first = await next_hops(cached, "example.test", shuffle=keep_order)
        asked = len(self.server.queries)
        second = await next_hops(cached, "example.test", shuffle=keep_order)
        self.assertEqual(first, second)
        self.assertEqual(asked, 5)  # MX, then A and AAAA of both hosts
        # Only the SERVFAIL, which is never cached, is asked again.
        self.assertEqual(self.server.queries[asked:], [("mx2.example.test", "AAAA", "udp")])
