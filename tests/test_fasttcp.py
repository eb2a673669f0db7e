"""Transports that write through (L{mta.fasttcp}), on real loopback sockets."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mta import fasttcp
from mta.tls import ServerTLS, ensure_selfsigned

BIG = 16 * 1024 * 1024  # far more than a loopback socket buffer takes at once


class Collect(protocol.Protocol):
    """Gathers what arrives; fires C{done} with it when the peer closes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.connected_d: defer.Deferred[Collect] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.received))


@implementer(IPushProducer)
class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Pair:
    """A server and a client connection over loopback, both from L{fasttcp}."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.server = Collect()
        self.client = Collect()
        self.fast = fasttcp.WriteThroughReactor(reactor)

    async def open(self) -> None:
        factory = protocol.Factory.forProtocol(lambda: self.server)
        port = self.fast.listenTCP(0, factory, interface="127.0.0.1")
        self.case.addCleanup(port.stopListening)
        self.case.assertIsInstance(port, fasttcp.Port)
        client_factory = protocol.ClientFactory.forProtocol(lambda: self.client)
        connector = self.fast.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        self.case.assertIsInstance(connector, fasttcp.Connector)
        await self.client.connected_d
        await self.server.connected_d
        self.case.assertIsInstance(self.server.transport, fasttcp.Server)
        self.case.assertIsInstance(self.client.transport, fasttcp.Client)

    def pending(self, proto: Collect) -> bool:
        """Whether Twisted holds data of C{proto}'s transport to write later."""
        t: Any = proto.transport
        return bool(t.dataBuffer or t._tempDataBuffer) or t in reactor.getWriters()


class WriteThroughTests(TestCase):
    """Write-through TCP transports on real loopback sockets: a small write leaves at once, what the
    socket does not take is buffered and sent in order, a registered producer, a write while
    closing and a reset peer take Twisted's usual path, and TLS still goes through Twisted's TLS
    layer."""

    def setUp(self) -> None:
        self.pair = Pair(self)

    async def test_a_small_write_goes_out_at_once(self) -> None:
        await self.pair.open()
        self.pair.server.transport.write(b"220 ready\r\n")  # type: ignore[union-attr]
        self.assertFalse(self.pair.pending(self.pair.server))
        self.pair.server.transport.writeSequence([b"250-a\r\n", b"250 b\r\n"])  # type: ignore[union-attr]
        self.assertFalse(self.pair.pending(self.pair.server))
        self.pair.server.transport.loseConnection()  # type: ignore[union-attr]
        got = await self.pair.client.done
        self.assertEqual(got, b"220 ready\r\n250-a\r\n250 b\r\n")

    async def test_what_the_socket_does_not_take_is_buffered_in_order(self) -> None:
        await self.pair.open()
        big = os.urandom(BIG)
        t: Any = self.pair.server.transport
        t.write(big)
        self.assertTrue(self.pair.pending(self.pair.server))  # a partial send
        # Later writes queue behind the rest, never overtake it.
        t.write(b"tail")
        self.assertTrue(t._tempDataBuffer or t.dataBuffer.endswith(b"tail"))
        t.loseConnection()
        got = await self.pair.client.done
        self.assertEqual(len(got), BIG + 4)
        self.assertEqual(got, big + b"tail")

    async def test_a_push_producer_does_not_stop_writing_through(self) -> None:
        await self.pair.open()
        t: Any = self.pair.server.transport
        producer = Producer()
        t.registerProducer(producer, True)
        t.write(b"220 at once")
        self.assertFalse(self.pair.pending(self.pair.server))
        # What the socket does not take is buffered, and the producer paused.
        big = os.urandom(BIG)
        t.write(big)
        self.assertTrue(self.pair.pending(self.pair.server))
        self.assertTrue(producer.paused)
        t.unregisterProducer()
        t.loseConnection()
        self.assertEqual(await self.pair.client.done, b"220 at once" + big)

    async def test_a_pull_producer_takes_twisteds_path(self) -> None:
        await self.pair.open()
        t: Any = self.pair.server.transport
        t.registerProducer(Producer(), False)
        t.write(b"through the buffer")
        self.assertTrue(self.pair.pending(self.pair.server))
        t.unregisterProducer()
        t.loseConnection()
        self.assertEqual(await self.pair.client.done, b"through the buffer")

    async def test_a_write_while_closing_is_left_to_twisted(self) -> None:
        await self.pair.open()
        t: Any = self.pair.server.transport
        t.write(b"last words")
        t.loseConnection()
        t.write(b", buffered")  # Twisted sends it before the close, as without us
        self.assertTrue(self.pair.pending(self.pair.server))
        self.assertEqual(await self.pair.client.done, b"last words, buffered")

    async def test_a_write_to_a_reset_peer_fails_the_usual_way(self) -> None:
        await self.pair.open()
        client: Any = self.pair.client.transport
        client.abortConnection()
        await self.pair.client.done
        t: Any = self.pair.server.transport
        for _ in range(50):  # until the kernel reports the reset
            if self.pair.server.done.called:
                break
            t.write(b"x" * 65536)
            await deferLater(reactor, 0.01, lambda: None)
        await self.pair.server.done  # connectionLost, no exception out of write()

    async def test_tls_goes_through_twisteds_tls_layer(self) -> None:
        await self.pair.open()
        cert_dir = self.mktemp()
        os.makedirs(cert_dir)
        cert, key = ensure_selfsigned(cert_dir, "localhost")
        server_ctx = ServerTLS(cert, key)
        s: Any = self.pair.server.transport
        c: Any = self.pair.client.transport
        s.startTLS(server_ctx)
        c.startTLS(CertificateOptions(verify=False))
        s.write(b"secret")
        c.write(b"reply")
        await deferLater(reactor, 0.2, lambda: None)
        s.loseConnection()
        got = await self.pair.client.done
        self.assertEqual(got, b"secret")
        self.assertEqual(b"".join(self.pair.server.received), b"reply")
