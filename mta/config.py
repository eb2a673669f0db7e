"""Configuration: a TOML file read into frozen dataclasses.

Every option has a default (documented in C{docs/configuration.md}); the
defaults together are the embedded configuration that runs from a checkout
with no file at all: spool in C{spool/}, a self-signed certificate, listeners
on loopback high ports.  Relative paths are taken relative to the directory
of the configuration file, or to the working directory when there is none.

A wrong file or value raises L{ConfigError} whose one-line text names the
file and the key, so that start-up can stop with that line and no traceback.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import tomllib
import types
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

from mta.bounce import Rule, rules_from_config
from mta.errors import ConfigError
from mta.hostnames import check_relay
from mta.queue.shaping_rules import ShapingRule
from mta.queue.shaping_rules import rules_from_config as shaping_rules_from_config


def _opt(
    default: Any, *, minimum: float | None = None, choices: tuple[str, ...] = (), why: str = ""
) -> Any:
    """A field with a default and its checks; C{why} is added to a too-small value's error."""
    meta = {"minimum": minimum, "choices": choices, "why": why}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


option = _opt  # for plugins' Options: option(default, minimum=..., choices=(...))


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = ""  # "" = this machine's fully qualified name
    spool: str = "spool"
    users_file: str = "users.json"


@dataclass(frozen=True)
class ListenConfig:
    # Twisted server endpoint descriptions (plain TCP; TLS is added by mta).
    submissions: list[str] = _opt(["tcp:8465:interface=127.0.0.1"])
    submission: list[str] = _opt(["tcp:8587:interface=127.0.0.1"])
    # Listeners behind a load balancer: every connection starts with a PROXY
    # protocol header (v1 or v2) naming the real client; only from proxy_from.
    proxy_submissions: list[str] = _opt([])  # implicit TLS after the header
    proxy_submission: list[str] = _opt([])  # STARTTLS after the header
    proxy_from: list[str] = _opt([])  # the load balancers' addresses or networks
    proxy_timeout: float = _opt(10.0, minimum=0.1)  # seconds to wait for the header


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""  # PEM, leaf first then the chain; "" = self-signed
    key: str = ""
    selfsigned_dir: str = "spool/selfsigned"


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = _opt(50 * 1024 * 1024, minimum=1024)
    # Postfix's smtpd_recipient_limit; RFC 5321 section 4.5.3.1.8 asks for at least 100.
    recipients: int = _opt(
        1000, minimum=100, why="RFC 5321 section 4.5.3.1.8: a server must accept 100 recipients"
    )
    received_headers: int = _opt(25, minimum=1)
    connections_per_ip: int = _opt(10, minimum=1)
    connections: int = _opt(1000, minimum=1)
    idle_timeout: float = _opt(300.0, minimum=0.1)
    errors: int = _opt(20, minimum=1)
    junk_commands: int = _opt(100, minimum=1)
    daily_messages: int = _opt(300, minimum=0)  # per login and UTC day; 0: no limit
    header_size: int = _opt(1024 * 1024, minimum=1024)
    data_min_rate: int = _opt(500, minimum=0)  # octets/s in DATA; 0: any progress will do
    # A line that ends in a bare LF: stored with CRLF, or the message refused
    # (Postfix 3.9's smtpd_forbid_bare_newline = normalize / reject).
    bare_newline: str = _opt("normalize", choices=("normalize", "reject"))


@dataclass(frozen=True)
class AuthConfig:
    max_failures: int = _opt(10, minimum=1)
    failure_window: float = _opt(900.0, minimum=1)
    failure_delay: float = _opt(1.0, minimum=0)
    failure_delay_max: float = _opt(8.0, minimum=0)
    trusted_networks: list[str] = _opt([])  # may submit without TLS and AUTH


