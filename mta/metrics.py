"""Prometheus metrics and the health check, served over HTTP (SPEC section 8).

Every part that counts something gets the one L{Metrics} object built by the
service; each instance has its own registry (not the process-global one), so
tests can build as many as they like.  The queue gauges are read when
scraped, from the queue manager's bookkeeping and a listing of C{hold/} and
C{corrupt/}, so they cost nothing between scrapes.

    GET /metrics   Prometheus text format (prometheus-client)
    GET /health    200 {"status": "ok", ...} or 503 with the reason
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: Seconds: from a fraction of a second (submission) to days (retries).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
    4 * 3600, 86400, 5 * 86400, float("inf"),
)  # fmt: skip


class Metrics:
    """The counters and histograms the MTA keeps, on a private registry.

    With an C{instance} name, every sample carries the label
    C{mta_instance="NAME"} (C{[cluster] instance}): the instances of a
    cluster can then be told apart and summed however they are scraped
    (Prometheus's own C{instance} label is the scrape address, which a
    federation or a second balancer in between would change).
    """

    def __init__(self, instance: str = "") -> None:
        self.instance = instance
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_in = Counter(
            "mta_connections_in", "Client connections accepted", ["listener"], registry=r
        )
        self.tls_in = Counter(
            "mta_tls_sessions_in", "TLS handshakes completed with clients", ["protocol"],
            registry=r,
        )  # fmt: skip
        self.auth_failures = Counter("mta_auth_failures", "Failed SMTP AUTH attempts", registry=r)
        self.messages_accepted = Counter(
            "mta_messages_accepted", "Messages queued (250 sent)", registry=r
        )
        self.submission_latency = Histogram(
            "mta_submission_latency_seconds",
            "From MAIL FROM to the 250 reply after DATA",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections_out = Counter(
            "mta_connections_out", "SMTP sessions set up with next hops", ["tls"], registry=r
        )
        self.connection_failures_out = Counter(
            "mta_connection_failures_out", "Failed attempts to set up an SMTP session", ["kind"],
            registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "mta_delivery_attempts", "Delivery attempts, per recipient", registry=r
        )
        self.deliveries = Counter(
            "mta_deliveries",
            "Delivery results per recipient: status sent, deferred, bounced or expired; "
            "category from the bounce classifier",
            ["status", "category"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "mta_delivery_latency_seconds",
            "From arrival to successful delivery, per recipient",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shaping_decreases = Counter(
            "mta_shaping_decreases",
            "Traffic-shaping decreases of a destination's limits, by the rule that read the reply",
            ["rule"],
            registry=r,
        )

    def watch_queue(
        self, counts: Callable[[], dict[str, int]], oldest: Callable[[], float | None],
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        """Report queue sizes and the oldest message's age when scraped."""
        self.registry.register(_QueueCollector(counts, oldest, clock))

    def watch_shaping(self, limits: Callable[[], list[tuple[str, int, float | None]]]) -> None:
        """Report the shaped destinations' (name, concurrency, messages/s) when scraped."""
        self.registry.register(_ShapingCollector(limits))


class _ShapingCollector(Collector):
    def __init__(self, limits: Callable[[], list[tuple[str, int, float | None]]]) -> None:
        self.limits = limits

    def collect(self) -> Iterator[Metric]:
        rows = self.limits()
        concurrency = GaugeMetricFamily(
            "mta_shaping_concurrency_limit",
            "Deliveries allowed at once to a destination whose limits traffic shaping lowered",
            labels=["destination"],
        )
        rate = GaugeMetricFamily(
            "mta_shaping_rate_limit",
            "Messages per second allowed to a shaped destination (0: no rate limit)",
            labels=["destination"],
        )
        for destination, connections, per_second in rows:
            concurrency.add_metric([destination], connections)
            rate.add_metric([destination], per_second or 0.0)
        yield concurrency
        yield rate
        yield GaugeMetricFamily(
            "mta_shaping_destinations", "Destinations whose limits traffic shaping lowered",
            value=len(rows),
        )  # fmt: skip

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _QueueCollector(Collector):
    def __init__(
        self, counts: Callable[[], dict[str, int]], oldest: Callable[[], float | None],
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        self.counts = counts
        self.oldest = oldest
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        sizes = GaugeMetricFamily("mta_queue_messages", "Messages in the queue", labels=["state"])
        for state, n in sorted(self.counts().items()):
            sizes.add_metric([state], n)
        yield sizes
        arrival = self.oldest()
        age = 0.0 if arrival is None else max(0.0, self.clock() - arrival)
        yield GaugeMetricFamily(
            "mta_queue_oldest_message_age_seconds",
            "Age of the oldest message waiting or in delivery (0 when none)",
            value=age,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _Labelled:
    """A registry's samples with constant labels added (what C{generate_latest} reads)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [
                s._replace(labels={**s.labels, **self.labels}) for s in metric.samples
            ]
            yield metric


def exposition(metrics: Metrics) -> bytes:
    """The Prometheus text of every metric, with the instance label when there is one."""
    if not metrics.instance:
        return generate_latest(metrics.registry)
    labelled = _Labelled(metrics.registry, {"mta_instance": metrics.instance})
    return generate_latest(labelled)


class Exposition(Resource):
    """C{/metrics}, rendered in the reactor thread.

    (prometheus-client's own Twisted resource renders in a thread, where the
    queue collector would read the manager's bookkeeping while the reactor
    changes it.)  A scrape costs a few milliseconds even for a large queue.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return exposition(self.metrics)


class Health(Resource):
    """C{/health}: 200 while the daemon runs and its spool is writable."""

    isLeaf = True

    def __init__(self, check: Callable[[], dict[str, Any]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.check = check

    def render_GET(self, request: Request) -> bytes:
        doc = self.check()
        request.setResponseCode(200 if doc.get("status") == "ok" else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode() + b"\n"


def site(metrics: Metrics, health: Callable[[], dict[str, Any]]) -> Site:
    """The HTTP site: C{/metrics} and C{/health}, nothing else."""
    root = Resource()
    root.putChild(b"metrics", Exposition(metrics))
    root.putChild(b"health", Health(health))
    s = Site(root)
    s.displayTracebacks = False
    s.noisy = False
    return s
