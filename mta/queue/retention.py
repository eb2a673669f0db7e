"""Retention: finished messages keep their content for a while, then only the facts.

A finished message is C{done} and keeps its content for
C{retention_days} (the seed's default: 30), counted from when it was
finished (a time the store keeps beside it).  Then it is redacted: the
header section is kept, the body is replaced by a short notice, the
envelope (with every recipient's result) is kept and marked, and the
message becomes C{redacted}.  C{remove_after_days} after the redaction it
is removed from the spool.  C{retention_days = 0} redacts a message as
soon as it is finished.

A sweep runs every C{sweep_interval} seconds in the spool thread pool; it
asks the store which messages are old enough (L{IQueueStore.finished_before}
reads no envelope) and works only on those.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import partial
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.batch import Runner
from mta.config import RetentionConfig
from mta.delivery.mime import header_section
from mta.envelope import QueueState
from mta.errors import StorageError
from mta.interfaces import IQueueStore
from mta.spool.format import FormatError

log = Logger(namespace="mta.retention")
DAY = 86400.0

T = TypeVar("T")


def redacted_message(original: bytes, days: float, when: float) -> bytes:
    """The header section of C{original} and a notice instead of the body."""
    head = header_section(original)
    date = format_datetime(datetime.fromtimestamp(when, UTC))
    notice = (
        f"The content of this message was removed on {date}, after the\r\n"
        f"retention period of {days:g} days. Its delivery results are kept.\r\n"
    )
    return head + b"\r\n" + notice.encode()


class Retention(Service):
    """Redacts and removes finished messages (see the module docstring)."""

    def __init__(
        self,
        store: IQueueStore,
        runner: Runner[Any],
        clock: IReactorTime,
        settings: RetentionConfig | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.clock = clock
        self.settings = settings or RetentionConfig()
        self._loop: LoopingCall | None = None
        self._sweeping: Deferred[Any] | None = None
        # Sweeps and immediate redactions run one after another, never in
        # two threads on the same message.
        self._serial: Deferred[Any] = succeed(None)

    def configure(self, settings: RetentionConfig) -> None:
        """New settings (a reload); a new sweep interval applies after a restart."""
        self.settings = settings

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.clock
        self._loop.start(self.settings.sweep_interval, now=True).addErrback(
            lambda f: log.failure("retention sweeps stopped", f)
        )

    def stopService(self) -> Deferred[Any] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        super().stopService()  # type: ignore[no-untyped-call]
        return self._sweeping

    def sweep(self) -> Deferred[Any] | None:
        """One pass over C{done/} and C{redacted/}; skipped if the last still runs."""
        if self._sweeping is not None:
            return None
        settings = self.settings
        now = self.clock.seconds()
        self._sweeping = self._serialized(lambda: self._sweep(settings, now))

        def done(counts: tuple[int, int]) -> None:
            redacted, removed = counts
            if redacted or removed:
                log.info(
                    "retention: {redacted} messages redacted, {removed} removed",
                    redacted=redacted,
                    removed=removed,
                )

        def failed(failure: Failure) -> None:
            log.failure("retention sweep failed", failure)

        def finished(_: object) -> None:
            self._sweeping = None

        self._sweeping.addCallbacks(done, failed).addBoth(finished)
        return self._sweeping

    def finished(self, queue_id: str) -> None:
        """The queue manager filed a message as done: redact now if so configured."""
        settings = self.settings
        if settings.retention_days <= 0:
            now = self.clock.seconds()
            self._serialized(lambda: self._redact(queue_id, settings, now)).addErrback(
                lambda f: log.failure("{qid}: cannot redact", f, qid=queue_id)
            )

    def _serialized(self, work: Callable[[], T]) -> Deferred[T]:
        """Run C{work} in the runner after all earlier retention work."""
        result: Deferred[T] = Deferred()

        def run(_: object) -> Deferred[Any]:
            d = self.runner(work)
            d.chainDeferred(result)
            return d.addErrback(lambda _: None)

        self._serial = self._serial.addCallback(run)
        return result

    # -- in the worker thread -------------------------------------------------

    def _sweep(self, settings: RetentionConfig, now: float) -> tuple[int, int]:
        """One pass; a message that cannot be handled is logged and skipped,
        so that one bad entry never stops the redaction of the others."""
        redacted = removed = 0
        for queue_id in self.store.finished_before(
            QueueState.DONE, now - settings.retention_days * DAY
        ):
            try:
                if self._redact(queue_id, settings, now):
                    redacted += 1
            except FormatError as e:
                log.error("{qid}: unreadable envelope, moved to corrupt/: {e}", qid=queue_id, e=e)
                self._quarantine(queue_id, QueueState.DONE)
            except (OSError, StorageError) as e:
                log.error("{qid}: cannot redact: {e}", qid=queue_id, e=str(e))
        for queue_id in self.store.finished_before(
            QueueState.REDACTED, now - settings.remove_after_days * DAY
        ):
            try:
                self.store.remove(queue_id, QueueState.REDACTED)
                removed += 1
            except (OSError, StorageError) as e:
                log.error("{qid}: cannot remove: {e}", qid=queue_id, e=str(e))
        return redacted, removed

    def _quarantine(self, queue_id: str, state: QueueState) -> None:
        try:
            self.store.move(queue_id, state, QueueState.CORRUPT)
        except StorageError as e:
            log.error("{qid}: cannot move to corrupt/: {e}", qid=queue_id, e=str(e))

    def _redact(self, queue_id: str, settings: RetentionConfig, now: float) -> bool:
        """Replace the body, mark the envelope, file as redacted."""
        transform = partial(redacted_message, days=settings.retention_days, when=now)
        if not self.store.redact(queue_id, transform, now):
            return False
        log.info("{qid}: content redacted after {days:g} days", qid=queue_id,
                 days=settings.retention_days)  # fmt: skip
        return True