@dataclass(frozen=True)
class DeliveryConfig:
    dns_servers: list[str] = _opt([])  # [] = the system's /etc/resolv.conf
    dns_port: int = _opt(53, minimum=1)
    dns_timeout: float = _opt(10.0, minimum=0.1)
    port: int = _opt(25, minimum=1)  # the SMTP port of MX hosts
    ip_versions: list[str] = _opt(["ipv4", "ipv6"])
    tls: str = _opt("may", choices=("none", "may", "encrypt", "verify"))
    tls_required: list[str] = _opt([])
    # DANE (RFC 7672): trust the AD bit of dns_servers, which must validate.
    dnssec: bool = False
    # MTA-STS (RFC 8461): look up, fetch and honour domains' policies.
    mta_sts: bool = True
    mta_sts_port: int = _opt(443, minimum=1)  # the policy hosts' HTTPS port (tests)
    mta_sts_timeout: float = _opt(30.0, minimum=0.1)
    ca_file: str = ""  # CAs for MTA-STS and tls = "verify"; "" = the system's
    refuse_networks: list[str] = _opt(
        ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "169.254.0.0/16", "fe80::/10"]
    )
    address_limit: int = _opt(5, minimum=1)
    session_limit: int = _opt(2, minimum=1)
    recipients_per_transaction: int = _opt(50, minimum=1)
    destination_concurrency: int = _opt(20, minimum=1)
    max_connections: int = _opt(100, minimum=1)
    connection_cache_time: float = _opt(2.0, minimum=0)
    connection_reuse_limit: int = _opt(100, minimum=1)
    connect_timeout: float = _opt(30.0, minimum=0.1)
    greeting_timeout: float = _opt(300.0, minimum=0.1)
    helo_timeout: float = _opt(300.0, minimum=0.1)
    mail_timeout: float = _opt(300.0, minimum=0.1)
    rcpt_timeout: float = _opt(300.0, minimum=0.1)
    data_init_timeout: float = _opt(120.0, minimum=0.1)
    data_block_timeout: float = _opt(180.0, minimum=0.1)
    data_done_timeout: float = _opt(600.0, minimum=0.1)


@dataclass(frozen=True)
class SpoolConfig:
    # "standard": one fsync per message before its 250 and one per directory
    # per group commit, nothing after delivery; "strict": also fsync each
    # filing and every journal batch (docs/decisions.md).
    sync: str = _opt("standard", choices=("standard", "strict"))
    journal_sync_interval: float = _opt(0.1, minimum=0)  # seconds between journal fdatasyncs
    # How a group commit makes its message files durable before the 250:
    # "syncfs", one syncfs(2) of the spool's file system per group (Linux);
    # "fsync", an fsync of each file (docs/decisions.md).
    barrier: str = _opt("syncfs", choices=("syncfs", "fsync"))


@dataclass(frozen=True)
class QueueConfig:
    active_limit: int = _opt(1000, minimum=1)
    minimal_backoff_time: float = _opt(300.0, minimum=0)
    maximal_backoff_time: float = _opt(4000.0, minimum=0)
    maximal_queue_lifetime: float = _opt(5 * 86400.0, minimum=0)
    delay_warning_time: float = _opt(4 * 3600.0, minimum=0)  # 0: no delay notices
    blocklist_rest_time: float = _opt(3600.0, minimum=0)


@dataclass(frozen=True)
class ShapingConfig:
    """C{[shaping]}: per-destination limits learnt from receivers' replies
    (L{mta.queue.shaping}); rates in messages per minute, times in seconds."""

    enabled: bool = True
    max_rate: float = _opt(0.0, minimum=0)  # per destination; 0: none until a receiver asks
    min_rate: float = _opt(6.0, minimum=0.001)  # the floor of a lowered rate
    min_concurrency: int = _opt(1, minimum=1)  # the floor of a lowered concurrency
    decrease_factor: float = _opt(0.5, minimum=0.01)  # what a signal multiplies by
    hold_time: float = _opt(300.0, minimum=0)  # lowered limits hold this long
    concurrency_step: int = _opt(1, minimum=1)  # added per recovery step
    rate_step: float = _opt(30.0, minimum=0.001)  # added per recovery step
    recovery_interval: float = _opt(60.0, minimum=0.01)  # between steps, with successes
    max_wait: float = _opt(60.0, minimum=0)  # longer waits for the rate are deferred
    forget_after: float = _opt(3600.0, minimum=1)  # no delivery this long: limits end
    sync_interval: float = _opt(2.0, minimum=0.05)  # with [cluster] redis


