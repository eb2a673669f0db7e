"""Run a real mta process for end-to-end tests.

Each L{Daemon} gets its own directory with a configuration file, a users
file made with the real C{mtactl}, free loopback ports, and a log file.  It
is started as a child process (C{twistd -n mta} or C{python -m twisted
mta}) and stopped with SIGTERM or killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mta.errors import StorageError
from mta.spool import format as envformat
from mta.spool.fs import FileStore
from mta.spool.spares import PREFIX as SPARE_PREFIX

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 30.0
STATES = ("incoming", "deferred", "hold", "corrupt", "done", "redacted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_toml(path: str, sections: dict[str, dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for name, values in sections.items():
            f.write(f"[{name}]\n")
            for key, value in values.items():
                bare = key.replace("_", "").replace("-", "").isalnum()
                f.write(f"{key if bare else toml_value(key)} = {toml_value(value)}\n")
            f.write("\n")


def mtactl(
    args: Iterable[str], config: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.path.join(BIN, "mtactl"), "--config", config, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Daemon:
    def __init__(
        self, directory: str, sections: dict[str, dict[str, Any] | None] | None = None
    ) -> None:
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.config = os.path.join(self.dir, "mta.toml")
        self.log_path = os.path.join(self.dir, "mta.log")
        self.spool = os.path.join(self.dir, "spool")
        self.cafile = os.path.join(self.spool, "selfsigned", "cert.pem")
        base: dict[str, dict[str, Any]] = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {
                "submissions": [f"tcp:{self.tls_port}:interface=127.0.0.1"],
                "submission": [f"tcp:{self.plain_port}:interface=127.0.0.1"],
            },
            "auth": {"failure_delay": 0.05, "failure_delay_max": 0.2},
            # Nothing leaves the machine: no system DNS, deliveries to a
            # closed loopback port unless a test routes them to its sink.
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": free_port(), "dns_timeout": 2},
            "routes": {"*": f"[127.0.0.1]:{free_port()}"},
        }
        for name, values in (sections or {}).items():
            if values is None:
                base.pop(name, None)  # drop a default section (e.g. the route to nowhere)
            else:
                base.setdefault(name, {}).update(values)
        write_toml(self.config, base)
        self.process: subprocess.Popen[bytes] | None = None

    def add_user(self, email: str, password: str, *extra: str) -> None:
        result = mtactl(
            ["user", "add", email, "--password-stdin", *extra], self.config, password + "\n"
        )
        if result.returncode != 0:
            raise RuntimeError(f"mtactl user add failed: {result.stderr}")

    def command(self, runner: str) -> list[str]:
        if runner == "twistd":
            return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "mta", "--config", self.config]
        return [sys.executable, "-m", "twisted", "mta", "--config", self.config]

    def start(self, runner: str = "twistd") -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            self.command(runner), cwd=self.dir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mta exited with {self.process.returncode}:\n{self.log()}")
            if self._accepting(self.tls_port) and self._accepting(self.plain_port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mta did not start listening within {START_TIMEOUT}s:\n{self.log()}")

    @staticmethod
    def _accepting(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def queued(self, *states: str) -> list[str]:
        """Queue IDs in the given states (default: every state)."""
        found = []
        for state in states or STATES:
            if state == "active":
                continue  # no directory: a message in delivery stays where it was
            path = os.path.join(self.spool, state)
            found += [n for n in os.listdir(path) if not n.startswith(".")]
        return sorted(found)

    def submit(
        self,
        login: str,
        password: str,
        data: bytes | str,
        rcpts: list[str],
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
    ) -> str:
        """Submit one message over implicit TLS with smtplib; returns its queue ID."""
        ctx = ssl.create_default_context(cafile=self.cafile)
        with smtplib.SMTP_SSL("localhost", self.tls_port, context=ctx, timeout=30) as s:
            s.login(login, password)
            s.mail(login, list(mail_options))
            for rcpt in rcpts:
                code, text = s.rcpt(rcpt, list(rcpt_options))
                if code != 250:
                    raise AssertionError(f"RCPT {rcpt}: {code} {text!r}")
            code, text = s.data(data)
        if code != 250:
            raise AssertionError(f"DATA: {code} {text!r}")
        return text.decode().rpartition(" ")[2]

    def read(self, queue_id: str) -> bytes:
        """The bytes of a queued message, wherever it is: the daemon may be moving
        it between states right now, so a vanished file means "look again"."""
        for _ in range(100):
            try:
                with FileStore(self.spool).open_message(queue_id) as f:
                    return f.read()
            except StorageError:
                time.sleep(0.02)
        raise AssertionError(f"{queue_id} not found in the spool")

    def envelope(self, queue_id: str) -> dict[str, Any]:
        """A queued message's envelope as its records say, in the JSON of the spool."""
        for _ in range(100):
            try:
                return envformat.to_json(FileStore(self.spool).load(queue_id)[1])
            except (KeyError, FileNotFoundError):
                time.sleep(0.02)
        raise AssertionError(f"{queue_id} not found in the spool")

    def message_path(self, queue_id: str) -> str:
        for state in STATES:
            path = os.path.join(self.spool, state, queue_id)
            if os.path.isfile(path):
                return path
        raise KeyError(queue_id)


class Helper:
    """A helper process (DNS server, sink) that prints its port first."""

    def __init__(self, argv: list[str], log_path: str) -> None:
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=log, cwd=REPO
        )
        log.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        self.port = int(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def unfinished(spool: str) -> list[str]:
    """The files in a spool's tmp/ other than the daemon's spares (empty files
    made ahead for commits, mta/spool/spares.py): messages being received."""
    names = os.listdir(os.path.join(spool, "tmp"))
    return sorted(n for n in names if not n.startswith(SPARE_PREFIX))


def at_sink(out: str, needle: bytes, timeout: float = 30.0, what: str = "") -> bytes:
    """Wait (bounded) for a message containing C{needle} among the sink's
    C{.eml} files in C{out}, and return it."""

    def find() -> bytes | None:
        for name in os.listdir(out) if os.path.isdir(out) else []:
            if name.endswith(".eml"):
                with open(os.path.join(out, name), "rb") as f:
                    data = f.read()
                if needle in data:
                    return data
        return None

    return wait_for(find, timeout, what or f"{needle!r} at the sink")  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll C{condition()} (bounded) until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
