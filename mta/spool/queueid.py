"""Queue IDs: unique, sortable by arrival, safe as file names.

An ID is 15 characters of Crockford's base 32 (digits and upper-case letters
without I, L, O, U): 11 for the arrival time in microseconds since the epoch,
then 4 random ones (20 bits) so that two processes sharing a spool do not
collide.  Within one generator the time part strictly increases, so IDs sort
in the order they were made, and plain C{ls} lists a queue oldest first.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11
RANDOM_CHARS = 4
LENGTH = TIME_CHARS + RANDOM_CHARS
PATTERN = re.compile(f"[{ALPHABET}]{{{LENGTH}}}")


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    if value:
        raise ValueError("value does not fit")
    return "".join(reversed(chars))


def _decode(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 32 + ALPHABET.index(ch)
    return value


def is_queue_id(text: str) -> bool:
    return bool(PATTERN.fullmatch(text))


def arrival_of(queue_id: str) -> float:
    """The creation time encoded in an ID, in POSIX seconds."""
    return _decode(queue_id[:TIME_CHARS]) / 1_000_000


class QueueIdGenerator:
    """Makes IDs from an injected clock (POSIX seconds) and random source."""

    def __init__(
        self,
        now: Callable[[], float],
        randbits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self._now = now
        self._randbits = randbits
        self._last = 0

    def __call__(self) -> str:
        micros = max(round(self._now() * 1_000_000), self._last + 1)
        self._last = micros
        return _encode(micros, TIME_CHARS) + _encode(self._randbits(5 * RANDOM_CHARS), RANDOM_CHARS)
