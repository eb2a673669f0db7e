"""A private HAProxy for tests: its own config file, loopback ports, foreground.

Debian's C{haproxy} (scripts/install-test-deps.sh installs it), started as
a child of the test with C{-db} (no daemon), never the system's service.
The configuration is the one docs/operations.md shows, with test ports and
fast health checks: TCP mode, C{send-proxy-v2} to each instance's PROXY
listener, health checks over HTTP on each instance's C{/health}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from tests.e2e.daemon import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@dataclass(frozen=True)
class Backend:
    name: str
    proxy_tls_port: int  # [listen] proxy_submissions
    proxy_plain_port: int  # [listen] proxy_submission
    metrics_port: int  # [metrics] listen: /health


CONFIG = """\
global
    maxconn 2000

defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
    option httpchk GET /health
    http-check expect status 200
    default-server inter {inter} fall 2 rise 1

frontend submissions
    bind 127.0.0.1:{tls_port}
    default_backend mta_submissions

frontend submission
    bind 127.0.0.1:{plain_port}
    default_backend mta_submission

backend mta_submissions
    balance roundrobin
{tls_servers}

backend mta_submission
    balance roundrobin
{plain_servers}
"""


def config_text(backends: list[Backend], tls_port: int, plain_port: int, inter: str) -> str:
    def servers(kind: str) -> str:
        return "\n".join(
            f"    server {b.name} 127.0.0.1:{getattr(b, kind)} send-proxy-v2 "
            f"check port {b.metrics_port}"
            for b in backends
        )

    return CONFIG.format(
        tls_port=tls_port,
        plain_port=plain_port,
        inter=inter,
        tls_servers=servers("proxy_tls_port"),
        plain_servers=servers("proxy_plain_port"),
    )


class HAProxy:
    def __init__(self, directory: str, backends: list[Backend], inter: str = "200ms") -> None:
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.tls_port, self.plain_port = free_port(), free_port()
        self.config = os.path.join(self.dir, "haproxy.cfg")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(config_text(backends, self.tls_port, self.plain_port, inter))
        self.log_path = os.path.join(self.dir, "haproxy.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        if not os.path.exists(HAPROXY):
            raise RuntimeError("haproxy is not installed (scripts/install-test-deps.sh)")
        check = subprocess.run(
            [HAPROXY, "-c", "-f", self.config], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", self.config], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("haproxy did not listen within 20s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