@dataclass(frozen=True)
class RetentionConfig:
    retention_days: float = _opt(30.0, minimum=0)  # 0: redact as soon as finished
    remove_after_days: float = _opt(30.0, minimum=0)  # after redaction
    sweep_interval: float = _opt(3600.0, minimum=0.01)


@dataclass(frozen=True)
class MetricsConfig:
    # Twisted server endpoint descriptions for /metrics and /health; [] = off.
    listen: list[str] = _opt([])


@dataclass(frozen=True)
class LogConfig:
    json_file: str = ""  # also write every log event as a JSON line here; "" = off


@dataclass(frozen=True)
class ClusterConfig:
    # Twisted client endpoint of the Redis the instances share, e.g.
    # "tcp:host=127.0.0.1:port=6379"; "" = no cluster, all state in this process.
    redis: str = ""
    password_file: str = ""  # a file holding Redis's password (requirepass); "" = none
    prefix: str = "mta"  # of every key, so that several sites can share one Redis
    instance: str = ""  # this instance's name in metrics and logs; "" = the hostname
    timeout: float = _opt(1.0, minimum=0.01)  # seconds for each Redis command
    retry: float = _opt(1.0, minimum=0.01)  # after a failed connection, fail at once this long
    users: str = _opt("file", choices=("file", "redis"))  # where the users are kept
    users_refresh: float = _opt(2.0, minimum=0.1)  # seconds between checks for changed users

    def password(self, source: str) -> str:
        """The password in C{password_file} ("" without one); L{ConfigError} if unreadable."""
        if not self.password_file:
            return ""
        try:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise ConfigError(
                f"{source}: [cluster] password_file: cannot read {self.password_file}: {e.strerror}"
            ) from None


@dataclass(frozen=True)
class RouteConfig:
    """One entry of C{[routes]}: where mail for a domain goes instead of its MX."""

    relay: str = ""
    tls: str = _opt("", choices=("", "none", "may", "encrypt", "verify"))
    ca_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""


@dataclass(frozen=True)
class DKIMConfig:
    keys_dir: str = ""  # "" = dkim/ inside the spool; written by mtactl dkim keygen


