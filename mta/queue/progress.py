"""The queue manager's writes to the progress journal (L{IQueueStore.journal}).

A recipient the next hop accepted is journaled as soon as its
transaction's reply is read (L{DeliveryJob.on_transaction}), and every
recipient's new state is when its job ends, so that a SIGKILL before the
message is filed does not send it again (docs/flow.md, section 6).  Which
records to write is decided by L{scheduler.sent_records} and
L{scheduler.progress_records}; this keeps each job's journaled deliveries
(L{QueuedJob.journaled}), so that each is written once, and each message's
tokens (L{ActiveMessage.journal}), which the store may let go once the
message is filed.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mta.delivery.job import RecipientResult
from mta.envelope import ProgressRecord
from mta.interfaces import IQueueStore
from mta.queue import scheduler
from mta.queue.bookkeeping import ActiveMessage, QueuedJob


class ProgressJournal:
    """Journals the results of the jobs of one L{mta.queue.manager.QueueManager}."""

    def __init__(self, store: IQueueStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock

    def transaction(self, item: QueuedJob, results: list[RecipientResult]) -> None:
        """The agent's C{on_transaction}: one transaction's deliveries, journaled
        before the job ends, so that a SIGKILL during a later transaction of
        the same job (more than 50 recipients, another MX host for the rest)
        does not send them again."""
        records = scheduler.sent_records(
            item.message.envelope, item.job.recipients, results, self.clock.seconds(),
            written=item.journaled,
        )  # fmt: skip
        self._write(item, records)

    def results(self, item: QueuedJob, decision: scheduler.Decision) -> None:
        """A job's recipients as its results left them (L{scheduler.apply})."""
        envelope = item.message.envelope
        self._write(item, scheduler.progress_records(envelope, decision, written=item.journaled))

    def _write(self, item: QueuedJob, records: list[ProgressRecord]) -> None:
        """Write results ahead of the message file; a recipient's delivery is
        written once."""
        token = self.store.journal(records) if records else None
        if token is not None:
            item.message.journal.append(token)
            item.journaled.update(r.recipient.address for r in records if r.recipient.state.final)

    def release(self, message: ActiveMessage) -> None:
        """The message is filed: its journal lines are no longer needed."""
        for token in message.journal:
            self.store.release(token)
        message.journal = []
