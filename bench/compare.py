"""Side by side: mta against a private Postfix, same load, same sink, same run.

    python bench/compare.py [--messages 20000] [--repeat 1] [--only 2k-20-1,...]
                            [--json out.json]

For every scenario of the matrix (2 KB and 50 KB messages x 20 and 100
concurrent sessions x 1 and 100 messages per session) it runs, one after
the other in the same minute:

  1. a fresh private Postfix (Debian's postfix package, built from scratch
     in a temporary directory: its own config_directory, queue_directory
     and data_directory, loopback only, no local delivery, relaying
     everything to the sink), then
  2. a fresh mta daemon (twistd) whose route for every domain is the sink,

each loaded by Postfix's smtp-source and relaying to its own, newly started
smtp-sink (the same program for both; its -c counter counts the messages
that reached it).  For each it measures:

  - accepted msg/s: messages (the load's and the probe's) / seconds until
    the load generator finished (every message had its 250);
  - delivered msg/s: messages that reached the sink / seconds from the
    start of the load until the last one arrived;
  - submission latency (connect to the 250 after DATA): a probe client
    submits one message of the same size at a time, alongside the load,
    and times each whole session up to the 250 (p50/p99/max), one every
    100 ms;
  - peak memory: the largest sum over all the server's processes of RSS
    (and of PSS, which does not count shared pages twice), sampled every
    0.25 s; for mta also the kernel's VmHWM;
  - CPU seconds per 1,000 messages over all the server's processes
    (exited Postfix processes are counted through the master's cutime).

It prints a table of the ratios mta / Postfix per scenario and the raw
figures as JSON.  Needs root (Postfix's master runs as root and switches to
the postfix user), Debian's postfix package and the project's virtualenv.
Everything stays on 127.0.0.1; the system's own Postfix, if any, is not
touched (the private one has its own directories and ports).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import (
    BIN,
    free_port,
    mta_command,
    need,
    percentile,
    postfix_directories,
    wait_port,
)

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SENDER = "bench@bench.example"
RECIPIENT = "sink@bench.example"


@dataclass(frozen=True)
class Scenario:
    size: int  # bytes per message
    sessions: int  # concurrent sessions
    per_session: int  # messages per session

    @property
    def name(self) -> str:
        return f"{self.size // 1024}k-{self.sessions}-{self.per_session}"


MATRIX = [
    Scenario(size, sessions, per)
    for size in (2048, 51200)
    for sessions in (20, 100)
    for per in (1, 100)
]


# -- processes --------------------------------------------------------------


def proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    tree = proc_children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_total(pid: int) -> float:
    """utime + stime + cutime + cstime (waited-for children included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICKS


def hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Server(Protocol):
    name: str

    def start(self, sink_port: int) -> int: ...  # returns the SMTP port
    def root_pid(self) -> int: ...
    def stop(self) -> None: ...


# -- the sink ---------------------------------------------------------------


class Sink:
    """smtp-sink with its running counter (-c) read from its stdout."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self._proc = subprocess.Popen(
            [need("smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        buf = b""
        while chunk := os.read(self._proc.stdout.fileno(), 4096):
            buf += chunk
            *lines, buf = buf.split(b"\r")
            for line in reversed(lines):
                if b"mesg=" in line:
                    self.count = int(line.rsplit(b"mesg=", 1)[1])
                    break

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


# -- the two servers --------------------------------------------------------

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {work}/queue
data_directory = {work}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = postfix-bench.localhost
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
maillog_file_prefixes = {work}
maillog_file = {work}/maillog
biff = no
# 100 sessions and the latency probe must fit (the default is 100).
default_process_limit = 150
"""

POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixServer:
    name = "postfix"

    def __init__(self, work: str) -> None:
        self.work = os.path.join(work, "postfix")
        self.conf = os.path.join(self.work, "etc")
        self._master = 0

    def start(self, sink_port: int) -> int:
        port = free_port()
        os.makedirs(self.conf)
        os.makedirs(os.path.join(self.work, "queue"))
        os.makedirs(os.path.join(self.work, "data"))
        shutil.chown(os.path.join(self.work, "data"), "postfix", "postfix")
        for path in (os.path.dirname(self.work), self.work):
            os.chmod(path, 0o755)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN.format(work=self.work, sink_port=sink_port))
            f.write(postfix_directories())
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER.format(port=port))
        self._postfix("start")
        wait_port(port)
        with open(os.path.join(self.work, "queue", "pid", "master.pid")) as f:
            self._master = int(f.read().strip())
        return port

    def _postfix(self, command: str) -> None:
        subprocess.run(
            [need("postfix"), "-c", self.conf, command],
            check=True,
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def root_pid(self) -> int:
        return self._master

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.conf, "main.cf")):
            with contextlib.suppress(subprocess.SubprocessError):
                self._postfix("stop")
        if self._master:
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{self._master}") and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._master, signal.SIGKILL)


