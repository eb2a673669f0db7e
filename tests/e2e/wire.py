"""A raw SMTP client for attack tests: exact bytes out, whole replies in.

smtplib repairs what it sends (it adds CRLF, dot-stuffs, refuses bare
line ends in some calls); an attack test needs to send exactly the bytes
an attacker would, over plain TCP or TLS, from a chosen loopback address.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time

_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")


def plain_token(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Wire:
    """One connection; C{reply()} reads one complete (possibly multi-line) reply."""

    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        source: str | None = None,
        timeout: float = 30.0,
        greeting: bool = True,
    ) -> None:
        source_address = (source, 0) if source else None
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=source_address
        )
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock: socket.socket = sock
        self.buffer = b""
        self.greeting = self.reply() if greeting else None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            raw = self._line()
            m = _REPLY.match(raw)
            if m is None:
                raise AssertionError(f"not an SMTP reply line: {raw!r}")
            lines.append(m.group(3).decode("utf-8", "replace"))
            if m.group(2) == b" ":
                return int(m.group(1)), "\n".join(lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        """Send one command line (CRLF added) and read its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def login(self, user: str, password: str) -> tuple[int, str]:
        code, text = self.cmd("EHLO client.test")
        assert code == 250, text
        return self.cmd(f"AUTH PLAIN {plain_token(user, password)}")

    def starttls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def closed_within(self, seconds: float) -> bytes:
        """Read until the server closes; fail after C{seconds}.  Returns what came."""
        deadline = time.monotonic() + seconds
        got = self.buffer
        self.buffer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {seconds}s; got {got!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return got
            except TimeoutError:
                continue
            if not chunk:
                return got
            got += chunk
