"""The plugin host: loading and verifying plugins, verdicts, failures and timeouts."""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import fields, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mta import config as configmod
from mta.checks import (
    ACCEPT,
    CONTINUE,
    Action,
    SessionInfo,
    Verdict,
    disconnect,
    reject,
    tempfail,
)
from mta.checks import host as checkhost
from mta.errors import ConfigError, Reply
from mta.interfaces import IConnectHook, IMailHook, IMessageHook, IQueuedHook, IStartupHook
from mta.spool.fs import FileStore, Spool
from mta.spool.queueid import QueueIdGenerator
from mta.testing import run_inline
from tests.support import LOGIN, Harness, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "plugins", "example_domains.py")
SESSION = SessionInfo(peer="192.0.2.1", helo="c", login=LOGIN, tls=None, trusted=False)


@implementer(IMailHook)
class Scripted:
    """A MAIL hook that answers what it is told, or raises."""

    name = "scripted"

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def on_mail(self, session: SessionInfo, sender: str) -> Any:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def checks_of(h: Harness, *plugins: Any, timeout: float = 5.0) -> checkhost.Checks:
    loaded = [checkhost.Loaded(p.name, p, timeout) for p in plugins]
    return checkhost.Checks(loaded, h.clock)


def mail(h: Harness) -> tuple[int, str]:
    c = h.connect()
    c.login()
    return c.command(f"MAIL FROM:<{LOGIN}>")


class VerdictTests(SynchronousTestCase):
    """Verdict as a closed set: a refusal's reply must fit its action (5xx for reject, 4xx for
    tempfail and disconnect, none for continue and accept), unknown actions raise, and the
    default replies."""

    def test_reply_must_match_the_action(self) -> None:
        self.assertRaises(ValueError, Verdict, Action.REJECT, Reply(451, "4.7.1", "x"))
        self.assertRaises(ValueError, Verdict, Action.TEMPFAIL, Reply(550, "5.7.1", "x"))
        self.assertRaises(ValueError, Verdict, Action.CONTINUE, Reply(550, "5.7.1", "x"))

    def test_action_is_one_of_the_closed_set(self) -> None:
        # A plugin that writes the action as a string gets the same verdict.
        self.assertIs(Verdict("continue").action, Action.CONTINUE)  # type: ignore[arg-type]
        self.assertFalse(checkhost._final(Verdict("continue")))  # type: ignore[arg-type]
        self.assertTrue(Verdict("tempfail").refuses)  # type: ignore[arg-type]
        self.assertRaises(ValueError, Verdict, "pass")
        self.assertRaises(ValueError, Verdict, "Continue")
        # Spelled as a string, a reject still needs a 5xx reply.
        self.assertRaises(ValueError, Verdict, "reject", Reply(250, "2.0.0", "fine"))
        self.assertRaises(ValueError, Verdict, "tempfail", Reply(550, "5.7.1", "x"))

    def test_default_replies(self) -> None:
        self.assertEqual(Verdict(Action.REJECT).to_reply().code, 550)
        self.assertEqual(Verdict(Action.TEMPFAIL).to_reply().code, 451)
        self.assertEqual(Verdict(Action.DISCONNECT).to_reply().code, 421)


