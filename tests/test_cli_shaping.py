"""C{mtactl queue shaping}: what a running daemon says of its traffic-shaping limits.

The daemon here is the real control protocol (L{ControlProtocol}) of a
queue manager on a Clock, served on the spool's control socket from a
thread, so that C{mtactl} (L{mta.cli.main}, in process) talks to it over a
real UNIX socket while the test waits in C{main}.  The end-to-end test
(tests/e2e/test_shaping.py) runs the real command against a real daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from typing import Any

from twisted.internet.testing import StringTransport

from mta.controlsocket import ControlProtocol, socket_address
from mta.queue.shaping import ShapingPolicy
from mta.spool.fs import FileStore
from tests.test_cli import CLITestCase
from tests.test_queue_shaping import GMAIL, ShapingTestCase


class ControlThread:
    """Answers each connection on C{path} with C{answer(line)} (one line in, one out)."""

    def __init__(self, path: str, answer: Any) -> None:
        self.answer = answer
        address, self._fd = socket_address(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.answer(data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self.thread.join(10)
        if self._fd is not None:
            os.close(self._fd)


class ShapingCommandTests(CLITestCase, ShapingTestCase):
    """The limits and why, as text and JSON; resets; errors."""

    def setUp(self) -> None:
        CLITestCase.setUp(self)
        ShapingTestCase.setUp(self)
        self.files = FileStore(self.spool_path)
        self.files.open()
        self.qm = self.shaping_manager()

    def daemon(self, answer: Any = None) -> None:
        def converse(line: bytes) -> bytes:
            proto = ControlProtocol(self.qm.operator)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(line)
            return bytes(transport.value())

        server = ControlThread(self.files.control_socket(), answer or converse)
        self.addCleanup(server.close)

    def shape(self) -> None:
        self.warm_up(self.qm)
        self.clock.advance(1)
        self.send(self.qm, 10)
        self.clock.advance(1)
        self.spy.answer(self.waiting()[0], GMAIL)

    def test_the_limits_and_why(self) -> None:
        self.shape()
        self.daemon()
        code, out = self.mtactl("queue", "shaping")
        self.assertEqual(code, 0, self.err.getvalue())
        lines = out.splitlines()
        self.assertEqual(
            lines[0],
            "1 destination(s) with lowered limits (ceilings: 4 connections, rate no limit)",
        )
        self.assertEqual(lines[2], "example.net")
        self.assertEqual(
            lines[3], "  concurrency 2 of 4, rate 75/min of 150/min; 3 running, 6 waiting"
        )
        self.assertEqual(
            lines[4],
            "  lowered 1 time(s) since 2023-11-14 22:13:22; held until 2023-11-14 22:13:52, "
            "next increase 2023-11-14 22:13:52, back to the ceilings by 2023-11-14 22:14:02 "
            "if deliveries succeed",
        )
        self.assertEqual(
            lines[5],
            "  last lowered at 2023-11-14 22:13:22 by rule gmail-rate-limited (Gmail) for:",
        )
        self.assertEqual(lines[6], f"    {GMAIL}")

    def test_json(self) -> None:
        self.shape()
        self.daemon()
        code, out = self.mtactl("queue", "shaping", "--json")
        self.assertEqual(code, 0, self.err.getvalue())
        doc = json.loads(out)
        self.assertEqual((doc["enabled"], doc["instances"], doc["max_concurrency"]), (True, 1, 4))
        self.assertIsNone(doc["max_rate_per_minute"])
        [row] = doc["destinations"]
        self.assertEqual(row["destination"], "example.net")
        self.assertEqual((row["concurrency"], row["rate_per_minute"]), (2, 75.0))
        self.assertEqual(row["since"], "2023-11-14T22:13:22.000000Z")
        self.assertEqual(row["hold_until"], "2023-11-14T22:13:52.000000Z")
        self.assertEqual(row["reason"]["at"], "2023-11-14T22:13:22.000000Z")
        self.assertEqual(row["reason"]["reply"], str(GMAIL))

    def test_nothing_shaped(self) -> None:
        self.daemon()
        self.assertEqual(
            self.mtactl("queue", "shaping"),
            (
                0,
                "No destination has lowered limits (each may have 4 connections, rate no limit).\n",
            ),
        )
        code, out = self.mtactl("queue", "shaping", "--json")
        self.assertEqual((code, json.loads(out)["destinations"]), (0, []))

    def test_shaping_off(self) -> None:
        self.qm.traffic.shaper.policy = ShapingPolicy(enabled=False)
        self.daemon()
        self.assertEqual(
            self.mtactl("queue", "shaping"),
            (0, "Traffic shaping is off ([shaping] enabled = false).\n"),
        )

    def test_shared_by_instances(self) -> None:
        self.shape()
        self.qm.traffic.shaper.instances = 2
        self.daemon()
        code, out = self.mtactl("queue", "shaping")
        self.assertEqual(code, 0)
        self.assertIn("; limits shared by 2 instances, this one's share shown", out.splitlines()[0])
        self.assertIn("concurrency 1 of 4, rate 37.5/min", out)

    def test_reset(self) -> None:
        self.shape()
        self.daemon()
        self.assertEqual(
            self.mtactl("queue", "shaping", "--reset", "example.net"),
            (0, "example.net: traffic-shaping limits ended\n"),
        )
        self.assertEqual(self.qm.traffic.shaper.limits, {})
        code, out = self.mtactl("queue", "shaping", "--reset", "example.net")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error("example.net: no traffic-shaping limits to end")

    def test_reset_all(self) -> None:
        self.shape()
        self.daemon()
        self.assertEqual(
            self.mtactl("queue", "shaping", "--reset-all"),
            (0, "ended the traffic-shaping limits of 1 destination(s)\n"),
        )

    def test_usage_errors(self) -> None:
        self.daemon()
        for argv, words in [
            (("--reset", "a.example", "--reset-all"), "not both"),
            (("--json", "--reset", "a.example"), "--json shows the limits"),
            (("--reset", "  "), "--reset needs a destination"),
        ]:
            self.err.truncate(0)
            self.err.seek(0)
            self.assertEqual(self.mtactl("queue", "shaping", *argv), (2, ""), argv)
            self.assert_one_line_error(words)

    def test_no_daemon(self) -> None:
        code, out = self.mtactl("queue", "shaping")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line_error(
            "no daemon answers on", "traffic-shaping limits live in the running daemon"
        )

    def test_an_answer_that_is_not_understood(self) -> None:
        for answer in (
            json.dumps({"ok": True, "text": "not json"}),
            json.dumps({"ok": True, "text": "[]"}),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.files.control_socket())
            self.daemon(lambda line, answer=answer: answer.encode() + b"\n")
            self.err.truncate(0)
            self.err.seek(0)
            self.assertEqual(self.mtactl("queue", "shaping"), (1, ""))
            self.assert_one_line_error("answer about traffic shaping was not understood")

    def test_the_daemon_refuses(self) -> None:
        self.daemon(lambda line: json.dumps({"ok": False, "text": "busy"}).encode() + b"\n")
        self.assertEqual(self.mtactl("queue", "shaping"), (1, ""))
        self.assert_one_line_error("mtactl: busy")
