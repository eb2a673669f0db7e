"""Duplicates after SIGKILL under load: mta against a private Postfix.

    python bench/kill_compare.py [--messages 2000] [--kills 4] [--repeat 3]
                                 [--seed 1] [--only postfix,mta] [--json out.json]

The treatment of tests/e2e/test_faults.py::KillUnderLoad, applied the same
way to both servers, one after the other, each relaying to its own fresh
tests/e2e/sink.py (a sink process that writes every message it accepts to a
file):

  - load: 8 concurrent smtplib sessions (all plaintext from the trusted
    127.0.0.1; the private Postfix has no TLS or AUTH) take the next of N
    messages (tests/e2e/test_faults.py's load_message: a unique Message-ID,
    the ID in Subject: and in the last body line) and send it until it gets
    a 250; the queue ID of that 250 is recorded;
  - kills: after a seeded random 0.3-2.0 s, SIGKILL the whole server, start
    it again on the same queue and wait until it accepts connections; K
    times (fewer if the load ends first).  Postfix: SIGKILL to the
    instance's process group (master and every child: smtpd, cleanup, qmgr,
    smtp, ... in one kill(2)), then `postfix -c CONFIG_DIR start`.  mta:
    SIGKILL to twistd, then the same twistd command again;
  - drain: wait (bounded) until every acknowledged message has reached the
    sink and the server's queue is empty (so that late redeliveries count
    too).  If nothing moves for --stall seconds, do what an operator would
    after a crash: `postqueue -c CONFIG_DIR -f` or `mtactl queue flush`; the
    number of flushes is reported.

Each copy at the sink is attributed to the queue ID in the top Received:
field ("(Postfix) with ESMTP id X" / "(mta) with ESMTP id X").  Per server
and run it reports: acknowledged, lost (acknowledged, never arrived: must
be 0), resent duplicates (another queue ID: the client never saw the 250 of
a queued copy and sent it again), redelivered duplicates (the same queue
ID twice: the sink accepted it, the kill came before the server recorded
the delivery), and per kill: a redelivery is charged to the last kill
before the second copy reached the sink, a resend to the last kill before
the client's failed DATA (not by the first copy's arrival: the sink lags
behind and may write a copy sent before a kill after it).  Both servers
get the same seeds (run i: SEED + i).

Needs root (Postfix's master), Debian's postfix package and the project's
virtualenv.  Everything stays on 127.0.0.1; the system's own Postfix, if
any, is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare import MtaServer, PostfixServer, descendants, raise_fd_limit, workdir
from bench.run import BIN, mta_command, need, wait_port
from tests.e2e.daemon import Helper
from tests.e2e.test_faults import SENDER, load_message

RECIPIENT = "sink@example.test"
SESSIONS = 8
MESSAGE_DEADLINE = 180.0  # seconds one client may spend on one message
_MID = re.compile(rb"^Message-ID: <([^>]*)>", re.MULTILINE | re.IGNORECASE)
# The top Received: field, folded or not: "by HOST (Postfix) with ESMTP id X".
_QUEUE_ID = re.compile(rb"\((?:Postfix|mta)\)\s+with\s+\w+\s+id\s+([0-9A-Za-z]+)")


# -- the two servers, killable ---------------------------------------------


def gone(pid: int) -> bool:
    """Exited (no /proc entry) or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Killable(Protocol):
    name: str

    def start(self, sink_port: int) -> int: ...
    def kill(self) -> int: ...  # returns the number of processes killed
    def restart(self) -> None: ...
    def flush(self) -> None: ...
    def queued(self) -> dict[str, int]: ...
    def log_counts(self) -> dict[str, int]: ...
    def stop(self) -> None: ...


def count_lines(path: str, needles: dict[str, str]) -> dict[str, int]:
    counts = dict.fromkeys(needles, 0)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                for name, needle in needles.items():
                    if needle in line:
                        counts[name] += 1
    except OSError:
        pass
    return counts


