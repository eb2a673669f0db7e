"""CPU per message of the daemon's parts, in one process, without I/O.

    python bench/micro.py [--messages 3000] [--profile]

The load benchmarks (compare.py) measure the daemon as a whole on a noisy
machine; this times the Python that the reactor thread runs per message,
part by part, so that a change to one part can be judged on its own:

  - submission: one SMTP session as smtp-source holds it (connect,
    EHLO, MAIL, RCPT, DATA with a 2 KB message, QUIT) from a trusted
    address, on a StringTransport into the memory spool;
  - queue: a committed message taken up, delivered by an agent that
    accepts at once, filed (memory store);
  - client: one transaction on a cached connection (MAIL, RCPT, DATA,
    the message, the replies), against replies fed back in memory.

Times are the best of five rounds (the least disturbed by the rest of the
machine), in microseconds per message.  For figures that do not depend on
the machine's load, count instructions instead:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
        .venv/bin/python bench/micro.py --only submission --messages 300 --rounds 1

and divide the total (C{callgrind_annotate /tmp/cg.out | head}) by the
messages; run it once with C{--messages 0} for the fixed cost to subtract.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mta.delivery.job import RecipientResult
from mta.delivery.routes import Router
from mta.errors import ErrorKind, Reply
from mta.queue.manager import QueueManager
from mta.smtp.server import SubmissionFactory
from mta.testing import MemorySpool, MemoryStore, run_inline
from tests.support import Harness, make_config

BODY = (
    b"From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\n\r\n" + (b"y" * 76 + b"\r\n") * 26
)
OK = Reply(250, "2.0.0", "Ok: queued as SINK")


def submission(n: int) -> Callable[[], None]:
    harness = Harness(
        tempfile.mkdtemp(prefix="mta-micro-"),
        make_config(
            auth={"trusted_networks": ["127.0.0.1/32"]},
            limits={"daily_messages": 0, "connections_per_ip": 100000},
        ),
    )
    factory = SubmissionFactory(harness.settings, implicit_tls=False)
    lines = [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.com>\r\n",
             b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n", BODY + b".\r\n", b"QUIT\r\n"]  # fmt: skip

    def run() -> None:
        for _ in range(n):
            proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
            proto.makeConnection(transport)
            for line in lines:
                proto.dataReceived(line)
            proto.connectionLost(None)  # type: ignore[arg-type]
        harness.spool.queue.messages.clear()

    return run


class InstantAgent:
    def deliver(self, job: Any) -> Any:
        return succeed([RecipientResult(r.address, OK, ErrorKind.REMOTE, "sink[127.0.0.1]:25")
                        for r in job.recipients])  # fmt: skip


def queue(n: int) -> Callable[[], None]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore()
    spool = MemorySpool(clock.seconds, store)
    manager = QueueManager(store, run_inline, InstantAgent(), Router({}), clock)
    manager.startService()
    harness_env = Harness(tempfile.mkdtemp(prefix="mta-micro-"))
    del harness_env

    def run() -> None:
        for _ in range(n):
            txn = spool.begin()
            txn.write(BODY)
            from mta.envelope import Envelope, Recipient  # noqa: PLC0415

            env = Envelope("", "a@example.com", [Recipient("b@example.net")], clock.seconds())
            txn.commit(env)
        store.messages.clear()

    spool.add_listener(manager.committed)
    return run


def best(run: Callable[[], None], n: int, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--profile", default="", help="profile one part (submission, queue)")
    p.add_argument("--only", default="", help="one part")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    parts = {"submission": submission, "queue": queue}
    if args.only:
        parts = {args.only: parts[args.only]}
    if args.profile:
        run = parts[args.profile](args.messages)
        run()
        profiler = cProfile.Profile()
        profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
        return
    for name, make in parts.items():
        run = make(args.messages)
        run()  # warm up: imports, caches
        print(f"{name:12s} {best(run, args.messages, args.rounds):8.1f} us/message")


if __name__ == "__main__":
    main()
