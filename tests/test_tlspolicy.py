"""DANE and MTA-STS at delivery: L{mta.delivery.tlspolicy} with real TLS on loopback.

Three layers:

  - the decision per MX host (L{TLSPolicies.for_hop}) from a table
    resolver: which records make which policy, which failures skip a host;
  - the outbound client (L{mta.smtp.client.connect}) against sinks over
    real TCP and TLS presenting a good, an expired, a wrong-name and a
    self-signed certificate, with the checks those policies attach;
  - the delivery agent walking MX hosts that are sinks on 127.0.0.x, with
    MTA-STS policies from a real HTTPS server on loopback
    (tests/policyserver.py), and the policy each result names.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from mta.batch import run_now
from mta.config import RouteConfig, parse
from mta.delivery import pkix
from mta.delivery.dns import TLSARecord
from mta.delivery.mtasts import MTASTS, Policy, PolicyCache, PolicyFetcher
from mta.delivery.mx import NextHop
from mta.delivery.relay import DeliveryAgent
from mta.delivery.routes import Router
from mta.delivery.tlspolicy import (
    DANECheck,
    DomainTLS,
    HopRefusedError,
    PKIXCheck,
    TLSPolicies,
)
from mta.errors import ConfigError, DeliveryError
from mta.service import MTAService
from mta.smtp.client import ClientPolicy, ClientTimeouts, OutboundConnection, connect
from mta.testing import HANG, FakeResolver, SinkBehaviour, SinkFactory, write_users
from mta.tls import ServerTLS
from tests.client_support import ScriptedServer, outbound
from tests.pki import CA, Issued, self_signed
from tests.policyserver import PolicyServer
from tests.test_relay import RelayTestCase

MX = "mx.example.test"


def tlsa(issued: Issued, usage: int = 3, selector: int = 1) -> tuple[int, int, int, str]:
    """A TLSA record (table form) for a certificate: SHA2-256 of its key or itself."""
    cert = issued.cert if usage == 3 else issued.chain[0]
    if selector == 1:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        data = cert.public_bytes(serialization.Encoding.DER)
    return (usage, selector, 1, hashlib.sha256(data).hexdigest())


def record(issued: Issued, usage: int = 3) -> TLSARecord:
    u, s, m, hexdata = tlsa(issued, usage)
    return TLSARecord(u, s, m, bytes.fromhex(hexdata))


class LogCapture:
    """Formatted log events while a test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.lines: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            self.lines.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observe)
        test.addCleanup(globalLogPublisher.removeObserver, observe)

    def has(self, *parts: str) -> bool:
        return any(all(p in line for p in parts) for line in self.lines)


