"""Each recipient's result, counted in the metrics and logged in Postfix's shape.

One line per recipient per attempt (L{mta.maillog.delivery_line}) goes to
the C{mta.maillog} namespace, with the fields a log reader filters on
(queue ID, recipient, relay, status, DSN code, reply, TLS policy) beside
the formatted line.  The queue manager logs what the scheduler decided
about a job's results (L{ResultLog.job}); the operator logs the
recipients that C{mtactl queue bounce} gives up (L{ResultLog.expired}).
"""

from __future__ import annotations

from twisted.logger import Logger

from mta import maillog
from mta.envelope import Envelope, Recipient
from mta.errors import Reply
from mta.metrics import Metrics
from mta.queue.scheduler import ADMIN_BOUNCE, Decision

maillog_log = Logger(namespace="mta.maillog")


class ResultLog:
    """Counts and logs recipients' results (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def job(
        self, envelope: Envelope, decision: Decision, *, ran: bool, activated: float,
        started: float, now: float,
    ) -> None:  # fmt: skip
        """The results of one job as L{mta.queue.scheduler.apply} decided them.

        A job that did not run (its destination rests) counts no attempts.
        """
        for o in decision.outcomes:
            if ran:
                self.metrics.attempts.inc()
            if o.status == "sent":
                self.metrics.delivery_latency.observe(max(0.0, now - envelope.arrival))
            self.result(
                envelope, o.recipient, o.status, reply=o.result.reply, relay=o.result.relay,
                activated=activated, started=started, now=now, setup=o.result.setup_time,
                transfer=o.result.transfer_time, tls=o.result.tls,
            )  # fmt: skip

    def expired(
        self, envelope: Envelope, recipients: list[Recipient], *, activated: float, now: float
    ) -> None:
        """Recipients given up by the mail administrator (L{mta.queue.scheduler.expire})."""
        for rcpt in recipients:
            self.result(
                envelope, rcpt, "expired", reply=ADMIN_BOUNCE, relay="none",
                activated=activated, started=now, now=now,
            )  # fmt: skip

    def result(
        self, env: Envelope, rcpt: Recipient, status: str, *, reply: Reply, relay: str,
        activated: float, started: float, now: float, setup: float = 0.0,
        transfer: float = 0.0, tls: str = "",
    ) -> None:  # fmt: skip
        """Count a recipient's result and log it in Postfix's shape, with its fields."""
        self.metrics.deliveries.labels(status, rcpt.category or "").inc()
        line = maillog.delivery_line(
            env.queue_id, rcpt.address, relay=relay, status=status, reply=reply,
            arrival=env.arrival, activated=activated, started=started, setup=setup,
            transfer=transfer, now=now, tls=tls,
        )  # fmt: skip
        maillog_log.info("{line}", queue_id=env.queue_id, recipient=rcpt.address, relay=relay,
                         status=status, dsn=rcpt.dsn_status, reply=rcpt.reply, tls=tls,
                         line=line)  # fmt: skip
