"""Throughput benchmark: smtp-source -> mta -> smtp-sink, all on loopback.

    python bench/run.py [--messages 20000] [--sessions 20] [--size 2048]
                        [--new-connections] [--json result.json]

Starts Postfix's smtp-sink, measures smtp-source straight into it (the
reference run: what this machine does without an MTA in between), then
starts a real mta daemon (twistd) whose route for every domain is the
sink, loads it with smtp-source over the STARTTLS listener from a trusted
loopback network (smtp-source speaks neither TLS nor AUTH), and waits
until every message has been delivered.  It prints:

  - accepted msg/s: messages / time smtp-source took;
  - delivered msg/s: messages / time from the first message sent to the
    last one in done/;
  - delivery latency percentiles from the daemon's Postfix-shaped log
    (delay=: arrival to delivery);
  - CPU seconds of the daemon per 1,000 messages, and its peak RSS;
  - the ratios of the rates to the reference run.

Needs Debian's postfix package (for smtp-source and smtp-sink) and the
project's virtualenv (`make install`).  Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TICKS = os.sysconf("SC_CLK_TCK")


def mta_command(config: str) -> list[str]:
    """The daemon under test, in the foreground, on a configuration file.

    C{MTA_BENCH_CPROFILE=FILE} runs it under twistd's cProfile (C{--profile
    FILE --profiler cprofile --savestats}: pstats written when it stops),
    for call counts per message, which py-spy's samples do not give."""
    profile = os.environ.get("MTA_BENCH_CPROFILE")
    extra = ["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []
    return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", *extra, "mta", "--config", config]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POSTFIX_PACKAGE = os.path.join(REPO, "bench", "out", "postfix-package")


def postfix_tree() -> str:
    """Where Postfix's programs are: "" when Debian's postfix package is
    installed, else the root of that package unpacked into bench/out/.

    The tests need Debian's exim4 (a real sender of BDAT), and Debian
    installs only one mail transport agent at a time; unpacked, Postfix's
    programs run beside an installed exim.  The environment is set so that
    they find their libraries.
    """
    if os.path.exists("/usr/sbin/postfix"):
        return ""
    root = POSTFIX_PACKAGE
    if not os.path.exists(os.path.join(root, "usr", "sbin", "postfix")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "postfix"], cwd=tmp, check=True,
                           capture_output=True)  # fmt: skip
            [deb] = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".deb")]
            os.makedirs(root, exist_ok=True)
            subprocess.run(["dpkg", "-x", deb, root], check=True)
    for group in ("postfix", "postdrop"):
        subprocess.run(["groupadd", "--system", group], check=False, capture_output=True)
    subprocess.run(["useradd", "--system", "-g", "postfix", "-d", "/nonexistent", "-s",
                    "/usr/sbin/nologin", "postfix"], check=False, capture_output=True)  # fmt: skip
    os.environ["PATH"] = os.path.join(root, "usr", "sbin") + os.pathsep + os.environ["PATH"]
    os.environ["LD_LIBRARY_PATH"] = os.path.join(root, "usr", "lib", "postfix")
    return root


def postfix_directories() -> str:
    """main.cf lines for an unpacked Postfix (L{postfix_tree}); "" for the installed one."""
    root = postfix_tree()
    if not root:
        return ""
    return (
        f"command_directory = {root}/usr/sbin\n"
        f"daemon_directory = {root}/usr/lib/postfix/sbin\n"
        f"meta_directory = {root}/etc/postfix\n"
        f"shlib_directory = {root}/usr/lib/postfix\n"
        "import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE "
        "POSTLOG_HOSTNAME LD_LIBRARY_PATH\n"
    )


def need(program: str) -> str:
    postfix_tree()
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if path is None:
        sys.exit(f"bench: {program} not found; install Debian's postfix package")
    return path


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def smtp_source(port: int, args: argparse.Namespace) -> float:
    """Run smtp-source; returns the seconds it took."""
    cmd = [
        need("smtp-source"),
        "-s", str(args.sessions),
        "-l", str(args.size),
        "-m", str(args.messages),
        "-f", "bench@bench.example",
        "-t", "sink@bench.example",
        "-M", "bench.example",
    ]  # fmt: skip
    if not args.new_connections:
        cmd.append("-d")  # keep each session open for further messages
    cmd.append(f"127.0.0.1:{port}")
    start = time.monotonic()
    subprocess.run(cmd, check=True, timeout=3600)
    return time.monotonic() - start


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="mta-bench-")
    sink_port, smtp_port, tls_port = free_port(), free_port(), free_port()
    sink = subprocess.Popen(
        [need("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = None
    try:
        wait_port(sink_port)
        reference = smtp_source(sink_port, args)
        config = os.path.join(work, "mta.toml")
        with open(config, "w") as f:
            f.write(
                f"""
[server]
hostname = "bench.localhost"
spool = "spool"
users_file = "users.json"
[listen]
submissions = ["tcp:{tls_port}:interface=127.0.0.1"]
submission = ["tcp:{smtp_port}:interface=127.0.0.1"]
[auth]
trusted_networks = ["127.0.0.1/32"]
[limits]
connections_per_ip = 1000
[delivery]
dns_servers = ["127.0.0.1"]
dns_port = {free_port()}
destination_concurrency = {args.concurrency}
[routes]
"*" = "[127.0.0.1]:{sink_port}"
"""
            )
        log_path = os.path.join(work, "mta.log")
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                mta_command(config),
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(smtp_port)
        done_dir = os.path.join(work, "spool", "done")
        cpu_before = cpu_seconds(daemon.pid)
        start = time.monotonic()
        accept_seconds = smtp_source(smtp_port, args)
        deadline = time.monotonic() + args.timeout
        delivered = 0
        while time.monotonic() < deadline:
            delivered = len(os.listdir(done_dir))
            if delivered >= args.messages:
                break
            time.sleep(0.1)
        end_to_end = time.monotonic() - start
        cpu = cpu_seconds(daemon.pid) - cpu_before
        rss = peak_rss_mib(daemon.pid)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            delays = [
                float(m.group(1))
                for m in re.finditer(
                    r"delay=([0-9.]+), delays=[^ ]+ dsn=2[^ ]*, status=sent", f.read()
                )
            ]
        rate_ref = args.messages / reference
        accepted = args.messages / accept_seconds
        delivered_rate = delivered / end_to_end
        return {
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "connection_reuse": not args.new_connections,
            "reference_msg_s": round(rate_ref, 1),
            "accepted_msg_s": round(accepted, 1),
            "delivered": delivered,
            "delivered_msg_s": round(delivered_rate, 1),
            "accepted_ratio_to_reference": round(accepted / rate_ref, 4),
            "delivered_ratio_to_reference": round(delivered_rate / rate_ref, 4),
            "latency_s": {
                "p50": percentile(delays, 50),
                "p90": percentile(delays, 90),
                "p99": percentile(delays, 99),
                "max": max(delays) if delays else float("nan"),
                "mean": round(statistics.fmean(delays), 3) if delays else float("nan"),
            },
            "cpu_s_per_1000": round(cpu / args.messages * 1000, 3),
            "peak_rss_mib": round(rss, 1),
            "workdir": work,
        }
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        sink.terminate()
        sink.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--concurrency", type=int, default=20, help="[delivery] destination_concurrency")
    p.add_argument("--new-connections", action="store_true", help="one connection per message")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for delivery")
    p.add_argument("--keep", action="store_true", help="keep the work directory (spool, log)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if result["delivered"] < args.messages:
        sys.exit(f"bench: only {result['delivered']} of {args.messages} delivered in time")


if __name__ == "__main__":
    main()
