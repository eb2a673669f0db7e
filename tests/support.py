"""Shared test scaffolding: a submission session on a StringTransport."""

from __future__ import annotations

import base64
import os
import re
import tempfile
from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mta import config as configmod
from mta.address import parse_networks
from mta.checks import PluginContext
from mta.checks import host as checkhost
from mta.cluster.local import LocalState
from mta.config import Config
from mta.dailycount import DailyCounter
from mta.service import plugin_context, session_limits, throttle_settings
from mta.smtp.auth import Authenticator, AuthThrottle, UserFileChecker
from mta.smtp.server import SessionSettings, SubmissionFactory, SubmissionSession
from mta.spool.memory import MemorySpool
from mta.testing import SwitchableState, TLSStringTransport, run_inline, write_users
from mta.tls import ServerTLS, ensure_selfsigned
from mta.users import UserFile

_CERT_DIR = tempfile.mkdtemp(prefix="mta-test-cert-")
CERT, KEY = ensure_selfsigned(_CERT_DIR, "mx.test")

LOGIN = "alice@example.com"
PASSWORD = "correct horse battery"
OTHER = "bob@example.org"
OTHER_PASSWORD = "bobs password"

_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_config(**sections: dict[str, Any]) -> Config:
    """The embedded default with some options replaced per section."""
    config = configmod.load(None)
    for name, values in sections.items():
        config = replace(config, **{name: replace(getattr(config, name), **values)})
    return config


class Harness:
    """One set of server parts with a Clock and an in-memory spool."""

    def __init__(self, directory: str, config: Config | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = config or make_config(auth={"failure_delay": 1.0})
        self.spool = MemorySpool(self.clock.seconds)
        os.makedirs(directory, exist_ok=True)
        self.users = write_users(
            os.path.join(directory, "users.json"),
            {LOGIN: PASSWORD, OTHER: OTHER_PASSWORD},
            aliases={LOGIN: ["sales@example.com"]},
            domains={LOGIN: ["alice.example"]},
        )
        # Switchable: a test can take the shared state "down" (Redis gone).
        self.shared = SwitchableState(
            LocalState(DailyCounter(os.path.join(directory, "state"), self.clock))
        )
        # Built from the configuration as the service builds them.
        self.throttle = AuthThrottle(self.clock, throttle_settings(self.config), state=self.shared)
        self.state_dir = os.path.join(directory, "state")
        self.context = self.plugin_context(self.config)
        self.checks = checkhost.load(self.config.plugins, self.context)
        self.settings = SessionSettings(
            hostname="mx.test",
            limits=session_limits(self.config),
            tls=ServerTLS(CERT, KEY),
            spool=self.spool,
            users=self.users,
            auth=Authenticator(
                UserFileChecker(self.users, run_inline), self.throttle, self.users, self.clock
            ),
            clock=self.clock,
            trusted_networks=parse_networks(self.config.auth.trusted_networks),
            checks=self.checks,
        )

    def plugin_context(self, config: Config) -> PluginContext:
        """What the plugins of C{config} are given, with this harness's services."""
        return plugin_context(
            config,
            reactor=self.clock,
            runner=run_inline,
            users=self.users,
            state_dir=self.state_dir,
            hostname="mx.test",
            shared=self.shared,
        )

    def use(self, **changes: Any) -> None:
        """Sessions connected from now on get these settings changed
        (C{spool=...}, C{checks=...}): the settings are frozen, as in the service."""
        self.settings = replace(self.settings, **changes)
        if "checks" in changes:
            self.checks = changes["checks"]

    def use_checker(self, checker: Any) -> None:
        """Sessions connected from now on check passwords with C{checker}."""
        self.use(auth=replace(self.settings.auth, checker=checker))

    def use_users(self, users: UserFile) -> None:
        """Replace the users file everywhere it is used (sessions, plugins)."""
        self.users = users
        self.context = replace(self.context, users=users)
        self.use(
            users=users,
            auth=replace(
                self.settings.auth, users=users, checker=UserFileChecker(users, run_inline)
            ),
            checks=checkhost.load(self.config.plugins, self.context),
        )

    def connect(self, *, implicit_tls: bool = True, peer: str = "192.0.2.10") -> Client:
        factory = SubmissionFactory(self.settings, implicit_tls=implicit_tls)
        protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        protocol.makeConnection(transport)
        return Client(protocol, transport)


class Client:
    """Drives one session: send bytes, read the replies written so far."""

    def __init__(self, protocol: Any, transport: TLSStringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._read = 0

    @property
    def session(self) -> SubmissionSession:
        assert isinstance(self.protocol, SubmissionSession)
        return self.protocol

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)

    def replies(self) -> list[tuple[int, str]]:
        """The complete replies written since the last call: (code, text lines)."""
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        out: list[tuple[int, str]] = []
        lines: list[str] = []
        for raw in new.split(b"\r\n")[:-1]:
            m = _REPLY.match(raw)
            assert m, f"not an SMTP reply line: {raw!r}"
            lines.append(m.group(3).decode())
            if m.group(2) == b" ":
                out.append((int(m.group(1)), "\n".join(lines)))
                lines = []
        return out

    def codes(self) -> list[int]:
        return [code for code, _ in self.replies()]

    def command(self, line: str) -> tuple[int, str]:
        """Send one command and return its one reply."""
        self.send(line + "\r\n")
        replies = self.replies()
        assert len(replies) == 1, replies
        return replies[0]

    def login(self, user: str = LOGIN, password: str = PASSWORD) -> None:
        self.replies()
        assert self.command("EHLO client.test")[0] == 250
        code, text = self.command(f"AUTH PLAIN {plain(user, password)}")
        assert code == 235, text

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)
