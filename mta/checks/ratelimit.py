"""The per-user daily sending limit (SPEC section 2) as the built-in C{ratelimit} plugin.

Always on: without a C{[[plugins]]} entry named C{ratelimit} it runs with
its defaults.  The limit is a user's C{daily_limit} (users file, C{mtactl
user add --daily-limit}) or else C{daily_messages} (the option, else
C{[limits] daily_messages}, 300 by default); 0 means no limit.  What counts is
one per accepted message, or with C{count = "recipients"} one per
recipient.  Counts are kept by L{mta.dailycount.DailyCounter} in
C{spool/state/}, so a restart does not reset them; the day is the UTC day.

Refusals are temporary (C{451 4.7.1}) and say which limit was reached:
at MAIL once the day's count is used up, at RCPT when one more recipient
would pass it (recipient counting), and at the end of data if other
sessions of the same login used the rest meanwhile.  Only messages that
were queued count (the C{on_queued} hook), never refused ones.
Clients from trusted networks have no login and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import implementer

from mta.checks import CONTINUE, MessageInfo, PluginContext, SessionInfo, Verdict, tempfail
from mta.config import option
from mta.dailycount import DailyCounter
from mta.interfaces import IMailHook, IMessageHook, IQueuedHook, IRcptHook

log = Logger(namespace="mta.checks.ratelimit")


@dataclass(frozen=True)
class Options:
    daily_messages: int | None = option(None, minimum=0)  # None: [limits] daily_messages
    count: str = option("messages", choices=("messages", "recipients"))


@implementer(IMailHook, IRcptHook, IMessageHook, IQueuedHook)
class SendingLimit:
    name = "ratelimit"

    def __init__(self, counter: DailyCounter, users: object, default: int, count: str) -> None:
        self.counter = counter
        self.users = users
        self.default = default
        self.by_recipient = count == "recipients"

    def limit(self, login: str) -> int:
        user = self.users.get(login)  # type: ignore[attr-defined]
        if user is not None and user.daily_limit is not None:
            return int(user.daily_limit)
        return self.default

    def _refuse(self, login: str, limit: int) -> Verdict:
        unit = "recipients" if self.by_recipient else "messages"
        log.info("{login}: daily limit of {n} {unit} reached", login=login, n=limit, unit=unit)
        return tempfail(
            f"Daily sending limit of {limit} {unit} reached for <{login}>; try again tomorrow"
        )

    def on_mail(self, session: SessionInfo, sender: str) -> Verdict:
        login = session.login
        if login is None:
            return CONTINUE
        limit = self.limit(login)
        if limit and self.counter.count(login) >= limit:
            return self._refuse(login, limit)
        return CONTINUE

    def on_rcpt(
        self, session: SessionInfo, sender: str, accepted: list[str], recipient: str
    ) -> Verdict:
        login = session.login
        if login is None or not self.by_recipient:
            return CONTINUE
        limit = self.limit(login)
        if limit and self.counter.count(login) + len(accepted) + 1 > limit:
            return self._refuse(login, limit)
        return CONTINUE

    def _weight(self, message: MessageInfo) -> int:
        return len(message.recipients) if self.by_recipient else 1

    def on_message(self, session: SessionInfo, message: MessageInfo) -> Verdict:
        login = session.login
        if login is None:
            return CONTINUE
        limit = self.limit(login)
        if limit and self.counter.count(login) + self._weight(message) > limit:
            return self._refuse(login, limit)
        return CONTINUE

    def on_queued(self, session: SessionInfo, message: MessageInfo) -> None:
        if session.login is not None:
            self.counter.add(session.login, self._weight(message))


def make(options: Options, context: PluginContext) -> SendingLimit:
    default = options.daily_messages
    if default is None:
        default = context.config.limits.daily_messages
    counter = DailyCounter(context.state_dir, context.reactor)
    return SendingLimit(counter, context.users, default, options.count)


__all__ = ["Options", "SendingLimit", "make"]
