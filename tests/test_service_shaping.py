"""The daemon's traffic shaping as the composition root builds it (L{mta.service}):
from the configuration, given to the queue manager, changed by a reload."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mta.config import load
from mta.metrics import exposition
from mta.queue.shaping_rules import DEFAULT_RULES
from mta.service import MTAService
from mta.testing import write_users

CONFIG = """
[server]
hostname = "localhost"
spool = "spool"
users_file = "users.json"

[listen]
submissions = []
submission = []

[delivery]
dns_servers = ["127.0.0.1"]
dns_port = 9
destination_concurrency = 7

[routes]
"*" = "[127.0.0.1]:9"

[shaping]
hold_time = {hold}
max_rate = 120

[[shaping.rules]]
name = "acme-busy"
pattern = "acme is busy"
"""


class ServiceShapingTests(TestCase):
    """The daemon builds traffic shaping from its configuration, and a reload
    changes the settings while the limits already learnt stay."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        write_users(os.path.join(self.base, "users.json"), {})
        self.path = os.path.join(self.base, "mta.toml")
        self.write(hold=5)

    def write(self, **values: Any) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(CONFIG.format(**values))

    def test_built_from_the_configuration(self) -> None:
        service = MTAService(load(self.path), reactor)
        policy = service.traffic.shaper.policy
        self.assertIs(service.queue.traffic, service.traffic)
        self.assertIs(service.queue.dispatcher.shaper, service.traffic.shaper)
        self.assertEqual((policy.max_concurrency, policy.max_rate, policy.hold_time), (7, 2.0, 5.0))
        self.assertEqual([r.name for r in policy.rules[:1]], ["acme-busy"])
        self.assertEqual(policy.rules[1:], DEFAULT_RULES)
        self.assertIsNone(service.traffic.shared)  # no [cluster]: nothing shared
        self.assertIn(service.traffic, list(service))
        self.assertIn("mta_shaping_destinations 0.0", exposition(service.metrics).decode())

    def test_a_reload_changes_the_settings(self) -> None:
        service = MTAService(load(self.path), reactor)
        self.write(hold=42)
        service.reload()
        self.assertEqual(service.traffic.shaper.policy.hold_time, 42.0)