MTA_CONFIG = """\
[server]
hostname = "mta-bench.localhost"
spool = "spool"
users_file = "users.json"
[listen]
submissions = ["tcp:{tls_port}:interface=127.0.0.1"]
submission = ["tcp:{port}:interface=127.0.0.1"]
[auth]
trusted_networks = ["127.0.0.1/32"]
[limits]
connections_per_ip = 1000
[delivery]
dns_servers = ["127.0.0.1"]
dns_port = {dns_port}
destination_concurrency = 20
[routes]
"*" = "[127.0.0.1]:{sink_port}"
"""


class MtaServer:
    name = "mta"

    def __init__(self, work: str, python: str | None = None) -> None:
        self.work = os.path.join(work, "mta")
        self._daemon: subprocess.Popen[bytes] | None = None
        self._logger: subprocess.Popen[bytes] | None = None
        self._python = python

    def start(self, sink_port: int) -> int:
        os.makedirs(self.work)
        port = free_port()
        config = os.path.join(self.work, "mta.toml")
        with open(config, "w") as f:
            f.write(
                MTA_CONFIG.format(
                    tls_port=free_port(), port=port, dns_port=free_port(), sink_port=sink_port
                )
            )
        with open(os.path.join(self.work, "mta.log"), "wb") as log:
            # The log goes through a pipe to a separate writer, as it would to
            # journald (and as Postfix's goes to its postlogd): a write to a
            # file on the spool's file system can stall behind its fsyncs.
            self._logger = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
            self._daemon = subprocess.Popen(
                mta_command(config),
                cwd=self.work,
                stdout=self._logger.stdin,
                stderr=subprocess.STDOUT,
            )
            assert self._logger.stdin is not None
            self._logger.stdin.close()
        wait_port(port)
        return port

    def root_pid(self) -> int:
        assert self._daemon is not None
        return self._daemon.pid

    def stop(self) -> None:
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.send_signal(signal.SIGTERM)
            try:
                self._daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait()
        if self._logger is not None:
            self._logger.wait(timeout=30)


# -- load, probe, sampler ---------------------------------------------------


def smtp_source(port: int, size: int, sessions: int, messages: int, reuse: bool) -> None:
    cmd = [
        need("smtp-source"),
        "-s", str(sessions),
        "-l", str(size),
        "-m", str(messages),
        "-f", SENDER,
        "-t", RECIPIENT,
        "-M", "bench.example",
    ]  # fmt: skip
    if reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    subprocess.run(cmd, check=True, timeout=3600, stdout=subprocess.DEVNULL)


