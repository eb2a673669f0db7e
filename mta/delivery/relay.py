"""The delivery agent: one message, one destination, per-recipient results.

For a L{DeliveryJob} (a message and the recipients it has at one
destination) the agent finds the next hops (the route, or the MX hosts of
the domain), connects to them in order within Postfix's limits (at most
C{address_limit} addresses and C{session_limit} SMTP sessions per
attempt), reuses a cached connection to the same destination when one is
idle, sends the message in transactions of at most
C{recipients_per_transaction} recipients, and returns one
L{RecipientResult} per recipient.  It never raises: every failure becomes
a result, so the queue manager records and classifies it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mta.address import Network, in_networks
from mta.batch import Runner, run_now
from mta.delivery import mx
from mta.delivery.job import DeliveryJob, RecipientResult
from mta.delivery.mime import DowngradeError, downgrade_8bit, is_8bit_file, read_header_section
from mta.delivery.mime import needs_smtputf8 as _needs_smtputf8
from mta.delivery.routes import Route, Router
from mta.delivery.tlspolicy import DomainTLS, HopRefusedError, TLSPolicies
from mta.envelope import Envelope, Recipient
from mta.errors import DeliveryError, Reply
from mta.interfaces import IDeliveryAgent, IResolver
from mta.metrics import Metrics
from mta.smtp.client import (
    ClientPolicy,
    ClientTimeouts,
    OutboundConnection,
    OutboundMessage,
    OutboundRecipient,
    connect,
)

log = Logger(namespace="mta.delivery")

Connector = Callable[[Any, str, str, int, ClientPolicy], Awaitable[OutboundConnection]]


@dataclass
class DeliverySettings:
    hostname: str
    port: int = 25
    families: tuple[str, ...] = ("A", "AAAA")
    address_limit: int = 5
    session_limit: int = 2
    recipients_per_transaction: int = 50
    connection_cache_time: float = 2.0
    connection_reuse_limit: int = 100
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    # Addresses MX delivery never connects to (routes may): see [delivery] refuse_networks.
    refuse_networks: tuple[Network, ...] = ()


class ConnectionCache:
    """Idle connections per destination, closed after C{idle} seconds.

    Postfix's connection cache: the next message to the same destination
    skips the TCP, TLS and EHLO set-up.
    """

    def __init__(self, clock: IReactorTime, idle: float, reuse_limit: int) -> None:
        self._clock = clock
        self._idle = idle
        self._reuse_limit = reuse_limit
        self._idle_conns: dict[str, list[tuple[OutboundConnection, IDelayedCall]]] = {}
        self._closed = False  # shutting down: connections given back are closed

    def take(self, destination: str) -> OutboundConnection | None:
        conns = self._idle_conns.get(destination, [])
        while conns:
            conn, timer = conns.pop()
            if timer.active():
                timer.cancel()
            if conn.usable:
                return conn
        self._idle_conns.pop(destination, None)
        return None

    def give(self, destination: str, conn: OutboundConnection) -> None:
        """Keep a connection for reuse, or close it when it should not be kept."""
        if (
            self._closed
            or not conn.usable
            or self._idle <= 0
            or conn.transactions >= self._reuse_limit
        ):
            self._close(conn)
            return
        conns = self._idle_conns.setdefault(destination, [])
        timer = self._clock.callLater(self._idle, self._expire, destination, conn)
        conns.append((conn, timer))

    def _expire(self, destination: str, conn: OutboundConnection) -> None:
        conns = self._idle_conns.get(destination, [])
        self._idle_conns[destination] = [(c, t) for c, t in conns if c is not conn]
        if not self._idle_conns[destination]:
            del self._idle_conns[destination]
        self._close(conn)

    @staticmethod
    def _close(conn: OutboundConnection) -> Deferred[None]:
        return Deferred.fromCoroutine(conn.quit()).addErrback(lambda _: None)

    def close_all(self) -> Deferred[Any]:
        """Close every idle connection (and any given back later); fires when closed."""
        self._closed = True
        closing = []
        for conns in self._idle_conns.values():
            for conn, timer in conns:
                if timer.active():
                    timer.cancel()
                closing.append(self._close(conn))
        self._idle_conns.clear()
        return DeferredList(closing)

    def __len__(self) -> int:
        return sum(len(c) for c in self._idle_conns.values())


class _MessageFacts:
    """What the agent learns about a message's bytes, at most once per job.

    Reading a message (up to 50 MB) blocks, so every read runs in the
    agent's runner (the spool thread pool in the daemon).
    """

    def __init__(
        self,
        open_message: Callable[[], IO[bytes]],
        envelope: Envelope,
        recipients: list[str],
        runner: Runner[Any],
    ) -> None:
        self.open = open_message
        self.envelope = envelope
        self.recipients = recipients
        self.runner = runner
        self._eight_bit: bool | None = None
        self._smtputf8: bool | None = None
        self._downgraded: bytes | None = None
        self._prepared: dict[bool, bytes] = {}

    async def eight_bit(self) -> bool:
        """Whether the message has 8-bit octets: from the envelope when it
        says (the submission server records what it saw), else by reading."""
        if self._eight_bit is None:
            if self.envelope.body == "8BITMIME":
                self._eight_bit = True
            elif self.envelope.body == "7BIT":
                self._eight_bit = False
            else:
                self._eight_bit = await self.runner(self._scan_8bit)
        return self._eight_bit

    def _scan_8bit(self) -> bool:
        with self.open() as f:
            return is_8bit_file(f)

    async def smtputf8(self) -> bool:
        if self._smtputf8 is None:
            if not self.envelope.smtputf8:
                self._smtputf8 = False
            else:
                head = await self.runner(self._header)
                self._smtputf8 = _needs_smtputf8(self.envelope.sender, self.recipients, head)
        return self._smtputf8

    def _header(self) -> bytes:
        with self.open() as f:
            return read_header_section(f)

    async def downgraded(self) -> bytes:
        if self._downgraded is None:
            self._downgraded = await self.runner(self._downgrade)
        return self._downgraded

    def _downgrade(self) -> bytes:
        with self.open() as f:
            return downgrade_8bit(f.read())

    def _read(self) -> bytes:
        with self.open() as f:
            return f.read()

    async def prepared(
        self, outbound: Callable[[Envelope, bytes], Deferred[bytes]], downgraded: bool
    ) -> bytes:
        """The message as sent, after the outbound hooks, once per form."""
        if downgraded not in self._prepared:
            data = await self.downgraded() if downgraded else await self.runner(self._read)
            self._prepared[downgraded] = await outbound(self.envelope, data)
        return self._prepared[downgraded]


@implementer(IDeliveryAgent)
class DeliveryAgent:
    """Delivers jobs; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        router: Router,
        settings: DeliverySettings,
        *,
        connector: Connector = connect,
        shuffle: Callable[[list[Any]], None] = random.shuffle,
        runner: Runner[Any] = run_now,
        metrics: Metrics | None = None,
        outbound: Callable[[Envelope, bytes], Deferred[bytes]] | None = None,
        tls: TLSPolicies | None = None,
    ) -> None:
        self.reactor = reactor
        # DANE and MTA-STS for MX delivery (mta.delivery.tlspolicy); None:
        # the configured TLS level only.
        self.tls = tls
        self.metrics = metrics or Metrics()
        self.runner = runner
        # Plugins' outbound hooks (DKIM signing): the exact bytes to send,
        # with header fields put in front.
        self.outbound = outbound
        self.resolver = resolver
        self.router = router
        self.settings = settings
        self.connector = connector
        self.shuffle = shuffle
        self.cache = ConnectionCache(
            reactor, settings.connection_cache_time, settings.connection_reuse_limit
        )

    def deliver(self, job: DeliveryJob) -> Deferred[list[RecipientResult]]:
        """Deliver a job; fires with one result per recipient, never fails."""
        return Deferred.fromCoroutine(_Attempt(self, job).run())

    def policy(self, domain: str, route: Route | None) -> ClientPolicy:
        s = self.settings
        if route is None:
            return ClientPolicy(s.hostname, s.timeouts, tls=self.router.tls_policy(domain))
        return ClientPolicy(
            s.hostname,
            s.timeouts,
            tls=route.tls,
            ca_file=route.ca_file,
            username=route.username,
            password=route.password,
        )

    async def hops(self, domain: str, route: Route | None) -> list[mx.NextHop]:
        s = self.settings
        if route is not None:
            return await mx.route_hops(
                self.resolver,
                route.relay,
                families=s.families,
                shuffle=self.shuffle,
                address_limit=s.address_limit,
            )
        return await mx.next_hops(
            self.resolver,
            domain,
            port=s.port,
            families=s.families,
            shuffle=self.shuffle,
            address_limit=s.address_limit,
        )

    async def connect(
        self, hop: mx.NextHop, address: str, policy: ClientPolicy
    ) -> OutboundConnection:
        try:
            conn = await self._connect(hop, address, policy)
        except DeliveryError as e:
            self.metrics.connection_failures_out.labels(e.kind).inc()
            raise
        self.metrics.connections_out.labels("yes" if conn.tls else "no").inc()
        return conn

    async def _connect(
        self, hop: mx.NextHop, address: str, policy: ClientPolicy
    ) -> OutboundConnection:
        try:
            return await self.connector(self.reactor, hop.host, address, hop.port, policy)
        except DeliveryError as e:
            if e.kind != "tls" or policy.tls != "may":
                raise
            # Opportunistic TLS that fails is retried in plaintext at once,
            # as Postfix does; "encrypt" and "verify" never fall back.
            log.info("{error}; retrying without TLS", error=str(e.reply))
            return await self.connector(
                self.reactor,
                hop.host,
                address,
                hop.port,
                replace(policy, tls="none", label=policy.tls_label),
            )


