"""A receiving server that starts rate-limiting, run as its own process for the shaping test.

    python tests/e2e/ratesink.py OUTDIR --accept N --refuse-for SECONDS [--reply TEXT]

It listens on 127.0.0.1, prints its port on the first line of stdout and
serves until killed.  It takes the first C{N} messages (250 at the end of
data), then answers every message with C{--reply} (by default Gmail's
C{421 4.7.28} rate limit) for C{SECONDS} from its first refusal, then takes
everything again.  Each end of data is one line of C{OUTDIR/events.jsonl}:
C{{"t": time, "accepted": true|false, "id": "<Message-ID>"}}, written before
the reply is sent, so a test can read the attempt rate the receiver saw.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import IO, Any

from twisted.internet import reactor as global_reactor

from mta.testing import SinkBehaviour, SinkFactory

GMAIL_421 = (
    "421-4.7.28 Gmail has detected an unusual rate of email. To protect our users from spam,\n"
    "421 4.7.28 email has been temporarily rate limited. - gsmtp"
)
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


class RateLimiter:
    """Takes C{accept} messages, then refuses for C{refuse_for} seconds, then takes all."""

    def __init__(self, events: IO[str], accept: int, refuse_for: float, reply: str) -> None:
        self.events = events
        self.accept = accept
        self.refuse_for = refuse_for
        self.reply = reply
        self.accepted = 0
        self.refusing_since: float | None = None

    def message(self, data: bytes) -> str:
        now = time.time()
        refuse = self.accepted >= self.accept and (
            self.refusing_since is None or now < self.refusing_since + self.refuse_for
        )
        if refuse and self.refusing_since is None:
            self.refusing_since = now
        if not refuse:
            self.accepted += 1
        found = _MESSAGE_ID.search(data)
        message_id = found.group(1).decode("ascii", "replace") if found else ""
        self.events.write(json.dumps({"t": now, "accepted": not refuse, "id": message_id}) + "\n")
        self.events.flush()
        return self.reply if refuse else "250 2.0.0 Ok: queued"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A receiver that rate-limits after N messages.")
    parser.add_argument("out", help="directory for events.jsonl")
    parser.add_argument("--accept", type=int, required=True, help="messages taken first")
    parser.add_argument("--refuse-for", type=float, required=True, help="seconds of refusals")
    parser.add_argument("--reply", default=GMAIL_421, help="the refusal (lines joined by \\n)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    events = open(os.path.join(args.out, "events.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
    limiter = RateLimiter(events, args.accept, args.refuse_for, args.reply)
    factory = SinkFactory(SinkBehaviour(message=limiter.message))
    reactor: Any = global_reactor
    port = reactor.listenTCP(args.port, factory, interface="127.0.0.1")
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
