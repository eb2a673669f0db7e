"""The composition root: builds every part from a L{Config} and wires them.

Nothing else in the package imports the global reactor; it is passed in
here and handed down.  L{MTAService} is what C{twistd -n mta} runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from functools import partial
from types import FrameType
from typing import Any, NoReturn

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mta import config as configmod
from mta import logs
from mta.address import parse_networks
from mta.bounce import Classifier
from mta.checks import PluginContext
from mta.checks import host as checkhost
from mta.cluster.client import RedisClient
from mta.cluster.local import LocalState
from mta.cluster.redisstate import RedisState
from mta.cluster.users import RedisUsers
from mta.config import Config
from mta.controlsocket import ControlFactory, socket_address
from mta.dailycount import DailyCounter
from mta.delivery import tlspolicy
from mta.delivery.dns import CachingResolver, DNSPythonResolver
from mta.delivery.relay import DeliveryAgent, DeliverySettings
from mta.delivery.routes import Router
from mta.envelope import QueueState
from mta.errors import ConfigError, StorageError
from mta.fasttcp import WriteThroughReactor
from mta.interfaces import IOutboundHook, ISharedState, IUserDirectory
from mta.logs import json_observer
from mta.metrics import Metrics
from mta.metrics import site as metrics_site
from mta.proxyproto import ProxyHeaderFactory, ProxySettings
from mta.queue.dispatch import QueueLimits
from mta.queue.manager import QueueManager
from mta.queue.reports import Reporter
from mta.queue.retention import Retention
from mta.queue.shaping import PER_MINUTE, Shaper, ShapingPolicy
from mta.queue.shaping_rules import DEFAULT_RULES as SHAPING_RULES
from mta.queue.traffic import TrafficShaping
from mta.smtp.auth import Authenticator, AuthThrottle, ThrottleSettings, UserFileChecker
from mta.smtp.client import ClientTimeouts
from mta.smtp.server import SessionLimits, SessionSettings, SubmissionFactory
from mta.spool import open_store, receiver
from mta.spool.queueid import QueueIdGenerator
from mta.tls import ServerTLS, ensure_selfsigned
from mta.users import UserFile

log = Logger(namespace="mta")
# Twisted's default listen backlog of 50 makes the kernel drop the SYNs of
# a burst of new clients (each then waits a second to retry).
LISTEN_BACKLOG = 1024
# Threads that fsync the messages of one group commit concurrently.
SPOOL_SYNC_WORKERS = 8
# What a reload (SIGHUP) applies: these parts of the configuration...
RELOADED = frozenset(
    {"limits", "auth", "queue", "retention", "bounce_rules", "shaping", "shaping_rules"}
)
# ...except these options, which the parts that use them read only at start
# ([limits] daily_messages: the sending limit plugin's default; active_limit:
# the queue's concurrency limits; sweep_interval: the retention timer's;
# [shaping] sync_interval: the cluster poll's).
RESTART_ONLY = frozenset(
    {
        ("limits", "daily_messages"),
        ("queue", "active_limit"),
        ("retention", "sweep_interval"),
        ("shaping", "sync_interval"),
    }
)


def session_limits(config: Config) -> SessionLimits:
    """C{[limits]} as the listeners and their sessions apply them."""
    limits = config.limits
    return SessionLimits(
        message_size=limits.message_size,
        recipients=limits.recipients,
        received_headers=limits.received_headers,
        connections_per_ip=limits.connections_per_ip,
        connections=limits.connections,
        idle_timeout=limits.idle_timeout,
        errors=limits.errors,
        junk_commands=limits.junk_commands,
        header_size=limits.header_size,
        data_min_rate=limits.data_min_rate,
        bare_newline=limits.bare_newline,
    )


def throttle_settings(config: Config) -> ThrottleSettings:
    """C{[auth]} as the AUTH throttle applies it."""
    auth = config.auth
    return ThrottleSettings(
        max_failures=auth.max_failures,
        window=auth.failure_window,
        delay=auth.failure_delay,
        delay_max=auth.failure_delay_max,
    )


def plugin_context(
    config: Config,
    *,
    reactor: Any,
    runner: Callable[[Callable[[], Any]], Deferred[Any]],
    users: IUserDirectory,
    state_dir: str,
    hostname: str,
    shared: ISharedState,
) -> PluginContext:
    """What the plugins are given: the services, and the few options of
    other sections that built-in plugins apply (L{mta.checks.host.load}
    adds each plugin's own C{[[plugins]]} entry)."""
    return PluginContext(
        source=config.source,
        reactor=reactor,
        runner=runner,
        users=users,
        state_dir=state_dir,
        hostname=hostname,
        shared=shared,
        daily_messages=config.limits.daily_messages,
        dkim_keys_dir=config.dkim.keys_dir,
    )


def shaping_policy(config: Config) -> ShapingPolicy:
    """C{[shaping]} as the traffic shaper applies it: rates per second (the
    file has them per minute), C{[delivery] destination_concurrency} as the
    ceiling, C{[queue] maximal_backoff_time} as the window retries are spread
    over, and the operator's C{[[shaping.rules]]} before the built-in ones."""
    shaping, delivery, queue = config.shaping, config.delivery, config.queue
    return ShapingPolicy(
        enabled=shaping.enabled,
        max_concurrency=delivery.destination_concurrency,
        max_rate=shaping.max_rate / PER_MINUTE,
        min_concurrency=shaping.min_concurrency,
        min_rate=shaping.min_rate / PER_MINUTE,
        decrease_factor=shaping.decrease_factor,
        hold_time=shaping.hold_time,
        concurrency_step=shaping.concurrency_step,
        rate_step=shaping.rate_step / PER_MINUTE,
        recovery_interval=shaping.recovery_interval,
        max_wait=shaping.max_wait,
        forget_after=shaping.forget_after,
        spread_window=queue.maximal_backoff_time,
        rules=(*config.shaping_rules, *SHAPING_RULES),
    )


def needs_restart(old: Config, new: Config) -> list[str]:
    """The changes from C{old} to C{new} that a reload does not apply, by name."""
    found = []
    for part in fields(Config):
        name = part.name
        before, after = getattr(old, name), getattr(new, name)
        if name in ("source", "base_dir") or before == after:
            continue
        label = {
            "plugins": "[[plugins]]",
            "bounce_rules": "[[bounce.rules]]",
            "shaping_rules": "[[shaping.rules]]",
        }.get(name, f"[{name}]")
        if name not in RELOADED:
            found.append(label)
            continue
        found += [
            f"{label} {key}"
            for section, key in sorted(RESTART_ONLY)
            if section == name and getattr(before, key) != getattr(after, key)
        ]
    return found


def with_backlog(description: str) -> str:
    """A TCP endpoint description with a listen backlog, unless it sets one."""
    if description.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def fatal(message: str) -> NoReturn:
    """Stop start-up with one clear line on stderr and exit status 1."""
    # twistd replaces sys.stderr with a logging file once it runs; the
    # person starting the daemon needs the line on the real stderr.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"mta: error: {message}\n")
    stream.flush()
    log.critical("{message}", message=message)
    raise SystemExit(1)


class MTAService(MultiService):
    """Everything one mta process runs."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.hostname = config.hostname
        self.ports: list[IListeningPort] = []
        self._pools: list[ThreadPool] = []
        self._control_dir: int | None = None

        self.spool_runner = self._pool("spool-io", 4)
        self.store = open_store(
            config.server.spool,
            create=True,
            workers=SPOOL_SYNC_WORKERS,
            journal_runner=self.spool_runner,
            schedule=lambda f: reactor.callLater(0, f),
            call_later=reactor.callLater,
            settings=config.spool,
            spares=True,
        )
        self.lock = self.store.lock()

        if config.tls.certificate:
            cert, key = config.tls.certificate, config.tls.key
        else:
            cert, key = ensure_selfsigned(config.tls.selfsigned_dir, self.hostname)
        self.tls = ServerTLS(cert, key)

        self.instance = config.cluster.instance or self.hostname
        # The label only where it tells instances apart (or was asked for).
        labelled = bool(config.cluster.redis or config.cluster.instance)
        self.metrics = Metrics(instance=self.instance if labelled else "")
        self.spool = receiver(self.store, self.spool_runner, QueueIdGenerator(reactor.seconds))
        self._build_shared(config, reactor)
        self.throttle = AuthThrottle(reactor, throttle_settings(config), state=self.shared)
        checker = UserFileChecker(self.users, self._pool("auth", 2))
        self.checks = checkhost.load(
            config.plugins,
            plugin_context(
                config,
                reactor=reactor,
                runner=self._pool("checks", 2),
                users=self.users,
                state_dir=self.store.state_dir(""),
                hostname=self.hostname,
                shared=self.shared,
            ),
        )
        self.settings = SessionSettings(
            hostname=self.hostname,
            limits=session_limits(config),
            tls=self.tls,
            spool=self.spool,
            users=self.users,
            auth=Authenticator(checker, self.throttle, self.users, reactor, self.metrics),
            clock=reactor,
            trusted_networks=parse_networks(config.auth.trusted_networks),
            metrics=self.metrics,
            checks=self.checks,
        )
        self._build_delivery(config, reactor)
        self.listeners: list[tuple[str, IProtocolFactory]] = []
        self.factories: list[SubmissionFactory] = []  # each gets new settings on a reload
        for description in config.listen.submissions:
            inner = self._submission_factory(implicit_tls=True)
            self.listeners.append((description, TLSMemoryBIOFactory(self.tls, False, inner)))
        for description in config.listen.submission:
            plain = self._submission_factory(implicit_tls=False)
            self.listeners.append((description, plain))
        self._proxy_listeners(config, reactor)
        oldest = self.queue.messages.oldest_arrival
        self.metrics.watch_queue(self.queue_counts, oldest, reactor.seconds)
        for description in config.metrics.listen:
            self.listeners.append((description, metrics_site(self.metrics, self.health)))

    def _submission_factory(self, *, implicit_tls: bool) -> SubmissionFactory:
        factory = SubmissionFactory(self.settings, implicit_tls=implicit_tls)
        self.factories.append(factory)
        return factory

    def _build_shared(self, config: Config, reactor: Any) -> None:
        """The state the instances share (and the users): Redis with
        C{[cluster] redis}, else this process and the users file, as always."""
        cluster = config.cluster
        self.redis: RedisClient | None = None
        self.redis_users: RedisUsers | None = None
        self.users: IUserDirectory
        if not cluster.redis:
            self.shared: ISharedState = LocalState(DailyCounter(self.store.state_dir(""), reactor))
        else:
            self.redis = RedisClient(
                redis_endpoint(reactor, config),
                reactor,
                name=cluster.redis,
                timeout=cluster.timeout,
                retry=cluster.retry,
                password=cluster.password(config.source),
            )
            self.shared = RedisState(self.redis, reactor, cluster.prefix)
        if cluster.users == "redis":
            assert self.redis is not None
            self.redis_users = RedisUsers(
                self.redis, reactor, cluster.prefix, cluster.users_refresh
            )
            self.users = self.redis_users
        else:
            users = UserFile(config.server.users_file)
            users.users()  # a broken users file stops start-up here
            self.users = users

    def _proxy_listeners(self, config: Config, reactor: Any) -> None:
        """C{[listen] proxy_submissions/proxy_submission}: sessions behind a
        load balancer, built once the PROXY header names the client."""
        listen = config.listen
        proxy = ProxySettings(parse_networks(listen.proxy_from), listen.proxy_timeout)
        for description in listen.proxy_submissions:
            inner = self._submission_factory(implicit_tls=True)
            tls = TLSMemoryBIOFactory(self.tls, False, inner)
            self.listeners.append((description, ProxyHeaderFactory(tls, proxy, reactor)))
        for description in listen.proxy_submission:
            plain = self._submission_factory(implicit_tls=False)
            self.listeners.append((description, ProxyHeaderFactory(plain, proxy, reactor)))

    def _build_delivery(self, config: Config, reactor: Any) -> None:
        """The resolver, route table, delivery agent and queue manager."""
        d = config.delivery
        self.resolver = CachingResolver(
            DNSPythonResolver(
                self._pool("dns", 8),
                nameservers=d.dns_servers or None,
                port=d.dns_port,
                timeout=d.dns_timeout,
                dnssec=d.dnssec,
            ),
            reactor,
        )
        self.router = Router(config.routes, default_tls=d.tls, tls_required=d.tls_required)
        families = tuple({"ipv4": "A", "ipv6": "AAAA"}[v] for v in d.ip_versions)
        tls = tlspolicy.from_config(
            d, reactor, self.resolver, cache_dir=self.store.state_dir("mta-sts"),
            runner=self.spool_runner, families=families,
            refuse_networks=parse_networks(d.refuse_networks),
        )  # fmt: skip
        self.agent = DeliveryAgent(
            WriteThroughReactor(reactor),
            self.resolver,
            self.router,
            DeliverySettings(
                hostname=self.hostname,
                port=d.port,
                families=families,
                address_limit=d.address_limit,
                session_limit=d.session_limit,
                recipients_per_transaction=d.recipients_per_transaction,
                connection_cache_time=d.connection_cache_time,
                connection_reuse_limit=d.connection_reuse_limit,
                refuse_networks=parse_networks(d.refuse_networks),
                timeouts=ClientTimeouts(
                    connect=d.connect_timeout,
                    greeting=d.greeting_timeout,
                    helo=d.helo_timeout,
                    starttls=d.helo_timeout,
                    mail=d.mail_timeout,
                    rcpt=d.rcpt_timeout,
                    data_init=d.data_init_timeout,
                    data_block=d.data_block_timeout,
                    data_done=d.data_done_timeout,
                ),
            ),
            runner=self.spool_runner,
            metrics=self.metrics,
            outbound=self.checks.outbound if self.checks.has(IOutboundHook) else None,
            tls=tls,
        )
        self.traffic = TrafficShaping(
            Shaper(shaping_policy(config)), reactor, metrics=self.metrics,
            shared=self.shared if config.cluster.redis else None, instance=self.instance,
            sync_interval=config.shaping.sync_interval,
        )  # fmt: skip
        self.traffic.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.queue = QueueManager(
            self.store,
            self.spool_runner,
            self.agent,
            self.router,
            reactor,
            limits=QueueLimits(
                active=config.queue.active_limit,
                destination_concurrency=d.destination_concurrency,
                connections=d.max_connections,
            ),
            settings=config.queue,
            # Spread the retries of messages that failed together (+-5 %).
            jitter=lambda delay: delay * random.uniform(0.95, 1.05),
            classifier=Classifier(extra=config.bounce_rules),
            reporter=Reporter(self.store, self.spool, self.spool_runner, reactor, self.hostname),
            metrics=self.metrics,
            traffic=self.traffic,
        )
        self.retention = Retention(self.store, self.spool_runner, reactor, config.retention)
        self.queue.on_done = self.retention.finished
        self.retention.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.spool.add_listener(self.queue.committed)
        self.queue.setServiceParent(self)  # type: ignore[no-untyped-call]

    def queue_counts(self) -> dict[str, int]:
        """Messages per state: the manager's bookkeeping, and a listing of the rest."""
        counts = self.queue.messages.counts()
        for state in (QueueState.HOLD, QueueState.CORRUPT):
            counts[state.value] = self.store.count(state)
        return counts

    def health(self) -> dict[str, Any]:
        """For C{/health}: the queue runs and the spool takes new messages."""
        problems = []
        if not self.queue.running:
            problems.append("the queue manager is not running")
        if not self.store.writable():
            problems.append(f"the spool {self.store.root} is not writable")
        doc: dict[str, Any] = {"status": "ok" if not problems else "failing"}
        if problems:
            doc["problems"] = problems
        doc["queue"] = self.queue_counts()
        if self.redis is not None:
            # Information, not a failure: with Redis down every instance is
            # alike, and taking them all out of the balancer would stop
            # the mail that needs no Redis (relay from trusted networks).
            doc["instance"] = self.instance
            doc["redis"] = "connected" if self.redis.connected else "not connected"
        return doc

    def _pool(self, name: str, size: int) -> Callable[[Callable[[], Any]], Deferred[Any]]:
        pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._pools.append(pool)
        return partial(deferToThreadPool, self.reactor, pool)

    def startService(self) -> None:
        try:
            self.lock.acquire()
        except (OSError, StorageError) as e:
            fatal(str(e))
        self._raise_file_limit()
        logs.start_batching(self.reactor.callLater)
        self._log_json()
        self._recover()
        self._listen()
        self._listen_control()
        for pool in self._pools:
            pool.start()
        signal.signal(signal.SIGHUP, self._sighup)
        if self.redis_users is not None:
            self.redis_users.start()
        self.checks.startup()
        if self.redis is not None:
            log.info(
                "instance {name} of a cluster: shared state in Redis at {redis} "
                "(prefix {prefix}), users in {users}",
                name=self.instance,
                redis=self.config.cluster.redis,
                prefix=self.config.cluster.prefix,
                users="Redis" if self.redis_users is not None else "the users file",
            )
        log.info(
            "mta started as {host}; spool {spool}; TLS certificate {cert} (SHA-256 {fp})",
            host=self.hostname,
            spool=self.store.root,
            cert=self.tls.info.path,
            fp=self.tls.info.sha256,
        )
        super().startService()  # type: ignore[no-untyped-call]

    def _raise_file_limit(self) -> None:
        """Each connection and each message being received needs descriptors:
        raise the soft limit to the hard one, and warn if it is still low."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        needed = 2 * self.config.limits.connections + self.config.delivery.max_connections + 100
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warn(
                "only {soft} file descriptors allowed; [limits] connections = {n} may need "
                "{needed} (raise the limit, or lower connections)",
                soft=soft,
                n=self.config.limits.connections,
                needed=needed,
            )

    def _listen(self) -> None:
        for description, factory in self.listeners:
            try:
                endpoint = serverFromString(
                    WriteThroughReactor(self.reactor), with_backlog(description)
                )
            except (ValueError, TypeError, KeyError) as e:
                self._unlisten()
                fatal(f"{self.config.source}: [listen] bad endpoint {description!r}: {e}")
            outcome: list[Any] = []
            endpoint.listen(factory).addBoth(outcome.append)
            if not outcome or isinstance(outcome[0], Failure):
                self._unlisten()
                reason = outcome[0].getErrorMessage() if outcome else "did not complete"
                fatal(f"cannot listen on {description}: {reason}")
            self.ports.append(outcome[0])
            log.info("listening on {desc}", desc=description)

    def _log_json(self) -> None:
        """C{[log] json_file}: every event as a JSON line, beside the text log."""
        path = self.config.log.json_file
        if not path:
            return
        try:
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process
        except OSError as e:
            fatal(f"{self.config.source}: [log] json_file: cannot open {path}: {e.strerror}")
        globalLogPublisher.addObserver(json_observer(stream))

    def _listen_control(self) -> None:
        """The control socket for mtactl (L{mta.control}); ours to replace, as we hold the lock."""
        path = self.store.control_socket()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            address, self._control_dir = socket_address(path)
            port = self.reactor.listenUNIX(address, ControlFactory(self.queue.operator), mode=0o600)
        except Exception as e:  # CannotListenError and OS errors alike
            fatal(f"cannot listen on the control socket {path}: {e}")
        self.ports.append(port)

    def _unlisten(self) -> Deferred[Any]:
        ports, self.ports = self.ports, []
        stopping = [maybeDeferred(port.stopListening) for port in ports]
        return DeferredList(stopping)

    def _recover(self) -> None:
        """Half-received messages, and results a crash kept out of their files."""
        try:
            found = self.store.recover()
        except OSError as e:
            # Not fatal: without it those messages are only sent again.
            log.error("cannot read the progress journal: {e}", e=e)
            return
        if found.incomplete:
            log.info(
                "removed {n} incomplete messages from {spool}/tmp",
                n=found.incomplete,
                spool=self.store.root,
            )
        if found.recipients:
            log.info(
                "recorded {n} recipients' results of {m} messages from the progress journal",
                n=found.recipients,
                m=found.messages,
            )
        if found.kept:
            log.error("the progress journal is kept for the next start (see the errors above)")

    def stopService(self) -> Deferred[Any]:
        children = super().stopService()  # type: ignore[no-untyped-call]
        listening = self._unlisten()
        closing = self.agent.cache.close_all()
        if self.redis_users is not None:
            self.redis_users.stop()
        shared = self.shared.close()

        def release(_: object) -> None:
            # Waits for work already handed to the threads (commits in flight).
            for pool in self._pools:
                pool.stop()
            self.store.close()
            logs.stop_batching()
            if self._control_dir is not None:
                os.close(self._control_dir)
                self._control_dir = None
            self.lock.release()

        return DeferredList([children, listening, closing, shared]).addBoth(release)

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and the certificate.

        New settings objects go to the parts that take them: the listeners
        ([limits] and [auth] trusted_networks, for new connections and
        sessions), the AUTH throttle (the rest of [auth]), the queue (the
        retry schedule, delay notices, blocklist rest, bounce rules),
        traffic shaping and retention; the log names the changes that need a restart
        (L{needs_restart}).  Established connections keep their settings
        and their certificate.
        """
        self._reload_config()
        try:
            info = self.tls.reload()
        except ConfigError as e:
            log.error("reload failed, keeping the old certificate: {e}", e=str(e))
            return
        log.info("reloaded TLS certificate {path} (SHA-256 {fp})", path=info.path, fp=info.sha256)

    def _reload_config(self) -> None:
        if not os.path.isfile(self.config.source):
            return
        try:
            new = configmod.load(self.config.source)
        except ConfigError as e:
            log.error("reload failed, keeping the old configuration: {e}", e=str(e))
            return
        restart = needs_restart(self.config, new)
        self.config = new
        self.queue.configure(new.queue, Classifier(extra=new.bounce_rules))
        self.traffic.configure(shaping_policy(new))
        self.retention.configure(new.retention)
        self.throttle.configure(throttle_settings(new))
        self.settings = replace(
            self.settings,
            limits=session_limits(new),
            trusted_networks=parse_networks(new.auth.trusted_networks),
        )
        for factory in self.factories:
            factory.configure(self.settings)
        log.info("reloaded {source}", source=new.source)
        if restart:
            log.warn("changes to {changes} take effect after a restart", changes=", ".join(restart))


def redis_endpoint(reactor: Any, config: Config) -> IStreamClientEndpoint:
    """The client endpoint of C{[cluster] redis}; L{ConfigError} names a bad one."""
    description = config.cluster.redis
    try:
        endpoint: IStreamClientEndpoint = clientFromString(reactor, description)
        return endpoint
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{config.source}: [cluster] redis: bad endpoint {description!r}: {e}"
        ) from None


def build(config: Config, reactor: Any) -> MTAService:
    """Build the service, turning configuration and storage errors into L{fatal}."""
    try:
        return MTAService(config, reactor)
    except (ConfigError, StorageError) as e:
        fatal(str(e))
