"""A scriptable SMTP sink, run as its own process for end-to-end tests.

    python tests/e2e/sink.py OUTDIR [--port N] [--script script.json]

It listens on 127.0.0.1 (port 0: any free one), prints the port on the
first line of stdout, and writes each message it accepts to
C{OUTDIR/N.eml} with the envelope in C{OUTDIR/N.json} (with C{accepted}, the
time it took the message, just before its reply is sent).  The script file
(re-read for every command, so a test can change it while the sink runs)
says what to answer::

    {
      "rcpt": {"user@example.test": ["451 4.7.1 Greylisted", "250 2.1.5 Ok"]},
      "message": ["250 2.0.0 Ok"],
      "extensions": ["PIPELINING", "8BITMIME", "DSN"],
      "message_delay": 2.5,
      "lenient": true
    }

C{message_delay} holds the reply to the end of data that many seconds
(blocking the sink), so that a test can act while a delivery is in flight.

For a recipient with a list, each RCPT for it takes the next reply and
the last one repeats; recipients not named get 250.  Every RCPT line is
also appended to C{OUTDIR/rcpt.log}, so tests can count attempts.
C{"lenient"} makes the sink end DATA at a "." between any line ends and
drop NULs, as careless servers do (L{SinkBehaviour.lenient_end}).
C{--host} picks the loopback address to listen on (default 127.0.0.1).
C{--tls-cert} and C{--tls-key} (PEM files) make the sink offer STARTTLS
with that certificate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from twisted.internet import reactor as global_reactor

from mta.testing import SinkBehaviour, SinkFactory
from mta.tls import ServerTLS

_RCPT = re.compile(r"RCPT TO:<([^>]*)>", re.IGNORECASE)


class Script:
    def __init__(self, path: str | None, out: str) -> None:
        self.path = path
        self.out = out
        self.used: dict[str, int] = {}
        self.count = 0

    def load(self) -> dict[str, Any]:
        if not self.path:
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def rcpt(self, line: str) -> str:
        with open(os.path.join(self.out, "rcpt.log"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        m = _RCPT.search(line)
        address = m.group(1).lower() if m else ""
        replies = self.load().get("rcpt", {}).get(address)
        if not replies:
            return "250 2.1.5 Ok"
        n = self.used.get(address, 0)
        self.used[address] = n + 1
        return str(replies[min(n, len(replies) - 1)])

    def message(self, factory: SinkFactory, data: bytes) -> str:
        script = self.load()
        delay = float(script.get("message_delay", 0))
        if delay > 0:
            # Holds the whole sink: enough for one delivery "in flight".
            time.sleep(min(delay, 30.0))
        replies = script.get("message") or ["250 2.0.0 Ok: queued"]
        reply = str(replies[min(self.count, len(replies) - 1)])
        self.count += 1
        if reply.startswith("2"):
            n = len(factory.messages)
            msg = factory.messages[-1]
            with open(os.path.join(self.out, f"{n}.eml.tmp"), "wb") as f:
                f.write(data)
            with open(os.path.join(self.out, f"{n}.json"), "w", encoding="utf-8") as f:
                json.dump(
                    {"mail": msg.sender_line, "rcpt": msg.rcpt_lines, "accepted": time.time()}, f
                )
            os.rename(os.path.join(self.out, f"{n}.eml.tmp"), os.path.join(self.out, f"{n}.eml"))
        return reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scriptable SMTP sink on loopback.")
    parser.add_argument("out", help="directory for received messages")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--script", default=None, help="JSON file with replies")
    parser.add_argument("--tls-cert", default=None, help="offer STARTTLS with this certificate")
    parser.add_argument("--tls-key", default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    script = Script(args.script, args.out)
    extensions = script.load().get("extensions")
    behaviour = SinkBehaviour(rcpt=script.rcpt, lenient_end=bool(script.load().get("lenient")))
    if extensions is not None:
        behaviour.extensions = tuple(extensions)
    tls = ServerTLS(args.tls_cert, args.tls_key) if args.tls_cert else None
    factory = SinkFactory(behaviour, tls=tls)
    behaviour.message = lambda data: script.message(factory, data)
    reactor: Any = global_reactor
    port = reactor.listenTCP(args.port, factory, interface=args.host)
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
