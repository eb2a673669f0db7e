"""The Redis client (L{mta.cluster.client}) and its wire format (L{mta.cluster.resp}).

The wire format is pure: replies split anywhere must parse the same, and
what is not RESP is refused.  The client runs against a real, private
redis-server, and against servers made to fail: nothing listening
(connection refused), a server that accepts and never answers (timeout),
one that answers garbage, Redis killed and started again (restart), and a
Redis that wants a password.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mta.cluster.blocking import BlockingRedis, split_description
from mta.cluster.client import RedisClient
from mta.cluster.resp import ErrorReply, ReplyParser, RESPProtocolError, encode_command
from mta.errors import ConfigError, SharedStateError
from tests.e2e.daemon import free_port
from tests.redisserver import RedisServer

Gen = Generator[Deferred[Any], Any, None]

REPLIES = (
    b"+OK\r\n-ERR wrong number of arguments\r\n:42\r\n:-1\r\n$5\r\nhe\r\no\r\n$-1\r\n"
    b"*2\r\n$1\r\na\r\n*1\r\n:7\r\n*0\r\n$0\r\n\r\n"
)
PARSED = ["OK", ErrorReply("ERR wrong number of arguments"), 42, -1, b"he\r\no", None,
          [b"a", [7]], [], b""]  # fmt: skip


class RESPTests(SynchronousTestCase):
    """The RESP2 codec: commands as arrays of bulk strings (None and booleans refused), every kind
    of reply parsed, replies split anywhere, input that is not RESP, a line without an end
    bounded, and descriptions for the logs."""

    def test_command_is_an_array_of_bulk_strings(self) -> None:
        self.assertEqual(
            encode_command("SET", b"k\r\n", 5, 1.5),
            b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n",
        )
        self.assertEqual(encode_command("GET", "ü"), b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xbc\r\n")

    def test_command_refuses_nothing_and_bools(self) -> None:
        self.assertRaises(ValueError, encode_command)
        self.assertRaises(TypeError, encode_command, "SET", True)

    def test_every_kind_of_reply(self) -> None:
        self.assertEqual(ReplyParser().feed(REPLIES), PARSED)
        self.assertEqual(ErrorReply("LOADING Redis is loading").kind, "LOADING")

    @given(st.lists(st.integers(min_value=1, max_value=len(REPLIES) - 1), max_size=12))
    def test_split_anywhere(self, cuts: list[int]) -> None:
        parser, out, last = ReplyParser(), [], 0
        for cut in [*sorted(set(cuts)), len(REPLIES)]:
            out += parser.feed(REPLIES[last:cut])
            last = cut
        self.assertEqual(out, PARSED)

    def test_not_resp(self) -> None:
        for garbage in (
            b"HTTP/1.1 200 OK\r\n",
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"$-5\r\n",
            b"*-2\r\n",
            b"\r\n",
            b"$999999999999\r\n",
        ):
            self.assertRaises(RESPProtocolError, ReplyParser().feed, garbage)

    def test_a_line_without_end_is_bounded(self) -> None:
        parser = ReplyParser()
        parser.feed(b"+" + b"x" * 1000)
        self.assertRaises(RESPProtocolError, parser.feed, b"x" * 70000)

    def test_descriptions(self) -> None:
        self.assertEqual(
            split_description(r"tcp:host=\:\:1:port=6379"),
            ("tcp", [], {"host": "::1", "port": "6379"}),
        )
        self.assertEqual(
            BlockingRedis("tcp:127.0.0.1:7000", timeout=1).address, ("127.0.0.1", 7000)
        )
        self.assertEqual(BlockingRedis("unix:path=/run/r.sock", timeout=1).address, "/run/r.sock")
        for bad in ("tcp:host=x", "ssl:host=x:port=1", "unix:"):
            self.assertRaises(ConfigError, BlockingRedis, bad, timeout=1)


class _Counting:
    """A client endpoint that counts its connection attempts."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        return self.endpoint.connect(factory)  # type: ignore[no-any-return]


class _Silent(Protocol):
    """Accepts and never answers."""


