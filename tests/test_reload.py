"""SIGHUP: what a reload of the configuration changes, and what it leaves.

The service is built (not started) from a file on disk, on a Clock; the
file is rewritten and L{MTAService.reload} called as the signal handler
does.  Sessions are built by the service's own listener factories.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mta import config as configmod
from mta.service import MTAService, needs_restart, session_limits
from mta.smtp.server import SessionLimits, SubmissionSession, _Refuse
from mta.testing import TLSStringTransport, write_users

LOGIN = "app@example.com"

BASE = """
[server]
hostname = "mx.test"
spool = "spool"
users_file = "users.json"

[listen]
submissions = "tcp:0:interface=127.0.0.1"
submission = "tcp:0:interface=127.0.0.1"
proxy_submissions = "tcp:0:interface=127.0.0.1"
proxy_submission = "tcp:0:interface=127.0.0.1"
proxy_from = ["127.0.0.1"]

[delivery]
dns_servers = ["127.0.0.1"]
dns_port = 9
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


class ReloadTests(SynchronousTestCase):
    """A reload builds new settings objects from the file and hands them to the
    listeners (new sessions get new limits, open ones keep theirs), the AUTH
    throttle, the queue and retention; a broken file changes nothing; the
    log names what needs a restart."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        write_users(os.path.join(self.dir, "users.json"), {LOGIN: "password-1"})
        self.path = os.path.join(self.dir, "mta.toml")
        self.write()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = MTAService(configmod.load(self.path), self.clock)
        self.addCleanup(self.service.store.close)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, **sections: dict[str, Any]) -> None:
        """The base file with these sections added."""
        text = BASE
        for name, values in sections.items():
            lines = [f"{key} = {toml_value(value)}" for key, value in values.items()]
            text += f"\n[{name}]\n" + "\n".join(lines) + "\n"
        tomllib.loads(text)  # a test's own typo fails here, not as a reload error
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)

    def reload(self, **sections: dict[str, Any]) -> None:
        self.write(**sections)
        self.service.reload()

    def connect(self, factory_index: int = 1, peer: str = "192.0.2.10") -> Any:
        factory = self.service.factories[factory_index]
        address = IPv4Address("TCP", peer, 40000)
        protocol = factory.buildProtocol(address)
        protocol.makeConnection(TLSStringTransport(peerAddress=address))
        return protocol

    def session(self, factory_index: int = 1, peer: str = "192.0.2.10") -> SubmissionSession:
        protocol = self.connect(factory_index, peer)
        assert isinstance(protocol, SubmissionSession), protocol
        return protocol

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "mta"]

    def test_a_listener_for_each_kind(self) -> None:
        """Plain and implicit TLS, directly and behind PROXY: four factories."""
        self.assertEqual(
            [f.implicit_tls for f in self.service.factories], [True, False, True, False]
        )

    def test_new_sessions_get_new_limits_open_ones_keep_theirs(self) -> None:
        before = self.session()
        self.reload(limits={"message_size": 4096, "idle_timeout": 7.0, "recipients": 150})
        after = self.session()
        self.assertEqual(before.limits, session_limits(configmod.load(None)))
        self.assertEqual(
            (after.limits.message_size, after.limits.idle_timeout, after.limits.recipients),
            (4096, 7.0, 150),
        )
        after.dataReceived(b"EHLO client.test\r\n")
        self.assertIn(b"250-SIZE 4096\r\n", after.transport.value())  # type: ignore[union-attr]
        before.dataReceived(b"EHLO client.test\r\n")
        self.assertIn(b"250-SIZE 52428800\r\n", before.transport.value())  # type: ignore[union-attr]
        # The idle timeout: the new session's at 7 s, the old one's at 300 s.
        self.clock.advance(7)
        self.assertIn(b"421 4.4.2", after.transport.value())  # type: ignore[union-attr]
        self.assertNotIn(b"421", before.transport.value())  # type: ignore[union-attr]

    def test_every_listener_gets_the_new_settings(self) -> None:
        self.reload(limits={"message_size": 4096})
        for factory in self.service.factories:
            self.assertIs(factory.settings, self.service.settings)
        self.assertEqual(self.service.settings.limits.message_size, 4096)

    def test_connection_limits_count_the_open_connections(self) -> None:
        self.session(peer="192.0.2.10")
        self.session(peer="192.0.2.10")
        self.reload(limits={"connections_per_ip": 2})
        refused = self.connect(peer="192.0.2.10")
        self.assertIsInstance(refused, _Refuse)
        self.session(peer="192.0.2.11")  # another address still gets in
        self.reload(limits={"connections_per_ip": 2, "connections": 3})
        self.assertIsInstance(self.connect(peer="192.0.2.12"), _Refuse)

    def test_trusted_networks_for_new_sessions(self) -> None:
        before = self.session(peer="192.0.2.10")
        self.reload(auth={"trusted_networks": ["192.0.2.0/24"]})
        self.assertFalse(before.trusted)
        self.assertTrue(self.session(peer="192.0.2.10").trusted)
        self.assertFalse(self.session(peer="198.51.100.1").trusted)

    def test_throttle_gets_new_limits(self) -> None:
        self.reload(
            auth={"max_failures": 4, "failure_window": 60, "failure_delay": 0.5,
                  "failure_delay_max": 2.0}
        )  # fmt: skip
        settings = self.service.throttle.settings
        self.assertEqual(
            (settings.max_failures, settings.window, settings.delay, settings.delay_max),
            (4, 60.0, 0.5, 2.0),
        )
        self.assertIs(self.service.settings.auth.throttle, self.service.throttle)

    def test_queue_and_retention_get_new_settings(self) -> None:
        self.reload(queue={"minimal_backoff_time": 60}, retention={"retention_days": 2})
        self.assertEqual(self.service.queue.settings.minimal_backoff_time, 60.0)
        self.assertEqual(self.service.retention.settings.retention_days, 2.0)

    def test_applied_changes_need_no_restart(self) -> None:
        self.reload(
            limits={"message_size": 4096},
            auth={"max_failures": 4, "trusted_networks": ["10.0.0.0/8"]},
            queue={"delay_warning_time": 0},
        )
        lines = self.logged()
        self.assertIn(f"reloaded {self.path}", lines)
        self.assertEqual([line for line in lines if "restart" in line], [])

    def test_the_log_names_what_needs_a_restart(self) -> None:
        before = self.session()
        self.reload(
            limits={"daily_messages": 10, "message_size": 4096},
            queue={"active_limit": 10},
            metrics={"listen": ["tcp:0"]},
        )
        self.assertIn(
            "changes to [limits] daily_messages, [queue] active_limit, [metrics] "
            "take effect after a restart",
            self.logged(),
        )
        # The rest of the file applied all the same.
        self.assertEqual(self.service.settings.limits.message_size, 4096)
        self.assertEqual(before.limits.message_size, 50 * 1024 * 1024)

    def test_a_broken_file_changes_nothing(self) -> None:
        settings, config = self.service.settings, self.service.config
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n[limits]\nmessage_size = 10\n")  # below the minimum
        self.service.reload()
        self.assertIs(self.service.settings, settings)
        self.assertIs(self.service.config, config)
        [error] = [line for line in self.logged() if "reload failed" in line]
        self.assertIn("keeping the old configuration", error)
        self.assertIn("[limits] message_size: must be at least 1024", error)
        self.assertEqual(self.session().limits, settings.limits)


class NeedsRestartTests(SynchronousTestCase):
    """L{needs_restart}: which differences between two configurations a
    reload leaves for a restart, named as the file names them."""

    def setUp(self) -> None:
        self.old = configmod.load(None)

    def changed(self, **sections: dict[str, Any]) -> list[str]:
        new = self.old
        for name, values in sections.items():
            new = replace(new, **{name: replace(getattr(new, name), **values)})
        return needs_restart(self.old, new)

    def test_the_same(self) -> None:
        self.assertEqual(needs_restart(self.old, configmod.load(None)), [])

    def test_reloaded_options(self) -> None:
        self.assertEqual(
            self.changed(
                limits={"message_size": 2048, "connections": 5, "bare_newline": "reject"},
                auth={"max_failures": 3, "trusted_networks": ["10.0.0.0/8"]},
                queue={"maximal_backoff_time": 8000.0},
                retention={"retention_days": 1.0, "remove_after_days": 2.0},
                shaping={"max_rate": 600.0, "hold_time": 60.0},
            ),
            [],
        )

    def test_options_read_only_at_start(self) -> None:
        self.assertEqual(
            self.changed(
                limits={"daily_messages": 5},
                queue={"active_limit": 5},
                retention={"sweep_interval": 60.0},
                shaping={"sync_interval": 5.0},
            ),
            [
                "[limits] daily_messages",
                "[queue] active_limit",
                "[retention] sweep_interval",
                "[shaping] sync_interval",
            ],
        )

    def test_whole_sections(self) -> None:
        self.assertEqual(
            self.changed(server={"hostname": "other.test"}, delivery={"port": 2525}),
            ["[server]", "[delivery]"],
        )
        new = replace(
            self.old,
            plugins=(configmod.PluginConfig(name="clamd"),),
            routes={"*": configmod.RouteConfig(relay="[127.0.0.1]:25")},
        )
        self.assertEqual(needs_restart(self.old, new), ["[routes]", "[[plugins]]"])

    def test_bounce_rules_are_reloaded(self) -> None:
        rules = configmod.parse(
            {
                "bounce": {
                    "rules": [{"name": "full", "pattern": "mailbox full", "category": "capacity"}]
                }
            },
            "x.toml",
            ".",
        ).bounce_rules
        self.assertEqual(needs_restart(self.old, replace(self.old, bounce_rules=rules)), [])

    def test_shaping_rules_are_reloaded(self) -> None:
        rules = configmod.parse(
            {"shaping": {"rules": [{"name": "slow", "pattern": "slow down"}]}},
            "x.toml",
            ".",
        ).shaping_rules
        self.assertTrue(rules)
        self.assertEqual(needs_restart(self.old, replace(self.old, shaping_rules=rules)), [])

    def test_where_a_file_was_read_from_is_no_change(self) -> None:
        moved = replace(self.old, source="/etc/mta/mta.toml", base_dir="/etc/mta")
        self.assertEqual(needs_restart(self.old, moved), [])

    def test_session_limits_are_the_limits_section(self) -> None:
        """Every option of [limits] but the sending limit's default reaches the sessions."""
        limits = configmod.LimitsConfig()
        built = session_limits(self.old)
        for name in SessionLimits.__dataclass_fields__:
            self.assertEqual(getattr(built, name), getattr(limits, name), name)
        self.assertEqual(
            set(SessionLimits.__dataclass_fields__) | {"daily_messages"},
            set(configmod.LimitsConfig.__dataclass_fields__),
        )
