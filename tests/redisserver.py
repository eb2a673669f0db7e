"""A private redis-server for tests: its own config file, directory and loopback port.

Debian's C{redis-server} (scripts/install-test-deps.sh installs it), run
in the foreground as a child of the test, never the system's service.
Missing, it is an error, not a skip: the tests that need it are checks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString

from mta.cluster.client import RedisClient
from tests.e2e.daemon import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server; C{stop}/C{start} again keep its port (a "restart")."""

    def __init__(
        self, directory: str | None = None, *, password: str = "", persistent: bool = False
    ) -> None:
        if directory is None:
            # Its own directory under /tmp, removed with the object (or at exit).
            self.dir = tempfile.mkdtemp(prefix="mta-redis-")
            weakref.finalize(self, shutil.rmtree, self.dir, True)
        else:
            self.dir = os.path.abspath(directory)
            os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.config = os.path.join(self.dir, "redis.conf")
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize no",
            f"dir {self.dir}",
            'save ""',
            # Persistent: every write in the append-only file before its
            # reply (docs/operations.md: what is lost without it).
            "appendonly yes" if persistent else "appendonly no",
            "appendfsync always",
            "protected-mode yes",
            f"logfile {os.path.join(self.dir, 'redis.log')}",
        ]
        if password:
            lines.append(f"requirepass {password}")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self) -> RedisServer:
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed (scripts/install-test-deps.sh)")
        self.process = subprocess.Popen(
            [REDIS_SERVER, self.config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer within 20s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                answer = s.recv(64)
        except OSError:
            return False
        return answer.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """SIGKILL (a crash; nothing is saved anyway) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)
        self.process = None

    def command(self, *args: str) -> bytes:
        """One command through a fresh connection (for checks from the test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            payload = b""
            if self.password:
                payload += _encode("AUTH", self.password)
            payload += _encode(*args)
            s.sendall(payload)
            time.sleep(0.05)
            return s.recv(65536)


def _encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        data = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisFixture:
    """Mixed into a TestCase: one redis-server for the class, and clients of it."""

    server: RedisServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = RedisServer()
        cls.server.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def client(self, **options: Any) -> RedisClient:
        """A client of the class's server, closed when the test ends."""
        settings: dict[str, Any] = {"timeout": 2.0, "retry": 0.2} | options
        client = RedisClient(
            clientFromString(reactor, self.server.endpoint),
            reactor,
            name=self.server.endpoint,
            **settings,
        )
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client
