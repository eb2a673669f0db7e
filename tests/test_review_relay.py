"""Review findings in the delivery agent and the outbound client."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from mta.config import QueueConfig
from mta.delivery.routes import Router
from mta.queue.manager import QueueLimits, QueueManager
from mta.smtp.client import ClientTimeouts
from mta.spool.fs import SpoolStore
from mta.testing import HANG, NoSyncOps, SinkBehaviour, queue_message, run_inline
from tests.test_relay import RelayTestCase


class StaleConnectionTests(RelayTestCase):
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
    def test_drop_during_data_does_not_suspend_destination(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        store = SpoolStore(os.path.abspath(self.mktemp()), NoSyncOps())
        store.open()

        async def go() -> None:
            await self.sink("127.0.0.2", SinkBehaviour(drop_after_data_bytes=10))
            agent = self.agent()
            queue_message(store, "a@example.com", ["bob@example.net"], arrival=reactor.seconds())
            qm = QueueManager(
                store, run_inline, agent.deliver, Router({}), reactor,
                limits=QueueLimits(), settings=QueueConfig,
            )  # fmt: skip
            qm.startService()
            self.addCleanup(qm.stopService)
            await qm.when_idle()
            _, env = store.load(next(iter(store.ids("deferred"))))
            self.assertIn("lost connection", env.recipients[0].reply)
            self.assertEqual(qm.suspended, {}, "one dropped transfer suspended example.net")

        return ensureDeferred(go())
