"""Metrics (L{mta.metrics}) and what the queue manager counts into them."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from twisted.web.test.requesthelper import DummyRequest

from mta.metrics import Metrics, exposition, site
from mta.spool.queueid import arrival_of
from tests.queue_support import LATER, NO_USER, OK, T0, QueueTestCase


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


class ExpositionTests(QueueTestCase):
    """The /metrics and /health resources: queue gauges read from the manager when scraped, metrics
    rendered in the reactor thread, every sample labelled with the instance when asked, and the
    health document."""

    def test_queue_gauges_are_read_when_scraped(self) -> None:
        metrics = Metrics()
        counts = {"incoming": 2, "deferred": 5}
        metrics.watch_queue(lambda: counts, lambda: T0 - 90, lambda: T0)
        self.assertEqual(sample(metrics, "mta_queue_messages", state="deferred"), 5)
        counts["deferred"] = 7
        text = generate_latest(metrics.registry).decode()
        self.assertIn('mta_queue_messages{state="deferred"} 7.0', text)
        self.assertIn("mta_queue_oldest_message_age_seconds 90.0", text)

    def test_metrics_render_at_once(self) -> None:
        """In the reactor thread, not deferred to a thread (see Exposition)."""
        metrics = Metrics()
        metrics.messages_accepted.inc()
        resource = site(metrics, lambda: {"status": "ok"}).resource
        request = DummyRequest([b"metrics"])
        body = resource.getChildWithDefault(b"metrics", request).render(request)  # type: ignore[attr-defined]
        self.assertIsInstance(body, bytes)
        self.assertIn(b"mta_messages_accepted_total 1.0", body)

    def test_every_sample_carries_the_instance_label(self) -> None:
        metrics = Metrics(instance="mta-b")
        metrics.messages_accepted.inc()
        metrics.deliveries.labels("sent", "").inc()
        metrics.watch_queue(lambda: {"incoming": 1}, lambda: None, lambda: T0)
        text = exposition(metrics).decode()
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        self.assertTrue(samples)
        for line in samples:
            self.assertIn('mta_instance="mta-b"', line)
        self.assertIn('mta_messages_accepted_total{mta_instance="mta-b"} 1.0', text)
        self.assertIn('mta_queue_messages{mta_instance="mta-b",state="incoming"} 1.0', text)
        # The registry itself is unchanged (tests read samples by their own labels).
        self.assertEqual(sample(metrics, "mta_messages_accepted_total"), 1.0)
        self.assertNotIn("mta_instance", exposition(Metrics()).decode())

    def test_health_resource(self) -> None:
        resource = site(Metrics(), lambda: {"status": "failing", "problems": ["disk"]}).resource
        request = DummyRequest([b"health"])
        child = resource.getChildWithDefault(b"health", request)
        body = child.render(request)  # type: ignore[attr-defined]
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(body)["problems"], ["disk"])


class QueueCountingTests(QueueTestCase):
    """Delivery results counted by status and category as the queue manager records them."""

    def test_results_by_status_and_category(self) -> None:
        self.queue("a@example.net", "b@example.net")
        qm = self.manager()
        metrics = qm.metrics
        later = self.queue("c@example.org")
        self.commit(qm, later)
        self.spy.answer_each(0, [OK, NO_USER])
        self.clock.advance(7)
        self.spy.answer(1, LATER)
        self.assertEqual(sample(metrics, "mta_delivery_attempts_total"), 3)
        self.assertEqual(sample(metrics, "mta_deliveries_total", status="sent", category=""), 1)
        self.assertEqual(
            sample(metrics, "mta_deliveries_total", status="bounced", category="recipient"), 1
        )
        self.assertEqual(
            sample(metrics, "mta_deliveries_total", status="deferred", category="greylist"), 1
        )
        self.assertEqual(sample(metrics, "mta_delivery_latency_seconds_count"), 1)
        self.assertEqual(qm.messages.counts(), {"incoming": 0, "active": 0, "deferred": 1})
        # The arrival time is read from the queue ID (they sort by arrival).
        self.assertEqual(qm.messages.oldest_arrival(), arrival_of(later))


class JSONLogTests(QueueTestCase):
    """mta.logs.json_stdout writes one JSON object per log event, one per line."""

    def test_json_stdout_writes_one_object_per_line(self) -> None:
        import io  # noqa: PLC0415
        import sys  # noqa: PLC0415

        from twisted.logger import Logger  # noqa: PLC0415

        from mta.logs import json_stdout  # noqa: PLC0415

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = json_stdout()
        Logger(namespace="mta.test", observer=observer).info(
            "{queue_id}: to=<{recipient}>", queue_id="0ABC", recipient="bob@example.net"
        )
        [line] = out.getvalue().splitlines()
        event = json.loads(line)
        self.assertEqual((event["queue_id"], event["recipient"]), ("0ABC", "bob@example.net"))
        self.assertEqual(event["log_namespace"], "mta.test")
