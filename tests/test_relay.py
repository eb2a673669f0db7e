"""The delivery agent against sink servers on loopback addresses.

MX hosts are sinks listening on the same port at different loopback
addresses (127.0.0.2, 127.0.0.3, ...: all of 127/8 is local), found
through a table-driven resolver, so the agent walks real TCP connections.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from functools import partial
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mta.config import RouteConfig
from mta.delivery.fakedns import FakeResolver
from mta.delivery.job import DeliveryJob
from mta.delivery.relay import DeliveryAgent, DeliverySettings
from mta.delivery.routes import Router
from mta.envelope import Envelope, QueueState, Recipient
from mta.queue.manager import QueueManager
from mta.smtp.client import ClientTimeouts
from mta.testing import HANG, MemoryStore, SinkBehaviour, SinkFactory, queue_message, run_inline
from mta.tls import ServerTLS, ensure_selfsigned

MX1 = (10, "mx1.example.net", "127.0.0.2")
MX2 = (20, "mx2.example.net", "127.0.0.3")
MESSAGE = b"From: a@example.com\r\nSubject: relay test\r\n\r\nHello.\r\n.dot line\r\n"


def free_port() -> int:
    """A port free on 127.0.0.1 (and, almost surely, on 127.0.0.2-9)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayTestCase(TestCase):
    """Shared by the delivery agent tests: sinks on loopback addresses of one port, a FakeResolver
    to publish MX records in, the agent and a job to deliver."""

    def setUp(self) -> None:
        self.port = free_port()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sinks: dict[str, SinkFactory] = {}
        self.resolver = FakeResolver({})
        self.agents: list[DeliveryAgent] = []

    def sink(self, address: str, behaviour: SinkBehaviour | None = None, tls: Any = None) -> Any:
        factory = SinkFactory(behaviour, tls=tls)
        self.sinks[address] = factory
        d = TCP4ServerEndpoint(reactor, self.port, interface=address).listen(factory)

        def listening(port: Any) -> SinkFactory:
            self.addCleanup(port.stopListening)
            return factory

        return d.addCallback(listening)

    def agent(self, router: Router | None = None, **settings: Any) -> DeliveryAgent:
        settings.setdefault("timeouts", ClientTimeouts(connect=2, greeting=2, helo=2,
                                                       mail=2, rcpt=2, data_init=2,
                                                       data_block=2, data_done=2))  # fmt: skip
        agent = DeliveryAgent(
            reactor,
            self.resolver,
            router or Router({}),
            DeliverySettings(hostname="relay.test", port=self.port, families=("A",), **settings),
            shuffle=lambda items: None,
        )
        self.agents.append(agent)
        self.addCleanup(agent.cache.close_all)
        return agent

    def job(
        self,
        *recipients: str,
        data: bytes = MESSAGE,
        smtputf8: bool = False,
        body: str | None = None,
        **rcpt_params: Any,
    ) -> DeliveryJob:
        path = os.path.join(self.dir, f"msg{len(os.listdir(self.dir))}")
        with open(path, "wb") as f:
            f.write(data)
        env = Envelope(
            queue_id="0000000000000TEST",
            sender="a@example.com",
            recipients=[Recipient(r, **rcpt_params) for r in recipients],
            arrival=reactor.seconds(),
            size=len(data),
            smtputf8=smtputf8,
            body=body,
            ret="HDRS",
            envid="env-1",
        )
        domain = recipients[0].rpartition("@")[2].lower()
        return DeliveryJob(env, env.recipients, partial(open, path, "rb"), domain, domain)

    def mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """Publish MX records; each host is (preference, name, address)."""
        self.resolver.table[domain] = {"MX": [(pref, name) for pref, name, _ in hosts]}
        for _, name, address in hosts:
            self.resolver.table[name] = {"A": [address]}


