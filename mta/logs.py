"""Log output: the text log written in batches, and JSON lines for log shippers.

Every event the daemon logs is a C{twisted.logger} event with structured
fields (C{queue_id}, C{recipient}, C{status}, C{dsn}, C{relay} on delivery
lines; C{qid}, C{peer}, C{login}, C{size}, C{n} on the C{queued} line).

The text log has twistd's usual lines, but twistd's own observer writes
and flushes each line at once: a system call per line, several per
message.  L{BatchedWriter} collects the lines of one turn of the reactor
(at most L{FLUSH_DELAY} seconds) and writes them with one call: the same
lines, in the same order.  A SIGKILL loses at most those milliseconds of
log, never anything in the spool.  C{twistd -n mta} uses it by itself
(L{mta.tap}) unless C{--logger} or C{--syslog} says otherwise.

JSON lines, two ways in:

  - C{twistd --logger mta.logs.json_stdout ...}: JSON lines instead of
    the text log, on standard output (for systemd's journal or a container);
  - C{[log] json_file = "PATH"} in the configuration: JSON lines in a file,
    beside the text log.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python import logfile, threadable

FLUSH_DELAY = 0.005  # seconds: the longest a line waits
FLUSH_BYTES = 1 << 16  # written at once when this much waits


class BatchedWriter:
    """A file-like object whose lines are written in batches (see the module docstring).

    C{write} and C{flush} may be called from any thread; the reactor thread
    schedules the batch with C{call_later(delay, f)} (the reactor's
    C{callLater} once it runs); other threads' lines go out with the next
    batch or at once when no reactor is there to schedule one.
    """

    def __init__(
        self, out: IO[str], call_later: Callable[[float, Callable[[], None]], Any] | None = None
    ) -> None:
        self.out = out
        self.call_later = call_later
        self._lines: list[str] = []
        self._size = 0
        self._scheduled = False
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            due = self._size >= FLUSH_BYTES
            schedule = not self._scheduled and not due
            if schedule:
                schedule = self.call_later is not None and threadable.isInIOThread()
                self._scheduled = schedule
        if due or (not schedule and not self._scheduled):
            self.drain()
        elif schedule:
            assert self.call_later is not None
            self.call_later(FLUSH_DELAY, self._later)

    def flush(self) -> None:
        """Called by the observer after each line: the batch goes out later."""

    def _later(self) -> None:
        with self._lock:
            self._scheduled = False
        self.drain()

    def drain(self) -> None:
        """Write and flush every line waiting (and at shutdown)."""
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                self.out.write("".join(lines))
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log must not stop the daemon


class _Second:
    """The last second formatted, and its text (a log has many lines a second)."""

    second: int | None = None
    text = ""


def _time_text(when: float | None) -> str:
    """C{formatTime(when)} as twistd's text log has it, computed once a second.

    The format (RFC 3339 without fractions) is the same for every moment of
    one second, offset included: a change of the local offset happens at a
    whole second.
    """
    if when is None:
        return "-"
    second = int(when // 1)
    if second != _Second.second:
        _Second.text, _Second.second = formatTime(when, timeFormatRFC3339), second
    return _Second.text


def _classic_slow(event: LogEvent) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=formatTime)


def classic_text(event: LogEvent) -> str | None:
    """What twistd's text log writes for an event (C{formatEventAsClassicLogText}
    with its RFC 3339 time), made faster for the events this daemon logs.

    The common case, a format with named fields and no traceback, is
    C{str.format_map} (written in C); anything else (a call in a field, a
    traceback, a flattened event, a field that fails) goes to Twisted's own
    formatter, so the text is the same either way.
    """
    text = event.get("log_format")
    if (
        not isinstance(text, str)
        or "()" in text
        or "log_failure" in event
        or "log_flattened" in event
    ):
        return _classic_slow(event)
    try:
        message = text.format_map(event)
    except Exception:
        return _classic_slow(event)
    if not message:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
    line = f"{_time_text(event.get('log_time'))} [{system}] {message}"
    return line.replace("\n", "\n\t") + "\n"


class _Batching:
    """What twistd's batched text log writes to (set up before the reactor runs)."""

    logfile: str | None = None
    writer: BatchedWriter | None = None


def use_batched_text_log(logfile_name: str | None) -> None:
    """Where L{batched_text_observer} writes: C{None} or C{"-"} for stdout (twistd -n)."""
    _Batching.logfile = logfile_name


def batched_text_observer() -> ILogObserver:
    """For C{twistd --logger mta.logs.batched_text_observer}: twistd's text log, batched."""
    name = _Batching.logfile
    out = sys.stdout if not name or name == "-" else logfile.LogFile.fromFullPath(name)
    writer = _Batching.writer = BatchedWriter(cast(IO[str], out))
    atexit.register(writer.drain)
    return FileLogObserver(cast(IO[Any], writer), classic_text)


def start_batching(call_later: Callable[[float, Callable[[], None]], Any]) -> None:
    """The reactor runs: lines written in its thread wait for the next batch."""
    if _Batching.writer is not None:
        _Batching.writer.call_later = call_later


def stop_batching() -> None:
    """At shutdown: write what waits."""
    if _Batching.writer is not None:
        _Batching.writer.call_later = None
        _Batching.writer.drain()


def json_observer(stream: IO[str]) -> ILogObserver:
    """An observer writing one JSON object per event (RFC 7464 record separators off)."""
    return jsonFileLogObserver(stream, recordSeparator="")


def json_stdout() -> ILogObserver:
    """For C{twistd --logger mta.logs.json_stdout}."""
    return json_observer(sys.stdout)