class DecisionTests(SynchronousTestCase):
    """Which policy a host gets; DNS from a table, no network."""

    def setUp(self) -> None:
        self.ca = CA()
        directory = self.mktemp()
        os.makedirs(directory)
        self.trust = pkix.TrustStore(self.ca.write(os.path.join(directory, "ca.pem")))
        self.server = self.ca.issue([MX])
        self.resolver = FakeResolver(
            {f"_25._tcp.{MX}": {"TLSA": [tlsa(self.server)], "secure": True}}
        )
        self.policies = TLSPolicies(self.resolver, self.trust, dnssec=True)
        self.base = ClientPolicy("client.test", tls="may")

    def decide(
        self, hop: NextHop, sts: Policy | None = None, base: ClientPolicy | None = None
    ) -> ClientPolicy:
        found = DomainTLS("example.test", base or self.base, sts)
        result: ClientPolicy = self.successResultOf(
            Deferred.fromCoroutine(self.policies.for_hop(found, hop))
        )
        return result

    def refused(self, hop: NextHop, sts: Policy | None = None) -> HopRefusedError:
        found = DomainTLS("example.test", self.base, sts)
        d = Deferred.fromCoroutine(self.policies.for_hop(found, hop))
        error = self.failureResultOf(d, HopRefusedError).value
        assert isinstance(error, HopRefusedError)
        return error

    def hop(self, host: str = MX, secure: bool = True, port: int = 25) -> NextHop:
        return NextHop(host, 10, ("192.0.2.1",), port, secure=secure)

    def test_dane(self) -> None:
        policy = self.decide(self.hop())
        self.assertEqual((policy.tls, policy.tls_label), ("encrypt", "dane"))
        assert isinstance(policy.check, DANECheck)
        self.assertEqual(policy.check.records, (record(self.server),))
        self.assertEqual(policy.check.names, (MX, "example.test"))
        self.assertTrue(policy.tls_required)
        self.assertEqual(self.resolver.queries, [(f"_25._tcp.{MX}", "TLSA")])

    def test_tlsa_owner_uses_the_port(self) -> None:
        self.resolver.table[f"_2525._tcp.{MX}"] = self.resolver.table[f"_25._tcp.{MX}"]
        self.assertEqual(self.decide(self.hop(port=2525)).tls_label, "dane")
        self.assertEqual(self.resolver.queries, [(f"_2525._tcp.{MX}", "TLSA")])

    def test_no_tlsa_lookup_for_an_insecure_hop(self) -> None:
        self.assertEqual(self.decide(self.hop(secure=False)), self.base)
        self.assertEqual(self.resolver.queries, [])

    def test_no_dane_without_dnssec(self) -> None:
        self.policies = TLSPolicies(self.resolver, self.trust, dnssec=False)
        self.assertEqual(self.decide(self.hop()), self.base)
        self.assertEqual(self.resolver.queries, [])

    def test_tlsa_not_validated_is_ignored(self) -> None:
        self.resolver.table[f"_25._tcp.{MX}"]["secure"] = False
        self.assertEqual(self.decide(self.hop()), self.base)

    def test_no_tlsa_records(self) -> None:
        for answer in ({"TLSA": "nodata"}, {"TLSA": "nxdomain"}):
            self.resolver.table[f"_25._tcp.{MX}"] = answer
            self.assertEqual(self.decide(self.hop()), self.base)

    def test_tlsa_lookup_failure_skips_the_host(self) -> None:
        # SERVFAIL is also what a validating resolver makes of bogus records.
        self.resolver.table[f"_25._tcp.{MX}"] = {"TLSA": "servfail"}
        error = self.refused(self.hop())
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.7.5"))
        self.assertEqual((error.kind, error.label), ("tls", "dane"))
        self.assertIn(f"TLSA lookup for _25._tcp.{MX} failed", error.reply.text)

    def test_only_unusable_records_still_require_tls(self) -> None:
        _, s, m, data = tlsa(self.server)
        self.resolver.table[f"_25._tcp.{MX}"]["TLSA"] = [(1, s, m, data), (0, 0, 1, data)]
        policy = self.decide(self.hop())
        self.assertEqual(
            (policy.tls, policy.tls_label, policy.check), ("encrypt", "dane-encrypt", None)
        )

    def test_implicit_mx_names_only_itself(self) -> None:
        hop = NextHop("example.test", 0, ("192.0.2.1",), 25, mx=False, secure=True)
        self.resolver.table["_25._tcp.example.test"] = self.resolver.table[f"_25._tcp.{MX}"]
        policy = self.decide(hop)
        assert isinstance(policy.check, DANECheck)
        self.assertEqual(policy.check.names, ("example.test",))

    def test_mta_sts_enforce(self) -> None:
        sts = Policy("enforce", 86400, ("*.example.test",))
        policy = self.decide(self.hop(secure=False), sts)
        self.assertEqual((policy.tls, policy.tls_label), ("encrypt", "mta-sts"))
        assert isinstance(policy.check, PKIXCheck)
        self.assertEqual((policy.check.names, policy.check.enforced), ((MX,), True))
        self.assertEqual(policy.check.name, "MTA-STS policy of example.test")

    def test_mta_sts_enforce_refuses_an_mx_it_does_not_name(self) -> None:
        sts = Policy("enforce", 86400, ("mail.example.test", "*.other.test"))
        error = self.refused(self.hop(secure=False), sts)
        self.assertEqual(
            (error.reply.code, error.reply.enhanced, error.label), (451, "4.7.5", "mta-sts")
        )
        self.assertEqual(
            error.reply.text,
            f"MX host {MX} is not one the MTA-STS policy of example.test names "
            "(mail.example.test, *.other.test)",
        )

    def test_mta_sts_testing_checks_without_enforcing(self) -> None:
        log = LogCapture(self)
        sts = Policy("testing", 86400, ("mail.example.test",))
        policy = self.decide(self.hop(secure=False), sts)
        self.assertEqual((policy.tls, policy.tls_label), ("may", "may"))
        assert isinstance(policy.check, PKIXCheck)
        self.assertFalse(policy.check.enforced)
        self.assertTrue(log.has(f"MX host {MX} is not one the MTA-STS policy", "(testing)"))

    def test_mta_sts_testing_with_tls_none_stays_plain(self) -> None:
        base = ClientPolicy("client.test", tls="none")
        sts = Policy("testing", 86400, (MX,))
        self.assertEqual(self.decide(self.hop(secure=False), sts, base), base)

    def test_dane_wins_over_mta_sts(self) -> None:
        # RFC 8461 section 2: even an MX the policy does not name.
        sts = Policy("enforce", 86400, ("mail.example.test",))
        self.assertEqual(self.decide(self.hop(), sts).tls_label, "dane")

    def test_verify_is_checked_against_the_trust_store(self) -> None:
        base = ClientPolicy("client.test", tls="verify")
        policy = self.decide(self.hop(secure=False), None, base)
        self.assertEqual((policy.tls, policy.tls_label), ("encrypt", "verify"))
        assert isinstance(policy.check, PKIXCheck)
        self.assertEqual((policy.check.trust, policy.check.names), (self.trust, (MX,)))

    def test_encrypt_stays(self) -> None:
        base = ClientPolicy("client.test", tls="encrypt")
        self.assertEqual(self.decide(self.hop(secure=False), None, base), base)

    def test_for_domain_without_mta_sts(self) -> None:
        found = self.successResultOf(
            Deferred.fromCoroutine(self.policies.for_domain("Bücher.Example", self.base))
        )
        self.assertEqual(found, DomainTLS("xn--bcher-kva.example", self.base, None))
        found = self.successResultOf(
            Deferred.fromCoroutine(self.policies.for_domain("[192.0.2.1]", self.base))
        )
        self.assertEqual(found, DomainTLS("", self.base, None))


