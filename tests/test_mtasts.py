"""Tests for L{mta.delivery.mtasts}: MTA-STS (RFC 8461).

Layers: the TXT record and policy parsers (tables of valid and invalid
input), MX pattern matching, the on-disk cache on a temp directory with a
Clock, then L{PolicyFetcher} and L{MTASTS} against a real HTTPS server
on loopback (tests/policyserver.py) whose certificate comes from a test
CA the fetcher is told to trust.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.address import parse_networks
from mta.batch import run_now
from mta.delivery import pkix
from mta.delivery.mtasts import (
    MAX_AGE_LIMIT,
    MTASTS,
    CachedPolicy,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyFetcher,
    parse_policy,
    parse_txt,
    policy_id,
)
from mta.testing import FakeResolver
from tests.pki import CA, self_signed
from tests.policyserver import PolicyServer

GOOD = (
    "version: STSv1\r\nmode: enforce\r\n"
    "mx: mx1.example.test\r\nmx: *.mx.example.test\r\nmax_age: 86400\r\n"
)


class TXTTests(SynchronousTestCase):
    """The _mta-sts TXT record (RFC 8461 section 3.1): valid and invalid records, only v=STSv1
    records counting, two records meaning no policy, and no record."""

    def test_valid_records(self) -> None:
        for record, expected in [
            ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
            ("v=STSv1; id=20160831085700Z", "20160831085700Z"),
            ("v=STSv1;id=abc", "abc"),
            ("v=STSv1 ;\tid=abc ; ext=val-ue.1", "abc"),
            ("v=STSv1; x.y_z-1=v; id=" + "a" * 32, "a" * 32),
        ]:
            self.assertEqual(parse_txt(record), expected, record)

    def test_invalid_records(self) -> None:
        for record in [
            "v=STSv1",  # no id
            "v=STSv1;",
            "v=STSv1; id=",
            "v=STSv1; id=a-b",  # id: letters and digits only
            "v=STSv1; id=" + "a" * 33,
            "v=STSv1; id=1; id=2",
            "v=STSv10; id=1",
            "v=stsv1; id=1",
            " v=STSv1; id=1",
            "v=STSv1; id=1;;",
            "v=STSv1; id=1 extra",
            "v=STSv1; =x; id=1",
            "v=STSv1; id=1; e=a;b",
            "v=STSv1; id=1; e=a=b",
        ]:
            with self.assertRaises(PolicyError, msg=record):
                parse_txt(record)

    def test_only_v_stsv1_records_count(self) -> None:
        self.assertEqual(policy_id(["v=spf1 -all", "v=STSv1; id=7"]), "7")

    def test_two_records_are_no_policy(self) -> None:
        # RFC 8461 section 3.1
        with self.assertRaises(PolicyError) as caught:
            policy_id(["v=STSv1; id=1", "v=STSv1; id=2"])
        self.assertIn("2 v=STSv1 TXT records", str(caught.exception))

    def test_no_record(self) -> None:
        with self.assertRaises(PolicyError):
            policy_id(["v=spf1 -all"])


class PolicyParserTests(SynchronousTestCase):
    """Parsing an MTA-STS policy file (RFC 8461 section 3.2): the RFC's example, LF line ends, keys
    in any order, extensions and spaces, mode none without mx, max_age capped, trailing empty
    lines, invalid policies and an error that says what is wrong."""

    def test_example(self) -> None:
        policy = parse_policy(GOOD.encode())
        self.assertEqual(
            policy, Policy("enforce", 86400, ("mx1.example.test", "*.mx.example.test"))
        )

    def test_lf_line_ends_any_order_extensions_and_space(self) -> None:
        body = (
            b"max_age:604800  \nmx:   MX.Example.TEST.\nmode: testing\n"
            b"foo_bar: some value\nversion: STSv1"
        )
        self.assertEqual(parse_policy(body), Policy("testing", 604800, ("mx.example.test",)))

    def test_mode_none_needs_no_mx(self) -> None:
        self.assertEqual(
            parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n"), Policy("none", 1, ())
        )

    def test_max_age_is_capped(self) -> None:
        body = b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n"
        self.assertEqual(parse_policy(body).max_age, MAX_AGE_LIMIT)

    def test_trailing_empty_lines_are_ignored(self) -> None:
        self.assertEqual(parse_policy(GOOD.encode() + b"\r\n\n").mode, "enforce")

    def test_invalid_policies(self) -> None:
        base = {"version": "STSv1", "mode": "enforce", "mx": "mx.test", "max_age": "86400"}

        def body(**change: str | None) -> bytes:
            fields = {**base, **change}
            return "\n".join(f"{k}: {v}" for k, v in fields.items() if v is not None).encode()

        cases = {
            "no version": body(version=None),
            "version STSv2": body(version="STSv2"),
            "no mode": body(mode=None),
            "mode report": body(mode="report"),
            "mode Enforce": body(mode="Enforce"),
            "no max_age": body(max_age=None),
            "max_age -1": body(max_age="-1"),
            "max_age 11 digits": body(max_age="12345678901"),
            "max_age 1.5": body(max_age="1.5"),
            "no mx": body(mx=None),
            "mx with a port": body(mx="mx.test:25"),
            "mx wildcard inside": body(mx="mx.*.test"),
            "mx one label": body(mx="localhost"),
            "mx U-label": body(mx="bücher.test"),
            "mx empty label": body(mx="mx..test"),
            "mode twice": body() + b"\nmode: testing",
            "max_age twice": body() + b"\nmax_age: 5",
            "empty line between": b"version: STSv1\n\nmode: enforce\nmx: mx.test\nmax_age: 1",
            "no colon": body() + b"\njunk",
            "empty value": body() + b"\nfoo:",
            "bad name": body() + b"\n-x: 1",
            "Version capitalised": body(version=None) + b"\nVersion: STSv1",
            "control character": body() + b"\nfoo: a\x01b",
            "bare CR inside": body() + b"\nfoo: a\rb",
            "not UTF-8": body() + b"\nfoo: \xff",
            "empty": b"",
            "only line ends": b"\r\n\r\n",
        }
        for name, data in cases.items():
            with self.assertRaises(PolicyError, msg=name):
                parse_policy(data)

    def test_error_says_what_is_wrong(self) -> None:
        with self.assertRaises(PolicyError) as caught:
            parse_policy(b"version: STSv1\nmode: enforce\nmax_age: 5\nmx: x..test\n")
        self.assertEqual(str(caught.exception), "line 4: 'x..test' is not an MX host pattern")


class MatchTests(SynchronousTestCase):
    """MX host names against a policy's mx patterns, wildcards covering exactly one label (RFC 8461
    section 4.1)."""

    def test_patterns(self) -> None:
        policy = Policy("enforce", 1, ("mail.example.test", "*.mx.example.test"))
        for host, expected in [
            ("mail.example.test", True),
            ("MAIL.example.test.", True),
            ("a.mx.example.test", True),
            ("mx.example.test", False),  # the wildcard needs one more label
            ("a.b.mx.example.test", False),  # and only one
            ("xmail.example.test", False),
            ("mail.example.test.evil", False),
            ("example.test", False),
            (".mx.example.test", False),  # an empty label is not a label
        ]:
            self.assertEqual(policy.matches(host), expected, host)


class CacheTests(SynchronousTestCase):
    """The policy cache in the spool: kept in a file a new cache reads, expired after max_age,
    unknown domains, a corrupt file or one of another domain taken as no policy, unsafe names
    never written, a write failure keeping the copy in memory, and the memory bounded."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dir = os.path.join(self.mktemp(), "state", "mta-sts")
        self.cache = PolicyCache(self.dir, run_now, self.clock)

    def entry(self, domain: str = "example.test", sts_id: str = "1") -> CachedPolicy:
        return CachedPolicy(domain, sts_id, self.clock.seconds(), parse_policy(GOOD.encode()), GOOD)

    def get(self, cache: PolicyCache, domain: str = "example.test") -> CachedPolicy | None:
        result: CachedPolicy | None = self.successResultOf(
            Deferred.fromCoroutine(cache.get(domain))
        )
        return result

    def test_kept_in_a_file_that_a_new_cache_reads(self) -> None:
        entry = self.entry()
        self.successResultOf(Deferred.fromCoroutine(self.cache.put(entry)))
        self.assertEqual(os.listdir(self.dir), ["example.test.json"])
        with open(os.path.join(self.dir, "example.test.json")) as f:
            self.assertEqual(json.load(f)["id"], "1")
        restarted = PolicyCache(self.dir, run_now, self.clock)
        self.assertEqual(self.get(restarted), entry)

    def test_expires_after_max_age(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.cache.put(self.entry())))
        self.clock.advance(86399)
        self.assertIsNotNone(self.get(self.cache))
        self.clock.advance(1)
        self.assertIsNone(self.get(self.cache))
        self.assertIsNone(self.get(PolicyCache(self.dir, run_now, self.clock)))

    def test_unknown_domain(self) -> None:
        self.assertIsNone(self.get(self.cache, "nothing.test"))

    def test_corrupt_file_is_no_policy(self) -> None:
        os.makedirs(self.dir)
        for content in ("{", "[]", '{"domain": "example.test"}', json.dumps(
            {"domain": "example.test", "id": "1", "fetched": 0, "policy": "mode: enforce"}
        )):  # fmt: skip
            with open(os.path.join(self.dir, "example.test.json"), "w") as f:
                f.write(content)
            self.assertIsNone(self.get(PolicyCache(self.dir, run_now, self.clock)), content)

    def test_file_of_another_domain_is_ignored(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.cache.put(self.entry("other.test"))))
        os.rename(
            os.path.join(self.dir, "other.test.json"), os.path.join(self.dir, "example.test.json")
        )
        self.assertIsNone(self.get(PolicyCache(self.dir, run_now, self.clock)))

    def test_unsafe_name_is_not_written(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.cache.put(self.entry("../evil"))))
        self.assertFalse(os.path.exists(self.dir))
        self.assertIsNotNone(self.get(self.cache, "../evil"))  # in memory only

    def test_write_failure_keeps_the_memory_copy(self) -> None:
        os.makedirs(os.path.dirname(self.dir))
        with open(self.dir, "w") as f:
            f.write("a file where the directory should be")
        self.successResultOf(Deferred.fromCoroutine(self.cache.put(self.entry())))
        self.assertIsNotNone(self.get(self.cache))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_memory_is_bounded(self) -> None:
        cache = PolicyCache(self.dir, run_now, self.clock, memory_limit=2)
        for name in ("a.test", "b.test", "c.test"):
            self.successResultOf(Deferred.fromCoroutine(cache.put(self.entry(name))))
        for name in ("a.test", "c.test"):
            os.remove(os.path.join(self.dir, f"{name}.json"))
        self.assertIsNotNone(self.get(cache, "c.test"))  # still in memory
        self.assertIsNone(self.get(cache, "a.test"))  # forgotten, and its file is gone


