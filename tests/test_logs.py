"""The text log written in batches (L{mta.logs.BatchedWriter}) and the twistd wiring."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from mta import logs
from mta.logs import FLUSH_BYTES, FLUSH_DELAY, BatchedWriter


class CountingOut(io.StringIO):
    """A text file that counts writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


class BatchedWriterTests(SynchronousTestCase):
    """The same lines in the same order, one write per batch."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.out = CountingOut()
        self.writer = BatchedWriter(self.out, self.clock.callLater)
        threadable.registerAsIOThread()

    def test_lines_of_a_turn_go_out_together(self) -> None:
        for n in range(50):
            self.writer.write(f"line {n}\n")
            self.writer.flush()  # what the observer does after each line
        self.assertEqual(self.out.writes, 0)
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.out.getvalue(), "".join(f"line {n}\n" for n in range(50)))
        self.assertEqual((self.out.writes, self.out.flushes), (1, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_large_batch_goes_out_at_once(self) -> None:
        line = "x" * 1000 + "\n"
        for _ in range(FLUSH_BYTES // len(line) + 1):
            self.writer.write(line)
        self.assertEqual(self.out.writes, 1)
        self.assertGreaterEqual(len(self.out.getvalue()), FLUSH_BYTES)

    def test_without_a_reactor_each_line_goes_out(self) -> None:
        writer = BatchedWriter(self.out)
        writer.write("one\n")
        writer.write("two\n")
        self.assertEqual(self.out.getvalue(), "one\ntwo\n")

    def test_other_threads_lines_are_not_lost_nor_reordered(self) -> None:
        self.writer.write("reactor 1\n")
        seen: list[Callable[[], Any]] = []

        def elsewhere() -> None:
            self.writer.write("thread\n")
            seen.append(lambda: None)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        self.writer.write("reactor 2\n")
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.out.getvalue(), "reactor 1\nthread\nreactor 2\n")
        self.assertEqual(len(seen), 1)

    def test_drain_at_shutdown(self) -> None:
        self.writer.write("last words\n")
        self.writer.drain()
        self.assertEqual(self.out.getvalue(), "last words\n")
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.out.writes, 1)

    def test_a_broken_log_does_not_raise(self) -> None:
        self.out.close()
        self.writer.write("nobody reads this\n")
        self.writer.drain()


class TwistdTests(SynchronousTestCase):
    """twistd -n mta logs through the batched writer unless told otherwise."""

    def options(self, *argv: str) -> ServerOptions:
        opts = ServerOptions()
        opts.parseOptions([*argv, "mta"])
        return opts

    def test_default_is_batched(self) -> None:
        opts = self.options("-n")
        self.assertIs(opts["logger"], logs.batched_text_observer)

    def test_a_logger_given_is_kept(self) -> None:
        opts = self.options("-n", "--logger", "mta.logs.json_stdout")
        self.assertIs(opts["logger"], logs.json_stdout)

    def test_the_text_lines_are_twistd_s(self) -> None:
        logs.use_batched_text_log("-")
        observer = logs.batched_text_observer()
        writer = logs._Batching.writer
        assert writer is not None
        out = io.StringIO()
        writer.out = out
        observer({"log_format": "hello {who}", "who": "world", "log_time": 0.0,
                  "log_namespace": "mta", "log_system": "-"})  # fmt: skip
        writer.drain()
        self.assertTrue(out.getvalue().endswith(" [-] hello world\n"), out.getvalue())


class ClassicTextTests(SynchronousTestCase):
    """The fast formatter writes exactly what Twisted's text log would."""

    def test_same_text_as_twisted(self) -> None:

        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()

        class Thing:
            name = "thing"

            def shout(self) -> str:
                return "LOUD"

        base = {"log_time": 1_700_000_000.75, "log_namespace": "mta.queue",
                "log_level": LogLevel.info}  # fmt: skip
        events: list[dict[str, Any]] = [
            {**base, "log_format": "{qid}: queued ({n} recipients)", "qid": "Q1", "n": 3},
            {**base, "log_format": "{secs:.0f} s and {pct:5.1%}", "secs": 3.7, "pct": 0.5},
            {**base, "log_format": "{x.name} {y[0]}", "x": Thing(), "y": ["first"]},
            {**base, "log_format": "{x.shout()}", "x": Thing()},
            {**base, "log_format": "missing {nothere}"},
            {**base, "log_format": "two\nlines"},
            {**base, "log_format": ""},
            {**base, "log_format": "no fields {{braces}}"},
            {**base, "log_format": "{} positional"},
            {**base, "log_format": "crashed {qid}", "qid": "Q", "log_failure": failure},
            {**base, "log_format": "with system", "log_system": "-"},
            {"log_format": "no level, no time", "log_namespace": "x"},
            {**base, "log_format": "ünïcode {v}", "v": "ä"},
            {**base, "log_format": b"bytes format"},
            {**base, "log_format": None},
        ]
        for event in events:
            with self.subTest(event=event.get("log_format")):
                self.assertEqual(logs.classic_text(dict(event)),
                                 formatEventAsClassicLogText(dict(event)))  # fmt: skip

    def test_the_time_is_computed_once_a_second(self) -> None:

        for when in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0, 12.5, 0.0):
            self.assertEqual(logs._time_text(when), formatTime(when))
        self.assertEqual(logs._time_text(None), "-")