class SessionVerdictTests(SynchronousTestCase):
    """Plugin verdicts in a session: continue and accept go on (accept skips the later plugins),
    reject and tempfail send their reply, a string continue still means continue, disconnect
    closes; an exception, a failed Deferred, something not a Verdict, a refusal with a success
    reply or a timeout (which cancels the hook) is a 451; the connect hook refuses the greeting;
    a message refusal queues nothing; a check's own header fields are removed from the client's
    message and its notes kept in the envelope."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def use(self, *plugins: Any, timeout: float = 5.0) -> None:
        self.h.use(checks=checks_of(self.h, *plugins, timeout=timeout))

    def test_continue_and_accept_go_on(self) -> None:
        for verdict in (CONTINUE, ACCEPT):
            self.use(Scripted(verdict))
            self.assertEqual(mail(self.h)[0], 250)

    def test_accept_skips_later_plugins(self) -> None:
        later = Scripted(reject("no"))
        self.use(Scripted(ACCEPT), later)
        self.assertEqual(mail(self.h)[0], 250)
        self.assertEqual(later.calls, 0)

    def test_reject_and_tempfail_send_their_reply(self) -> None:
        self.use(Scripted(CONTINUE), Scripted(reject("Go away", 553, "5.7.1")))
        self.assertEqual(mail(self.h), (553, "5.7.1 Go away"))
        self.use(Scripted(tempfail("Later")))
        self.assertEqual(mail(self.h), (451, "4.7.1 Later"))

    def test_a_string_continue_goes_on_to_the_next_plugin(self) -> None:
        later = Scripted(reject("Go away", 553, "5.7.1"))
        self.use(Scripted(Verdict("continue")), later)  # type: ignore[arg-type]
        self.assertEqual(mail(self.h), (553, "5.7.1 Go away"))
        self.assertEqual(later.calls, 1)

    def test_a_refusal_with_a_success_reply_is_a_451(self) -> None:
        # Made valid, then changed behind the dataclass's back: the host
        # checks again, so a "reject" can never send a 250 (at the end of
        # DATA that would lose a message the client thinks accepted).
        for action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
            verdict = reject("x") if action is Action.REJECT else tempfail("x")
            object.__setattr__(verdict, "action", action)
            object.__setattr__(verdict, "reply", Reply(250, "2.0.0", "fine"))
            later = Scripted(CONTINUE)
            self.use(Scripted(verdict), later)
            self.assertEqual(
                mail(self.h),
                (451, "4.3.0 Temporary failure in the scripted check; try again later"),
            )
            self.assertEqual(later.calls, 0)
        # A reject with a 4xx, a tempfail with a 5xx, an unknown action.
        wrong = [reject("x"), tempfail("x"), Verdict(Action.CONTINUE)]
        object.__setattr__(wrong[0], "reply", Reply(451, "4.7.1", "x"))
        object.__setattr__(wrong[1], "reply", Reply(550, "5.7.1", "x"))
        object.__setattr__(wrong[2], "action", "pass")
        for verdict in wrong:
            self.use(Scripted(verdict))
            self.assertEqual(mail(self.h)[0], 451)

    def test_disconnect_closes(self) -> None:
        self.use(Scripted(disconnect("Bye now")))
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>"), (421, "4.7.0 Bye now"))
        self.assertTrue(c.closed)

    def test_exception_is_a_451(self) -> None:
        self.use(Scripted(RuntimeError("plugin bug")))
        code, text = mail(self.h)
        self.assertEqual(
            (code, text), (451, "4.3.0 Temporary failure in the scripted check; try again later")
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_deferred_is_a_451(self) -> None:
        d: Deferred[Verdict] = Deferred()
        self.use(Scripted(d))
        c = self.h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\n")
        self.assertEqual(c.replies(), [])  # waiting for the plugin
        d.errback(ValueError("daemon said nonsense"))
        self.assertEqual(c.codes(), [451])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_not_a_verdict_is_a_451(self) -> None:
        self.use(Scripted("yes please"))
        self.assertEqual(mail(self.h)[0], 451)

    def test_timeout_is_a_451_and_cancels(self) -> None:
        cancelled: list[bool] = []
        d: Deferred[Verdict] = Deferred(lambda _: cancelled.append(True))
        self.use(Scripted(d), timeout=3.0)
        c = self.h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\n")
        self.h.clock.advance(2.9)
        self.assertEqual(c.replies(), [])
        self.h.clock.advance(0.2)
        self.assertEqual(c.codes(), [451])
        self.assertEqual(cancelled, [True])
        # The session goes on: the next command is answered.
        self.assertEqual(c.command("NOOP")[0], 250)

    def test_connect_hook_refuses_the_greeting(self) -> None:
        @implementer(IConnectHook)
        class Gate:
            name = "gate"

            def __init__(self, verdict: Verdict) -> None:
                self.verdict = verdict
                self.peers: list[str] = []

            def on_connect(self, session: SessionInfo) -> Verdict:
                self.peers.append(session.peer)
                return self.verdict

        for verdict, code in ((reject("Not from here"), 554), (tempfail("Busy"), 421)):
            gate = Gate(verdict)
            self.use(gate)
            c = self.h.connect(peer="198.51.100.7")
            [(got, text)] = c.replies()
            self.assertEqual(got, code)
            self.assertTrue(text.endswith(verdict.to_reply().text), text)
            self.assertTrue(c.closed)
            self.assertEqual(gate.peers, ["198.51.100.7"])
        self.use(Gate(CONTINUE))
        self.assertEqual(self.h.connect().codes(), [220])

    def test_message_refusal_queues_nothing(self) -> None:
        @implementer(IMessageHook)
        class Refuse:
            name = "refuse"
            seen: bytes = b""

            def on_message(self, session: SessionInfo, message: Any) -> Verdict:
                with message.open() as f:
                    Refuse.seen = f.read()
                return reject("Not this one", 554, "5.7.1")

        self.use(Refuse())
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        c.send(f"From: {LOGIN}\r\n\r\nsecret body\r\n.\r\n")
        self.assertEqual(c.replies(), [(554, "5.7.1 Not this one")])
        self.assertEqual(self.h.spool.messages, {})
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        self.assertIn(b"secret body", Refuse.seen)
        self.assertTrue(Refuse.seen.startswith(b"Received: "))

    def test_owned_fields_removed_and_notes_kept(self) -> None:
        """The client's own fields of the names a check writes are gone before
        the check reads the message; what it notes is in the queued envelope."""

        @implementer(IMessageHook)
        class Verdicts:
            name = "verdicts"
            owned_fields = ("X-Verdict", "X-Verdict-Score")
            seen: bytes = b""

            def on_message(self, session: SessionInfo, message: Any) -> Verdict:
                with message.open() as f:
                    Verdicts.seen = f.read()
                message.notes[self.name] = {"headers": "X-Verdict: fine\r\n"}
                return CONTINUE

        self.use(Verdicts())
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        c.send(
            f"X-VERDICT: forged clean\r\n\tfolded on\r\nFrom: {LOGIN}\r\n"
            "x-verdict-score: -100\r\nX-Verdicts: kept\r\n\r\nbody\r\n.\r\n"
        )
        [(code, text)] = c.replies()
        self.assertEqual(code, 250, text)
        _, env, stored = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertEqual(Verdicts.seen, stored)
        self.assertNotIn(b"forged", stored)
        self.assertNotIn(b"folded on", stored)
        self.assertNotIn(b"-100", stored)
        self.assertIn(b"\r\nX-Verdicts: kept\r\n", stored)
        self.assertEqual(env.extra["plugins"], {"verdicts": {"headers": "X-Verdict: fine\r\n"}})


class QueuedHookTests(SynchronousTestCase):
    """The queued hook on the real file-system spool: after the commit, open() reads the message as
    queued: our Received: field, then the client's message."""

    def test_on_queued_reads_the_committed_message(self) -> None:
        # With the real spool: after the commit the transaction's file is
        # closed and the message has moved out of tmp/.
        h = Harness(self.mktemp())
        store = FileStore(os.path.abspath(self.mktemp()))
        store.open()
        h.use(spool=Spool(store, run_inline, QueueIdGenerator(h.clock.seconds)))

        @implementer(IQueuedHook)
        class Reader:
            name = "reader"
            seen: list[tuple[str, bytes]] = []

            def on_queued(self, session: SessionInfo, message: Any) -> None:
                with message.open() as f:
                    Reader.seen.append((message.queue_id, f.read()))

        h.use(checks=checks_of(h, Reader()))
        c = h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        c.send(f"From: {LOGIN}\r\n\r\nqueued body\r\n.\r\n")
        [(code, text)] = c.replies()
        self.assertEqual(code, 250, text)
        [(queue_id, data)] = Reader.seen
        self.assertTrue(text.endswith(queue_id), text)
        self.assertTrue(data.startswith(b"Received: "))
        self.assertTrue(data.endswith(b"queued body\r\n"), data[-40:])
        self.assertEqual(self.flushLoggedErrors(), [])


