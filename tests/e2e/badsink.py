"""A next hop that misbehaves, run as its own process for the fault tests.

    python tests/e2e/badsink.py MODE [--host 127.0.0.x] [--port N]

It prints its port on the first line of stdout and serves until killed,
each connection the same way:

  - C{hang}: accept and never say anything;
  - C{reset}: accept and reset the connection at once (RST, not FIN);
  - C{garbage}: send 200 kB of random octets without a line end, then hang;
  - C{badreply}: a proper greeting, then "garbage" in reply to every line;
  - C{reset-in-data}: a proper dialogue until DATA, then a reset in the middle.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory, Protocol

MODES = ("hang", "reset", "garbage", "badreply", "reset-in-data")


class BadHop(Protocol):
    def __init__(self, mode: str, rng: random.Random) -> None:
        self.mode = mode
        self.rng = rng
        self.buffer = b""
        self.in_data = False

    def reset(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        if self.mode == "reset":
            self.reset()
        elif self.mode == "garbage":
            junk = bytes(self.rng.randrange(256) for _ in range(200_000))
            self.transport.write(junk.replace(b"\n", b"X"))  # type: ignore[union-attr]
        elif self.mode in ("badreply", "reset-in-data"):
            self.transport.write(b"220 bad.test ESMTP\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "badreply":
            self.buffer += data
            while b"\n" in self.buffer:
                _, _, self.buffer = self.buffer.partition(b"\n")
                self.transport.write(b"garbage\r\n")  # type: ignore[union-attr]
        elif self.mode == "reset-in-data":
            if self.in_data:
                self.reset()
                return
            self.buffer += data
            while b"\r\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\r\n")
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.transport.write(b"250-bad.test\r\n250 PIPELINING\r\n")  # type: ignore[union-attr]
                elif verb == b"DATA":
                    self.in_data = True
                    self.transport.write(b"354 go on\r\n")  # type: ignore[union-attr]
                    return
                else:
                    self.transport.write(b"250 ok\r\n")  # type: ignore[union-attr]


class BadFactory(Factory):
    noisy = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rng = random.Random(7)

    def buildProtocol(self, addr: Any) -> BadHop:
        return BadHop(self.mode, self.rng)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A misbehaving SMTP next hop on loopback.")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    reactor: Any = global_reactor
    port = reactor.listenTCP(args.port, BadFactory(args.mode), interface=args.host)
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