class MXWalkTests(RelayTestCase):
    """The agent walking next hops against real sinks: the next MX when the first refuses the
    connection, session_limit and address_limit, one result per recipient, many recipients in
    several transactions on one connection, the connection cache, and a temporary MAIL failure
    trying the next MX."""

    async def run_job(self, agent: DeliveryAgent, job: DeliveryJob) -> Any:
        return await agent.deliver(job)

    def test_next_mx_when_first_refuses_connection(self) -> Any:
        self.mx(
            "example.net",
            (10, "mx1.example.net", "127.0.0.2"),
            (20, "mx2.example.net", "127.0.0.3"),
        )

        async def go() -> None:
            sink = await self.sink("127.0.0.3")
            [result] = await self.agent().deliver(self.job("bob@example.net"))
            self.assertEqual(result.reply.code, 250)
            self.assertEqual(result.relay, f"mx2.example.net[127.0.0.3]:{self.port}")
            self.assertEqual(len(sink.messages), 1)
            self.assertEqual(sink.messages[0].data, MESSAGE)

        return ensureDeferred(go())

    def test_session_limit(self) -> Any:
        """Two SMTP sessions per attempt (Postfix smtp_mx_session_limit)."""
        self.mx(
            "example.net",
            (10, "mx1.example.net", "127.0.0.2"),
            (20, "mx2.example.net", "127.0.0.3"),
            (30, "mx3.example.net", "127.0.0.4"),
        )

        async def go() -> None:
            busy = SinkBehaviour(mail=lambda line: "451 4.3.2 System busy")
            await self.sink("127.0.0.2", busy)
            await self.sink("127.0.0.3", busy)
            third = await self.sink("127.0.0.4")
            [result] = await self.agent(session_limit=2).deliver(self.job("bob@example.net"))
            self.assertEqual((result.reply.code, result.kind), (451, "remote"))
            self.assertEqual(result.relay, f"mx2.example.net[127.0.0.3]:{self.port}")
            self.assertEqual(third.connections, 0)

        return ensureDeferred(go())

    def test_address_limit(self) -> Any:
        hosts = [(i, f"mx{i}.example.net", f"127.0.0.{i + 1}") for i in range(1, 8)]
        self.mx("example.net", *hosts)

        async def go() -> None:
            for _, _, address in hosts:
                await self.sink(address, SinkBehaviour(greeting="421 4.7.0 Not now"))
            [result] = await self.agent(address_limit=5, session_limit=10).deliver(
                self.job("bob@example.net")
            )
            self.assertEqual(result.reply.code, 421)
            tried = [a for a, f in self.sinks.items() if f.connections]
            self.assertEqual(tried, [h[2] for h in hosts[:5]])

        return ensureDeferred(go())

    def test_per_recipient_results(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            await self.sink(
                "127.0.0.2",
                SinkBehaviour(
                    rcpt=lambda line: "550 5.1.1 No such user" if "nobody" in line else "250 Ok"
                ),
            )
            results = await self.agent().deliver(
                self.job("bob@example.net", "nobody@example.net", "carol@example.net")
            )
            self.assertEqual([r.reply.code for r in results], [250, 550, 250])
            self.assertEqual(results[1].reply.enhanced, "5.1.1")

        return ensureDeferred(go())

    def test_many_recipients_several_transactions_one_connection(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            rcpts = [f"user{i}@example.net" for i in range(120)]
            results = await self.agent().deliver(self.job(*rcpts))
            self.assertTrue(all(r.ok for r in results))
            self.assertEqual([len(m.rcpt_lines) for m in sink.messages], [50, 50, 20])
            self.assertEqual(sink.connections, 1)

        return ensureDeferred(go())

    def test_connection_cache(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            agent = self.agent(connection_cache_time=0.3)
            await agent.deliver(self.job("a@example.net"))
            await agent.deliver(self.job("b@example.net"))
            self.assertEqual((sink.connections, len(sink.messages)), (1, 2))
            self.assertEqual(len(agent.cache), 1)
            await deferLater(reactor, 0.5, lambda: None)
            self.assertEqual(len(agent.cache), 0, "the idle connection was closed")
            self.assertEqual(sink.commands[-1], "QUIT")
            await agent.deliver(self.job("c@example.net"))
            self.assertEqual(sink.connections, 2)

        return ensureDeferred(go())

    def test_temporary_mail_failure_tries_next_mx(self) -> Any:
        self.mx(
            "example.net",
            (10, "mx1.example.net", "127.0.0.2"),
            (20, "mx2.example.net", "127.0.0.3"),
        )

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(mail=lambda line: "451 4.3.0 Busy"))
            second = await self.sink("127.0.0.3")
            [result] = await self.agent().deliver(self.job("bob@example.net"))
            self.assertTrue(result.ok)
            self.assertEqual(len(second.messages), 1)

        return ensureDeferred(go())


class DNSOutcomeTests(RelayTestCase):
    """What DNS outcomes mean for each recipient: a null MX and NXDOMAIN fail permanently, SERVFAIL
    defers, no MX delivers to the domain itself."""

    async def one(self, domain: str) -> Any:
        [result] = await self.agent().deliver(self.job(f"bob@{domain}"))
        return result

    def test_null_mx(self) -> Any:
        self.resolver.table["null.example"] = {"MX": [(0, ".")]}

        async def go() -> None:
            result = await self.one("null.example")
            self.assertEqual(
                (result.reply.code, result.reply.enhanced, result.kind), (556, "5.1.10", "dns")
            )

        return ensureDeferred(go())

    def test_nxdomain(self) -> Any:
        async def go() -> None:
            result = await self.one("nowhere.example")
            self.assertEqual((result.reply.code, result.reply.enhanced), (550, "5.1.2"))

        return ensureDeferred(go())

    def test_servfail(self) -> Any:
        self.resolver.table["broken.example"] = {"servfail": True}

        async def go() -> None:
            result = await self.one("broken.example")
            self.assertEqual((result.reply.code, result.reply.enhanced), (451, "4.4.3"))

        return ensureDeferred(go())

    def test_implicit_mx(self) -> Any:
        self.resolver.table["plain.example"] = {"A": ["127.0.0.2"]}

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            result = await self.one("plain.example")
            self.assertTrue(result.ok)
            self.assertEqual(len(sink.messages), 1)

        return ensureDeferred(go())


class RouteTests(RelayTestCase):
    """Routes of [routes]: a route skips the MX lookup, and a smarthost gets AUTH over TLS."""

    def test_route_skips_mx_lookup(self) -> Any:
        async def go() -> None:
            sink = await self.sink("127.0.0.5")
            router = Router({"example.net": RouteConfig(relay=f"[127.0.0.5]:{self.port}")})
            [result] = await self.agent(router).deliver(self.job("bob@example.net"))
            self.assertTrue(result.ok)
            self.assertEqual(self.resolver.queries, [])
            self.assertEqual(len(sink.messages), 1)

        return ensureDeferred(go())

    def test_smarthost_with_auth_over_tls(self) -> Any:
        cert, key = ensure_selfsigned(os.path.join(self.dir, "cert"), "localhost")

        async def go() -> None:
            behaviour = SinkBehaviour(extensions=("PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN"))
            sink = await self.sink("127.0.0.6", behaviour, tls=ServerTLS(cert, key))
            route = RouteConfig(
                relay=f"[127.0.0.6]:{self.port}", tls="encrypt", username="u", password="p"
            )
            [result] = await self.agent(Router({"*": route})).deliver(
                self.job("x@anywhere.example")
            )
            self.assertTrue(result.ok, result.reply)
            self.assertIn("STARTTLS", sink.commands)
            self.assertTrue(any(c.startswith("AUTH PLAIN ") for c in sink.commands))

        return ensureDeferred(go())


class TLSPolicyTests(RelayTestCase):
    """TLS levels on delivery: required TLS that the server does not offer defers, a failed
    opportunistic handshake falls back to plaintext."""

    def test_required_tls_not_offered_defers(self) -> Any:
        self.mx("secure.example", (10, "mx.secure.example", "127.0.0.2"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            router = Router({}, tls_required=["secure.example"])
            [result] = await self.agent(router).deliver(self.job("bob@secure.example"))
            self.assertEqual((result.reply.code, result.kind), (451, "tls"))
            self.assertEqual(sink.messages, [])

        return ensureDeferred(go())

    def test_failed_opportunistic_tls_falls_back_to_plaintext(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        @implementer(IOpenSSLContextFactory)
        class NoCertificate:
            """Says 220 to STARTTLS, then cannot complete a handshake."""

            def getContext(self) -> Any:
                return SSL.Context(SSL.TLS_METHOD)

        async def go() -> None:
            sink = await self.sink("127.0.0.2", tls=NoCertificate())
            [result] = await self.agent().deliver(self.job("bob@example.net"))
            self.assertTrue(result.ok, result.reply)
            self.assertEqual(sink.connections, 2)
            self.assertEqual(len(sink.messages), 1)

        return ensureDeferred(go())


class ContentTests(RelayTestCase):
    """The message on the way out: 8-bit content unchanged to an 8BITMIME server and converted for
    one without, SMTPUTF8 required but not offered bounces, and DSN parameters passed on when the
    server offers DSN."""

    def test_8bit_to_8bitmime_server_unchanged(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        data = "From: a@example.com\r\nSubject: x\r\n\r\nBlåbærsyltetøy\r\n".encode()

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            await self.agent().deliver(self.job("bob@example.net", data=data))
            self.assertEqual(sink.messages[0].data, data)
            self.assertIn("BODY=8BITMIME", sink.messages[0].sender_line)

        return ensureDeferred(go())

    def test_8bit_to_7bit_server_downgraded(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        data = (
            "From: a@example.com\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\nBlåbærsyltetøy\r\n"
        ).encode()

        async def go() -> None:
            sink = await self.sink(
                "127.0.0.2", SinkBehaviour(extensions=("PIPELINING", "ENHANCEDSTATUSCODES"))
            )
            [result] = await self.agent().deliver(self.job("bob@example.net", data=data))
            self.assertTrue(result.ok, result.reply)
            got = sink.messages[0].data
            self.assertTrue(got.isascii())
            self.assertIn(b"Content-Transfer-Encoding: quoted-printable", got)
            self.assertIn(b"Bl=C3=A5b=C3=A6rsyltet=C3=B8y", got)
            self.assertNotIn("BODY=", sink.messages[0].sender_line)

        return ensureDeferred(go())

    def test_smtputf8_required_but_missing_bounces(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2", SinkBehaviour(extensions=("8BITMIME",)))
            [result] = await self.agent().deliver(self.job("jørn@example.net", smtputf8=True))
            self.assertEqual((result.reply.code, result.reply.enhanced), (553, "5.6.7"))
            self.assertEqual(sink.messages, [])

        return ensureDeferred(go())

    def test_dsn_parameters_passed_when_offered(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        self.mx("plain.example", (10, "mx.plain.example", "127.0.0.3"))

        async def go() -> None:
            dsn = await self.sink("127.0.0.2")
            plain = await self.sink("127.0.0.3", SinkBehaviour(extensions=("8BITMIME",)))
            agent = self.agent()
            params = {"notify": ("SUCCESS",), "orcpt": "rfc822;bob@example.net"}
            results = await DeferredList([
                agent.deliver(self.job("bob@example.net", **params)),
                agent.deliver(self.job("bob@plain.example", **params)),
            ])  # fmt: skip
            [with_dsn], [without] = (r for _, r in results)
            self.assertTrue(with_dsn.dsn_passed)
            self.assertFalse(without.dsn_passed)
            self.assertIn("NOTIFY=SUCCESS", dsn.messages[0].rcpt_lines[0])
            self.assertIn("RET=HDRS", dsn.messages[0].sender_line)
            self.assertNotIn("NOTIFY", plain.messages[0].rcpt_lines[0])

        return ensureDeferred(go())


class RefusedNetworkTests(RelayTestCase):
    """refuse_networks: an MX on loopback and an address literal of a refused network are not
    connected to (so no domain can reach this host's local services); routes are the operator's
    and not checked."""

    def test_loopback_mx_is_refused(self) -> Any:
        """A domain whose MX points at this host must not reach its local services."""
        self.mx("evil.example", (10, "mx.evil.example", "127.0.0.2"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            agent = self.agent(refuse_networks=(ipaddress.ip_network("127.0.0.0/8"),))
            [result] = await agent.deliver(self.job("x@evil.example"))
            self.assertEqual((result.reply.code, result.reply.enhanced), (554, "5.4.4"))
            self.assertEqual(sink.connections, 0)

        return ensureDeferred(go())

    def test_address_literal_is_refused(self) -> Any:
        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            agent = self.agent(refuse_networks=(ipaddress.ip_network("127.0.0.0/8"),))
            [result] = await agent.deliver(self.job("x@[127.0.0.2]"))
            self.assertEqual(result.reply.code, 554)
            self.assertEqual(sink.connections, 0)

        return ensureDeferred(go())

    def test_routes_are_not_checked(self) -> Any:
        async def go() -> None:
            sink = await self.sink("127.0.0.5")
            router = Router({"*": RouteConfig(relay=f"[127.0.0.5]:{self.port}")})
            agent = self.agent(router, refuse_networks=(ipaddress.ip_network("127.0.0.0/8"),))
            [result] = await agent.deliver(self.job("x@anywhere.example"))
            self.assertTrue(result.ok)
            self.assertEqual(len(sink.messages), 1)

        return ensureDeferred(go())


class TransactionReportTests(RelayTestCase):
    """C{DeliveryJob.on_transaction}: each transaction's results as soon as
    the next hop has answered it, before the job ends."""

    def test_each_transaction_is_reported(self) -> Any:
        self.mx("example.net", MX1)
        recipients = [f"r{n}@example.net" for n in range(5)]

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            job = self.job(*recipients)
            told: list[tuple[list[str], int]] = []
            job.on_transaction = lambda results: told.append(
                ([r.address for r in results], len(sink.messages))
            )
            results = await self.agent(recipients_per_transaction=2).deliver(job)
            self.assertEqual([r.reply.code for r in results], [250] * 5)
            # Told after each transaction, while the later ones were still to come.
            self.assertEqual(
                told, [(recipients[0:2], 1), (recipients[2:4], 2), (recipients[4:], 3)]
            )

        return ensureDeferred(go())

    def test_a_failing_report_does_not_stop_the_delivery(self) -> Any:
        self.mx("example.net", MX1)

        def broken(results: Any) -> None:
            raise RuntimeError("journal gone")

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            job = self.job("a@example.net", "b@example.net")
            job.on_transaction = broken
            results = await self.agent(recipients_per_transaction=1).deliver(job)
            self.assertEqual([r.reply.code for r in results], [250, 250])
            self.assertEqual(len(sink.messages), 2)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

        return ensureDeferred(go())


class StaleConnectionTests(RelayTestCase):
    """A connection that timed out is never offered for reuse."""

    def test_timed_out_connection_is_not_cached(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(mail=lambda line: HANG))
            short = ClientTimeouts(connect=2, greeting=2, helo=2, mail=0.2, rcpt=0.2,
                                   data_init=0.2, data_block=2, data_done=2)  # fmt: skip
            agent = self.agent(timeouts=short, connection_cache_time=5)
            [result] = await agent.deliver(self.job("a@example.net"))
            self.assertEqual(result.kind, "timeout")
            conn = agent.cache.take("example.net")  # what the next job would get
            try:
                self.assertIsNone(conn, "an aborted connection was offered for reuse")
            finally:
                await deferLater(reactor, 0.05, lambda: None)

        return ensureDeferred(go())


class DeadSiteScopeTests(RelayTestCase):
    """A transfer dropped half-way does not make the destination look dead."""

    def test_drop_during_data_does_not_suspend_destination(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        store = MemoryStore()

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(drop_after_data_bytes=10))
            agent = self.agent()
            queue_message(store, "a@example.com", ["bob@example.net"], arrival=reactor.seconds())
            qm = QueueManager(store, run_inline, agent, Router({}), reactor)
            qm.startService()
            self.addCleanup(qm.stopService)
            await qm.when_idle()
            _, env = store.load(next(iter(store.ids(QueueState.DEFERRED))))
            self.assertIn("lost connection", env.recipients[0].reply)
            self.assertEqual(
                qm.destinations.suspended, {}, "one dropped transfer suspended example.net"
            )

        return ensureDeferred(go())