class LoadingTests(SynchronousTestCase):
    """Loading plugins from [[plugins]]: the sending limit always on and first, the example site
    plugin by path, errors that name the file and key (options, entries, a missing interface
    method, no hook at all), and each plugin's context with its own entry."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def load(self, *tables: dict[str, Any]) -> checkhost.Checks:
        config = configmod.parse({"plugins": list(tables)}, "/etc/mta.toml", REPO)
        return checkhost.load(config.plugins, replace(self.h.context, source="/etc/mta.toml"))

    def error(self, *tables: dict[str, Any]) -> str:
        return str(self.assertRaises(ConfigError, self.load, *tables))

    def test_ratelimit_is_always_on_and_first(self) -> None:
        checks = self.load({"name": "blocked", "path": EXAMPLE})
        self.assertEqual([p.name for p in checks.plugins], ["ratelimit", "blocked"])

    def test_example_site_plugin_by_path(self) -> None:
        checks = self.load(
            {"name": "blocked", "path": "plugins/example_domains.py",
             "options": {"domains": ["Blocked.Example"]}}
        )  # fmt: skip
        self.h.use(checks=checks)
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        code, text = c.command("RCPT TO:<someone@blocked.example>")
        self.assertEqual(code, 550)
        self.assertIn("someone@blocked.example", text)
        self.assertEqual(c.command("RCPT TO:<someone@fine.example>")[0], 250)

    def test_option_errors_name_file_and_key(self) -> None:
        text = self.error({"name": "blocked", "path": EXAMPLE, "options": {"domains": 3}})
        self.assertEqual(
            text, "/etc/mta.toml: [plugins.blocked.options] domains: expected a list, got 3"
        )
        text = self.error({"name": "clamd", "options": {"colour": "red"}})
        self.assertEqual(text, "/etc/mta.toml: [plugins.clamd.options] unknown key 'colour'")
        text = self.error({"name": "clamd", "options": {"address": "udp:1"}})
        self.assertIn("[plugins.clamd.options] address: must start with unix: or tcp:", text)
        text = self.error({"name": "spamd", "options": {"reject_score": "high"}})
        self.assertIn("[plugins.spamd.options] reject_score: expected a number", text)

    def test_entry_errors(self) -> None:
        self.assertIn("no built-in plugin 'nope'", self.error({"name": "nope"}))
        self.assertIn("name is missing", self.error({"path": EXAMPLE}))
        self.assertIn("'clamd' is used twice", self.error({"name": "clamd"}, {"name": "clamd"}))
        self.assertIn("no such file", self.error({"name": "x", "path": "plugins/nothing.py"}))
        self.assertIn("unknown key 'colour'", self.error({"name": "clamd", "colour": 1}))

    def test_a_plugin_that_does_not_implement_its_interface(self) -> None:
        path = os.path.abspath(self.mktemp() + ".py")
        with open(path, "w") as f:
            f.write(
                "from zope.interface import implementer\n"
                "from mta.interfaces import IMailHook\n"
                "@implementer(IMailHook)\n"
                "class Broken:\n"
                "    name = 'broken'\n"
                "    def on_mail(self):\n"
                "        pass\n"
                "def make(options, context):\n"
                "    return Broken()\n"
            )
        text = self.error({"name": "broken", "path": path})
        self.assertIn("[plugins.broken] does not implement IMailHook", text)

    def test_each_plugin_gets_its_own_entry(self) -> None:
        """The context names the plugin's own [[plugins]] table, not the
        whole configuration, and carries the options built-ins apply."""
        path = os.path.abspath(self.mktemp() + ".py")
        with open(path, "w") as f:
            f.write(
                "from zope.interface import implementer\n"
                "from mta.checks import CONTINUE\n"
                "from mta.interfaces import IMailHook\n"
                "@implementer(IMailHook)\n"
                "class Keeps:\n"
                "    def __init__(self, context):\n"
                "        self.name, self.context = context.plugin.name, context\n"
                "    def on_mail(self, session, sender):\n"
                "        return CONTINUE\n"
                "def make(options, context):\n"
                "    return Keeps(context)\n"
            )
        doc = {
            "limits": {"daily_messages": 7},
            "dkim": {"keys_dir": "/var/lib/mta/dkim"},
            "plugins": [
                {"name": "first", "path": path, "timeout": 3},
                {"name": "second", "path": path},
                {"name": "dkim"},
            ],
        }
        config = configmod.parse(doc, "/etc/mta.toml", REPO)
        checks = checkhost.load(config.plugins, self.h.plugin_context(config))
        first, second = checks.plugins[1].plugin, checks.plugins[2].plugin
        self.assertEqual(first.context.plugin, config.plugins[0])
        self.assertEqual(second.context.plugin, config.plugins[1])
        self.assertEqual((first.name, second.name), ("first", "second"))
        self.assertEqual(first.context.plugin.timeout, 3.0)
        self.assertEqual((first.context.daily_messages, first.context.source), (7, "/etc/mta.toml"))
        self.assertEqual(checks.plugins[3].plugin.keys_dir, "/var/lib/mta/dkim")
        ratelimit = checks.plugins[0]
        self.assertEqual(ratelimit.name, "ratelimit")  # always on, with the default entry
        self.assertEqual(ratelimit.plugin.default, 7)

    def test_a_plugin_without_hooks(self) -> None:
        path = os.path.abspath(self.mktemp() + ".py")
        with open(path, "w") as f:
            f.write("def make(options, context):\n    return object()\n")
        self.assertIn("provides no hook interface", self.error({"name": "none", "path": path}))


class SendingLimitTests(SynchronousTestCase):
    """The ratelimit plugin in sessions: the UTC day boundary, the count kept across a restart,
    counting recipients instead of messages (also across a restart), trusted clients not counted,
    and concurrent sessions of one login checked again at the end of data."""

    def submit(self, c: Any, *recipients: str) -> int:
        c.command(f"MAIL FROM:<{LOGIN}>")
        for r in recipients or ("bob@example.net",):
            c.command(f"RCPT TO:<{r}>")
        c.command("DATA")
        c.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")
        return int(c.replies()[-1][0])

    def harness(self, directory: str, **options: Any) -> Harness:
        config = make_config(limits={"daily_messages": 2})
        config = replace(config, plugins=(configmod.PluginConfig("ratelimit", options=options),))
        return Harness(directory, config)

    def test_day_boundary(self) -> None:
        h = self.harness(self.mktemp())
        h.clock.advance(86400 - h.clock.seconds() % 86400 - 10)  # 23:59:50 UTC
        c = h.connect()
        c.login()
        self.assertEqual([self.submit(c), self.submit(c)], [250, 250])
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 451)
        h.clock.advance(11)  # the next UTC day
        self.assertEqual(self.submit(c), 250)

    def test_restart_keeps_the_count(self) -> None:
        directory = self.mktemp()
        h = self.harness(directory)
        c = h.connect()
        c.login()
        self.assertEqual([self.submit(c), self.submit(c)], [250, 250])
        again = self.harness(directory)  # a new process on the same state/
        c = again.connect()
        c.login()
        code, text = c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(code, 451)
        self.assertIn("Daily sending limit of 2 messages reached", text)

    def test_counting_recipients(self) -> None:
        h = self.harness(self.mktemp(), count="recipients", daily_messages=3)
        c = h.connect()
        c.login()
        self.assertEqual(self.submit(c, "a@example.net", "b@example.net"), 250)
        c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(c.command("RCPT TO:<c@example.net>")[0], 250)
        code, text = c.command("RCPT TO:<d@example.net>")
        self.assertEqual(code, 451)
        self.assertIn("Daily sending limit of 3 recipients", text)
        c.command("DATA")
        c.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(c.replies()[-1][0], 250)
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 451)

    def test_recipient_counts_survive_a_restart(self) -> None:
        directory = self.mktemp()
        h = self.harness(directory, count="recipients", daily_messages=3)
        c = h.connect()
        c.login()
        self.assertEqual(self.submit(c, "a@example.net", "b@example.net"), 250)
        c = self.harness(directory, count="recipients", daily_messages=3).connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(c.command("RCPT TO:<c@example.net>")[0], 250)
        self.assertEqual(c.command("RCPT TO:<d@example.net>")[0], 451)

    def test_trusted_clients_are_not_counted(self) -> None:
        config = make_config(
            limits={"daily_messages": 1}, auth={"trusted_networks": ["192.0.2.0/24"]}
        )
        h = Harness(self.mktemp(), config)
        c = h.connect(implicit_tls=False, peer="192.0.2.5")
        c.replies()
        c.command("EHLO app.test")
        self.assertEqual([self.submit(c), self.submit(c)], [250, 250])

    def test_concurrent_sessions_rechecked_at_end_of_data(self) -> None:
        h = self.harness(self.mktemp(), daily_messages=1)
        first, second = h.connect(), h.connect()
        for c in (first, second):
            c.login()
            c.command(f"MAIL FROM:<{LOGIN}>")
            c.command("RCPT TO:<bob@example.net>")
            c.command("DATA")
        first.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")
        second.send(f"From: {LOGIN}\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(first.codes(), [250])
        self.assertEqual(second.codes(), [451])
        self.assertEqual(len(h.spool.messages), 1)


class StartupTests(SynchronousTestCase):
    """Start-up hooks: a failing one is logged, not raised, and one that never finishes is cancelled
    after the plugin's timeout and logged."""

    def test_a_failing_startup_is_logged_not_raised(self) -> None:
        @implementer(IStartupHook)
        class Failing:
            name = "failing"

            def startup(self) -> None:
                raise ConnectionRefusedError("daemon down")

        h = Harness(self.mktemp())
        checkhost.Checks([checkhost.Loaded("failing", Failing(), 5)], h.clock).startup()
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 1)

    def test_a_startup_that_never_finishes_is_cancelled_and_logged(self) -> None:
        cancelled: list[bool] = []

        @implementer(IStartupHook)
        class Hanging:
            name = "hanging"

            def startup(self) -> Deferred[None]:
                return Deferred(lambda _: cancelled.append(True))

        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness(self.mktemp())
        done = checkhost.Checks([checkhost.Loaded("hanging", Hanging(), 7)], h.clock).startup()
        h.clock.advance(6.9)
        self.assertNoResult(done)
        h.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(cancelled, [True])
        self.assertIn(
            "plugin hanging: startup did not finish within 7s", [formatEvent(e) for e in events]
        )


class DocumentationTests(SynchronousTestCase):
    """The plugin documentation matches the code: the plugins of docs/mta.example.toml load and pass
    verifyObject, and every option of each built-in is in docs/configuration.md."""

    def test_example_configuration_loads_every_plugin(self) -> None:
        """The plugins of docs/mta.example.toml load and pass verifyObject."""
        h = Harness(self.mktemp())
        config = configmod.load(os.path.join(REPO, "docs", "mta.example.toml"))
        checks = checkhost.load(config.plugins, h.plugin_context(config))
        self.assertEqual([p.name for p in checks.plugins], ["ratelimit", "clamd", "spamd", "dkim"])

    def test_every_builtin_option_is_documented(self) -> None:
        with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
            text = f.read()
        for name, module_name in checkhost.BUILTINS.items():
            start = text.index(f"`{name}` options")
            end = text.find("\n\n`", start + 1)
            table = text[start : end if end >= 0 else None]
            documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
            options = importlib.import_module(module_name).Options
            self.assertEqual(sorted(documented), sorted(f.name for f in fields(options)), name)