class KillablePostfix(PostfixServer):
    """bench/compare.py's private Postfix, plus kill -9 of the whole instance."""

    def start(self, sink_port: int) -> int:
        self.port = super().start(sink_port)
        return self.port

    def kill(self) -> int:
        master = self.root_pid()
        pids = descendants(master)
        # One kill(2) for the process group (master and its children share
        # it: the master is a session leader), then the snapshot's stragglers.
        os.killpg(master, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while not all(gone(p) for p in pids):
            if time.monotonic() > deadline:
                sys.exit(f"bench: Postfix processes survived SIGKILL: {pids}")
            time.sleep(0.01)
        return len(pids)

    def restart(self) -> None:
        # `postfix start` first runs postsuper over the queue; after a kill it
        # finds cleanup's temporary files ("warning: bogus file name") and
        # logs that directly, as the postfix user, to maillog_file (postlogd is
        # not running yet).  The file postlogd made is root's, so that would be
        # fatal and Postfix would not start; with syslog, as usually installed,
        # it is a warning.  Let postsuper write the file, as syslog would.
        maillog = os.path.join(self.work, "maillog")
        if os.path.exists(maillog):
            shutil.chown(maillog, "postfix", "postfix")
        for attempt in range(10):
            r = subprocess.run(
                [need("postfix"), "-c", self.conf, "start"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if r.returncode == 0:
                break
            print(f"postfix start ({attempt}): {r.stdout}{r.stderr}".strip(), file=sys.stderr)
            time.sleep(0.5)
        else:
            sys.exit("bench: Postfix does not start again")
        with open(os.path.join(self.work, "queue", "pid", "master.pid")) as f:
            self._master = int(f.read().strip())
        wait_port(self.port)

    def flush(self) -> None:
        subprocess.run(
            [need("postqueue"), "-c", self.conf, "-f"],
            check=False,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def queued(self) -> dict[str, int]:
        """Queue files per queue; incoming counts only complete files (cleanup
        sets the owner-execute bit when a file is complete) and reports the
        partial ones, left by a killed cleanup, separately."""
        counts: dict[str, int] = {}
        queue = os.path.join(self.work, "queue")
        for name in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            complete = partial = 0
            for top, _dirs, files in os.walk(os.path.join(queue, name)):
                for file in files:
                    try:
                        mode = os.stat(os.path.join(top, file)).st_mode
                    except FileNotFoundError:
                        continue
                    if name == "incoming" and not mode & 0o100:
                        partial += 1
                    else:
                        complete += 1
            counts[name] = complete
            if name == "incoming":
                counts["incoming_partial"] = partial
        return counts

    def log_counts(self) -> dict[str, int]:
        return count_lines(
            os.path.join(self.work, "maillog"),
            {
                "sent": "status=sent",
                "deferred": "status=deferred",
                "warning": "warning:",
                "fatal": "fatal:",
                "panic": "panic:",
                "bogus_file_name": "bogus file name",
            },
        )


class KillableMta(MtaServer):
    """bench/compare.py's mta daemon, plus SIGKILL and a restart on the same spool."""

    def start(self, sink_port: int) -> int:
        self.port = super().start(sink_port)
        self.config = os.path.join(self.work, "mta.toml")
        return self.port

    def kill(self) -> int:
        assert self._daemon is not None
        assert self._logger is not None
        self._daemon.kill()  # SIGKILL
        self._daemon.wait(timeout=30)
        self._logger.wait(timeout=30)  # the log writer ends with the pipe
        return 1

    def restart(self) -> None:
        with open(os.path.join(self.work, "mta.log"), "ab") as log:
            self._logger = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
            self._daemon = subprocess.Popen(
                mta_command(self.config),
                cwd=self.work,
                stdout=self._logger.stdin,
                stderr=subprocess.STDOUT,
            )
            assert self._logger.stdin is not None
            self._logger.stdin.close()
        wait_port(self.port)

    def flush(self) -> None:
        subprocess.run(
            [os.path.join(BIN, "mtactl"), "--config", self.config, "queue", "flush"],
            check=False,
            timeout=60,
            cwd=self.work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def queued(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in ("incoming", "active", "deferred", "hold", "corrupt"):
            try:
                entries = os.listdir(os.path.join(self.work, "spool", name))
            except FileNotFoundError:
                entries = []
            counts[name] = sum(not e.startswith(".") for e in entries)
        return counts

    def log_counts(self) -> dict[str, int]:
        return count_lines(
            os.path.join(self.work, "mta.log"),
            {"sent": "status=sent", "deferred": "status=deferred", "traceback": "Traceback"},
        )


PENDING = ("maildrop", "incoming", "active", "deferred", "hold")


# -- the sink ---------------------------------------------------------------


@dataclass
class Copy:
    index: int  # the sink's message number (N.eml)
    mid: str
    queue_id: str
    arrived: float  # the file's mtime (time.time() clock)
    whole: bool  # ends with the message's last line


class SinkDir:
    """tests/e2e/sink.py in its own process, its output read incrementally."""

    def __init__(self, work: str) -> None:
        self.out = os.path.join(work, "sink")
        self.helper = Helper(["tests/e2e/sink.py", self.out], os.path.join(work, "sink.log"))
        self.port = self.helper.port
        self.copies: dict[int, Copy] = {}

    def count(self) -> int:
        try:
            return sum(n.endswith(".eml") for n in os.listdir(self.out))
        except FileNotFoundError:
            return 0

    def scan(self) -> dict[int, Copy]:
        try:
            names = os.listdir(self.out)
        except FileNotFoundError:
            return self.copies
        for name in names:
            if not name.endswith(".eml"):
                continue
            index = int(name.split(".", 1)[0])
            if index in self.copies:
                continue
            path = os.path.join(self.out, name)
            with open(path, "rb") as f:
                data = f.read()
            mid_m = _MID.search(data)
            qid_m = _QUEUE_ID.search(data)
            mid = mid_m.group(1).decode() if mid_m else ""
            self.copies[index] = Copy(
                index=index,
                mid=mid,
                queue_id=qid_m.group(1).decode() if qid_m else "",
                arrived=os.stat(path).st_mtime,
                whole=data.endswith(f"end of {mid}\r\n".encode()),
            )
        return self.copies

    def stop(self) -> None:
        self.helper.stop()


# -- the load ---------------------------------------------------------------


@dataclass
class Load:
    port: int
    messages: int
    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> queue ID
    data_failed: dict[str, float] = field(default_factory=dict)  # first failure in DATA
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        lock = threading.Lock()
        todo = [f"load-{n}@example.com" for n in range(self.messages)]

        def client() -> None:
            conn: smtplib.SMTP | None = None
            while True:
                with lock:
                    if not todo:
                        break
                    mid = todo.pop()
                data = load_message(mid)
                deadline = time.monotonic() + MESSAGE_DEADLINE
                while True:
                    if time.monotonic() > deadline:
                        with lock:
                            self.errors.append(f"{mid}: never accepted")
                        break
                    in_data = False
                    try:
                        with lock:
                            self.attempts += 1
                        if conn is None:
                            conn = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                            conn.ehlo("load.test")
                        conn.mail(SENDER)
                        conn.rcpt(RECIPIENT)
                        in_data = True
                        code, text = conn.data(data)
                    except (OSError, smtplib.SMTPException):
                        if in_data:
                            with lock:
                                self.data_failed.setdefault(mid, time.time())
                        if conn is not None:
                            conn.close()
                        conn = None
                        time.sleep(0.05)
                        continue
                    if code == 250:
                        with lock:
                            self.acked[mid] = text.decode().rpartition(" ")[2]
                        break
                    conn.rset()  # 4xx: the same message again
                    time.sleep(0.05)
            if conn is not None:
                conn.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.done.set()


# -- one run ----------------------------------------------------------------


@dataclass
class Kill:
    at: float  # time.time() of the kill
    since_start: float
    acked: int  # acknowledged before the kill
    at_sink: int  # copies at the sink before the kill
    processes: int
    down_s: float  # from the kill until the server accepted connections again


def pending(server: Killable) -> int:
    q = server.queued()
    return sum(q.get(name, 0) for name in PENDING)


def one_run(server: Killable, work: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sink = SinkDir(work)
    try:
        port = server.start(sink.port)
        time.sleep(0.5)  # let start-up work settle, as bench/compare.py does
        load = Load(port, args.messages)
        loader = threading.Thread(target=load.run, daemon=True)
        started = time.time()
        loader.start()
        kills: list[Kill] = []
        while len(kills) < args.kills and not load.done.wait(rng.uniform(0.3, 2.0)):
            at = time.time()
            acked, at_sink = len(load.acked), sink.count()
            processes = server.kill()
            server.restart()
            kills.append(Kill(at, at - started, acked, at_sink, processes, time.time() - at))
        loader.join(600 + 0.1 * args.messages)  # bounded: 600 s + 0.1 s a message
        if loader.is_alive():
            sys.exit(f"bench: {server.name}: the load did not finish")
        load_s = time.time() - started

        # Drain: every acknowledged message at the sink and an empty queue.
        flushes = 0
        drain_start = time.monotonic()
        deadline = drain_start + args.timeout
        last_change, last_seen = time.monotonic(), (-1, -1)
        drained = False
        while time.monotonic() < deadline:
            copies = sink.scan()
            arrived = {c.mid for c in copies.values()}
            waiting = pending(server)
            if set(load.acked) <= arrived and waiting == 0:
                drained = True
                break
            progress = (len(copies), waiting)
            if progress != last_seen:
                last_seen, last_change = progress, time.monotonic()
            elif time.monotonic() - last_change > args.stall:
                server.flush()  # what an operator does after a crash
                flushes += 1
                last_change = time.monotonic()
            time.sleep(0.25)
        drain_s = time.monotonic() - drain_start
        time.sleep(1.0)  # a redelivery in flight at the last check
        copies = sink.scan()
        queue_left = server.queued()
        logs = server.log_counts()
    finally:
        server.stop()
        sink.stop()

    by_mid: dict[str, list[Copy]] = {}
    for c in sorted(copies.values(), key=lambda c: c.index):
        by_mid.setdefault(c.mid, []).append(c)
    resent = redelivered = 0
    per_kill = [{"resent": 0, "redelivered": 0} for _ in kills]
    unattributed = {"resent": 0, "redelivered": 0}
    for mid, cs in by_mid.items():
        qids = [c.queue_id for c in cs]
        n_resent = len(set(qids)) - 1
        resent += n_resent
        if n_resent:
            failed = load.data_failed.get(mid)
            before = [i for i, k in enumerate(kills) if failed is not None and k.at <= failed]
            target = per_kill[before[-1]] if before else unattributed
            target["resent"] += n_resent
        seen: dict[str, Copy] = {}
        for c in cs:
            first = seen.setdefault(c.queue_id, c)
            if first is c:
                continue
            redelivered += 1
            before = [i for i, k in enumerate(kills) if k.at <= c.arrived]
            (per_kill[before[-1]] if before else unattributed)["redelivered"] += 1
    arrived_ids = set(by_mid)
    return {
        "server": server.name,
        "seed": seed,
        "messages": args.messages,
        "acknowledged": len(load.acked),
        "never_acknowledged": len(load.errors),
        "delivered_copies": len(copies),
        "lost": len(set(load.acked) - arrived_ids),
        "unknown": len(arrived_ids - set(load.acked)),
        "torn": sum(not c.whole for c in copies.values()),
        "no_queue_id": sum(not c.queue_id for c in copies.values()),
        "resent": resent,
        "redelivered": redelivered,
        "kills": len(kills),
        "per_kill": [
            {
                "at_s": round(k.since_start, 2),
                "acked_before": k.acked,
                "at_sink_before": k.at_sink,
                "processes": k.processes,
                "down_s": round(k.down_s, 2),
                **f,
            }
            for k, f in zip(kills, per_kill, strict=True)
        ],
        "unattributed": unattributed,
        "load_s": round(load_s, 1),
        "client_attempts": load.attempts,
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "flushes": flushes,
        "queue_left": queue_left,
        "log": logs,
    }


# -- report -----------------------------------------------------------------


RESENT, REDELIVERED, DOWN = "resent", "redelivered", "down_s"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | seed | server | acked | lost | resent | redelivered | kills "
        "| per kill resent / redelivered | down s per kill | flushes | drained in s |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        pk = r["per_kill"]
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['server']} | {r['acknowledged']} | {r['lost']} "
            f"| {r['resent']} | {r['redelivered']} | {r['kills']} "
            f"| {' '.join(f'{k[RESENT]}/{k[REDELIVERED]}' for k in pk)} "
            f"| {' '.join(f'{k[DOWN]:.1f}' for k in pk)} "
            f"| {r['flushes']} | {r['drain_s']:.1f} |"
        )
    lines += [
        "",
        "| server | runs | kills | lost | resent | redelivered "
        "| resent per kill | redelivered per kill: mean (min-max over kills) |",
        "|" + " --- |" * 8,
    ]
    for name in dict.fromkeys(r["server"] for r in results):
        rows = [r for r in results if r["server"] == name]
        kills = sum(r["kills"] for r in rows)
        red = [k["redelivered"] for r in rows for k in r["per_kill"]]
        resent = sum(r["resent"] for r in rows)
        redelivered = sum(r["redelivered"] for r in rows)
        lines.append(
            f"| {name} | {len(rows)} | {kills} | {sum(r['lost'] for r in rows)} "
            f"| {resent} | {redelivered} "
            f"| {resent / kills if kills else float('nan'):.1f} "
            f"| {statistics.fmean(red) if red else float('nan'):.1f} "
            f"({min(red, default=0)}-{max(red, default=0)}) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=2000, help="per run and server")
    p.add_argument("--kills", type=int, default=4, help="SIGKILLs per run (at most)")
    p.add_argument("--repeat", type=int, default=1, help="runs per server")
    p.add_argument("--seed", type=int, default=1, help="run i uses SEED + i, for both servers")
    p.add_argument("--only", default="postfix,mta", help="servers, in order")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the drain")
    p.add_argument(
        "--stall", type=float, default=15, help="seconds without progress before a flush"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument("--json", help="also write all results to this file")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (Postfix's master starts as root)")
    raise_fd_limit(65536)
    makers: dict[str, type[KillablePostfix] | type[KillableMta]] = {
        "postfix": KillablePostfix,
        "mta": KillableMta,
    }
    names = [n for n in args.only.split(",") if n]
    if unknown := set(names) - set(makers):
        sys.exit(f"bench: unknown servers {sorted(unknown)}")
    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for name in names:
            with workdir(args.keep) as work:
                server: Killable = makers[name](work)
                result = {"run": rep, **one_run(server, work, args, args.seed + rep)}
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    if any(r["lost"] or not r["drained"] for r in results):
        sys.exit("bench: acknowledged messages lost or not drained")


if __name__ == "__main__":
    main()
