"""The DNS layer: dnspython against a real loopback server, and the TTL cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mta.delivery.dns import (
    Answer,
    CachingResolver,
    DNSError,
    DNSPythonResolver,
    MXRecord,
    TLSARecord,
)
from mta.delivery.fakedns import FakeResolver
from mta.interfaces import IResolver
from mta.testing import run_inline
from tests.dnsserver import DNSTestServer

NEGATIVE_TTL = 30

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {
        "MX": [[20, "MX2.Example.TEST."], [10, "mx1.example.test"]],
        "ttl": 120,
    },
    "mx1.example.test": {"A": ["127.0.0.1", "127.0.0.2"], "AAAA": ["2001:DB8:0::1"], "ttl": 60},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "null.test": {"MX": [[0, "."]]},
    "alias.test": {"CNAME": "mx2.example.test", "ttl": 45},
    "broken.test": {"servfail": True},
    "half.test": {"A": ["127.0.0.4"], "AAAA": "servfail"},
    "slow.test": {"A": ["127.0.0.5"], "delay": 5.0},
    "big.test": {"A": [f"127.0.1.{i}" for i in range(1, 41)], "truncate": True},
    "signed.test": {"A": ["127.0.0.6"], "MX": [[10, "mx1.example.test"]], "secure": True},
    "signed-alias.test": {"CNAME": "signed.test", "secure": True},
    "unsigned-alias.test": {"CNAME": "signed.test"},
    "_mta-sts.example.test": {
        "TXT": [["v=STSv1; ", "id=20240101"], "v=spf1 -all"],
        "secure": True,
    },
    "_25._tcp.mx1.example.test": {
        "TLSA": [[3, 1, 1, "0123456789abcdef" * 4], [2, 0, 2, "ff" * 64]],
        "secure": True,
    },
    "_25._tcp.mx2.example.test": {"TLSA": [[3, 1, 1, "00" * 32]]},
    "_25._tcp.bogus.test": {"TLSA": "servfail"},
}


class _Silent(DatagramProtocol):
    """A UDP port where nothing ever answers."""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        pass


class DNSPythonResolverOnLoopback(TestCase):
    """DNSPythonResolver in a thread pool, asking a twisted.names server on 127.0.0.1."""

    def setUp(self) -> None:
        self.server = DNSTestServer(ZONE, negative_ttl=NEGATIVE_TTL)
        port = self.server.start()
        self.addCleanup(self.server.stop)
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="dns-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.worker_threads: list[int] = []
        self.resolver = self.make_resolver(port, timeout=2.0)

    def make_resolver(self, port: int, timeout: float, dnssec: bool = False) -> DNSPythonResolver:
        def runner(work: Any) -> Deferred[Any]:
            def recorded() -> Any:
                self.worker_threads.append(threading.get_ident())
                return work()

            return deferToThreadPool(reactor, self.pool, recorded)

        return DNSPythonResolver(
            runner, nameservers=["127.0.0.1"], port=port, timeout=timeout, dnssec=dnssec
        )

    async def failed(self, d: Deferred[Any]) -> DNSError:
        try:
            result = await d
        except DNSError as e:
            return e
        self.fail(f"expected DNSError, got {result!r}")

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IResolver, self.resolver))

    async def test_mx(self) -> None:
        answer = await self.resolver.lookup_mx("example.test")
        self.assertEqual(
            sorted(answer.records, key=lambda r: r.preference),
            [MXRecord(10, "mx1.example.test"), MXRecord(20, "mx2.example.test")],
        )
        self.assertEqual(answer.ttl, 120)

    async def test_null_mx(self) -> None:
        answer = await self.resolver.lookup_mx("null.test")
        self.assertEqual(answer.records, (MXRecord(0, ""),))

    async def test_txt_strings_of_one_record_are_joined(self) -> None:
        answer = await self.resolver.lookup_txt("_mta-sts.example.test")
        self.assertEqual(sorted(answer.records), ["v=STSv1; id=20240101", "v=spf1 -all"])

    async def test_tlsa(self) -> None:
        answer = await self.resolver.lookup_tlsa("_25._tcp.mx1.example.test")
        self.assertEqual(
            sorted(answer.records, key=lambda r: r.usage),
            [
                TLSARecord(2, 0, 2, b"\xff" * 64),
                TLSARecord(3, 1, 1, bytes.fromhex("0123456789abcdef" * 4)),
            ],
        )

    async def test_no_tlsa_is_nodata_or_nxdomain(self) -> None:
        error = await self.failed(self.resolver.lookup_tlsa("_25._tcp.mx3.example.test"))
        self.assertEqual((error.kind, error.rdtype), ("nxdomain", "TLSA"))
        error = await self.failed(self.resolver.lookup_tlsa("signed.test"))
        self.assertEqual(error.kind, "nodata")

    async def test_bogus_tlsa_is_temporary(self) -> None:
        # What a validating resolver answers for records that fail validation.
        error = await self.failed(self.resolver.lookup_tlsa("_25._tcp.bogus.test"))
        self.assertEqual(error.kind, "temporary")

    async def test_ad_bit_is_ignored_without_dnssec(self) -> None:
        self.server.factory.ad_unasked = True
        for lookup in (
            self.resolver.lookup_addresses("signed.test", "A"),
            self.resolver.lookup_mx("signed.test"),
            self.resolver.lookup_tlsa("_25._tcp.mx1.example.test"),
        ):
            self.assertFalse((await lookup).secure)

    async def test_ad_bit_with_dnssec(self) -> None:
        resolver = self.make_resolver(self.server.port, timeout=2.0, dnssec=True)
        for name, rdtype, secure in [
            ("signed.test", "A", True),
            ("signed.test", "MX", True),
            ("mx1.example.test", "A", False),
            ("_25._tcp.mx1.example.test", "TLSA", True),
            ("_25._tcp.mx2.example.test", "TLSA", False),
            ("_mta-sts.example.test", "TXT", True),
            ("signed-alias.test", "A", True),
            ("unsigned-alias.test", "A", False),  # one insecure link spoils the chain
        ]:
            if rdtype == "MX":
                answer = await resolver.lookup_mx(name)
            elif rdtype == "TLSA":
                answer = await resolver.lookup_tlsa(name)
            elif rdtype == "TXT":
                answer = await resolver.lookup_txt(name)
            else:
                answer = await resolver.lookup_addresses(name, rdtype)
            self.assertEqual(answer.secure, secure, f"{name}/{rdtype}")

    async def test_a(self) -> None:
        answer = await self.resolver.lookup_addresses("MX1.example.test.", "A")
        self.assertEqual(sorted(answer.records), ["127.0.0.1", "127.0.0.2"])
        self.assertEqual(answer.ttl, 60)

    async def test_aaaa_in_canonical_text(self) -> None:
        answer = await self.resolver.lookup_addresses("mx1.example.test", "AAAA")
        self.assertEqual(answer.records, ("2001:db8::1",))

    async def test_cname_ttl_is_the_smallest_on_the_chain(self) -> None:
        answer = await self.resolver.lookup_addresses("alias.test", "A")
        self.assertEqual(answer.records, ("127.0.0.3",))
        self.assertEqual(answer.ttl, 45)

    async def test_nxdomain_with_negative_ttl(self) -> None:
        error = await self.failed(self.resolver.lookup_mx("nowhere.test"))
        self.assertEqual(
            (error.kind, error.name, error.rdtype, error.ttl),
            ("nxdomain", "nowhere.test", "MX", NEGATIVE_TTL),
        )
        self.assertEqual(str(error), "nowhere.test/MX: no such domain")

    async def test_nodata_with_negative_ttl(self) -> None:
        error = await self.failed(self.resolver.lookup_mx("mx2.example.test"))
        self.assertEqual((error.kind, error.ttl), ("nodata", NEGATIVE_TTL))
        error = await self.failed(self.resolver.lookup_addresses("mx2.example.test", "AAAA"))
        self.assertEqual((error.kind, error.rdtype), ("nodata", "AAAA"))

    async def test_servfail_is_temporary(self) -> None:
        error = await self.failed(self.resolver.lookup_mx("broken.test"))
        self.assertEqual((error.kind, error.ttl), ("temporary", None))
        self.assertTrue(error.temporary)
        self.assertIn("SERVFAIL", str(error))

    async def test_servfail_for_one_type(self) -> None:
        answer = await self.resolver.lookup_addresses("half.test", "A")
        self.assertEqual(answer.records, ("127.0.0.4",))
        error = await self.failed(self.resolver.lookup_addresses("half.test", "AAAA"))
        self.assertEqual(error.kind, "temporary")

    async def test_truncated_answer_is_retried_over_tcp(self) -> None:
        answer = await self.resolver.lookup_addresses("big.test", "A")
        self.assertEqual(len(answer.records), 40)
        self.assertEqual([q[2] for q in self.server.queries if q[0] == "big.test"], ["udp", "tcp"])

    async def test_slow_server_times_out_as_temporary(self) -> None:
        resolver = self.make_resolver(self.server.port, timeout=0.3)
        error = await self.failed(resolver.lookup_addresses("slow.test", "A"))
        self.assertEqual(error.kind, "temporary")
        self.assertIn("0.3 s", str(error))

    async def test_silent_port_times_out_as_temporary(self) -> None:
        silent = reactor.listenUDP(0, _Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = self.make_resolver(silent.getHost().port, timeout=0.3)
        error = await self.failed(resolver.lookup_mx("example.test"))
        self.assertEqual(
            (error.kind, error.name, error.rdtype), ("temporary", "example.test", "MX")
        )

    async def test_queries_run_off_the_reactor_thread(self) -> None:
        await self.resolver.lookup_addresses("mx2.example.test", "A")
        self.assertEqual(len(self.worker_threads), 1)
        self.assertNotEqual(self.worker_threads[0], threading.get_ident())

    async def test_every_lookup_asks_the_server(self) -> None:
        # Caching is CachingResolver's job alone; dnspython's cache is off.
        for _ in range(2):
            await self.resolver.lookup_addresses("mx2.example.test", "A")
            await self.failed(self.resolver.lookup_mx("nowhere.test"))
        self.assertEqual(len(self.server.queries), 4)

    async def test_invalid_name_is_nxdomain_without_a_query(self) -> None:
        error = await self.failed(self.resolver.lookup_mx("a..b.test"))
        self.assertEqual(error.kind, "nxdomain")
        self.assertEqual(self.server.queries, [])

    async def test_unicode_name_is_idna_encoded(self) -> None:
        self.server.zone = {**ZONE, "xn--bcher-kva.test": {"A": ["127.0.0.9"]}}
        answer = await self.resolver.lookup_addresses("bücher.test", "A")
        self.assertEqual(answer.records, ("127.0.0.9",))


class DNSServerProgram(TestCase):
    """tests/dnsserver.py run as a program, as end-to-end tests do."""

    async def test_serves_a_zone_file(self) -> None:
        zone_file = os.path.abspath(self.mktemp())
        with open(zone_file, "w", encoding="utf-8") as f:
            json.dump({"example.test": {"MX": [[10, "mx.example.test"]]}}, f)
        program = os.path.join(os.path.dirname(__file__), "dnsserver.py")
        process = subprocess.Popen(
            [sys.executable, program, zone_file, "--negative-ttl", "7"],
            stdout=subprocess.PIPE,
            text=True,
        )

        def stop() -> None:
            process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()

        self.addCleanup(stop)
        assert process.stdout is not None
        port = int(await deferToThread(process.stdout.readline))
        resolver = DNSPythonResolver(
            deferToThread, nameservers=["127.0.0.1"], port=port, timeout=2.0
        )
        answer = await resolver.lookup_mx("example.test")
        self.assertEqual(answer.records, (MXRecord(10, "mx.example.test"),))
        try:
            await resolver.lookup_mx("nowhere.test")
        except DNSError as e:
            self.assertEqual((e.kind, e.ttl), ("nxdomain", 7))
        else:
            self.fail("nowhere.test resolved")


class DNSPythonResolverArguments(SynchronousTestCase):
    """DNSPythonResolver's arguments: nameservers must be addresses and not an empty list, a
    positive timeout, the configured servers used, address lookups only for A or AAAA."""

    def test_nameservers_must_be_addresses(self) -> None:
        with self.assertRaises(ValueError) as caught:
            DNSPythonResolver(run_inline, nameservers=["dns.example"])
        self.assertIn("'dns.example' is not an IP address", str(caught.exception))

    def test_empty_nameserver_list_is_refused(self) -> None:
        self.assertRaises(ValueError, DNSPythonResolver, run_inline, nameservers=[])

    def test_timeout_must_be_positive(self) -> None:
        self.assertRaises(
            ValueError, DNSPythonResolver, run_inline, nameservers=["127.0.0.1"], timeout=0
        )

    def test_configured_servers(self) -> None:
        resolver = DNSPythonResolver(run_inline, nameservers=["127.0.0.1", "::1"], port=5353)
        self.assertEqual(resolver.nameservers, ["127.0.0.1", "::1"])

    def test_address_lookups_are_a_or_aaaa(self) -> None:
        resolver = DNSPythonResolver(run_inline, nameservers=["127.0.0.1"])
        self.assertRaises(ValueError, resolver.lookup_addresses, "example.test", "MX")


class DNSErrorTests(SynchronousTestCase):
    """DNSError: its kind is checked against the closed set, and its messages name the host and
    record type."""

    def test_kind_is_checked(self) -> None:
        self.assertRaises(ValueError, DNSError, "bogus", "example.test", "A")

    def test_messages(self) -> None:
        self.assertEqual(str(DNSError("nodata", "h.test", "AAAA")), "h.test/AAAA: no AAAA record")
        self.assertEqual(
            str(DNSError("temporary", "h.test", "A", "no answer within 2 s")),
            "h.test/A: no answer within 2 s",
        )
        self.assertEqual(str(DNSError("temporary", "h.test", "A")), "h.test/A: temporary failure")


@implementer(IResolver)
class BrokenResolver:
    """A resolver whose every lookup fails with an unexpected error."""

    def __init__(self) -> None:
        self.calls = 0

    def lookup_mx(self, domain: str) -> Deferred[Any]:
        self.calls += 1
        return fail(RuntimeError("bug"))

    def lookup_addresses(self, host: str, rdtype: str) -> Deferred[Any]:
        return self.lookup_mx(host)

    def lookup_txt(self, name: str) -> Deferred[Any]:
        return self.lookup_mx(name)

    def lookup_tlsa(self, name: str) -> Deferred[Any]:
        return self.lookup_mx(name)


class CachingResolverTests(SynchronousTestCase):
    """CachingResolver: answers kept for their TTL (capped, zero not kept), TLSA kept with its
    DNSSEC status, TXT and every type apart, names matched without case or final dot, NXDOMAIN
    and NODATA kept for the negative TTL (the smaller one wins, the larger is capped), temporary
    failures and unexpected errors not kept, concurrent lookups sharing one query or failure,
    cancelling one waiter leaving the others, the size bounded by dropping the oldest, and
    clear()."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = FakeResolver(
            {
                "example.test": {"MX": [(10, "mx.example.test")], "ttl": 100},
                "mx.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"], "ttl": 100},
                "long.test": {"A": ["192.0.2.2"], "ttl": 100_000},
                "zero.test": {"A": ["192.0.2.3"], "ttl": 0},
                "broken.test": {"servfail": True},
                "_25._tcp.mx.example.test": {"TLSA": [(3, 1, 1, "ab" * 32)], "secure": True},
                "_mta-sts.example.test": {"TXT": ["v=STSv1; id=1"], "ttl": 50},
            }
        )
        self.cache = CachingResolver(self.inner, self.clock)

    def mx(self, name: str = "example.test") -> Answer[Any]:
        result: Answer[Any] = self.successResultOf(self.cache.lookup_mx(name))
        return result

    def a(self, name: str) -> Answer[Any]:
        result: Answer[Any] = self.successResultOf(self.cache.lookup_addresses(name, "A"))
        return result

    def error(self, d: Deferred[Any]) -> DNSError:
        value = self.failureResultOf(d, DNSError).value
        assert isinstance(value, DNSError)
        return value

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IResolver, self.cache))

    def test_tlsa_kept_with_its_dnssec_status(self) -> None:
        for _ in range(2):
            answer = self.successResultOf(self.cache.lookup_tlsa("_25._tcp.mx.example.test"))
            self.assertEqual(answer.records, (TLSARecord(3, 1, 1, b"\xab" * 32),))
            self.assertTrue(answer.secure)
        self.clock.advance(10)
        self.assertTrue(
            self.successResultOf(self.cache.lookup_tlsa("_25._tcp.mx.example.test")).secure
        )
        self.assertEqual(self.inner.queries, [("_25._tcp.mx.example.test", "TLSA")])

    def test_txt_is_cached_apart_from_other_types(self) -> None:
        self.successResultOf(self.cache.lookup_txt("_mta-sts.example.test"))
        self.clock.advance(49)
        answer = self.successResultOf(self.cache.lookup_txt("_mta-sts.example.test"))
        self.assertEqual((answer.records, answer.ttl), (("v=STSv1; id=1",), 1))
        self.assertEqual(len(self.inner.queries), 1)
        self.failureResultOf(self.cache.lookup_tlsa("_mta-sts.example.test"), DNSError)
        self.assertEqual(len(self.inner.queries), 2)

    def test_positive_answer_is_kept_for_its_ttl(self) -> None:
        self.assertEqual(self.mx().records, (MXRecord(10, "mx.example.test"),))
        self.clock.advance(99)
        answer = self.mx()
        self.assertEqual(answer.records, (MXRecord(10, "mx.example.test"),))
        self.assertEqual(answer.ttl, 1)
        self.assertEqual(self.inner.queries, [("example.test", "MX")])
        self.clock.advance(1)
        self.mx()
        self.assertEqual(len(self.inner.queries), 2)

    def test_new_answer_after_expiry_is_seen(self) -> None:
        self.mx()
        self.inner.table["example.test"] = {"MX": [(5, "new.example.test")], "ttl": 100}
        self.clock.advance(100)
        self.assertEqual(self.mx().records, (MXRecord(5, "new.example.test"),))

    def test_ttl_is_capped_by_max_ttl(self) -> None:
        self.a("long.test")
        self.clock.advance(3599)
        self.a("long.test")
        self.assertEqual(len(self.inner.queries), 1)
        self.clock.advance(1)
        self.a("long.test")
        self.assertEqual(len(self.inner.queries), 2)

    def test_zero_ttl_is_not_kept(self) -> None:
        self.a("zero.test")
        self.a("zero.test")
        self.assertEqual(len(self.inner.queries), 2)

    def test_names_match_without_case_or_final_dot(self) -> None:
        self.mx("Example.TEST.")
        self.mx("example.test")
        self.assertEqual(len(self.inner.queries), 1)

    def test_types_are_kept_apart(self) -> None:
        self.assertEqual(self.a("mx.example.test").records, ("192.0.2.1",))
        answer = self.successResultOf(self.cache.lookup_addresses("mx.example.test", "AAAA"))
        self.assertEqual(answer.records, ("2001:db8::1",))
        self.assertEqual(len(self.inner.queries), 2)

    def test_nxdomain_is_kept_for_negative_ttl(self) -> None:
        self.assertEqual(self.error(self.cache.lookup_mx("nowhere.test")).kind, "nxdomain")
        self.clock.advance(299)
        error = self.error(self.cache.lookup_mx("nowhere.test"))
        self.assertEqual((error.kind, error.name, error.rdtype), ("nxdomain", "nowhere.test", "MX"))
        self.assertEqual(len(self.inner.queries), 1)
        self.clock.advance(1)
        self.error(self.cache.lookup_mx("nowhere.test"))
        self.assertEqual(len(self.inner.queries), 2)

    def test_nodata_is_kept(self) -> None:
        self.error(self.cache.lookup_mx("mx.example.test"))
        self.clock.advance(200)
        self.assertEqual(self.error(self.cache.lookup_mx("mx.example.test")).kind, "nodata")
        self.assertEqual(len(self.inner.queries), 1)

    def test_smaller_negative_ttl_from_the_answer_wins(self) -> None:
        self.inner.negative_ttl = 30
        self.error(self.cache.lookup_mx("nowhere.test"))
        self.clock.advance(10)
        self.assertEqual(self.error(self.cache.lookup_mx("nowhere.test")).ttl, 20)
        self.clock.advance(20)
        self.error(self.cache.lookup_mx("nowhere.test"))
        self.assertEqual(len(self.inner.queries), 2)

    def test_larger_negative_ttl_from_the_answer_is_capped(self) -> None:
        self.inner.negative_ttl = 86400
        self.cache = CachingResolver(self.inner, self.clock, negative_ttl=60)
        self.error(self.cache.lookup_mx("nowhere.test"))
        self.clock.advance(60)
        self.error(self.cache.lookup_mx("nowhere.test"))
        self.assertEqual(len(self.inner.queries), 2)

    def test_temporary_failures_are_not_kept(self) -> None:
        self.assertEqual(self.error(self.cache.lookup_mx("broken.test")).kind, "temporary")
        self.assertEqual(self.error(self.cache.lookup_mx("broken.test")).kind, "temporary")
        self.assertEqual(len(self.inner.queries), 2)
        self.assertEqual(len(self.cache), 0)

    def test_unexpected_errors_pass_through_and_are_not_kept(self) -> None:
        inner = BrokenResolver()
        cache = CachingResolver(inner, self.clock)
        self.failureResultOf(cache.lookup_mx("example.test"), RuntimeError)
        self.failureResultOf(cache.lookup_mx("example.test"), RuntimeError)
        self.assertEqual(inner.calls, 2)

    def test_concurrent_lookups_share_one_query(self) -> None:
        self.inner.hold = True
        first = self.cache.lookup_mx("example.test")
        second = self.cache.lookup_mx("EXAMPLE.test")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.inner.release(), 1)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.mx()
        self.assertEqual(len(self.inner.queries), 1)

    def test_concurrent_lookups_share_a_failure(self) -> None:
        self.inner.hold = True
        first = self.cache.lookup_mx("broken.test")
        second = self.cache.lookup_mx("broken.test")
        self.inner.release()
        self.assertEqual(self.error(first).kind, "temporary")
        self.assertEqual(self.error(second).kind, "temporary")
        self.cache.lookup_mx("broken.test")
        self.assertEqual(len(self.inner.queries), 2)

    def test_cancelling_one_waiter_leaves_the_others(self) -> None:
        self.inner.hold = True
        first = self.cache.lookup_mx("example.test")
        second = self.cache.lookup_mx("example.test")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.inner.release()
        self.assertEqual(self.successResultOf(second).records, (MXRecord(10, "mx.example.test"),))

    def test_size_is_bounded_dropping_the_oldest(self) -> None:
        self.inner.table.update({f"h{i}.test": {"A": [f"192.0.2.{i}"]} for i in range(10, 14)})
        self.cache = CachingResolver(self.inner, self.clock, max_entries=3)
        for i in range(10, 14):
            self.a(f"h{i}.test")
        self.assertEqual(len(self.cache), 3)
        self.a("h13.test")
        self.a("h11.test")
        self.assertEqual(len(self.inner.queries), 4)
        self.a("h10.test")
        self.assertEqual(self.inner.queries[-1], ("h10.test", "A"))
        self.assertEqual(len(self.inner.queries), 5)

    def test_clear(self) -> None:
        self.mx()
        self.cache.clear()
        self.mx()
        self.assertEqual(len(self.inner.queries), 2)