class _Loopback:
    """A test CA, a policy server certificate, and the fetcher's resolver."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.ca = CA()
        self.ca_file = self.ca.write(os.path.join(directory, "ca.pem"))
        self.trust = pkix.TrustStore(self.ca_file)
        hosts = [f"mta-sts.{d}" for d in DOMAINS]
        self.cert, self.key = self.ca.issue(hosts).write(directory, "policy")
        self.resolver = FakeResolver({h: {"A": ["127.0.0.1"]} for h in hosts})


DOMAINS = [
    "example.test",
    "testing.test",
    "moved.test",
    "html.test",
    "big.test",
    "chunked.test",
    "slow.test",
    "bad.test",
    "missing.test",
]

TABLE: dict[str, dict[str, Any]] = {
    "mta-sts.example.test": {"body": GOOD},
    "mta-sts.testing.test": {"body": GOOD.replace("enforce", "testing")},
    "mta-sts.moved.test": {
        "status": 301,
        "location": "https://mta-sts.example.test/.well-known/mta-sts.txt",
    },
    "mta-sts.html.test": {"body": GOOD, "type": "text/html"},
    "mta-sts.big.test": {"body": GOOD, "size": 70_000},
    "mta-sts.chunked.test": {"body": GOOD, "size": 70_000, "length": False},
    "mta-sts.slow.test": {"body": GOOD, "delay": 30.0},
    "mta-sts.bad.test": {"body": "version: STSv1\nmode: enforce\n"},
}


class FetcherTests(TestCase):
    """L{PolicyFetcher} against a real HTTPS server on 127.0.0.1."""

    def setUp(self) -> Any:
        self.net = _Loopback(self.mktemp())
        self.server = PolicyServer(TABLE, self.net.cert, self.net.key)
        self.port = self.server.start()
        self.addCleanup(self.server.stop)

    def fetcher(self, **kw: Any) -> PolicyFetcher:
        options: dict[str, Any] = {"port": self.port, "timeout": 5.0, **kw}
        return PolicyFetcher(reactor, self.net.resolver, self.net.trust.trust_root(), **options)

    async def failure(self, domain: str, fetcher: PolicyFetcher | None = None) -> str:
        try:
            body = await (fetcher or self.fetcher()).fetch(domain)
        except PolicyError as e:
            return str(e)
        self.fail(f"fetched {body!r}")

    async def test_policy(self) -> None:
        body = await self.fetcher().fetch("example.test")
        self.assertEqual(body, GOOD.encode())
        self.assertEqual(
            self.server.requests, [("mta-sts.example.test", "/.well-known/mta-sts.txt")]
        )

    async def test_redirect_is_not_followed(self) -> None:
        error = await self.failure("moved.test")
        self.assertIn("HTTP 301", error)
        self.assertEqual([h for h, _ in self.server.requests], ["mta-sts.moved.test"])

    async def test_not_found(self) -> None:
        self.assertIn("HTTP 404", await self.failure("missing.test"))

    async def test_media_type(self) -> None:
        self.assertIn("media type text/html, not text/plain", await self.failure("html.test"))

    async def test_oversize_with_length(self) -> None:
        self.assertIn("larger than 65536 octets", await self.failure("big.test"))

    async def test_oversize_chunked(self) -> None:
        self.assertIn("larger than 65536 octets", await self.failure("chunked.test"))

    async def test_smaller_limit(self) -> None:
        error = await self.failure("example.test", self.fetcher(max_size=50))
        self.assertIn("larger than 50 octets", error)

    async def test_timeout(self) -> None:
        start = reactor.seconds()
        error = await self.failure("slow.test", self.fetcher(timeout=0.5))
        self.assertEqual(error, "no policy within 0.5 s")
        self.assertLess(reactor.seconds() - start, 5)

    async def test_untrusted_certificate(self) -> None:
        other = pkix.TrustStore(CA("another").write(os.path.join(self.net.dir, "other.pem")))
        fetcher = PolicyFetcher(reactor, self.net.resolver, other.trust_root(), port=self.port)
        error = await self.failure("example.test", fetcher)
        self.assertIn("certificate verify failed", error)
        self.assertEqual(self.server.requests, [])

    async def test_wrong_name(self) -> None:
        self.net.resolver.table["mta-sts.elsewhere.test"] = {"A": ["127.0.0.1"]}
        error = await self.failure("elsewhere.test")
        self.assertIn("VerificationError", error)
        self.assertEqual(self.server.requests, [])

    async def test_expired_and_self_signed_certificates(self) -> None:
        for name, issued in [
            ("expired", self.net.ca.issue(["mta-sts.example.test"], expired=True)),
            ("selfsigned", self_signed(["mta-sts.example.test"])),
        ]:
            cert, key = issued.write(self.net.dir, name)
            server = PolicyServer(TABLE, cert, key)
            port = server.start()
            try:
                error = await self.failure("example.test", self.fetcher(port=port))
            finally:
                await server.stop()
            self.assertIn("certificate verify failed", error, name)
            self.assertEqual(server.requests, [], name)

    async def test_dns_failure(self) -> None:
        self.net.resolver.table["mta-sts.example.test"] = {"servfail": True}
        error = await self.failure("example.test")
        self.assertIn("mta-sts.example.test: mta-sts.example.test/A: SERVFAIL", error)

    async def test_no_such_host(self) -> None:
        error = await self.failure("nowhere.test")
        self.assertIn("mta-sts.nowhere.test", error)
        self.assertIn("no such domain", error)

    async def test_refused_networks(self) -> None:
        fetcher = self.fetcher(refuse_networks=parse_networks(["127.0.0.0/8"]))
        error = await self.failure("example.test", fetcher)
        self.assertEqual(error, "mta-sts.example.test: only refused addresses")
        self.assertEqual(self.server.requests, [])

    async def test_nothing_listening(self) -> None:
        await self.server.stop()
        error = await self.failure("example.test")
        self.assertIn("connect to mta-sts.example.test", error)


class DiscoveryTests(TestCase):
    """L{MTASTS}: TXT record, fetch, cache and their failures (RFC 8461 sections 3, 5.1)."""

    def setUp(self) -> Any:
        self.net = _Loopback(self.mktemp())
        self.server = PolicyServer(TABLE, self.net.cert, self.net.key)
        self.port = self.server.start()
        self.addCleanup(self.server.stop)
        for domain in DOMAINS:
            self.net.resolver.table[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=1"]}
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.cache_dir = os.path.join(self.net.dir, "state", "mta-sts")
        self.sts = self.make()

    def make(self) -> MTASTS:
        fetcher = PolicyFetcher(
            reactor, self.net.resolver, self.net.trust.trust_root(), port=self.port, timeout=5
        )
        cache = PolicyCache(self.cache_dir, run_now, self.clock)
        return MTASTS(self.net.resolver, fetcher.fetch, cache, self.clock)

    def fetches(self, domain: str = "example.test") -> int:
        return sum(1 for host, _ in self.server.requests if host == f"mta-sts.{domain}")

    async def test_fetched_once_then_cached(self) -> None:
        policy = await self.sts.policy("example.test")
        self.assertEqual(policy, parse_policy(GOOD.encode()))
        self.assertEqual(await self.sts.policy("example.test"), policy)
        self.assertEqual(self.fetches(), 1)

    async def test_new_id_fetches_again(self) -> None:
        await self.sts.policy("example.test")
        self.server.table["mta-sts.example.test"] = {"body": GOOD.replace("enforce", "testing")}
        self.assertEqual((await self.sts.policy("example.test")).mode, "enforce")  # type: ignore[union-attr]
        self.net.resolver.table["_mta-sts.example.test"] = {"TXT": ["v=STSv1; id=2"]}
        self.assertEqual((await self.sts.policy("example.test")).mode, "testing")  # type: ignore[union-attr]
        self.assertEqual(self.fetches(), 2)

    async def test_expired_policy_is_fetched_again(self) -> None:
        await self.sts.policy("example.test")
        self.clock.advance(86400)
        self.assertIsNotNone(await self.sts.policy("example.test"))
        self.assertEqual(self.fetches(), 2)

    async def test_no_txt_record_no_policy(self) -> None:
        del self.net.resolver.table["_mta-sts.example.test"]
        self.assertIsNone(await self.sts.policy("example.test"))
        self.assertEqual(self.server.requests, [])

    async def test_cached_policy_outlives_the_txt_record(self) -> None:
        # RFC 8461 section 3.3: a valid cached policy is applied when no
        # live one can be discovered.
        await self.sts.policy("example.test")
        for broken in ({"TXT": "nxdomain"}, {"servfail": True}, {"TXT": ["v=STSv1; id=a;b"]}):
            self.net.resolver.table["_mta-sts.example.test"] = broken
            self.assertIsNotNone(await self.sts.policy("example.test"), broken)
        self.assertEqual(self.fetches(), 1)

    async def test_failed_fetch_keeps_the_cached_policy(self) -> None:
        await self.sts.policy("example.test")
        self.net.resolver.table["_mta-sts.example.test"] = {"TXT": ["v=STSv1; id=2"]}
        self.server.table["mta-sts.example.test"] = {"body": "junk"}
        policy = await self.sts.policy("example.test")
        self.assertEqual(policy, parse_policy(GOOD.encode()))
        self.assertEqual(self.fetches(), 2)

    async def test_failed_fetch_without_cache_is_no_policy_and_waits(self) -> None:
        self.assertIsNone(await self.sts.policy("bad.test"))
        self.assertIsNone(await self.sts.policy("bad.test"))
        self.assertEqual(self.fetches("bad.test"), 1)
        self.clock.advance(300)
        self.server.table["mta-sts.bad.test"] = {"body": GOOD}
        self.assertIsNotNone(await self.sts.policy("bad.test"))
        self.assertEqual(self.fetches("bad.test"), 2)

    async def test_mode_none_is_cached_too(self) -> None:
        await self.sts.policy("example.test")
        self.net.resolver.table["_mta-sts.example.test"] = {"TXT": ["v=STSv1; id=2"]}
        self.server.table["mta-sts.example.test"] = {
            "body": "version: STSv1\nmode: none\nmax_age: 60\n"
        }
        self.assertEqual((await self.sts.policy("example.test")).mode, "none")  # type: ignore[union-attr]

    async def test_concurrent_lookups_share_one_fetch(self) -> None:
        self.server.table["mta-sts.slow.test"] = {"body": GOOD, "delay": 0.2}
        results = await gatherResults(
            [Deferred.fromCoroutine(self.sts.policy("slow.test")) for _ in range(5)]
        )
        self.assertEqual(len({str(r) for r in results}), 1)
        self.assertIsNotNone(results[0])
        self.assertEqual(self.fetches("slow.test"), 1)

    async def test_policy_survives_a_restart(self) -> None:
        await self.sts.policy("example.test")
        await self.server.stop()
        restarted = self.make()
        self.assertEqual(await restarted.policy("example.test"), parse_policy(GOOD.encode()))

    async def test_policy_used_after_a_day_is_refreshed_in_the_background(self) -> None:
        # RFC 8461 section 3.3: refresh before expiry, about once a day.
        week = GOOD.replace("max_age: 86400", "max_age: 604800")
        self.server.table["mta-sts.example.test"] = {"body": week}
        await self.sts.policy("example.test")
        self.clock.advance(86399)
        await self.sts.policy("example.test")
        self.assertEqual(self.fetches(), 1)
        self.clock.advance(1)
        self.server.table["mta-sts.example.test"] = {"body": week, "delay": 0.1}
        self.assertIsNotNone(await self.sts.policy("example.test"))  # at once, from the cache
        self.assertEqual(self.fetches(), 1)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.fetches(), 2)
        cache = PolicyCache(self.cache_dir, run_now, self.clock)
        entry = await cache.get("example.test")
        assert entry is not None
        self.assertEqual(entry.fetched, self.clock.seconds())  # max_age counts from now

    async def test_failed_refresh_keeps_the_policy(self) -> None:
        week = GOOD.replace("max_age: 86400", "max_age: 604800")
        self.server.table["mta-sts.example.test"] = {"body": week}
        await self.sts.policy("example.test")
        self.clock.advance(86000)
        self.server.table["mta-sts.example.test"] = {"status": 500}
        self.clock.advance(400)
        await self.sts.policy("example.test")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.fetches(), 2)
        self.assertIsNotNone(await self.sts.policy("example.test"))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.fetches(), 2)  # not again within RETRY_AFTER

    async def test_txt_lookup_error_without_cache(self) -> None:
        self.net.resolver.table["_mta-sts.example.test"] = {"servfail": True}
        self.assertIsNone(await self.sts.policy("example.test"))
