"""A real HTTPS server on loopback serving MTA-STS policies, for tests.

L{PolicyServer} is C{twisted.web} behind Twisted's TLS layer with a
certificate from files (a L{tests.pki} certificate, so the client can be
told to trust its CA).  It answers C{GET /.well-known/mta-sts.txt} by the
request's C{Host}, from a table::

    {
        "mta-sts.example.test": {"body": "version: STSv1\\nmode: enforce\\n..."},
        "mta-sts.moved.test": {"status": 301, "location": "https://.../mta-sts.txt"},
        "mta-sts.html.test": {"body": "...", "type": "text/html"},
        "mta-sts.big.test": {"body": "x", "size": 70000, "length": false},
        "mta-sts.slow.test": {"body": "...", "delay": 5.0},
        "mta-sts.hang.test": {"hang": true},
    }

C{status} defaults to 200, C{type} to C{text/plain}; C{size} repeats the
body to that many octets; C{length: false} sends no Content-Length (a
chunked body); C{delay} holds the answer that many seconds, C{hang} for
ever.  A host not in the table gets 404.  C{requests} lists every
request as (host, path).

Run as a program it serves a table from a JSON file, for the end-to-end
tests::

    python tests/policyserver.py policies.json --cert C.pem --key K.pem [--port N]

It prints its port on the first line of stdout; SIGHUP re-reads the file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from mta.tls import ServerTLS

Table = dict[str, dict[str, Any]]


class _Policies(resource.Resource):
    isLeaf = True

    def __init__(self, owner: PolicyServer) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: server.Request) -> bytes | int:
        host = (request.getHeader("host") or "").rsplit(":", 1)[0].lower()
        path = request.path.decode("ascii", "replace")
        self.owner.requests.append((host, path))
        spec = self.owner.table.get(host)
        if spec is None or path != "/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        if spec.get("hang"):
            self.owner.hanging.append(request)
            return server.NOT_DONE_YET
        delay = float(spec.get("delay", 0))
        if delay > 0:
            call = self.owner.reactor.callLater(delay, self._answer, request, spec)
            self.owner.delayed.append(call)
            return server.NOT_DONE_YET
        self._answer(request, spec)
        return server.NOT_DONE_YET

    def _answer(self, request: server.Request, spec: dict[str, Any]) -> None:
        if request.finished or request.channel is None:
            return
        body = str(spec.get("body", "")).encode()
        size = spec.get("size")
        if size is not None and body:
            body = (body * (int(size) // len(body) + 1))[: int(size)]
        request.setResponseCode(int(spec.get("status", 200)))
        request.setHeader(b"content-type", str(spec.get("type", "text/plain")).encode())
        if "location" in spec:
            request.setHeader(b"location", str(spec["location"]).encode())
        if spec.get("length", True):
            request.setHeader(b"content-length", str(len(body)).encode())
        # Written in pieces so that a reader limiting the size sees more than one.
        for start in range(0, len(body), 4096):
            request.write(body[start : start + 4096])
        request.finish()


class _Tracking(TLSMemoryBIOFactory):
    """Twisted's TLS factory, telling when its last connection is gone."""

    noisy = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self.idle = self.idle, []
            for d in waiters:
                d.callback(None)

    def all_closed(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.protocols:
            self.idle.append(d)
        else:
            d.callback(None)
        return d


class PolicyServer:
    """Serves a policy table over HTTPS on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        table: Table,
        cert: str,
        key: str,
        *,
        reactor: Any = None,
        interface: str = "127.0.0.1",
    ) -> None:
        self.reactor = global_reactor if reactor is None else reactor
        self.table = {k.lower(): v for k, v in table.items()}
        self.interface = interface
        self.requests: list[tuple[str, str]] = []
        self.delayed: list[IDelayedCall] = []
        self.hanging: list[server.Request] = []
        self.site = server.Site(_Policies(self))
        self.site.noisy = False
        self.factory = _Tracking(ServerTLS(cert, key), False, self.site)
        self.listening: IListeningPort | None = None

    def start(self, port: int = 0) -> int:
        self.listening = self.reactor.listenTCP(port, self.factory, interface=self.interface)
        return int(self.listening.getHost().port)

    @property
    def port(self) -> int:
        assert self.listening is not None, "not started"
        return int(self.listening.getHost().port)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening, cancel delayed answers, close open connections; fires when done."""
        for call in self.delayed:
            if call.active():
                call.cancel()
        self.delayed = []
        self.hanging = []
        for p in list(self.factory.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        waits = [self.factory.all_closed()]
        if self.listening is not None:
            waits.append(defer.maybeDeferred(self.listening.stopListening))
            self.listening = None
        return defer.gatherResults(waits)


def load_table(path: str) -> Table:
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: the table must be a JSON object")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve MTA-STS policies over HTTPS on loopback.")
    parser.add_argument("table", help="JSON file: host -> response (see tests/policyserver.py)")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    reactor: Any = global_reactor
    policies = PolicyServer(
        load_table(args.table), args.cert, args.key, reactor=reactor, interface=args.interface
    )
    port = policies.start(args.port)

    def reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(_reload, policies, args.table)

    signal.signal(signal.SIGHUP, reload)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    reactor.run()


def _reload(policies: PolicyServer, path: str) -> None:
    try:
        policies.table = {k.lower(): v for k, v in load_table(path).items()}
    except (OSError, ValueError) as e:
        sys.stderr.write(f"policyserver: cannot reload {path}: {e}\n")


if __name__ == "__main__":
    main()
