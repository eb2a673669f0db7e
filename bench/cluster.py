"""Two mta instances behind HAProxy against one mta direct and Postfix.

    python bench/cluster.py [--messages 20000] [--repeat 1] [--only 2k-20-1,...]
                            [--json out.json] [--keep]

For each scenario (default 2k-20-1: 2 KB messages, 20 concurrent
sessions, one message per session; any of bench/compare.py's matrix can be
named), it runs, one after the other in the same minute, each relaying to
its own fresh smtp-sink and loaded by the same smtp-source:

  1. a fresh private Postfix (bench/compare.py's PostfixServer);
  2. one fresh mta daemon, direct (bench/compare.py's MtaServer);
  3. a cluster: a private redis-server (its own config file, append-only
     file with appendfsync everysec), two mta daemons (each its own spool,
     a PROXY listener, [cluster] redis) and a private HAProxy in TCP mode
     with send-proxy-v2 and health checks on each daemon's /health
     (tests/haproxy.py's configuration), smtp-source connecting to HAProxy.

and measures as bench/compare.py does (accepted and delivered msg/s,
probe latency, peak RSS/PSS, CPU s per 1,000 messages), the CPU and
memory summed over every process of the set-up: for the cluster, both
daemons, HAProxy and Redis.  The table shows the three side by side.

smtp-source speaks neither TLS nor AUTH, so, as in compare.py, its
address (127.0.0.1) is in [auth] trusted_networks: such clients have no
login and are not counted, and Redis is asked nothing per message here.
What Redis costs an authenticated submission (one GET at MAIL, one at the
end of data, one EVAL after the commit, two round trips of AUTH
checks) is therefore not in these figures; its CPU is counted all the same.

Needs root (Postfix), Debian's postfix, haproxy and redis-server packages,
and the project's virtualenv.  Everything stays on 127.0.0.1; no system
service is touched (every daemon here is a private one, on free ports).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare import (
    MATRIX,
    MtaServer,
    PostfixServer,
    Probe,
    Sampler,
    Scenario,
    Sink,
    cpu_of,
    descendants,
    drive,
    pss_bytes,
    raise_fd_limit,
    ratio,
    rss_bytes,
    workdir,
)
from bench.run import free_port, mta_command, need, percentile, wait_port
from tests.haproxy import Backend, config_text

INSTANCE_CONFIG = """\
[server]
hostname = "{name}.bench.localhost"
spool = "spool"
users_file = "users.json"
[listen]
submissions = []
submission = ["tcp:{direct_port}:interface=127.0.0.1"]
proxy_submission = ["tcp:{proxy_port}:interface=127.0.0.1"]
proxy_from = ["127.0.0.1/32"]
[auth]
trusted_networks = ["127.0.0.1/32"]
[limits]
connections_per_ip = 1000
[delivery]
dns_servers = ["127.0.0.1"]
dns_port = {dns_port}
destination_concurrency = 20
[metrics]
listen = ["tcp:{metrics_port}:interface=127.0.0.1"]
[cluster]
redis = "tcp:host=127.0.0.1:port={redis_port}"
instance = "{name}"
[routes]
"*" = "[127.0.0.1]:{sink_port}"
"""

REDIS_CONFIG = """\
bind 127.0.0.1
port {port}
daemonize no
dir {dir}
save ""
appendonly yes
appendfsync everysec
logfile {dir}/redis.log
"""


class ClusterServer:
    """Redis, two mta instances and HAProxy; every process is a root to count."""

    name = "cluster"

    def __init__(self, work: str, instances: int = 2) -> None:
        self.work = os.path.join(work, "cluster")
        self.instances = instances
        self._procs: list[subprocess.Popen[bytes]] = []  # counted: redis, mta..., haproxy
        self._loggers: list[subprocess.Popen[bytes]] = []  # not counted (as in compare.py)
        self._stats = os.path.join(self.work, "haproxy.sock")

    def _spawn(self, argv: list[str], cwd: str, log: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        self._procs.append(proc)
        return proc

    def start(self, sink_port: int) -> int:
        os.makedirs(self.work)
        redis_port = free_port()
        redis_dir = os.path.join(self.work, "redis")
        os.makedirs(redis_dir)
        with open(os.path.join(redis_dir, "redis.conf"), "w") as f:
            f.write(REDIS_CONFIG.format(port=redis_port, dir=redis_dir))
        self._spawn(
            [need("redis-server"), "redis.conf"], redis_dir, os.path.join(redis_dir, "out.log")
        )
        wait_port(redis_port)
        backends = []
        for i in range(self.instances):
            name = f"mta-{chr(ord('a') + i)}"
            home = os.path.join(self.work, name)
            os.makedirs(home)
            ports = {
                "direct_port": free_port(),
                "proxy_port": free_port(),
                "metrics_port": free_port(),
            }
            config = os.path.join(home, "mta.toml")
            with open(config, "w") as f:
                f.write(
                    INSTANCE_CONFIG.format(
                        name=name, dns_port=free_port(), redis_port=redis_port,
                        sink_port=sink_port, **ports,
                    )
                )  # fmt: skip
            with open(os.path.join(home, "mta.log"), "wb") as log:
                logger = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
                self._loggers.append(logger)
                daemon = subprocess.Popen(
                    mta_command(config), cwd=home, stdout=logger.stdin, stderr=subprocess.STDOUT
                )
                assert logger.stdin is not None
                logger.stdin.close()
            self._procs.append(daemon)
            wait_port(ports["proxy_port"])
            wait_port(ports["metrics_port"])
            backends.append(
                Backend(name, ports["proxy_port"], ports["proxy_port"], ports["metrics_port"])
            )
        tls_port, port = free_port(), free_port()
        cfg = os.path.join(self.work, "haproxy.cfg")
        with open(cfg, "w") as f:
            text = config_text(backends, tls_port, port, inter="500ms")
            text = text.replace(
                "    maxconn 2000", f"    maxconn 4000\n    stats socket {self._stats}"
            )
            f.write(text)
        self._spawn([need("haproxy"), "-db", "-f", cfg], self.work, cfg + ".log")
        wait_port(port)
        self._wait_all_up(len(backends))
        return port

    def _wait_all_up(self, n: int, timeout: float = 30.0) -> None:
        """Until HAProxy's health checks have every instance of the STARTTLS backend UP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self._stats)
                    s.sendall(b"show stat\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
            except OSError:
                data = b""
            rows = [r.split(",") for r in data.decode().splitlines()]
            up = [r for r in rows if len(r) > 17 and r[0] == "mta_submission" and r[17] == "UP"]
            if len(up) == n:
                return
            time.sleep(0.1)
        sys.exit("bench: HAProxy did not see every mta instance UP")

    def root_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self) -> None:
        for proc in reversed(self._procs):  # HAProxy first, Redis last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for logger in self._loggers:
            logger.wait(timeout=30)