def load(port: int, sc: Scenario, messages: int) -> None:
    """smtp-source has no "messages per session" option: for 1, one process
    with one connection per message; for more, `sessions` workers each
    running smtp-source -s 1 -d -m per_session until their share is sent."""
    if sc.per_session == 1:
        smtp_source(port, sc.size, sc.sessions, messages, reuse=False)
        return
    runs = messages // sc.per_session
    shares = [runs // sc.sessions + (i < runs % sc.sessions) for i in range(sc.sessions)]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for _ in range(n):
                smtp_source(port, sc.size, 1, sc.per_session, reuse=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


STEP_NAMES = ("greeting", "ehlo", "mail", "rcpt", "data", "message")


class Probe(threading.Thread):
    """One session at a time: connect, EHLO, MAIL, RCPT, DATA, body, '.' and
    the time until the 250; then QUIT and the next one after 100 ms."""

    def __init__(self, port: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        line = b"X" * 78 + b"\r\n"
        head = b"From: probe@bench.example\r\nTo: sink@bench.example\r\nSubject: probe\r\n\r\n"
        self.body = head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"
        self.latencies: list[float] = []
        # Per step (greeting, EHLO, MAIL, RCPT, DATA, the message up to its
        # 250): where a session's time goes.
        self.steps: list[list[float]] = [[] for _ in STEP_NAMES]
        self.failures = 0
        self.stopping = threading.Event()

    @staticmethod
    def _reply(f: Any) -> bytes:
        while True:
            line = f.readline(1024)
            if len(line) < 4:
                raise OSError(f"bad reply {line!r}")
            if line[3:4] != b"-":
                return bytes(line)

    def _one(self) -> float:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
            f = s.makefile("rb")
            steps: list[tuple[bytes, bytes]] = [
                (b"", b"2"),
                (b"EHLO probe.bench.example\r\n", b"2"),
                (b"MAIL FROM:<probe@bench.example>\r\n", b"2"),
                (f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"2"),
                (b"DATA\r\n", b"3"),
                (self.body, b"2"),
            ]
            times = []
            for send, want in steps:
                if send:
                    s.sendall(send)
                reply = self._reply(f)
                if not reply.startswith(want):
                    raise OSError(f"unexpected reply {reply!r}")
                times.append(time.monotonic())
            took = time.monotonic() - start
            for i, (a, b) in enumerate(itertools.pairwise([start, *times])):
                self.steps[i].append(b - a)
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
                self._reply(f)
        return took

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.latencies.append(self._one())
            except OSError:
                self.failures += 1
            self.stopping.wait(0.1)


class Sampler(threading.Thread):
    """The largest sums of RSS and PSS over the server's processes."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.stopping = threading.Event()

    def sample(self) -> None:
        pids = descendants(self.root)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in pids))
        self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            self.sample()


def cpu_of(root: int) -> float:
    return sum(cpu_total(p) for p in descendants(root))


def py_spy(pid: int, out: str, gil: bool = False) -> subprocess.Popen[bytes]:
    """py-spy sampling the daemon (all threads, raw collapsed stacks) until SIGINT;
    with C{gil}, only the samples of the thread holding the GIL."""
    cmd = [os.path.join(BIN, "py-spy"), "record", "--pid", str(pid), "--rate", "200"]
    cmd += ["--format", "raw", "--output", out, "--nonblocking", "--threads"]
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


SYSCALLS = (
    "fsync", "fdatasync", "syncfs", "openat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
    "write", "writev", "sendto", "recvfrom", "read", "futex", "epoll_wait",
)  # fmt: skip


def strace(root: int, out: str) -> subprocess.Popen[bytes]:
    """strace -f -c on every process of the server (Postfix's children too, as
    they are forked) until SIGINT; the summary goes to C{out}."""
    cmd = ["strace", "-f", "-c", "-o", out]
    for pid in [root, *descendants(root)]:
        cmd += ["-p", str(pid)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    return proc


def syscall_counts(path: str) -> dict[str, int]:
    """The calls column of an strace -c summary, by system call."""
    counts: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1].isidentifier():
                calls = parts[3]
                if calls.isdigit():
                    counts[parts[-1]] = int(calls)
    return counts


def drive(
    port: int,
    sc: Scenario,
    messages: int,
    timeout: float,
    sink: Sink,
    probe: Probe,
    sampler: threading.Thread,
) -> tuple[float, float, int, int]:
    """Start the sampler and the probe, run the load against C{port}, and
    wait (up to C{timeout}) for the sink to have every message: the seconds
    to the last 250 and to the last delivery, the messages expected and
    those delivered.  The probe's messages are real ones too: both rates
    count them."""
    start = time.monotonic()
    sampler.start()
    probe.start()
    load(port, sc, messages)
    accepted_s = time.monotonic() - start
    probe.stopping.set()
    probe.join()
    want = messages + len(probe.latencies)
    deadline = time.monotonic() + timeout
    while sink.count < want and time.monotonic() < deadline:
        time.sleep(0.02)
    return accepted_s, time.monotonic() - start, want, sink.count


def one_run(
    server: Server,
    sc: Scenario,
    messages: int,
    timeout: float,
    profile: str = "",
    gil: bool = False,
    syscalls: str = "",
) -> dict[str, Any]:
    sink = Sink()
    spy: subprocess.Popen[bytes] | None = None
    tracer: subprocess.Popen[bytes] | None = None
    try:
        port = server.start(sink.port)
        time.sleep(0.5)  # let start-up work settle
        root = server.root_pid()
        sampler = Sampler(root)
        sampler.sample()
        cpu0 = cpu_of(root)
        probe = Probe(port, sc.size)
        if profile and isinstance(server, MtaServer):
            os.makedirs(profile, exist_ok=True)  # py-spy fails silently without it
            spy = py_spy(root, os.path.join(profile, f"{sc.name}.txt"), gil)
            time.sleep(1)
        if syscalls:
            tracer = strace(root, syscalls)
        accepted_s, delivered_s, want, delivered = drive(
            port, sc, messages, timeout, sink, probe, sampler
        )
        cpu = cpu_of(root) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=120)
        sampler.stopping.set()
        sampler.join()
        sampler.sample()
        result: dict[str, Any] = {
            "accepted_msg_s": round(want / accepted_s, 1),
            "delivered": delivered,
            "expected": want,
            "delivered_msg_s": round(delivered / delivered_s, 1),
            "latency_ms": {
                "samples": len(probe.latencies),
                "failures": probe.failures,
                "p50": round(percentile(probe.latencies, 50) * 1000, 1),
                "p99": round(percentile(probe.latencies, 99) * 1000, 1),
                "max": round(max(probe.latencies, default=float("nan")) * 1000, 1),
                "p50_by_step": {
                    name: round(percentile(times, 50) * 1000, 1)
                    for name, times in zip(STEP_NAMES, probe.steps, strict=True)
                },
            },
            "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
            "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
            "peak_processes": sampler.peak_processes,
            "cpu_s_per_1000": round(cpu / messages * 1000, 3),
        }
        if isinstance(server, MtaServer):
            result["vmhwm_mib"] = round(hwm_bytes(root) / 2**20, 1)
        if syscalls:
            counts = syscall_counts(syscalls)
            result["syscalls_per_message"] = {
                name: round(counts.get(name, 0) / max(delivered, 1), 2) for name in SYSCALLS
            }
        return result
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        server.stop()
        sink.stop()


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[str]:
    work = tempfile.mkdtemp(prefix="mta-compare-")
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=20000, help="per scenario and server")
    p.add_argument("--repeat", type=int, default=1, help="runs of the whole matrix")
    p.add_argument("--only", default="", help="comma-separated scenario names, e.g. 2k-20-100")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for delivery")
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument(
        "--profile",
        default="",
        help="directory: record py-spy profiles of the mta daemon (SCENARIO.txt, raw stacks)",
    )
    p.add_argument(
        "--gil", action="store_true", help="with --profile: sample only the thread holding the GIL"
    )
    p.add_argument("--mta-only", action="store_true", help="skip Postfix (for profiling)")
    p.add_argument(
        "--strace",
        action="store_true",
        help="count system calls per delivered message with strace -f -c (slows both down: "
        "use a separate, small run, e.g. --messages 2000)",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (Postfix's master starts as root)")
    raise_fd_limit(65536)
    wanted = {n for n in args.only.split(",") if n}
    scenarios = [s for s in MATRIX if not wanted or s.name in wanted]
    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for sc in scenarios:
            row: dict[str, Any] = {"scenario": sc.name, "repeat": rep, "messages": args.messages}
            makers: list[type[PostfixServer] | type[MtaServer]] = [PostfixServer, MtaServer]
            for make in makers[1:] if args.mta_only else makers:
                with workdir(args.keep) as work:
                    server: Server = make(work)
                    trace = os.path.join(work, "strace.txt") if args.strace else ""
                    row[server.name] = one_run(
                        server, sc, args.messages, args.timeout, args.profile, args.gil, trace
                    )
            if args.mta_only:
                print(json.dumps(row), flush=True)
                continue
            m, pf = row["mta"], row["postfix"]
            row["ratio"] = {
                "delivered": ratio(m["delivered_msg_s"], pf["delivered_msg_s"]),
                "accepted": ratio(m["accepted_msg_s"], pf["accepted_msg_s"]),
                "peak_rss": ratio(m["peak_rss_mib"], pf["peak_rss_mib"]),
                "p99_latency": ratio(m["latency_ms"]["p99"], pf["latency_ms"]["p99"]),
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if results:
        print(table(results))
        if args.strace:
            print(syscall_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


def syscall_table(results: list[dict[str, Any]]) -> str:
    """System calls per delivered message, mta beside Postfix (from --strace)."""
    # syncfs: mta's group barrier (one per group commit, [spool] barrier).
    names = ("fsync", "fdatasync", "syncfs", "openat", "rename", "mkdir", "write", "futex")
    head = "| scenario | server | " + " | ".join(names) + " |"
    rows = [head, "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for row in results:
        for server in ("mta", "postfix"):
            per = row[server].get("syscalls_per_message", {})
            renames = sum(per.get(n, 0) for n in ("rename", "renameat", "renameat2"))
            mkdirs = per.get("mkdir", 0) + per.get("mkdirat", 0)
            values = {**per, "rename": round(renames, 2), "mkdir": round(mkdirs, 2)}
            cells = " | ".join(f"{values.get(n, 0):.2f}" for n in names)
            rows.append(f"| {row['scenario']} | {server} | {cells} |")
    return "\n".join(rows)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | run | delivered msg/s mta / postfix (ratio) "
        "| accepted msg/s mta / postfix (ratio) "
        "| p99 latency ms mta / postfix | peak RSS MiB mta / postfix (ratio) "
        "| CPU s/1000 mta / postfix |"
    )
    lines = [head, "|" + " --- |" * 7]
    for r in results:
        m, pf, q = r["mta"], r["postfix"], r["ratio"]
        lines.append(
            f"| {r['scenario']} | {r['repeat']} "
            f"| {m['delivered_msg_s']:.0f} / {pf['delivered_msg_s']:.0f} ({q['delivered']:.2f}) "
            f"| {m['accepted_msg_s']:.0f} / {pf['accepted_msg_s']:.0f} ({q['accepted']:.2f}) "
            f"| {m['latency_ms']['p99']:.0f} / {pf['latency_ms']['p99']:.0f} "
            f"| {m['peak_rss_mib']:.0f} / {pf['peak_rss_mib']:.0f} ({q['peak_rss']:.2f}) "
            f"| {m['cpu_s_per_1000']:.2f} / {pf['cpu_s_per_1000']:.2f} |"
        )
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["scenario"], []).append(r)
    if any(len(v) > 1 for v in by_name.values()):
        lines.append("")
        lines.append(
            "| scenario | delivered ratio median (min-max) | accepted ratio median (min-max) |"
        )
        lines.append("| --- | --- | --- |")
        for name, rows in by_name.items():
            d = [r["ratio"]["delivered"] for r in rows]
            a = [r["ratio"]["accepted"] for r in rows]
            lines.append(
                f"| {name} | {statistics.median(d):.2f} ({min(d):.2f}-{max(d):.2f}) "
                f"| {statistics.median(a):.2f} ({min(a):.2f}-{max(a):.2f}) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
