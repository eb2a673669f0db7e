"""What the delivery agent reports feeds traffic shaping: the real agent
(L{mta.delivery.relay}) against a scripted server on loopback, its results
read by the shaper as the queue reads them: a greeting that refuses the
session is the I{connect} stage.  (A reply in the transaction comes from
the real agent in tests/e2e/test_shaping.py.)"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from mta.delivery.routes import Router
from mta.envelope import QueueState
from mta.queue.manager import QueueManager
from mta.queue.shaping import Shaper
from mta.queue.shaping_rules import stage_of
from mta.testing import MemoryStore, SinkBehaviour, queue_message, run_inline
from tests.test_relay import RelayTestCase

BUSY = "421 mx.example.net Service temporarily unavailable, try again later"


class AgentResultsTests(RelayTestCase):
    """The real delivery agent's results carry what shaping reads: the stage a
    reply came at (a refused greeting is the connect stage)."""

    def test_a_refused_greeting_is_the_connect_stage(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(greeting=BUSY))
            results = await self.agent().deliver(self.job("bob@example.net"))
            self.assertEqual(stage_of(results[0]), "connect")
            change = Shaper().observe("example.net", results, 0.0, 1.0)
            assert change is not None
            assert change.reason is not None
            self.assertEqual(change.reason.rule, "connect-try-again-later")

        return ensureDeferred(go())

    def test_the_queue_shapes_from_the_agents_results(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        store = MemoryStore()

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(greeting=BUSY))
            queue_message(store, "a@example.com", ["bob@example.net"], arrival=reactor.seconds())
            qm = QueueManager(store, run_inline, self.agent(), Router({}), reactor)
            qm.startService()
            self.addCleanup(qm.stopService)
            await qm.when_idle()
            self.assertEqual(
                qm.traffic.shaper.effective("example.net"), (10, 0.5)
            )  # 1 start measured
            self.assertEqual(len(list(store.ids(QueueState.DEFERRED))), 1)
            self.assertEqual(qm.destinations.suspended, {}, "a busy greeting is no dead site")

        return ensureDeferred(go())