class _Certificates:
    """Server certificates for MX and the CA that issued the good ones."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.ca = CA()
        self.ca_file = self.ca.write(os.path.join(directory, "ca.pem"))
        self.trust = pkix.TrustStore(self.ca_file)
        self.issued = {
            "good": self.ca.issue([MX]),
            "wildcard": self.ca.issue(["*.example.test"]),
            "expired": self.ca.issue([MX], expired=True),
            "wrong-name": self.ca.issue(["other.example.test"]),
            "self-signed": self_signed([MX]),
        }
        self.tls = {
            name: ServerTLS(*issued.write(directory, name)) for name, issued in self.issued.items()
        }


class ClientCheckTests(TestCase):
    """The outbound client with a peer check, over real TCP and TLS on 127.0.0.1."""

    def setUp(self) -> None:
        self.certs = _Certificates(self.mktemp())

    def serve(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def sts_policy(self, enforced: bool = True, tls: str = "encrypt") -> ClientPolicy:
        check = PKIXCheck("MTA-STS policy of example.test", enforced, self.certs.trust, (MX,))
        return ClientPolicy("client.test", ClientTimeouts(starttls=2), tls=tls, check=check,
                            label="mta-sts" if enforced else "")  # fmt: skip

    async def open(self, certificate: str, policy: ClientPolicy) -> tuple[SinkFactory, Any]:
        factory = SinkFactory(tls=self.certs.tls[certificate])
        port = self.serve(factory)
        try:
            conn: Any = await connect(reactor, MX, "127.0.0.1", port, policy)
        except DeliveryError as e:
            conn = e
        return factory, conn

    async def close(self, conn: OutboundConnection) -> None:
        await conn.quit()

    async def test_good_certificate(self) -> None:
        for name in ("good", "wildcard"):
            factory, conn = await self.open(name, self.sts_policy())
            self.assertIsInstance(conn, OutboundConnection, name)
            self.assertTrue(conn.tls and conn.verified)
            await conn.send(outbound(b"Subject: x\r\n\r\nhi\r\n"))
            self.assertEqual(len(factory.messages), 1)
            await self.close(conn)

    async def test_bad_certificates_are_refused_before_anything_is_sent(self) -> None:
        for name, why in [
            ("expired", "certificate not trusted: certificate has expired"),
            ("wrong-name", f"the certificate is not valid for {MX}"),
            ("self-signed", "certificate not trusted: self-signed certificate"),
        ]:
            factory, error = await self.open(name, self.sts_policy())
            self.assertIsInstance(error, DeliveryError, name)
            self.assertEqual(
                (error.reply.code, error.reply.enhanced, error.kind), (451, "4.7.5", "tls")
            )
            self.assertIn(
                f"TLS authentication failed (MTA-STS policy of example.test): {why}",
                error.reply.text,
            )
            # Only the first EHLO and STARTTLS: nothing went inside TLS.
            self.assertEqual([c.split()[0] for c in factory.commands], ["EHLO", "STARTTLS"], name)

    async def test_testing_mode_delivers_and_logs(self) -> None:
        log = LogCapture(self)
        _, conn = await self.open("expired", self.sts_policy(enforced=False, tls="may"))
        self.assertIsInstance(conn, OutboundConnection)
        self.assertTrue(conn.tls)
        self.assertFalse(conn.verified)
        self.assertTrue(
            log.has("certificate has expired", "MTA-STS policy of example.test (testing)",
                    "delivering anyway")
        )  # fmt: skip
        await self.close(conn)

    async def test_testing_mode_without_starttls_logs(self) -> None:
        log = LogCapture(self)
        port = self.serve(SinkFactory())
        conn = await connect(reactor, MX, "127.0.0.1", port, self.sts_policy(False, "may"))
        self.assertFalse(conn.tls)
        self.assertTrue(log.has("STARTTLS is not offered", "(testing)"))
        await self.close(conn)

    async def test_required_but_not_offered(self) -> None:
        port = self.serve(SinkFactory())
        with self.assertRaises(DeliveryError) as caught:
            await connect(reactor, MX, "127.0.0.1", port, self.sts_policy())
        self.assertEqual(caught.exception.reply.enhanced, "4.7.4")
        self.assertIn(
            "TLS is required by the MTA-STS policy of example.test but not offered",
            caught.exception.reply.text,
        )

    async def test_dane_ee_accepts_a_self_signed_certificate(self) -> None:
        issued = self.certs.issued["self-signed"]
        check = DANECheck("DANE TLSA records of _25._tcp.mx", (record(issued),), (MX,))
        _, conn = await self.open("self-signed", ClientPolicy("c.test", tls="encrypt", check=check))
        self.assertIsInstance(conn, OutboundConnection)
        self.assertTrue(conn.verified)
        await self.close(conn)

    async def test_dane_mismatch(self) -> None:
        other = self.certs.issued["good"]
        check = DANECheck("DANE TLSA records of _25._tcp.mx", (record(other),), (MX,))
        _, error = await self.open(
            "self-signed", ClientPolicy("c.test", tls="encrypt", check=check)
        )
        self.assertIsInstance(error, DeliveryError)
        self.assertEqual(error.reply.enhanced, "4.7.5")
        self.assertIn("no TLSA record matches the certificate chain", error.reply.text)

    async def test_handshake_that_never_finishes_times_out(self) -> None:
        # 220 to STARTTLS, then silence where the server's half of the handshake should be.
        replies = ["250-mx\n250 STARTTLS", "220 2.0.0 go ahead", HANG]
        port = self.serve(Factory.forProtocol(lambda: ScriptedServer("220 mx ESMTP", replies)))
        policy = self.sts_policy()
        policy = ClientPolicy("client.test", ClientTimeouts(starttls=0.3), tls="encrypt",
                              check=policy.check)  # fmt: skip
        start = reactor.seconds()
        with self.assertRaises(DeliveryError) as caught:
            await connect(reactor, MX, "127.0.0.1", port, policy)
        self.assertEqual(
            (caught.exception.kind, caught.exception.reply.enhanced), ("timeout", "4.4.2")
        )
        self.assertIn("timeout in the TLS handshake", caught.exception.reply.text)
        self.assertLess(reactor.seconds() - start, 3)


class AgentTests(RelayTestCase):
    """The delivery agent with TLS policies: MX hosts are sinks on 127.0.0.x."""

    def setUp(self) -> None:
        super().setUp()
        self.certs = _Certificates(os.path.join(self.dir, "certs"))
        self.clock_dir = os.path.join(self.dir, "state", "mta-sts")
        hosts = ["mta-sts.sts.test", "mta-sts.testing.test", "mta-sts.both.test"]
        policy_cert, policy_key = self.certs.ca.issue(hosts).write(self.certs.dir, "policy")
        body = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"
        self.policies = PolicyServer(
            {
                "mta-sts.sts.test": {"body": body.format(mode="enforce", mx="*.sts.test")},
                "mta-sts.testing.test": {"body": body.format(mode="testing", mx="*.testing.test")},
                "mta-sts.both.test": {"body": body.format(mode="enforce", mx="nothing.both.test")},
            },
            policy_cert,
            policy_key,
        )
        policy_port = self.policies.start()
        self.addCleanup(self.policies.stop)
        for host in hosts:
            self.resolver.table[host] = {"A": ["127.0.0.1"]}
            self.resolver.table["_mta-sts." + host.removeprefix("mta-sts.")] = {
                "TXT": ["v=STSv1; id=1"]
            }
        fetcher = PolicyFetcher(
            reactor, self.resolver, self.certs.trust.trust_root(), port=policy_port, timeout=5
        )
        sts = MTASTS(
            self.resolver, fetcher.fetch, PolicyCache(self.clock_dir, run_now, reactor), reactor
        )
        self.tls = TLSPolicies(self.resolver, self.certs.trust, dnssec=True, mta_sts=sts)

    def tls_agent(self, router: Router | None = None) -> DeliveryAgent:
        agent = self.agent(router)
        agent.tls = self.tls
        return agent

    def secure_mx(
        self, domain: str, *hosts: tuple[int, str, str], tlsa_for: dict[str, Any]
    ) -> None:
        self.mx(domain, *hosts)
        self.resolver.table[domain]["secure"] = True
        for _, name, _ in hosts:
            self.resolver.table[name]["secure"] = True
            if name in tlsa_for:
                self.resolver.table[f"_{self.port}._tcp.{name}"] = tlsa_for[name]

    def dane_mx(self, domain: str, host: str, answer: dict[str, Any] | None = None) -> None:
        """One secure MX host on 127.0.0.2; TLSA for the self-signed sink by default."""
        if answer is None:
            answer = {"TLSA": [tlsa(self.certs.issued["self-signed"])], "secure": True}
        self.secure_mx(domain, (10, host, "127.0.0.2"), tlsa_for={host: answer})

    async def test_dane(self) -> None:
        self.dane_mx("dane.test", "mx.dane.test")
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@dane.test"))
        self.assertTrue(result.ok, result.reply)
        self.assertEqual(result.tls, "dane")
        self.assertEqual(len(sink.messages), 1)

    async def test_dane_failure_defers_and_tries_the_next_host(self) -> None:
        good = self.certs.issued["self-signed"]
        self.secure_mx(
            "dane.test",
            (10, "mx1.dane.test", "127.0.0.2"),
            (20, "mx2.dane.test", "127.0.0.3"),
            tlsa_for={
                "mx1.dane.test": {"TLSA": [tlsa(self.certs.issued["good"])], "secure": True},
                "mx2.dane.test": {"TLSA": [tlsa(good)], "secure": True},
            },
        )
        first = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        second = await self.sink("127.0.0.3", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@dane.test"))
        self.assertTrue(result.ok, result.reply)
        self.assertEqual((first.messages, len(second.messages)), ([], 1))
        self.assertIn("127.0.0.3", result.relay)

    async def test_dane_failure_everywhere_is_temporary(self) -> None:
        self.dane_mx("dane.test", "mx.dane.test",
                     {"TLSA": [tlsa(self.certs.issued["good"])], "secure": True})  # fmt: skip
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@dane.test"))
        self.assertEqual(
            (result.reply.code, result.reply.enhanced, result.kind), (451, "4.7.5", "tls")
        )
        self.assertEqual(result.tls, "dane")
        self.assertIn("no TLSA record matches", result.reply.text)
        self.assertEqual(sink.messages, [])

    async def test_bogus_tlsa_defers_without_connecting(self) -> None:
        self.dane_mx("dane.test", "mx.dane.test", {"TLSA": "servfail"})
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@dane.test"))
        self.assertEqual((result.reply.enhanced, result.tls), ("4.7.5", "dane"))
        self.assertEqual(sink.connections, 0)

    async def test_dane_without_starttls_defers(self) -> None:
        self.dane_mx("dane.test", "mx.dane.test")
        sink = await self.sink("127.0.0.2")  # no STARTTLS: a downgrade attack looks like this
        [result] = await self.tls_agent().deliver(self.job("bob@dane.test"))
        self.assertEqual((result.reply.enhanced, result.tls), ("4.7.4", "dane"))
        self.assertEqual(sink.messages, [])

    async def test_mta_sts_enforce_skips_a_bad_certificate_for_a_good_one(self) -> None:
        self.mx("sts.test", (10, "mx1.sts.test", "127.0.0.2"), (20, "mx2.sts.test", "127.0.0.3"))
        good = ServerTLS(*self.certs.ca.issue(["*.sts.test"]).write(self.certs.dir, "sts"))
        first = await self.sink("127.0.0.2", tls=self.certs.tls["expired"])
        second = await self.sink("127.0.0.3", tls=good)
        [result] = await self.tls_agent().deliver(self.job("bob@sts.test"))
        self.assertTrue(result.ok, result.reply)
        self.assertEqual(result.tls, "mta-sts")
        self.assertEqual((first.messages, len(second.messages)), ([], 1))

    async def test_mta_sts_enforce_with_only_bad_certificates(self) -> None:
        self.mx("sts.test", (10, "mx1.sts.test", "127.0.0.2"))
        await self.sink("127.0.0.2", tls=self.certs.tls["expired"])
        [result] = await self.tls_agent().deliver(self.job("bob@sts.test"))
        self.assertEqual((result.reply.code, result.reply.enhanced), (451, "4.7.5"))
        self.assertEqual((result.kind, result.tls), ("tls", "mta-sts"))
        self.assertIn("MTA-STS policy of sts.test", result.reply.text)

    async def test_mta_sts_enforce_mx_not_in_the_policy(self) -> None:
        self.mx("sts.test", (10, "mail.elsewhere.test", "127.0.0.2"))
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["good"])
        [result] = await self.tls_agent().deliver(self.job("bob@sts.test"))
        self.assertEqual((result.reply.enhanced, result.tls), ("4.7.5", "mta-sts"))
        self.assertIn("is not one the MTA-STS policy of sts.test names", result.reply.text)
        self.assertEqual(sink.connections, 0)

    async def test_mta_sts_testing_delivers_despite_a_bad_certificate(self) -> None:
        log = LogCapture(self)
        self.mx("testing.test", (10, "mx.testing.test", "127.0.0.2"))
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@testing.test"))
        self.assertTrue(result.ok, result.reply)
        self.assertEqual(result.tls, "may")
        self.assertEqual(len(sink.messages), 1)
        self.assertTrue(log.has("self-signed certificate", "(testing) would not deliver"))

    async def test_dane_wins_over_mta_sts(self) -> None:
        self.dane_mx("both.test", "mx.both.test")
        sink = await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@both.test"))
        self.assertTrue(result.ok, result.reply)
        self.assertEqual(result.tls, "dane")
        self.assertEqual(len(sink.messages), 1)

    async def test_no_policy_is_may(self) -> None:
        self.mx("plain.test", (10, "mx.plain.test", "127.0.0.2"))
        await self.sink("127.0.0.2", tls=self.certs.tls["self-signed"])
        [result] = await self.tls_agent().deliver(self.job("bob@plain.test"))
        self.assertEqual((result.ok, result.tls), (True, "may"))

    async def test_routes_ignore_dane_and_mta_sts(self) -> None:
        self.mx("sts.test", (10, "mail.elsewhere.test", "127.0.0.2"))
        await self.sink("127.0.0.5")
        router = Router({"sts.test": RouteConfig(relay=f"[127.0.0.5]:{self.port}")})
        [result] = await self.tls_agent(router).deliver(self.job("bob@sts.test"))
        self.assertEqual((result.ok, result.tls), (True, "may"))
        self.assertNotIn(("_mta-sts.sts.test", "TXT"), self.resolver.queries)

    async def test_verify(self) -> None:
        self.mx("plain.test", (10, MX, "127.0.0.2"))
        await self.sink("127.0.0.2", tls=self.certs.tls["wrong-name"])
        [result] = await self.tls_agent(Router({}, default_tls="verify")).deliver(
            self.job("bob@plain.test")
        )
        self.assertEqual((result.reply.enhanced, result.tls), ("4.7.5", "verify"))
        self.assertIn(f"not valid for {MX}", result.reply.text)

    async def test_a_cached_connection_keeps_its_policy(self) -> None:
        # The TLS label of a connection taken from the cache is the policy it was made with.
        self.dane_mx("dane.test", "mx.dane.test")
        await self.sink("127.0.0.2", SinkBehaviour(), tls=self.certs.tls["self-signed"])
        agent = self.tls_agent()
        [first] = await agent.deliver(self.job("bob@dane.test"))
        queries = len(self.resolver.queries)
        [second] = await agent.deliver(self.job("carol@dane.test"))
        self.assertEqual((first.tls, second.tls), ("dane", "dane"))
        self.assertEqual(len(self.resolver.queries), queries)  # the cached connection was used


class ServiceWiringTests(SynchronousTestCase):
    """The composition root builds the policies from [delivery]."""

    def service(self, **delivery: Any) -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write_users(os.path.join(directory, "users.json"), {"a@example.test": "password-1"})
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {"submissions": [], "submission": []},
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": 9, **delivery},
        }
        return MTAService(parse(doc, "test.toml", directory), reactor)

    def test_mta_sts_cache_in_the_spool(self) -> None:
        service = self.service()
        self.assertIsInstance(service.agent.tls, TLSPolicies)
        self.assertIsInstance(service.agent.tls.mta_sts, MTASTS)
        self.assertEqual(
            service.agent.tls.mta_sts.cache.directory,
            os.path.join(service.store.root, "state", "mta-sts"),
        )
        self.assertFalse(service.agent.tls.dnssec)

    def test_switches(self) -> None:
        service = self.service(mta_sts=False, dnssec=True)
        self.assertIsNone(service.agent.tls.mta_sts)
        self.assertTrue(service.agent.tls.dnssec)

    def test_unreadable_ca_file_stops_start_up(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.service(ca_file="missing-ca.pem")
        self.assertIn("[delivery] ca_file: cannot read", str(caught.exception))
