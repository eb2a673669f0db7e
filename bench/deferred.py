"""A large deferred queue: start-up cost, memory, and idle CPU.

    python bench/deferred.py [--messages 100000]

Fills a spool with N deferred messages (due in an hour), starts a real
mta daemon on it, and reports how long start-up took until it was serving
(the first EHLO answered with 250, and the first message submitted and
answered with 250, by a client that retries every 20 ms from the moment
the process is started), until the queue manager had indexed the queue,
the daemon's RSS then and its peak RSS, and its CPU use over the next 10
seconds (the queue must not be scanned on a tick, so this should be near
zero).  A reference: the same daemon on an empty spool.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import cpu_seconds, free_port, mta_command
from mta.envelope import Envelope, QueueState, Recipient, RecipientState
from mta.spool.fs import FileOps, FileStore
from mta.spool.queueid import QueueIdGenerator

MESSAGE = b"From: a@example.com\r\nSubject: deferred\r\n\r\n" + b"x" * 2000 + b"\r\n"


class Fast(FileOps):
    """No fsync while filling the test spool: it is not the subject here."""

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: str) -> None:
        pass

    def syncfs(self, path: str) -> None:
        pass


def fill(spool: str, count: int) -> None:
    store = FileStore(spool, Fast())
    store.open()
    now = time.time()
    due = now + 3600
    ids = QueueIdGenerator(lambda: now - 60)
    for _ in range(count):
        qid = ids()
        env = Envelope(
            queue_id=qid,
            sender="a@example.com",
            recipients=[
                Recipient(
                    "b@example.net",
                    state=RecipientState.DEFERRED,
                    attempts=1,
                    next_attempt=due,
                    reply="451 4.3.0 later",
                )
            ],
            arrival=now - 60,
            size=len(MESSAGE),
        )
        store.add(env, MESSAGE)
        store.settle(env, QueueState.INCOMING, QueueState.DEFERRED, due)
    store.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def submit(port: int, whole: bool) -> bool:
    """EHLO (and with C{whole}, one message) on the plain listener; True on 250s."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            f = s.makefile("rb")
            steps = [b"", b"EHLO probe.bench.example\r\n"]
            if whole:
                steps += [
                    b"MAIL FROM:<a@example.com>\r\n",
                    b"RCPT TO:<b@example.net>\r\n",
                    b"DATA\r\n",
                    b"From: a@example.com\r\nSubject: probe\r\n\r\nprobe\r\n.\r\n",
                ]
            for send in steps:
                if send:
                    s.sendall(send)
                while (line := f.readline(1024))[3:4] == b"-":
                    pass
                if line[:1] not in (b"2", b"3"):
                    return False
            return True
    except OSError:
        return False


def measure(work: str, expect: int) -> dict[str, float]:
    config = os.path.join(work, "mta.toml")
    port = free_port()
    with open(config, "w") as f:
        f.write(
            f"""[server]
hostname = "bench.localhost"
[listen]
submissions = ["tcp:{free_port()}:interface=127.0.0.1"]
submission = ["tcp:{port}:interface=127.0.0.1"]
[auth]
trusted_networks = ["127.0.0.1/32"]
[delivery]
dns_servers = ["127.0.0.1"]
dns_port = {free_port()}
[routes]
"*" = "[127.0.0.1]:{free_port()}"
"""
        )
    log_path = os.path.join(work, "mta.log")
    start = time.monotonic()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            mta_command(config),
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        while not submit(port, whole=False):
            if time.monotonic() - start > 600 or daemon.poll() is not None:
                sys.exit("bench: the daemon did not answer EHLO in time")
            time.sleep(0.02)
        ehlo = time.monotonic() - start
        while not submit(port, whole=True):
            if time.monotonic() - start > 600:
                sys.exit("bench: the daemon did not accept a message in time")
            time.sleep(0.02)
        submitted = time.monotonic() - start
        # The probe's message may be deferred (no sink) before the scan
        # lists deferred/, and then counts too.
        marker = re.compile(r"queue: \d+ messages ready, (\d+) deferred")
        while time.monotonic() - start < 600:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                found = marker.search(f.read())
            if found and int(found.group(1)) >= expect:
                break
            time.sleep(0.05)
        else:
            sys.exit("bench: the daemon did not index the queue in time")
        indexed = time.monotonic() - start
        rss = rss_kib(daemon.pid)
        cpu0 = cpu_seconds(daemon.pid)
        time.sleep(10)
        idle_cpu = cpu_seconds(daemon.pid) - cpu0
        return {"start_to_ehlo_s": round(ehlo, 2), "start_to_250_s": round(submitted, 2),
                "start_to_indexed_s": round(indexed, 2), "rss_mib": round(rss / 1024, 1),
                "peak_rss_mib": round(hwm_kib(daemon.pid) / 1024, 1),
                "cpu_s_over_next_10s": round(idle_cpu, 3)}  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=100_000)
    args = p.parse_args()
    empty = tempfile.mkdtemp(prefix="mta-bench-empty-")
    full = tempfile.mkdtemp(prefix="mta-bench-deferred-")
    try:
        reference = measure(empty, 0)
        t0 = time.monotonic()
        fill(os.path.join(full, "spool"), args.messages)
        filled = time.monotonic() - t0
        loaded = measure(full, args.messages)
        print(json.dumps({
            "messages": args.messages,
            "fill_s": round(filled, 1),
            "empty_spool": reference,
            "deferred_spool": loaded,
            "rss_per_deferred_message_bytes": round(
                (loaded["rss_mib"] - reference["rss_mib"]) * 1024 * 1024 / args.messages
            ),
        }, indent=2))  # fmt: skip
    finally:
        shutil.rmtree(empty, ignore_errors=True)
        shutil.rmtree(full, ignore_errors=True)


if __name__ == "__main__":
    main()
