"""Many idle TLS sessions held at once, and a new session still served.

    python bench/idle_tls.py [--sessions 5000]

Starts a real mta daemon (twistd) with connection limits above the count,
raises the open-files limit (the daemon inherits it), opens N sessions on
the implicit-TLS submission listener (TCP, TLS handshake, 220 greeting),
and holds them idle.  While they are held, it opens new sessions (implicit
TLS, and STARTTLS on the other listener) and times them up to the EHLO
reply.  It prints how many were held, how long opening took, the new
sessions' times, how many held sessions were still open at the end, and the
daemon's RSS and CPU.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import cpu_seconds, free_port, mta_command, wait_port

CONFIG = """\
[server]
hostname = "mta-bench.localhost"
spool = "spool"
users_file = "users.json"
[listen]
submissions = ["tcp:{tls_port}:interface=127.0.0.1:backlog=1024"]
submission = ["tcp:{port}:interface=127.0.0.1"]
[limits]
connections = {limit}
connections_per_ip = {limit}
[delivery]
dns_servers = ["127.0.0.1"]
dns_port = {dns_port}
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the daemon's self-signed certificate
    return ctx


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise OSError(f"bad reply {line!r}")
        if line[3:4] != b"-":
            return line


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_tls(port: int, ctx: ssl.SSLContext) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    greeting = await reply(reader)
    if not greeting.startswith(b"220"):
        raise OSError(f"greeting {greeting!r}")
    return reader, writer


async def new_session(tls_port: int, port: int, ctx: ssl.SSLContext) -> dict[str, float]:
    """Time a fresh implicit-TLS session and a fresh STARTTLS session to EHLO."""
    start = time.monotonic()
    reader, writer = await asyncio.wait_for(open_tls(tls_port, ctx), 30)
    writer.write(b"EHLO new.bench.example\r\n")
    ok = (await asyncio.wait_for(reply(reader), 30)).startswith(b"250")
    implicit = time.monotonic() - start
    writer.write(b"QUIT\r\n")
    writer.close()
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"EHLO new.bench.example\r\n")
    await reply(reader)
    writer.write(b"STARTTLS\r\n")
    ok = ok and (await reply(reader)).startswith(b"220")
    await writer.start_tls(ctx)
    writer.write(b"EHLO new.bench.example\r\n")
    ok = ok and (await asyncio.wait_for(reply(reader), 30)).startswith(b"250")
    starttls = time.monotonic() - start
    writer.write(b"QUIT\r\n")
    writer.close()
    if not ok:
        raise OSError("a new session was refused")
    return {"implicit_tls_s": round(implicit, 3), "starttls_s": round(starttls, 3)}


async def hold(tls_port: int, port: int, count: int, hold_s: float, pid: int) -> dict[str, object]:
    ctx = client_context()
    gate = asyncio.Semaphore(100)
    conns: list[Conn] = []
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                conns.append(await asyncio.wait_for(open_tls(tls_port, ctx), 60))
            except (TimeoutError, OSError) as e:
                failures.append(repr(e))

    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    opened = time.monotonic() - start
    cpu_open = cpu_seconds(pid) - cpu0
    rss_held = rss_mib(pid)
    new = [await new_session(tls_port, port, ctx) for _ in range(5)]
    await asyncio.sleep(hold_s)
    new += [await new_session(tls_port, port, ctx) for _ in range(5)]
    # A held session is still open if it answers a NOOP.
    alive = 0
    for _, writer in conns:
        writer.write(b"NOOP\r\n")
    for reader, writer in conns:
        try:
            if (await asyncio.wait_for(reply(reader), 30)).startswith(b"250"):
                alive += 1
        except (TimeoutError, OSError):
            pass
        writer.close()
    return {
        "sessions": count,
        "opened": len(conns),
        "open_failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "open_s": round(opened, 2),
        "daemon_cpu_s_opening": round(cpu_open, 2),
        "held_s": hold_s,
        "still_open_after": alive,
        "new_sessions_while_held": len(new),
        "new_session_s_max": {
            key: max(n[key] for n in new) for key in ("implicit_tls_s", "starttls_s")
        },
        "rss_mib_held": round(rss_held, 1),
        "rss_kib_per_session": None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold them")
    args = p.parse_args()
    need = args.sessions * 2 + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    work = tempfile.mkdtemp(prefix="mta-bench-idle-")
    tls_port, port = free_port(), free_port()
    config = os.path.join(work, "mta.toml")
    with open(config, "w") as f:
        f.write(
            CONFIG.format(
                tls_port=tls_port, port=port, limit=args.sessions + 100, dns_port=free_port()
            )
        )
    with open(os.path.join(work, "mta.log"), "wb") as log:
        daemon = subprocess.Popen(
            mta_command(config),
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port(tls_port)
        time.sleep(0.5)
        rss_idle = rss_mib(daemon.pid)
        result = asyncio.run(hold(tls_port, port, args.sessions, args.hold, daemon.pid))
        result["rss_mib_no_sessions"] = round(rss_idle, 1)
        opened = result["opened"]
        if isinstance(opened, int) and opened:
            held = result["rss_mib_held"]
            assert isinstance(held, float)
            result["rss_kib_per_session"] = round((held - rss_idle) * 1024 / opened, 1)
        print(json.dumps(result, indent=2))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
