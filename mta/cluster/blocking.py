"""A blocking Redis client for C{mtactl}, which has no reactor.

The same wire format as the daemon's client (L{mta.cluster.resp}), on a
plain socket with a timeout on every operation.  It understands the two
kinds of Twisted client endpoint description that C{[cluster] redis} may
hold, C{tcp:host=H:port=P} (or C{tcp:H:P}) and C{unix:path=P}, with
Twisted's backslash escapes (C{tcp:host=\\:\\:1:port=6379}).
"""

from __future__ import annotations

import socket
from typing import Any

from mta.cluster.resp import Arg, ErrorReply, ReplyParser, RESPProtocolError, encode_command
from mta.errors import ConfigError, SharedStateError


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """(kind, positional arguments, keyword arguments) of an endpoint description."""
    parts: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, args, kwargs = parts[0], [], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


def address(description: str) -> tuple[int, Any]:
    """The socket family and address of a C{tcp:} or C{unix:} description."""
    kind, args, kwargs = split_description(description)
    if kind == "tcp":
        host = kwargs.get("host") or (args[0] if args else "")
        port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        if not host or not port.isdigit():
            raise ConfigError(f"[cluster] redis: {description!r} needs host= and port=")
        return socket.AF_UNSPEC, (host, int(port))
    if kind == "unix":
        path = kwargs.get("path") or (args[0] if args else "")
        if not path:
            raise ConfigError(f"[cluster] redis: {description!r} needs path=")
        return socket.AF_UNIX, path
    raise ConfigError(f"[cluster] redis: {description!r} is not a tcp: or unix: endpoint")


class BlockingRedis:
    """One connection, opened at the first command; errors are L{SharedStateError}."""

    def __init__(self, description: str, *, timeout: float, password: str = "") -> None:
        self.description = description
        self.family, self.address = address(description)
        self.timeout = timeout
        self.password = password
        self._sock: socket.socket | None = None
        self._parser = ReplyParser()

    def _connect(self) -> socket.socket:
        try:
            if self.family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.address)
            else:
                sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as e:
            raise SharedStateError(f"cannot reach Redis at {self.description}: {e}") from None
        self._sock = sock
        if self.password:
            self.execute("AUTH", self.password)
        return sock

    def execute(self, *args: Arg) -> Any:
        sock = self._sock or self._connect()
        try:
            sock.sendall(encode_command(*args))
            while True:
                data = sock.recv(65536)
                if not data:
                    raise SharedStateError(f"Redis at {self.description} closed the connection")
                replies = self._parser.feed(data)
                if replies:
                    break
        except (OSError, RESPProtocolError) as e:
            self.close()
            raise SharedStateError(f"Redis at {self.description}: {e}") from None
        reply = replies[0]
        if isinstance(reply, ErrorReply):
            raise SharedStateError(f"Redis refused the command: {reply.message}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._parser = ReplyParser()
