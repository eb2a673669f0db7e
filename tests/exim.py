"""A private Exim on loopback for tests: a real MTA that relays into mta.

Debian's C{exim4-daemon-light} (installed by C{scripts/install-test-deps.sh};
its packaged service is never used).  Each L{Exim} has its own directory
with its own configuration file, spool, logs and pid file, and listens on
a free high port of 127.0.0.1.  It accepts any message from loopback
and relays everything to one smarthost, mta, with TLS (STARTTLS on the
submission port, or C{protocol = smtps} on the implicit-TLS one), the
certificate checked against mta's CA file, and AUTH PLAIN.  Exim's smtp
transport sends with BDAT whenever the server offers CHUNKING (its
C{hosts_try_chunking} is C{*} by default), so this is a real client of
RFC 3030.

Exim is started in the foreground (C{-bdf}) with C{-C} and stopped with
SIGTERM.  Its deliveries run as C{exim_user}: the user the tests run as,
or, for root (as in CI; Debian's Exim never delivers as root), the
packaged C{Debian-exim}, which then owns the test's Exim directory.  mta's
CA file is copied there so that this user can read it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

EXIM = "/usr/sbin/exim4"
EXIM_USER = "Debian-exim"  # the user Debian's package makes
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = """\
# A test's private Exim: its own spool and logs, loopback only.
primary_hostname = exim.test
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
exim_user = {user}
exim_group = {group}
never_users =
local_interfaces = 127.0.0.1
daemon_smtp_ports = {port}
tls_advertise_hosts =
disable_ipv6 = true
host_lookup =
rfc1413_hosts =
keep_environment =
acl_smtp_rcpt = acl_check_rcpt
# Deliver at once, one delivery process per message.
queue_only = false
# No retry waits between the tests' messages.
retry_data_expire = 1m

begin acl
acl_check_rcpt:
  accept hosts = 127.0.0.1
  deny

begin routers
smarthost:
  driver = manualroute
  route_list = * {mta_host}
  transport = to_mta
  self = send
  no_more

begin transports
to_mta:
  driver = smtp
  port = {mta_port}
  {protocol}
  hosts_require_tls = *
  hosts_require_auth = *
  tls_verify_certificates = {cafile}
  tls_verify_hosts = *
  tls_verify_cert_hostnames = *

begin retry
*   *   F,1m,10s

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  client_send = ^{login}^{password}
"""


class Exim:
    """Exim in the foreground on a loopback port, relaying to mta."""

    def __init__(
        self, *, mta_port: int, implicit_tls: bool, cafile: str, login: str, password: str
    ) -> None:
        for value in (login, password):
            # Exim expands client_send: keep the test's strings plain.
            if not value.replace("@", "").replace(".", "").replace("-", "").isalnum():
                raise ValueError(f"use a plain login and password for Exim, not {value!r}")
        self.dir = tempfile.mkdtemp(prefix="mta-exim-")
        os.chmod(self.dir, 0o755)
        for sub in ("spool", "log"):
            os.mkdir(os.path.join(self.dir, sub))
        self.port = free_port()
        self.config = os.path.join(self.dir, "exim.conf")
        ca_copy = os.path.join(self.dir, "mta-ca.pem")
        shutil.copyfile(cafile, ca_copy)
        user = pwd.getpwuid(os.geteuid())
        if user.pw_uid == 0:
            user = pwd.getpwnam(EXIM_USER)
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(
                CONFIG.format(
                    dir=self.dir,
                    user=user.pw_name,
                    group=grp.getgrgid(user.pw_gid).gr_name,
                    port=self.port,
                    # The certificate names localhost; Exim checks it.
                    mta_host="localhost",
                    mta_port=mta_port,
                    protocol="protocol = smtps" if implicit_tls else "",
                    cafile=ca_copy,
                    login=login,
                    password=password,
                )
            )
        if user.pw_uid != os.geteuid():
            # Its spool and logs; the configuration stays root's (Exim
            # insists), and the CA copy is readable by all.
            for sub in (".", "spool", "log"):
                os.chown(os.path.join(self.dir, sub), user.pw_uid, user.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def mainlog(self) -> str:
        return self._read(os.path.join(self.dir, "log", "mainlog"))

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self) -> None:
        out = open(os.path.join(self.dir, "stdout.log"), "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [EXIM, "-C", self.config, "-bdf"], stdout=out, stderr=out, cwd=self.dir
        )
        out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"exim exited with {self.process.returncode}:\n"
                    + self._read(os.path.join(self.dir, "stdout.log"))
                    + self._read(os.path.join(self.dir, "log", "paniclog"))
                    + self.mainlog
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"exim did not start within {START_TIMEOUT}s:\n{self.mainlog}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Delivery processes Exim forked have finished with their message
        # by the time a test stops it; none is left holding the directory.
        shutil.rmtree(self.dir, ignore_errors=True)
