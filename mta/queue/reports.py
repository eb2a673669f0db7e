"""Delivery status notifications: building a report and queueing it.

A report (L{mta.dsn}) is made from the stored message and the notices of
one round, and committed through the same spool as any message, from
C{MAILER-DAEMON} with the null sender, so it is delivered (and retried)
like any other.  The queue manager files the original only after the
commit, so a report is never lost between the two.
"""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mta import dsn
from mta.batch import Runner
from mta.envelope import Envelope, QueueState, Recipient
from mta.interfaces import IQueueStore, ISpool

log = Logger(namespace="mta.queue")
REPORT_READ_LIMIT = 1 << 20  # enough for any header section and a returned message


class Reporter:
    """Builds reports from the queue's messages and commits them to the spool."""

    def __init__(
        self,
        store: IQueueStore,
        spool: ISpool,
        runner: Runner[Any],
        clock: IReactorTime,
        hostname: str,
    ) -> None:
        self.store = store
        self.spool = spool
        self.runner = runner
        self.clock = clock
        self.hostname = hostname

    def send(
        self, envelope: Envelope, notices: list[dsn.Notice], retry_until: float
    ) -> Deferred[Any]:
        """Report C{notices} about an active message to its sender
        (C{retry_until}: when the queue gives up on it, for delay reports).

        Fails when the report could not be committed, so that the caller
        keeps the notices owed and tries again.
        """
        now = self.clock.seconds()
        snapshot = copy.deepcopy(envelope)
        notices = [dsn.Notice(copy.deepcopy(n.recipient), n.action) for n in notices]
        queue_id = envelope.queue_id

        def build() -> bytes:
            with self.store.open_message(queue_id, QueueState.ACTIVE) as f:
                original = f.read(REPORT_READ_LIMIT)
            return dsn.build_report(
                snapshot,
                notices,
                original,
                hostname=self.hostname,
                now=now,
                retry_until=retry_until,
                message_id=f"<{queue_id}.{int(now)}.dsn@{self.hostname}>",
            )

        def commit(report: bytes) -> Deferred[str]:
            txn = self.spool.begin()
            try:
                txn.write(report)
            except BaseException:
                txn.abort()
                raise
            report_env = Envelope(
                queue_id=txn.queue_id,
                sender="",
                recipients=[Recipient(envelope.sender, notify=("NEVER",))],
                arrival=now,
                size=len(report),
                body="8BITMIME" if dsn.report_is_8bit(report) else None,
                smtputf8=not envelope.sender.isascii() or dsn.report_needs_smtputf8(report),
                kind="dsn",
            )
            return txn.commit(report_env)

        def sent(report_id: str) -> None:
            log.info(
                "{qid}: sender notification: {report} ({actions})",
                qid=queue_id,
                report=report_id,
                actions=", ".join(f"{n.recipient.address} {n.action}" for n in notices),
            )

        return self.runner(build).addCallback(commit).addCallback(sent)
