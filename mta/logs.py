"""Log output in JSON lines, for log shippers (SPEC section 8).

Every event the daemon logs is a C{twisted.logger} event with structured
fields (C{queue_id}, C{recipient}, C{status}, C{dsn}, C{relay} on delivery
lines; C{qid}, C{peer}, C{login}, C{size}, C{n} on the C{queued} line), so
a JSON line carries the fields as well as the formatted text.  Two ways in:

  - C{twistd --logger mta.logs.json_stdout ...}: JSON lines instead of
    the text log, on standard output (for systemd's journal or a container);
  - C{[log] json_file = "PATH"} in the configuration: JSON lines in a file,
    beside twistd's usual text log.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer(stream: IO[str]) -> ILogObserver:
    """An observer writing one JSON object per event (RFC 7464 record separators off)."""
    return jsonFileLogObserver(stream, recordSeparator="")


def json_stdout() -> ILogObserver:
    """For C{twistd --logger mta.logs.json_stdout}."""
    return json_observer(sys.stdout)