@dataclass(frozen=True)
class PluginConfig:
    """One C{[[plugins]]} entry; its C{options} are checked by the plugin itself."""

    name: str = ""
    path: str = ""  # a site plugin's .py file; "" = the built-in called name
    timeout: float = _opt(30.0, minimum=0.01)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plugins: tuple[PluginConfig, ...] = ()
    bounce_rules: tuple[Rule, ...] = ()  # from [[bounce.rules]]
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    shaping_rules: tuple[ShapingRule, ...] = ()  # from [[shaping.rules]]
    source: str = "<embedded default>"
    base_dir: str = "."

    @property
    def hostname(self) -> str:
        return self.server.hostname or socket.getfqdn()

    def resolve(self, path: str) -> str:
        """An absolute path for a path option."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(path)))


_PATH_OPTIONS = {
    ("server", "spool"),
    ("server", "users_file"),
    ("tls", "certificate"),
    ("tls", "key"),
    ("tls", "selfsigned_dir"),
    ("log", "json_file"),
    ("dkim", "keys_dir"),
    ("cluster", "password_file"),
    ("delivery", "ca_file"),
}


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(where: str, annotation: Any, value: object, meta: dict[str, Any]) -> object:
    origin = get_origin(annotation)
    if origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, str) and item_type is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_check_value(f"{where}[{i}]", item_type, v, {}) for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_value(where, options[0], value, meta)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
    if not isinstance(value, annotation):
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise ConfigError(
            f"{where}: expected {kind.get(annotation, annotation.__name__)}, got {_describe(value)}"
        )
    minimum = meta.get("minimum")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {_describe(value)}")
    if minimum is not None and isinstance(value, int | float) and value < minimum:
        why = f" ({meta['why']})" if meta.get("why") else ""
        raise ConfigError(f"{where}: must be at least {minimum}{why}, got {_describe(value)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {_describe(value)}")
    return value


def _load_section(source: str, name: str, cls: type, doc: object) -> Any:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise ConfigError(f"{source}: [{name}] unknown key {key!r}")
        where = f"{source}: [{name}] {key}"
        values[key] = _check_value(where, hints[key], value, dict(known[key].metadata))
    return cls(**values)


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "listen": ListenConfig,
    "tls": TLSConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "delivery": DeliveryConfig,
    "queue": QueueConfig,
    "spool": SpoolConfig,
    "retention": RetentionConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "dkim": DKIMConfig,
    "cluster": ClusterConfig,
    "shaping": ShapingConfig,
}


def parse(doc: dict[str, Any], source: str, base_dir: str) -> Config:
    """Build a L{Config} from a parsed TOML document."""
    sections: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "routes":
            sections[key] = _load_routes(source, value, base_dir)
            continue
        if key == "bounce":
            sections["bounce_rules"] = _load_bounce(source, value)
            continue
        if key == "plugins":
            sections[key] = _load_plugins(source, value, base_dir)
            continue
        if key == "shaping":
            sections[key], sections["shaping_rules"] = _load_shaping(source, value)
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section or key {key!r}")
        sections[key] = _load_section(source, key, SECTIONS[key], value)
    config = Config(**sections, source=source, base_dir=base_dir)
    versions = config.delivery.ip_versions
    for version in versions:
        if version not in ("ipv4", "ipv6"):
            raise ConfigError(f"{source}: [delivery] ip_versions: {version!r} is not ipv4 or ipv6")
    if not versions or len(set(versions)) != len(versions):
        raise ConfigError(f"{source}: [delivery] ip_versions must list ipv4 and/or ipv6 once each")
    if config.queue.maximal_backoff_time < config.queue.minimal_backoff_time:
        raise ConfigError(f"{source}: [queue] maximal_backoff_time must be >= minimal_backoff_time")
    tls = config.tls
    if bool(tls.certificate) != bool(tls.key):
        raise ConfigError(f"{source}: [tls] certificate and key must be given together")
    for where, networks in (
        ("[auth] trusted_networks", config.auth.trusted_networks),
        ("[delivery] refuse_networks", config.delivery.refuse_networks),
        ("[listen] proxy_from", config.listen.proxy_from),
    ):
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{source}: {where}: {network!r} is not an address or network"
                ) from None
    _check_cluster(config)
    _check_shaping(config)
    if config.auth.failure_delay_max < config.auth.failure_delay:
        raise ConfigError(f"{source}: [auth] failure_delay_max must be >= failure_delay")
    config = _resolve_paths(config)
    if not config.dkim.keys_dir:
        keys_dir = os.path.join(config.server.spool, "dkim")
        config = replace(config, dkim=replace(config.dkim, keys_dir=keys_dir))
    return config


def _check_cluster(config: Config) -> None:
    """PROXY listeners need their balancers; Redis users need Redis."""
    source, listen, cluster = config.source, config.listen, config.cluster
    if (listen.proxy_submissions or listen.proxy_submission) and not listen.proxy_from:
        raise ConfigError(
            f"{source}: [listen] proxy_from: PROXY listeners need the load balancers' "
            "addresses (a header from anyone else would let a client claim any address)"
        )
    if cluster.users == "redis" and not cluster.redis:
        raise ConfigError(f'{source}: [cluster] users = "redis" needs [cluster] redis')
    if cluster.password_file and not cluster.redis:
        raise ConfigError(f"{source}: [cluster] password_file needs [cluster] redis")
    if not cluster.prefix or any(c.isspace() for c in cluster.prefix):
        raise ConfigError(f"{source}: [cluster] prefix must be a word without spaces")


def _load_routes(source: str, doc: object, base_dir: str) -> dict[str, RouteConfig]:
    """C{[routes]}: domain (or C{"*"}) = relay string, or a table of RouteConfig."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [routes] must be a table")
    routes: dict[str, RouteConfig] = {}
    for domain, value in doc.items():
        where = f"[routes] {domain!r}"
        table = {"relay": value} if isinstance(value, str) else value
        route = _load_section(source, f"routes.{domain}", RouteConfig, table)
        if not route.relay:
            raise ConfigError(f"{source}: {where}: relay is missing")
        problem = check_relay(route.relay)
        if problem:
            raise ConfigError(f"{source}: {where}: {problem}")
        if route.password and route.password_file:
            raise ConfigError(f"{source}: {where}: give password or password_file, not both")
        if (route.password or route.password_file) and not route.username:
            raise ConfigError(f"{source}: {where}: a password needs a username")
        for key in ("ca_file", "password_file"):
            path = getattr(route, key)
            if path:
                route = replace(route, **{key: os.path.join(base_dir, os.path.expanduser(path))})
        routes[domain.lower()] = route
    return routes


