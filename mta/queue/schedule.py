"""The retry schedule: when to try again, and when to give up.  Pure.

Postfix's rule: after a failed attempt the next one is at
C{now + clamp(time in queue, minimal_backoff_time, maximal_backoff_time)},
so the gaps double from the minimum (0, 5, 10, 20, 40, 80 minutes with the
defaults) until they reach the maximum (about every 67 minutes), and the
message is given up after C{maximal_queue_lifetime}.  An injected C{jitter}
spreads retries of messages that failed together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mta.config import QueueConfig


def no_jitter(delay: float) -> float:
    return delay


@dataclass(frozen=True)
class RetryPolicy:
    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    maximal_lifetime: float = 5 * 86400.0

    @classmethod
    def from_config(cls, queue: QueueConfig) -> RetryPolicy:
        return cls(
            minimal_backoff=queue.minimal_backoff_time,
            maximal_backoff=queue.maximal_backoff_time,
            maximal_lifetime=queue.maximal_queue_lifetime,
        )

    def backoff(self, arrival: float, now: float) -> float:
        return min(max(now - arrival, self.minimal_backoff), self.maximal_backoff)

    def expires_at(self, arrival: float) -> float:
        return arrival + self.maximal_lifetime

    def expired(self, arrival: float, now: float) -> bool:
        return now >= self.expires_at(arrival)

    def next_attempt(
        self, arrival: float, now: float, jitter: Callable[[float], float] = no_jitter
    ) -> float:
        """The time of the next attempt after one that failed at C{now}.

        Never later than the expiry time, so that the last attempt happens
        when the lifetime ends and the message is given up then.
        """
        return min(now + jitter(self.backoff(arrival, now)), self.expires_at(arrival))