class _Roots(Sampler):
    """bench/compare.py's Sampler over several process trees at once."""

    def __init__(self, roots: list[int]) -> None:
        super().__init__(roots[0])
        self.roots = roots

    def sample(self) -> None:
        pids = [p for root in self.roots for p in descendants(root)]
        self.peak_processes = max(self.peak_processes, len(pids))
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in pids))
        self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))


def roots_of(server: Any) -> list[int]:
    if isinstance(server, ClusterServer):
        return server.root_pids()
    return [server.root_pid()]


def one_run(server: Any, sc: Scenario, messages: int, timeout: float) -> dict[str, Any]:
    """bench/compare.py's one_run, over every process of the set-up."""
    sink = Sink()
    try:
        port = server.start(sink.port)
        time.sleep(0.5)  # let start-up work settle
        roots = roots_of(server)
        sampler = _Roots(roots)
        sampler.sample()
        cpu0 = {root: cpu_of(root) for root in roots}
        probe = Probe(port, sc.size)
        accepted_s, delivered_s, want, delivered = drive(
            port, sc, messages, timeout, sink, probe, sampler
        )
        cpu = {root: cpu_of(root) - cpu0[root] for root in roots}
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
            },
            "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
            "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
            "cpu_s_per_1000": round(sum(cpu.values()) / messages * 1000, 3),
        }
        if isinstance(server, ClusterServer):
            names = ["redis", *[f"mta-{chr(ord('a') + i)}" for i in range(server.instances)]]
            names.append("haproxy")
            result["cpu_s_per_1000_by_process"] = {
                name: round(cpu[root] / messages * 1000, 3)
                for name, root in zip(names, roots, strict=True)
            }
        return result
    finally:
        server.stop()
        sink.stop()


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | run | delivered msg/s: 2 mta + HAProxy / 1 mta / Postfix "
        "| accepted msg/s | p99 latency ms | CPU s/1000 (all processes) | peak PSS MiB "
        "| cluster CPU s/1000: Redis / mta-a / mta-b / HAProxy |"
    )
    lines = [head, "|" + " --- |" * 7]
    for r in results:
        c, m, p = r["cluster"], r["mta"], r["postfix"]
        by = c["cpu_s_per_1000_by_process"]
        lines.append(
            f"| {r['scenario']} | {r['repeat']} "
            f"| {c['delivered_msg_s']:.0f} / {m['delivered_msg_s']:.0f} / "
            f"{p['delivered_msg_s']:.0f}"
            f" ({ratio(c['delivered_msg_s'], m['delivered_msg_s']):.2f}x one mta, "
            f"{ratio(c['delivered_msg_s'], p['delivered_msg_s']):.2f}x Postfix) "
            f"| {c['accepted_msg_s']:.0f} / {m['accepted_msg_s']:.0f} / {p['accepted_msg_s']:.0f} "
            f"| {c['latency_ms']['p99']:.0f} / {m['latency_ms']['p99']:.0f} / "
            f"{p['latency_ms']['p99']:.0f} "
            f"| {c['cpu_s_per_1000']:.2f} / {m['cpu_s_per_1000']:.2f} / {p['cpu_s_per_1000']:.2f} "
            f"| {c['peak_pss_mib']:.0f} / {m['peak_pss_mib']:.0f} / {p['peak_pss_mib']:.0f} "
            f"| {' / '.join(f'{v:.2f}' for v in by.values())} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=20000, help="per scenario and set-up")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--only", default="2k-20-1", help="comma-separated scenario names")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for delivery")
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument("--json", help="also write all results to this file")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (Postfix's master starts as root)")
    raise_fd_limit(65536)
    wanted = {n for n in args.only.split(",") if n}
    scenarios = [s for s in MATRIX if s.name in wanted]
    if not scenarios:
        sys.exit(f"bench: no scenario among {sorted(wanted)}; see bench/compare.py's MATRIX")
    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for sc in scenarios:
            row: dict[str, Any] = {"scenario": sc.name, "repeat": rep, "messages": args.messages}
            for make in (PostfixServer, MtaServer, ClusterServer):
                with workdir(args.keep) as work:
                    server = make(work)
                    row[server.name] = one_run(server, sc, args.messages, args.timeout)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
