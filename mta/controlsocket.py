"""The daemon's control socket: how C{mtactl} and C{mta-sendmail} reach a running daemon.

A UNIX socket at C{SPOOL/control.sock}, mode 0600 (only the spool's owner
may steer the queue).  One request per connection: a JSON object on one
line, answered by one JSON line, then the daemon closes::

    {"op": "hold", "id": "0ABC..."}          -> {"ok": true, "text": "0ABC...: put on hold"}
    {"op": "flush", "all": true}             -> {"ok": true, "text": "flushed 12 ..."}
    {"op": "flush", "domain": "example.com"}
    {"op": "pickup", "id": "0ABC..."}        a message written into incoming/ by another process
    {"op": "shaping"}                        -> {"ok": true, "text": "{...JSON...}"} the limits
    {"op": "shaping", "reset": "DEST"}       end one destination's limits ("reset": true: all)
    {"op": "ping"}                           -> {"ok": true, "text": "pid 1234"}

Errors are C{{"ok": false, "text": "one line"}}.  The queue's operator does
the work (L{mta.queue.operator.Operator}); this module only carries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mta.address import valid_domain
from mta.errors import StorageError
from mta.queue.actions import OPERATIONS, ActionError
from mta.queue.operator import Operator
from mta.spool.queueid import is_queue_id

log = Logger(namespace="mta.control")
MAX_REQUEST = 4096
CLIENT_TIMEOUT = 120.0


class ControlSocketError(Exception):
    """The daemon could not be asked, or its answer not understood."""


class DaemonNotRunningError(ControlSocketError):
    """No daemon answers on the control socket."""


def handle(queue: Operator, request: object) -> Deferred[str]:
    """Carry out one request; fires with the text for the operator."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return fail(ActionError("a request is a JSON object with an 'op'"))
    op = request["op"]
    queue_id = request.get("id")
    if op == "ping":
        return succeed(f"pid {os.getpid()}")
    if op == "shaping":
        return _shaping(queue, request.get("reset"))
    if op == "flush" and queue_id is None:
        domain = request.get("domain")
        if domain is None:
            if request.get("all") is not True:
                return fail(ActionError("flush needs an ID, a domain or all"))
            return queue.flush()
        if not isinstance(domain, str) or not valid_domain(domain.rstrip("."), utf8=True):
            return fail(ActionError(f"{domain!r} is not a domain name"))
        return queue.flush(domain)
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        return fail(ActionError(f"{queue_id!r} is not a queue ID"))
    if op == "pickup":
        return maybeDeferred(queue.pickup, queue_id)
    if op not in OPERATIONS:
        return fail(ActionError(f"unknown action {op!r}"))
    return queue.act(op, queue_id)


def _shaping(queue: Operator, reset: object) -> Deferred[str]:
    """C{mtactl queue shaping}: the limits, or with C{reset} ending them."""
    if reset is None:
        return maybeDeferred(queue.shaping)
    if reset is True:
        return maybeDeferred(queue.reset_shaping, None)
    if not isinstance(reset, str) or not reset.strip():
        return fail(ActionError("reset needs a destination or true"))
    return maybeDeferred(queue.reset_shaping, reset.strip())


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, queue: Operator) -> None:
        self.queue = queue
        self._answered = False

    def lineReceived(self, line: bytes) -> None:
        if self._answered:
            return
        self._answered = True
        try:
            request = json.loads(line)
        except ValueError:
            self._reply(False, "the request is not JSON")
            return
        handle(self.queue, request).addCallbacks(lambda text: self._reply(True, text), self._failed)

    def _failed(self, failure: Failure) -> None:
        if failure.check(ActionError, StorageError):
            self._reply(False, str(failure.value))
            return
        log.failure("control request failed", failure)
        self._reply(False, f"internal error: {failure.getErrorMessage()}")

    def _reply(self, ok: bool, text: str) -> None:
        if self.transport is None or not self.connected:
            return
        self.sendLine(json.dumps({"ok": ok, "text": text}).encode())  # type: ignore[no-untyped-call]
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answered = True
        self._reply(False, "request too long")


class ControlFactory(Factory):
    def __init__(self, queue: Operator) -> None:
        self.queue = queue

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.queue)


def socket_address(path: str) -> tuple[str, int | None]:
    """A name for C{path} that fits in a UNIX socket address, and a descriptor to close.

    Socket addresses hold about 107 bytes; a deeper spool is reached
    through its open directory (C{/proc/self/fd/N/control.sock}, Linux),
    which must stay open while the name is used.
    """
    if len(path.encode()) <= 100:
        return path, None
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd


def request(path: str, doc: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> tuple[bool, str]:
    """Send one request to the daemon (blocking; for the command-line tools).

    Raises L{DaemonNotRunningError} when nothing listens on C{path}.
    """
    address, fd = socket_address(path)
    try:
        return _request(address, path, doc, timeout)
    finally:
        if fd is not None:
            os.close(fd)


def _request(address: str, path: str, doc: dict[str, Any], timeout: float) -> tuple[bool, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunningError(path) from None
        except OSError as e:
            raise ControlSocketError(
                f"cannot reach the daemon at {path}: {e.strerror or e}"
            ) from None
        try:
            s.sendall(json.dumps(doc).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlSocketError(f"the daemon did not answer within {timeout:g} s") from None
        except OSError as e:
            raise ControlSocketError(f"lost the daemon at {path}: {e.strerror or e}") from None
    with contextlib.suppress(ValueError):
        reply = json.loads(data)
        if isinstance(reply, dict) and isinstance(reply.get("text"), str):
            return bool(reply.get("ok")), reply["text"]
    raise ControlSocketError("the daemon's answer was not understood")
