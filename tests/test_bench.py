"""The benchmarks still fit the code they measure (they run only by hand)."""

from __future__ import annotations

import importlib
import os

from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import QueueState, RecipientState
from mta.spool import open_store

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


class BenchTests(SynchronousTestCase):
    """Every script in bench/ imports (an API it uses that moved fails here,
    not in the next measurement), and the deferred benchmark's spool is one
    the daemon reads: N deferred messages, due later."""

    def test_every_script_imports(self) -> None:
        names = sorted(
            f[:-3] for f in os.listdir(BENCH) if f.endswith(".py") and f != "__init__.py"
        )
        self.assertIn("compare", names)
        for name in names:
            importlib.import_module(f"bench.{name}")

    def test_deferred_fill(self) -> None:
        deferred = importlib.import_module("bench.deferred")
        root = self.mktemp()
        deferred.fill(root, 3)
        store = open_store(root)
        self.addCleanup(store.close)
        ids = list(store.ids(QueueState.DEFERRED))
        self.assertEqual(len(ids), 3)
        _, env = store.load(ids[0])
        self.assertEqual(env.recipients[0].state, RecipientState.DEFERRED)
        self.assertIsNotNone(env.recipients[0].next_attempt)
