"""The per-user daily sending limit (SPEC section 2) as the built-in C{ratelimit} plugin.

Always on: without a C{[[plugins]]} entry named C{ratelimit} it runs with
its defaults.  The limit is a user's C{daily_limit} (users file, C{mtactl
user add --daily-limit}) or else C{daily_messages} (the option, else
C{[limits] daily_messages}, 300 by default); 0 means no limit.  What counts is
one per accepted message, or with C{count = "recipients"} one per
recipient.  Counts are kept in the service's L{ISharedState}: by
L{mta.dailycount.DailyCounter} in C{spool/state/} for one instance (a
restart does not reset them), in Redis for a cluster (every instance
counts against the same limit); the day is the UTC day.  When Redis
cannot answer, the limit fails closed: C{451 4.3.0}, the message waits.

Refusals are temporary (C{451 4.7.1}) and say which limit was reached:
at MAIL once the day's count is used up, at RCPT when one more recipient
would pass it (recipient counting), and at the end of data if other
sessions of the same login used the rest meanwhile.  Only messages that
were queued count (the C{on_queued} hook), never refused ones.
Clients from trusted networks have no login and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.checks import CONTINUE, MessageInfo, PluginContext, SessionInfo, Verdict, tempfail
from mta.config import option
from mta.errors import SharedStateError
from mta.interfaces import IMailHook, IMessageHook, IQueuedHook, IRcptHook, ISharedState

log = Logger(namespace="mta.checks.ratelimit")


@dataclass(frozen=True)
class Options:
    daily_messages: int | None = option(None, minimum=0)  # None: [limits] daily_messages
    count: str = option("messages", choices=("messages", "recipients"))


UNAVAILABLE = (
    "The daily sending limit cannot be checked right now (a server problem); try again later"
)


@implementer(IMailHook, IRcptHook, IMessageHook, IQueuedHook)
class SendingLimit:
    name = "ratelimit"

    def __init__(self, state: ISharedState, users: object, default: int, count: str) -> None:
        self.state = state
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

    def _check(self, login: str, more: int) -> Verdict | Deferred[Verdict]:
        """Refuse when C{more} units on top of today's count would pass the limit.

        The count is asked of the shared state (another instance may have
        counted since); when it cannot answer, the message waits (fail closed).
        """
        limit = self.limit(login)
        if not limit:
            return CONTINUE

        def decide(sent: int) -> Verdict:
            return self._refuse(login, limit) if sent + more > limit else CONTINUE

        def unavailable(f: Failure) -> Verdict:
            f.trap(SharedStateError)
            log.error(
                "{login}: cannot check the daily limit: {e}", login=login, e=f.getErrorMessage()
            )
            return tempfail(UNAVAILABLE, 451, "4.3.0")

        return self.state.sent_today(login).addCallbacks(decide, unavailable)

    def on_mail(self, session: SessionInfo, sender: str) -> Verdict | Deferred[Verdict]:
        if session.login is None:
            return CONTINUE
        return self._check(session.login, 1)

    def on_rcpt(
        self, session: SessionInfo, sender: str, accepted: list[str], recipient: str
    ) -> Verdict | Deferred[Verdict]:
        if session.login is None or not self.by_recipient:
            return CONTINUE
        return self._check(session.login, len(accepted) + 1)

    def _weight(self, message: MessageInfo) -> int:
        return len(message.recipients) if self.by_recipient else 1

    def on_message(self, session: SessionInfo, message: MessageInfo) -> Verdict | Deferred[Verdict]:
        if session.login is None:
            return CONTINUE
        return self._check(session.login, self._weight(message))

    def on_queued(self, session: SessionInfo, message: MessageInfo) -> None:
        login = session.login
        if login is None:
            return

        def lost(f: Failure) -> None:
            # The message is queued already; only its count is missing.
            f.trap(SharedStateError)
            log.error(
                "{qid}: not counted for the daily limit of {login}: {e}",
                qid=message.queue_id,
                login=login,
                e=f.getErrorMessage(),
            )

        self.state.add_sent(login, self._weight(message)).addCallbacks(lambda _: None, lost)


def make(options: Options, context: PluginContext) -> SendingLimit:
    default = options.daily_messages
    if default is None:
        default = context.daily_messages
    return SendingLimit(context.shared, context.users, default, options.count)


__all__ = ["Options", "SendingLimit", "make"]
