"""The route table: where mail for a domain goes when not to its MX hosts.

C{[routes]} maps a recipient domain to a relay in Postfix's relayhost
syntax: C{"[host]:port"} sends to that host without an MX lookup,
C{"host:port"} looks up the MX records of C{host}.  Keys are a domain
(C{"example.com"}), a domain and its subdomains (C{".example.com"}), or
C{"*"} for everything else (a smarthost).  The most specific key wins.

Mail is grouped for delivery by destination: the relay for routed
domains (all domains behind one smarthost share its connections and its
concurrency limit, as in Postfix), the domain itself otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import RouteConfig
from mta.errors import ConfigError


@dataclass(frozen=True)
class Route:
    """A resolved route: the relay and how to talk to it."""

    relay: str
    tls: str
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def key(self) -> str:
        return f"relay:{self.relay}"


class Router:
    """Answers, per recipient domain, which route (if any) and TLS policy apply."""

    def __init__(
        self,
        routes: dict[str, RouteConfig],
        default_tls: str = "may",
        tls_required: list[str] | tuple[str, ...] = (),
    ) -> None:
        self._default_tls = default_tls
        self._tls_required = {d.lower().rstrip(".") for d in tls_required}
        self._routes: dict[str, Route] = {}
        for key, cfg in routes.items():
            password = cfg.password or None
            if cfg.password_file:
                try:
                    with open(cfg.password_file, encoding="utf-8") as f:
                        password = f.read().strip()
                except OSError as e:
                    raise ConfigError(
                        f"[routes] {key!r}: cannot read password_file {cfg.password_file}: "
                        f"{e.strerror}"
                    ) from None
            self._routes[key.lower()] = Route(
                relay=cfg.relay,
                tls=cfg.tls or default_tls,
                ca_file=cfg.ca_file or None,
                username=cfg.username or None,
                password=password,
            )

    def route(self, domain: str) -> Route | None:
        """The route for a domain: exact key, then C{.parent} keys, then C{*}."""
        domain = domain.lower().rstrip(".")
        if domain in self._routes:
            return self._routes[domain]
        labels = domain.split(".")
        for i in range(len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self._routes:
                return self._routes[parent]
        return self._routes.get("*")

    def destination(self, domain: str) -> str:
        """The key mail is grouped, limited and connection-cached by."""
        route = self.route(domain)
        return route.key if route is not None else domain.lower().rstrip(".")

    def tls_policy(self, domain: str) -> str:
        """The TLS level for direct (MX) delivery to a domain."""
        domain = domain.lower().rstrip(".")
        if domain in self._tls_required and self._default_tls in ("none", "may"):
            return "encrypt"
        return self._default_tls