class _Attempt:
    """One delivery attempt of one job: the state shared by its steps."""

    def __init__(self, agent: DeliveryAgent, job: DeliveryJob) -> None:
        self.agent = agent
        self.job = job
        self.clock = agent.reactor
        self.start = agent.reactor.seconds()
        self.setup_done = self.start
        self.facts = _MessageFacts(
            job.open_message, job.envelope, [r.address for r in job.recipients], agent.runner
        )
        self.results: dict[str, RecipientResult] = {}
        self.connected = False  # an SMTP session was set up with some host
        self.tls = ""  # the TLS policy of the last host tried

    async def run(self) -> list[RecipientResult]:
        job = self.job
        try:
            await self._try_hosts()
        except DeliveryError as e:
            self._fail_all(job.recipients, e)
        except Exception as e:
            log.failure(
                "delivery of {qid} to {dest} crashed", qid=job.envelope.queue_id,
                dest=job.destination,
            )  # fmt: skip
            self._fail_all(
                job.recipients,
                DeliveryError(Reply(451, "4.3.0", f"internal error: {e!r}"), "local"),
            )
        return [self.results[r.address] for r in job.recipients]

    def _fail_all(self, recipients: list[Recipient], error: DeliveryError) -> None:
        for rcpt in recipients:
            self.results.setdefault(
                rcpt.address,
                RecipientResult(
                    rcpt.address,
                    error.reply,
                    error.kind,
                    relay=error.remote or "none",
                    setup_time=self.clock.seconds() - self.start,
                    connected=self.connected,
                    tls=self.tls,
                ),
            )

    async def _try_hosts(self) -> None:
        agent, job = self.agent, self.job
        route = agent.router.route(job.domain)
        policy = agent.policy(job.domain, route)
        pending = list(job.recipients)
        last_error: DeliveryError | None = None
        conn = agent.cache.take(job.destination)
        if conn is not None:
            pending, last_error = await self._use(conn, pending)
            if not pending:
                return
        sessions = 0
        hops = await agent.hops(job.domain, route)
        found: DomainTLS | None = None
        if route is None:
            hops = self._allowed(hops)
            if agent.tls is not None:
                found = await agent.tls.for_domain(job.domain, policy)
        self.tls = policy.tls_label
        for hop in hops:
            if sessions >= agent.settings.session_limit:
                break
            hop_policy = policy
            if found is not None and agent.tls is not None:
                try:
                    hop_policy = await agent.tls.for_hop(found, hop)
                except HopRefusedError as e:
                    last_error, self.tls = e, e.label
                    log.info("{qid}: {error}", qid=job.envelope.queue_id, error=str(e.reply))
                    continue
                self.tls = hop_policy.tls_label
            for address in hop.addresses:
                if sessions >= agent.settings.session_limit:
                    break
                try:
                    conn = await agent.connect(hop, address, hop_policy)
                except DeliveryError as e:
                    last_error = e
                    log.info("{qid}: {error}", qid=job.envelope.queue_id, error=str(e.reply))
                    continue
                sessions += 1
                self.setup_done = self.clock.seconds()
                pending, last_error = await self._use(conn, pending)
                if not pending:
                    return
        self._fail_all(
            pending,
            last_error
            or DeliveryError(
                Reply(451, "4.4.1", f"no next hop for {job.domain} could take the message"),
                "network",
            ),
        )

    def _allowed(self, hops: list[mx.NextHop]) -> list[mx.NextHop]:
        """Drop addresses in refused networks (loopback ...) from MX next hops.

        A recipient domain, or an address literal, must not make this
        server connect to itself or to a service on its own host.
        """
        refused = self.agent.settings.refuse_networks
        if not refused:
            return hops
        allowed = []
        for hop in hops:
            addresses = tuple(a for a in hop.addresses if not in_networks(a, refused))
            if addresses:
                allowed.append(replace(hop, addresses=addresses))
        if hops and not allowed:
            raise DeliveryError(
                Reply(
                    554,
                    "5.4.4",
                    f"The mail servers of {self.job.domain} resolve only to refused "
                    "addresses (loopback or link-local)",
                ),
                "dns",
            )
        return allowed

    async def _use(
        self, conn: OutboundConnection, pending: list[Recipient]
    ) -> tuple[list[Recipient], DeliveryError | None]:
        """Send to C{pending} over C{conn}; returns the recipients worth another host.

        Recipients that got a reply from this server are finished for this
        attempt.  When a whole transaction fails with a temporary error
        (MAIL 4xx, a lost connection), its recipients and the rest stay
        pending, with that error, so that the next MX host can try.
        """
        limit = self.agent.settings.recipients_per_transaction
        left = list(pending)
        self.connected = True
        try:
            while left:
                batch, left = left[:limit], left[limit:]
                outcome = await self._transaction(conn, batch)
                if isinstance(outcome, DeliveryError):
                    return batch + left, outcome
                for result in outcome:
                    result.tls = conn.policy.tls_label
                    self.results[result.address] = result
                self._tell(outcome)
            return [], None
        except BaseException:
            conn.abort()  # in an unknown state: never reuse it
            raise
        finally:
            self.agent.cache.give(self.job.destination, conn)

    def _tell(self, outcome: list[RecipientResult]) -> None:
        """Report a transaction's results to the job's owner; its failure is
        logged and never stops the delivery."""
        if self.job.on_transaction is None:
            return
        try:
            self.job.on_transaction(outcome)
        except Exception:
            log.failure("{qid}: reporting a transaction failed", qid=self.job.envelope.queue_id)

    async def _transaction(
        self, conn: OutboundConnection, batch: list[Recipient]
    ) -> list[RecipientResult] | DeliveryError:
        """One transaction; a DeliveryError when the next host should try again."""
        env, facts = self.job.envelope, self.facts
        setup = self.setup_done - self.start

        def everyone(reply: Reply) -> list[RecipientResult]:
            return [
                RecipientResult(
                    r.address, reply, "remote", conn.remote, setup_time=setup, connected=True
                )
                for r in batch
            ]

        try:
            needs_utf8 = await facts.smtputf8()
            eight_bit = await facts.eight_bit()
        except OSError as e:
            return [
                RecipientResult(
                    r.address,
                    Reply(451, "4.3.0", f"cannot read the queued message: {e}"),
                    "local",
                    setup_time=setup,
                    connected=True,
                )
                for r in batch
            ]
        if needs_utf8 and "SMTPUTF8" not in conn.extensions:
            text = f"{conn.remote} does not support SMTPUTF8, which this message needs (RFC 6531)"
            return everyone(Reply(553, "5.6.7", text))
        opener: Callable[[], IO[bytes]] = facts.open
        size = env.size
        downgrade = eight_bit and "8BITMIME" not in conn.extensions
        if downgrade:
            try:
                data = await facts.downgraded()
            except (DowngradeError, OSError) as e:
                text = (
                    f"{conn.remote} does not support 8BITMIME and the message "
                    f"cannot be converted to 7 bit: {e}"
                )
                return everyone(Reply(554, "5.6.3", text))
            opener, size, eight_bit = (lambda: io.BytesIO(data)), len(data), False
        if self.agent.outbound is not None:
            try:
                sent = await facts.prepared(self.agent.outbound, downgrade)
            except Exception as e:
                log.failure("{qid}: outbound plugin failed", qid=env.queue_id)
                reply = Reply(451, "4.3.0", f"cannot prepare the message for sending: {e}")
                return [
                    RecipientResult(r.address, reply, "local", setup_time=setup, connected=True)
                    for r in batch
                ]
            opener, size = (lambda: io.BytesIO(sent)), len(sent)
        message = OutboundMessage(
            sender=env.sender,
            recipients=[OutboundRecipient(r.address, r.notify, r.orcpt) for r in batch],
            open=opener,
            size=size,
            eight_bit=eight_bit,
            smtputf8=needs_utf8,
            ret=env.ret,
            envid=env.envid,
        )
        sent_at = self.clock.seconds()
        try:
            outcome = await conn.send(message)
        except DeliveryError as e:
            if e.temporary and e.kind in ("remote", "network", "timeout", "protocol"):
                log.info(
                    "{qid}: {remote}: {error}", qid=env.queue_id, remote=conn.remote,
                    error=str(e.reply),
                )  # fmt: skip
                return e
            return [
                RecipientResult(
                    r.address, e.reply, e.kind, conn.remote, setup_time=setup, connected=True
                )
                for r in batch
            ]
        transfer = self.clock.seconds() - sent_at
        return [
            RecipientResult(
                rcpt.address,
                reply,
                "remote",
                conn.remote,
                dsn_passed=outcome.dsn,
                setup_time=setup,
                transfer_time=transfer,
                connected=True,
            )
            for rcpt, reply in zip(batch, outcome.replies, strict=True)
        ]
