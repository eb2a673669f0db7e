"""The delivery agent's outbound hooks (DKIM signing): what they see and what is sent."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mta.checks import host as checkhost
from mta.delivery.relay import DeliveryAgent
from mta.envelope import Envelope
from mta.interfaces import IOutboundHook
from mta.testing import SinkBehaviour
from tests.test_relay import RelayTestCase

EIGHT_BIT = (
    "From: a@example.com\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße aus Köln.\r\n"
).encode()


class Recorder:
    def __init__(self, result: Any = None) -> None:
        self.seen: list[bytes] = []
        self.result = result

    def __call__(self, envelope: Envelope, data: bytes) -> Deferred[bytes]:
        self.seen.append(data)
        if self.result is not None:
            return self.result  # type: ignore[no-any-return]
        return succeed(b"X-Signed: yes\r\n" + data)


class OutboundTests(RelayTestCase):
    """Outbound hooks in the delivery agent: their header bytes go in front of what is sent, a hook
    sees the 7-bit form for a server without 8BITMIME and the 8-bit one for a server with it, and
    a failing hook defers the recipients and sends nothing."""

    def agent_with(self, outbound: Any, **settings: Any) -> DeliveryAgent:
        agent = self.agent(**settings)
        agent.outbound = outbound
        return agent

    def test_header_in_front_of_what_is_sent(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        hook = Recorder()

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            [result] = await self.agent_with(hook).deliver(self.job("bob@example.net"))
            self.assertEqual(result.reply.code, 250)
            [message] = sink.messages
            self.assertEqual(message.data, b"X-Signed: yes\r\n" + hook.seen[0])
            self.assertTrue(hook.seen[0].startswith(b"From: a@example.com"))

        return ensureDeferred(go())

    def test_hook_sees_the_converted_form_for_a_7bit_server(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        hook = Recorder()
        seven_bit = SinkBehaviour(extensions=("PIPELINING", "ENHANCEDSTATUSCODES"))

        async def go() -> None:
            sink = await self.sink("127.0.0.2", seven_bit)
            job = self.job("bob@example.net", data=EIGHT_BIT, body="8BITMIME")
            [result] = await self.agent_with(hook).deliver(job)
            self.assertEqual(result.reply.code, 250)
            self.assertTrue(hook.seen[0].isascii())
            self.assertIn(b"quoted-printable", hook.seen[0])
            self.assertEqual(sink.messages[0].data, b"X-Signed: yes\r\n" + hook.seen[0])

        return ensureDeferred(go())

    def test_hook_sees_8bit_for_an_8bitmime_server(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        hook = Recorder()

        async def go() -> None:
            await self.sink("127.0.0.2")
            job = self.job("bob@example.net", data=EIGHT_BIT, body="8BITMIME")
            [result] = await self.agent_with(hook).deliver(job)
            self.assertEqual(result.reply.code, 250)
            self.assertEqual(hook.seen, [EIGHT_BIT])

        return ensureDeferred(go())

    def test_failing_hook_defers_and_sends_nothing(self) -> Any:
        self.mx("example.net", (10, "mx.example.net", "127.0.0.2"))
        hook = Recorder(fail(OSError("key file unreadable")))

        async def go() -> None:
            sink = await self.sink("127.0.0.2")
            [result] = await self.agent_with(hook).deliver(self.job("bob@example.net"))
            self.assertEqual((result.reply.code, result.kind), (451, "local"))
            self.assertIn("key file unreadable", result.reply.text)
            self.assertEqual(sink.messages, [])
            self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

        return ensureDeferred(go())


@implementer(IOutboundHook)
class Slow:
    name = "slow"

    def __init__(self) -> None:
        self.cancelled = False

    def on_outbound(self, envelope: Envelope, data: bytes) -> Deferred[bytes]:
        return Deferred(lambda _: setattr(self, "cancelled", True))


@implementer(IOutboundHook)
class Prefix:
    def __init__(self, name: str) -> None:
        self.name = name

    def on_outbound(self, envelope: Envelope, data: bytes) -> bytes:
        return f"X-{self.name}: {len(data)}\r\n".encode()


class HostOutboundTests(SynchronousTestCase):
    """Checks.outbound by itself: hooks run in order, each seeing the bytes with the previous hook's
    fields in front, and one that times out fails the delivery and is cancelled."""

    envelope = Envelope(queue_id="Q", sender="a@example.com", recipients=[], arrival=0.0)

    def test_hooks_in_order_each_sees_the_previous(self) -> None:
        checks = checkhost.Checks(
            [checkhost.Loaded("a", Prefix("A"), 5), checkhost.Loaded("b", Prefix("B"), 5)],
            Clock(),
        )
        out: list[bytes] = []
        checks.outbound(self.envelope, b"body").addCallback(out.append)
        self.assertEqual(out, [b"X-B: 12\r\nX-A: 4\r\nbody"])

    def test_timeout_fails_and_cancels(self) -> None:
        clock, slow = Clock(), Slow()
        checks = checkhost.Checks([checkhost.Loaded("slow", slow, 10)], clock)
        d = checks.outbound(self.envelope, b"body")
        clock.advance(11)
        self.failureResultOf(d)
        self.assertTrue(slow.cancelled)
