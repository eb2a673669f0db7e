"""Real clamd and spamd daemons on loopback for tests (Debian's clamav-daemon, spamd).

No signature download is possible, so clamd gets a database written here:
a hash signature (C{.hdb}: MD5, size, name) of the EICAR test file, which
clamd also finds inside a MIME attachment.  spamd runs with its shipped
rules and only local tests (C{-L}: no DNS or network lookups), which is
enough for GTUBE.  Start-up is bounded (L{START_TIMEOUT}); test classes
start one of each in C{setUpClass} and share it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

START_TIMEOUT = 90.0
CLAMD = "/usr/sbin/clamd"
SPAMD = "/usr/sbin/spamd"

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature-mta"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(process: subprocess.Popen[bytes], ready: object, log: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT}s:\n{_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Clamd:
    """clamd in the foreground with a UNIX socket and a TCP port on loopback."""

    def __init__(self, stream_max: int = 25 * 1024 * 1024) -> None:
        self.dir = tempfile.mkdtemp(prefix="mta-clamd-")
        self.socket = os.path.join(self.dir, "clamd.sock")
        self.port = free_port()
        self.log = os.path.join(self.dir, "clamd.log")
        db = os.path.join(self.dir, "db")
        os.mkdir(db)
        with open(os.path.join(db, "mta-test.hdb"), "w") as f:
            f.write(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{EICAR_NAME}\n")
        self.config = os.path.join(self.dir, "clamd.conf")
        with open(self.config, "w") as f:
            f.write(
                "Foreground yes\n"
                f"LocalSocket {self.socket}\n"
                f"TCPSocket {self.port}\n"
                "TCPAddr 127.0.0.1\n"
                f"DatabaseDirectory {db}\n"
                f"LogFile {self.log}\n"
                f"PidFile {os.path.join(self.dir, 'clamd.pid')}\n"
                f"StreamMaxLength {stream_max}\n"
                "SelfCheck 0\n"
                # Keep the user the tests run as (root in CI) instead of clamav.
                f"User {pwd.getpwuid(os.geteuid()).pw_name}\n"
            )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def unix_address(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def tcp_address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self) -> None:
        out = open(os.path.join(self.dir, "stdout.log"), "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen([CLAMD, "-c", self.config], stdout=out, stderr=out)
        out.close()
        _wait(self.process, self._answers, self.log, "clamd")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.socket)
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class Spamd:
    """spamd on a loopback port, shipped rules, local tests only."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mta-spamd-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.log = os.path.join(self.dir, "spamd.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self) -> None:
        argv = [
            SPAMD,
            "--local",  # no DNS blocklists or other network tests
            "--listen", f"127.0.0.1:{self.port}",
            "--allowed-ips", "127.0.0.1",
            "--max-children", "2",
            "--min-children", "1",
            "--nouser-config",
            "--syslog", self.log,
            "--pidfile", os.path.join(self.dir, "spamd.pid"),
        ]  # fmt: skip
        if os.geteuid() == 0:
            argv += ["--username", "nobody"]
        out = open(os.path.join(self.dir, "stdout.log"), "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.dir)
        out.close()
        _wait(self.process, self._answers, self.log, "spamd")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return b"PONG" in s.recv(64)
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)