def load_table(source: str, name: str, cls: type, doc: object) -> Any:
    """Check a table against a dataclass's fields (types, minimums, choices).

    Plugins use it for their C{options}; errors name the file and C{[name] key}.
    """
    return _load_section(source, name, cls, doc)


def _load_plugins(source: str, doc: object, base_dir: str) -> tuple[PluginConfig, ...]:
    """C{[[plugins]]}: which checks run, in order, each with its own options."""
    if not isinstance(doc, list) or not all(isinstance(t, dict) for t in doc):
        raise ConfigError(f"{source}: plugins must be an array of tables ([[plugins]])")
    out: list[PluginConfig] = []
    for i, table in enumerate(doc, 1):
        label = str(table.get("name", "")) or f"#{i}"
        where = f"plugins.{label}"
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: [{where}] options must be a table")
        plugin = _load_section(
            source, where, PluginConfig, {k: v for k, v in table.items() if k != "options"}
        )
        if not plugin.name:
            raise ConfigError(f"{source}: [{where}] name is missing")
        if any(p.name == plugin.name for p in out):
            raise ConfigError(f"{source}: [{where}] name: {plugin.name!r} is used twice")
        path = os.path.join(base_dir, os.path.expanduser(plugin.path)) if plugin.path else ""
        out.append(replace(plugin, path=path, options=dict(options)))
    return tuple(out)


def _load_bounce(source: str, doc: object) -> tuple[Rule, ...]:
    """C{[[bounce.rules]]}: operator classification rules, tried before the built-ins."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [bounce] must be a table")
    unknown = set(doc) - {"rules"}
    if unknown:
        raise ConfigError(f"{source}: [bounce] unknown key {sorted(unknown)[0]!r}")
    rules = doc.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{source}: [bounce] rules must be an array of tables ([[bounce.rules]])")
    return tuple(rules_from_config(rules, source))


def _load_shaping(source: str, doc: object) -> tuple[ShapingConfig, tuple[ShapingRule, ...]]:
    """C{[shaping]} and its C{[[shaping.rules]]}, tried before the built-in rules."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: [shaping] must be a table")
    options = {k: v for k, v in doc.items() if k != "rules"}
    rules = shaping_rules_from_config(doc.get("rules", []), source)
    return _load_section(source, "shaping", ShapingConfig, options), tuple(rules)


def _check_shaping(config: Config) -> None:
    """The floors below the ceilings, a decrease that decreases."""
    source, shaping = config.source, config.shaping
    if shaping.decrease_factor >= 1:
        raise ConfigError(
            f"{source}: [shaping] decrease_factor must be below 1 (a signal lowers the limits), "
            f"got {shaping.decrease_factor!r}"
        )
    if shaping.max_rate and shaping.min_rate > shaping.max_rate:
        raise ConfigError(f"{source}: [shaping] min_rate must not exceed max_rate")
    if shaping.min_concurrency > config.delivery.destination_concurrency:
        raise ConfigError(
            f"{source}: [shaping] min_concurrency must not exceed "
            "[delivery] destination_concurrency"
        )


def _resolve_paths(config: Config) -> Config:
    for section, key in _PATH_OPTIONS:
        part = getattr(config, section)
        value = getattr(part, key)
        if value:
            config = replace(config, **{section: replace(part, **{key: config.resolve(value)})})
    return config


def load(path: str | None) -> Config:
    """Load a configuration file, or the embedded default when C{path} is None."""
    if path is None:
        return parse({}, "<embedded default>", os.getcwd())
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, path, os.path.dirname(os.path.abspath(path)))


def defaults() -> dict[str, dict[str, Any]]:
    """Every option's default, by section, for the documentation test."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        out[name] = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[name][f.name] = f.default
            elif f.default_factory is not MISSING:
                out[name][f.name] = f.default_factory()
    return out