class _Garbage(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")  # type: ignore[union-attr]


class ClientTests(TestCase):
    """RedisClient against a real redis-server and made-up servers: commands pipelined and answered
    in order, a refused connection failing fast then retried, a server that never answers timing
    out, garbage closing the connection, Redis restarting, AUTH with a password, and the blocking
    client mtactl uses."""

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)

    def client(self, endpoint: str, **options: Any) -> RedisClient:
        settings: dict[str, Any] = {"timeout": 1.0, "retry": 0.3} | options
        client = RedisClient(
            clientFromString(reactor, endpoint), reactor, name=endpoint, **settings
        )
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def listen(self, protocol: type[Protocol]) -> Generator[Deferred[Any], Any, str]:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(protocol)
        )
        self.addCleanup(port.stopListening)
        return f"tcp:host=127.0.0.1:port={port.getHost().port}"

    @inlineCallbacks
    def test_commands_are_pipelined_and_answered_in_order(self) -> Gen:
        self.server.start()
        client = self.client(self.server.endpoint)
        answers = yield _all([client.execute("INCR", "n") for _ in range(20)])
        self.assertEqual(answers, list(range(1, 21)))
        self.assertTrue(client.connected)
        with self.assertRaises(SharedStateError) as caught:
            yield client.execute("NOSUCHCOMMAND")
        self.assertIn("unknown command", str(caught.exception))
        self.assertEqual((yield client.execute("GET", "n")), b"20")  # still in step

    @inlineCallbacks
    def test_connection_refused_fails_fast_then_retries(self) -> Gen:
        endpoint = _Counting(clientFromString(reactor, f"tcp:host=127.0.0.1:port={free_port()}"))
        client = RedisClient(endpoint, reactor, name="nowhere", timeout=1.0, retry=0.3)
        with self.assertRaises(SharedStateError) as caught:
            yield client.execute("PING")
        self.assertIn("unreachable", str(caught.exception))
        with self.assertRaises(SharedStateError):
            yield client.execute("PING")  # within retry: at once, no connection tried
        self.assertEqual(endpoint.attempts, 1)
        yield deferLater(reactor, 0.35)
        with self.assertRaises(SharedStateError):
            yield client.execute("PING")
        self.assertEqual(endpoint.attempts, 2)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_a_server_that_never_answers_times_out(self) -> Gen:
        client = self.client((yield self.listen(_Silent)), timeout=0.2)
        started = time.monotonic()
        with self.assertRaises(SharedStateError) as caught:
            yield client.execute("PING")
        self.assertIn("did not answer within 0.2s", str(caught.exception))
        self.assertLess(time.monotonic() - started, 1.0)
        yield deferLater(reactor, 0.05)
        self.assertFalse(client.connected)  # out of step: closed, a new one next time

    @inlineCallbacks
    def test_garbage_closes_the_connection(self) -> Gen:
        client = self.client((yield self.listen(_Garbage)))
        with self.assertRaises(SharedStateError):
            yield client.execute("PING")
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_redis_restarting(self) -> Gen:
        self.server.start()
        client = self.client(self.server.endpoint, retry=0.1)
        self.assertEqual((yield client.execute("PING")), "PONG")
        self.server.stop()
        for _ in range(2):  # the lost connection, then the refused one
            with self.assertRaises(SharedStateError):
                yield client.execute("PING")
        self.server.start()
        yield deferLater(reactor, 0.15)
        self.assertEqual((yield client.execute("PING")), "PONG")  # by itself
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_password(self) -> Gen:
        self.server = RedisServer(password="s3cret-redis")
        self.server.start()
        self.addCleanup(self.server.stop)
        good = self.client(self.server.endpoint, password="s3cret-redis")
        self.assertEqual((yield good.execute("PING")), "PONG")
        bad = self.client(self.server.endpoint, password="wrong")
        with self.assertRaises(SharedStateError):
            yield bad.execute("PING")
        none = self.client(self.server.endpoint)
        with self.assertRaises(SharedStateError) as caught:
            yield none.execute("PING")
        self.assertIn("NOAUTH", str(caught.exception))
        self.flushLoggedErrors()

    def test_blocking_client(self) -> None:
        self.server.start()
        redis = BlockingRedis(self.server.endpoint, timeout=2)
        self.assertEqual(redis.execute("INCR", "b"), 1)
        self.assertRaises(SharedStateError, redis.execute, "NOSUCHCOMMAND")
        self.assertEqual(redis.execute("GET", "b"), b"1")
        self.server.stop()
        self.assertRaises(SharedStateError, redis.execute, "GET", "b")
        redis.close()
        self.assertRaises(
            SharedStateError, BlockingRedis(self.server.endpoint, timeout=1).execute, "PING"
        )


def _all(ds: list[Deferred[Any]]) -> Deferred[list[Any]]:
    return gatherResults(ds)
