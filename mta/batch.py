"""Group commit: run one batch of blocking work for many requests.

While one batch runs in the worker thread, new requests wait; when it
finishes, all waiting requests go in the next batch.  Under load every
batch is large and the expensive part (a directory fsync) is paid once per
batch instead of once per request; with a single request it costs nothing
extra.  The spool uses it for commits, the queue manager for recording
results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")
T = TypeVar("T")

#: Runs blocking work somewhere (a thread pool in the daemon, at once in
#: tests) and fires with its result: C{deferToThreadPool} bound to a pool.
Runner = Callable[[Callable[[], T]], "Deferred[T]"]

log = Logger(namespace="mta.batch")


def run_now(work: Callable[[], R]) -> Deferred[R]:
    """A runner that does the work at once in the calling thread (tests, defaults)."""
    try:
        return succeed(work())
    except BaseException:
        return fail()


class Batcher(Generic[I, R]):
    """Submit items; C{work(items)} runs in the runner and returns, per item,
    a result or the exception for that item alone."""

    def __init__(
        self,
        runner: Runner[Any],
        work: Callable[[list[I]], Sequence[R | BaseException]],
        max_batch: int = 256,
    ) -> None:
        self._runner = runner
        self._work = work
        self._max = max_batch
        self._waiting: list[tuple[I, Deferred[R]]] = []
        self._busy = False

    def submit(self, item: I) -> Deferred[R]:
        d: Deferred[R] = Deferred()
        self._waiting.append((item, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
        self._busy = True
        items = [item for item, _ in batch]

        def finished(results: Sequence[R | BaseException]) -> None:
            for (_, d), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    d.errback(Failure(result))
                else:
                    d.callback(result)

        def crashed(failure: Failure) -> None:
            for _, d in batch:
                d.errback(failure)

        def again(_: object) -> None:
            self._busy = False
            if self._waiting:
                self._next()

        self._runner(lambda: self._work(items)).addCallbacks(finished, crashed).addBoth(again)

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._waiting)
