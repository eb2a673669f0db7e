"""Per-user daily sending limits (SPEC section 2: 300 messages a day by default).

Each accepted message of a login is counted for the current UTC day.  The
counts survive a restart: every count is appended as one line (the login,
or the login, a tab and a number when one message counts more than once)
to C{spool/state/sent-YYYYMMDD.log}, which is read back at start-up.  The
line is written (not fsync'd) before the client gets its 250; a lost line
after a machine crash only means one message less counted.  Files of past
days are removed at the first count of a new day.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from datetime import UTC, datetime
from typing import IO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="mta.dailycount")


def utc_day(seconds: float) -> str:
    """The UTC day of a time as C{YYYYMMDD}: the unit of the daily limit."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%d")


class DailyCounter:
    """Messages accepted per login today."""

    def __init__(self, directory: str, clock: IReactorTime) -> None:
        self.directory = directory
        self.clock = clock
        self._day = ""
        self._counts: Counter[str] = Counter()
        self._file: IO[str] | None = None
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._roll()

    def _today(self) -> str:
        return utc_day(self.clock.seconds())

    def _path(self, day: str) -> str:
        return os.path.join(self.directory, f"sent-{day}.log")

    def _roll(self) -> None:
        """Start counting for today: read today's file, forget older ones."""
        day = self._today()
        if day == self._day:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self._day = day
        self._counts = Counter()
        try:
            with open(self._path(day), encoding="utf-8", errors="replace") as f:
                for line in f:
                    login, _, n = line.rstrip("\n").partition("\t")
                    if login.strip():
                        self._counts[login] += int(n) if n.isdigit() and len(n) < 10 else 1
        except FileNotFoundError:
            pass
        for name in os.listdir(self.directory):
            if name.startswith("sent-") and name != os.path.basename(self._path(day)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))

    def count(self, login: str) -> int:
        self._roll()
        return self._counts[login]

    def add(self, login: str, n: int = 1) -> None:
        """Count one accepted message (C{n} units of it) for C{login}."""
        self._roll()
        self._counts[login] += n
        try:
            if self._file is None:
                self._file = open(self._path(self._day), "a", encoding="utf-8")  # noqa: SIM115
            name = login.replace("\n", " ").replace("\t", " ")
            self._file.write(name + ("\n" if n == 1 else f"\t{n}\n"))
            self._file.flush()
        except OSError as e:
            log.error("cannot record a sent message for {login}: {e}", login=login, e=str(e))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
