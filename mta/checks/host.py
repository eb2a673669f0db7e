"""Loading plugins from the configuration and running their hooks.

Built-ins are modules of this package (C{BUILTINS}); a site plugin is a
C{.py} file named by C{path}, loaded under a private module name so that
it cannot shadow anything.  Every plugin is checked with C{verifyObject}
against each hook interface it declares, so a broken plugin stops
start-up with one clear line instead of failing on the first message.

Running a phase calls the plugins that provide its hook, in configuration
order, until one answers with anything but continue.  A hook that raises,
fails, answers with something that is not a L{Verdict} or does not answer
within its timeout becomes a 451 and a log entry.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from twisted.internet.defer import (
    Deferred,
    TimeoutError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mta.checks import CONTINUE, Action, MessageInfo, PluginContext, SessionInfo, Verdict
from mta.config import PluginConfig, load_table
from mta.envelope import Envelope
from mta.errors import ConfigError, Reply
from mta.interfaces import (
    ICheck,
    IConnectHook,
    IMailHook,
    IMessageHook,
    IOutboundHook,
    IQueuedHook,
    IRcptHook,
    IStartupHook,
)

log = Logger(namespace="mta.checks")

BUILTINS = {
    "ratelimit": "mta.checks.ratelimit",
    "clamd": "mta.checks.clamd",
    "spamd": "mta.checks.spamd",
    "dkim": "mta.checks.dkim",
}
HOOKS: tuple[type[Interface], ...] = (
    IConnectHook,
    IMailHook,
    IRcptHook,
    IMessageHook,
    IQueuedHook,
    IOutboundHook,
    IStartupHook,
)


def failed_check(name: str) -> Verdict:
    return Verdict(
        Action.TEMPFAIL,
        Reply(451, "4.3.0", f"Temporary failure in the {name} check; try again later"),
    )


@dataclass(frozen=True)
class Loaded:
    name: str
    plugin: Any
    timeout: float


def load_module(entry: PluginConfig, source: str) -> ModuleType:
    where = f"{source}: [plugins.{entry.name}]"
    if not entry.path:
        if entry.name not in BUILTINS:
            known = ", ".join(sorted(BUILTINS))
            raise ConfigError(
                f"{where} name: no built-in plugin {entry.name!r} (built-ins: {known}; "
                "a site plugin needs path)"
            )
        return importlib.import_module(BUILTINS[entry.name])
    if not os.path.isfile(entry.path):
        raise ConfigError(f"{where} path: no such file {entry.path!r}")
    spec = importlib.util.spec_from_file_location(f"mta_site_plugin_{entry.name}", entry.path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where} path: cannot load {entry.path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses and type hints look the module up by name.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[spec.name]
        raise ConfigError(f"{where} path: {entry.path!r} failed to load: {e!r}") from None
    return module


def load_plugin(entry: PluginConfig, context: PluginContext) -> Loaded:
    """Import, configure and verify one plugin; L{ConfigError} for any problem."""
    where = f"{context.source}: [plugins.{entry.name}]"
    module = load_module(entry, context.source)
    make = getattr(module, "make", None)
    if not callable(make):
        raise ConfigError(f"{where} the module has no make(options, context) function")
    options_class = getattr(module, "Options", None)
    if options_class is None:
        if entry.options:
            raise ConfigError(f"{where} options: this plugin takes no options")
        options = None
    else:
        options = load_table(
            context.source, f"plugins.{entry.name}.options", options_class, entry.options
        )
    try:
        plugin = make(options, context)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{where} cannot be set up: {e}") from None
    provided = [iface for iface in HOOKS if iface.providedBy(plugin)]
    if not provided:
        raise ConfigError(f"{where} the plugin provides no hook interface")
    for iface in (ICheck, *provided):
        try:
            verifyObject(iface, plugin)
        except Invalid as e:
            text = " ".join(str(e).split())
            iname = getattr(iface, "__name__", iface)
            raise ConfigError(f"{where} does not implement {iname}: {text}") from None
    return Loaded(entry.name, plugin, entry.timeout)


def entries(plugins: Sequence[PluginConfig]) -> list[PluginConfig]:
    """The configured plugins; the sending limit is always on (SPEC section 2)."""
    configured = list(plugins)
    if not any(e.name == "ratelimit" and not e.path for e in configured):
        configured.insert(0, PluginConfig(name="ratelimit"))
    return configured


def load(plugins: Sequence[PluginConfig], context: PluginContext) -> Checks:
    """Load the C{[[plugins]]} entries, each given C{context} with its own entry."""
    loaded = [load_plugin(e, replace(context, plugin=e)) for e in entries(plugins)]
    return Checks(loaded, context.reactor)


def _then(result: Verdict | Deferred[Verdict], f: Callable[[Verdict], Any]) -> Any:
    if isinstance(result, Deferred):
        return result.addCallback(f)
    return f(result)


class Checks:
    """The loaded plugins, and one method per phase to run them."""

    def __init__(self, plugins: Sequence[Loaded], clock: IReactorTime) -> None:
        self.plugins = list(plugins)
        self.clock = clock
        self._by_hook: dict[type[Interface], list[Loaded]] = {}
        self._owned: frozenset[bytes] | None = None

    def _with(self, iface: type[Interface]) -> list[Loaded]:
        """The plugins with a hook (asked once per hook: the plugins do not change)."""
        found = self._by_hook.get(iface)
        if found is None:
            found = self._by_hook[iface] = [p for p in self.plugins if iface.providedBy(p.plugin)]
        return found

    def has(self, iface: type[Interface]) -> bool:
        return bool(self._with(iface))

    def owned_fields(self) -> frozenset[bytes]:
        """Lower-case names of the header fields that message hooks write
        (a plugin's C{owned_fields}): the client's own fields of those names
        are removed at receipt, so that no client can forge a check's verdict."""
        if self._owned is None:
            names: set[bytes] = set()
            for loaded in self._with(IMessageHook):
                names.update(
                    n.lower().encode("ascii") for n in getattr(loaded.plugin, "owned_fields", ())
                )
            self._owned = frozenset(names)
        return self._owned

    def _call(self, loaded: Loaded, phase: str, call: Callable[[], Any]) -> Any:
        """One hook: a Verdict now, or a Deferred that never fails."""

        def bad(f: Failure) -> Verdict:
            if f.check(TimeoutError):
                log.error(
                    "plugin {name}: {phase} hook timed out after {t}s",
                    name=loaded.name,
                    phase=phase,
                    t=loaded.timeout,
                )
            else:
                log.failure("plugin {name}: {phase} hook failed", f, name=loaded.name, phase=phase)
            return failed_check(loaded.name)

        def check(result: object) -> Verdict:
            if not isinstance(result, Verdict):
                log.error(
                    "plugin {name}: {phase} hook returned {r!r}, not a Verdict",
                    name=loaded.name,
                    phase=phase,
                    r=result,
                )
                return failed_check(loaded.name)
            if not _well_formed(result):
                # Verdict checks this when it is made; a plugin can still
                # get around that (object.__setattr__, a subclass).
                log.error(
                    "plugin {name}: {phase} hook returned {r!r}: not a valid verdict "
                    "(a reject needs a 5xx reply, a tempfail or disconnect a 4xx)",
                    name=loaded.name,
                    phase=phase,
                    r=result,
                )
                return failed_check(loaded.name)
            return result

        try:
            result = call()
        except Exception:
            return bad(Failure())
        if isinstance(result, Deferred):
            result.addTimeout(loaded.timeout, self.clock)
            return result.addCallbacks(check, bad)
        return check(result)

    def _run(self, iface: type[Interface], phase: str, method: str, *args: Any) -> Any:
        """Verdict or Deferred[Verdict]: the first one that is not continue."""
        plugins = self._with(iface)

        def after(v: Verdict, i: int) -> Any:
            return v if _final(v) else step(i + 1)

        def step(i: int) -> Any:
            while i < len(plugins):
                loaded = plugins[i]
                hook = getattr(loaded.plugin, method)
                result = self._call(loaded, phase, lambda h=hook: h(*args))  # type: ignore[misc]
                if isinstance(result, Deferred):
                    return result.addCallback(after, i)
                if _final(result):
                    return result
                i += 1
            return CONTINUE

        return step(0)

    def connect(self, session: SessionInfo) -> Verdict | Deferred[Verdict]:
        return self._run(IConnectHook, "connect", "on_connect", session)  # type: ignore[no-any-return]

    def mail(self, session: SessionInfo, sender: str) -> Verdict | Deferred[Verdict]:
        return self._run(IMailHook, "MAIL", "on_mail", session, sender)  # type: ignore[no-any-return]

    def rcpt(
        self, session: SessionInfo, sender: str, accepted: list[str], recipient: str
    ) -> Verdict | Deferred[Verdict]:
        return self._run(  # type: ignore[no-any-return]
            IRcptHook, "RCPT", "on_rcpt", session, sender, accepted, recipient
        )

    def message(self, session: SessionInfo, message: MessageInfo) -> Verdict | Deferred[Verdict]:
        return self._run(IMessageHook, "message", "on_message", session, message)  # type: ignore[no-any-return]

    def queued(self, session: SessionInfo, message: MessageInfo) -> None:
        for loaded in self._with(IQueuedHook):
            try:
                loaded.plugin.on_queued(session, message)
            except Exception:
                log.failure("plugin {name}: queued hook failed", name=loaded.name)

    def startup(self) -> Deferred[None]:
        """Run the start-up hooks, each bounded by its plugin's timeout (a
        daemon that accepts and stays silent must not hang them unlogged).
        Failures are logged only; fires when all are done."""
        pending: list[Deferred[Any]] = []
        for loaded in self._with(IStartupHook):
            d = maybeDeferred(loaded.plugin.startup)
            d.addTimeout(loaded.timeout, self.clock)
            d.addErrback(_startup_failed, loaded.name, loaded.timeout)
            pending.append(d)
        return gatherResults(pending).addCallback(lambda _: None)

    def outbound(self, envelope: Envelope, data: bytes) -> Deferred[bytes]:
        """The bytes to send: C{data} with every outbound hook's header lines
        in front; fails (a temporary delivery error) if a hook fails."""
        plugins = self._with(IOutboundHook)
        d: Deferred[bytes] = succeed(data)
        for loaded in plugins:

            def one(current: bytes, loaded: Loaded = loaded) -> Deferred[bytes]:
                hook = maybeDeferred(loaded.plugin.on_outbound, envelope, current)
                hook.addTimeout(loaded.timeout, self.clock)

                def prepend(prefix: object) -> bytes:
                    if not isinstance(prefix, bytes):
                        raise TypeError(f"plugin {loaded.name}: on_outbound returned {prefix!r}")
                    return prefix + current

                return hook.addCallback(prepend)

            d.addCallback(one)
        return d


def _final(v: Verdict) -> bool:
    return v.action != Action.CONTINUE


def _well_formed(v: Verdict) -> bool:
    """An action of the closed set and, for a refusal, a reply that is one:
    5xx for reject, 4xx for tempfail and disconnect."""
    if not isinstance(v.action, Action):
        return False
    if not v.refuses:
        return v.reply is None
    reply = v.to_reply()
    if not isinstance(reply, Reply):
        return False
    if v.action == Action.REJECT:
        return 500 <= reply.code <= 599
    return 400 <= reply.code <= 499


def _startup_failed(f: Failure, name: str, timeout: float) -> None:
    if f.check(TimeoutError):
        log.error("plugin {name}: startup did not finish within {t}s", name=name, t=timeout)
    else:
        log.failure("plugin {name}: startup failed", f, name=name)
