"""Content and policy checks as plugins: what a plugin author imports.

A plugin module (a built-in here, or a site's file in C{plugins/}) has

  - C{Options}: a frozen dataclass of its options (optional; without it
    the plugin takes none), checked like the rest of the configuration;
  - C{make(options, context)}: returns the plugin object, which provides
    L{mta.interfaces.ICheck} and one or more hook interfaces.

A hook answers with a L{Verdict} from a closed set of actions.  See
C{docs/plugins.md} for the whole contract and an example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any

from twisted.internet.defer import Deferred

from mta.config import PluginConfig
from mta.errors import Reply
from mta.interfaces import ISharedState, IUserDirectory


class Action(StrEnum):
    CONTINUE = "continue"  # no objection; the next plugin decides
    ACCEPT = "accept"  # accept now; later plugins of this phase are skipped
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx)
    DISCONNECT = "disconnect"  # 421 and close the connection


@dataclass(frozen=True)
class Verdict:
    """A hook's answer: an action and, for refusals, the reply to send."""

    action: Action
    reply: Reply | None = None

    def __post_init__(self) -> None:
        # A closed set: "continue" (a str) becomes Action.CONTINUE, and an
        # unknown action is an error here, not a verdict taken as final.
        try:
            action = Action(self.action)
        except ValueError:
            raise ValueError(f"unknown verdict action {self.action!r}") from None
        object.__setattr__(self, "action", action)
        if self.reply is not None and not isinstance(self.reply, Reply):
            raise TypeError(f"a verdict's reply must be a Reply, not {self.reply!r}")
        if self.reply is None:
            return
        if self.action is Action.REJECT and not self.reply.permanent:
            raise ValueError(f"a reject verdict needs a 5xx reply, not {self.reply.code}")
        if self.action in (Action.TEMPFAIL, Action.DISCONNECT) and not self.reply.temporary:
            raise ValueError(f"a {self.action} verdict needs a 4xx reply, not {self.reply.code}")
        if self.action in (Action.CONTINUE, Action.ACCEPT):
            raise ValueError(f"a {self.action} verdict takes no reply")

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT)

    def to_reply(self) -> Reply:
        """The reply a refusal sends (a default when the plugin gave none)."""
        if self.reply is not None:
            return self.reply
        if self.action is Action.REJECT:
            return Reply(550, "5.7.1", "Refused by local policy")
        if self.action is Action.DISCONNECT:
            return Reply(421, "4.7.0", "Closing connection by local policy")
        return Reply(451, "4.7.1", "Temporarily refused by local policy; try again later")


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)


def reject(text: str, code: int = 550, enhanced: str = "5.7.1") -> Verdict:
    return Verdict(Action.REJECT, Reply(code, enhanced, text))


def tempfail(text: str, code: int = 451, enhanced: str = "4.7.1") -> Verdict:
    return Verdict(Action.TEMPFAIL, Reply(code, enhanced, text))


def disconnect(text: str) -> Verdict:
    return Verdict(Action.DISCONNECT, Reply(421, "4.7.0", text))


@dataclass(frozen=True)
class SessionInfo:
    """What a hook may know about the client connection."""

    peer: str  # the client's IP address
    helo: str | None
    login: str | None  # the authenticated login, None for trusted networks
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384", None before TLS
    trusted: bool  # in [auth] trusted_networks


@dataclass(frozen=True)
class MessageInfo:
    """A received message, before it is queued (or just after, for on_queued)."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    size: int  # octets as stored, with our Received: field
    eight_bit: bool
    opener: Callable[[], IO[bytes]] = field(repr=False)
    # What message hooks keep with the message, by plugin name: stored in
    # the envelope (Envelope.extra["plugins"], so JSON values only) when the
    # message is queued, where the plugin's outbound hook finds it again.
    notes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def open(self) -> IO[bytes]:
        """A new binary file of the message from its first byte; close it after use.

        In an on-queued hook this is the queued message, wherever it is in
        the spool; L{mta.errors.StorageError} if it has already left it.

        Reads block briefly (the file is fresh in the page cache); read it
        in chunks, e.g. with C{twisted.protocols.basic.FileSender}.
        """
        return self.opener()


@dataclass(frozen=True)
class PluginContext:
    """What the service gives each plugin's C{make}: its own C{[[plugins]]}
    entry, the services a plugin may use, and the options of other
    sections that the built-in plugins apply.  Not the whole configuration:
    a plugin depends on what it is given here, nothing else."""

    source: str  # the configuration file, for error messages
    reactor: Any  # IReactorTime and, in the daemon, IReactorTCP/IReactorUNIX
    runner: Callable[[Callable[[], Any]], Deferred[Any]]  # blocking work, off the reactor
    users: IUserDirectory  # the users file, or the users in Redis
    state_dir: str  # spool/state: where a plugin may keep small files
    hostname: str
    shared: ISharedState  # counts the instances of a cluster share
    daily_messages: int  # [limits] daily_messages: the sending limit's default
    dkim_keys_dir: str  # [dkim] keys_dir: the signing keys
    # This plugin's [[plugins]] entry (name, path, timeout, options as
    # written); mta.checks.host.load sets it for each plugin.
    plugin: PluginConfig = field(default_factory=PluginConfig)
