"""A real DNS server on loopback for tests, serving a zone from a dict.

Built on C{twisted.names}: L{ZoneServerFactory} is a
C{DNSServerFactory} whose C{handleQuery} answers from a zone table, and
L{DNSTestServer} listens with it on UDP and TCP on the same port of
127.0.0.1 (port 0 picks a free one).

The zone maps a lower-case name without trailing dot to what it has::

    {
        "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"], "ttl": 60},
        "null.test": {"MX": [[0, "."]]},              # null MX (RFC 7505)
        "alias.test": {"CNAME": "mx1.example.test"},
        "broken.test": {"servfail": true},             # SERVFAIL for every type
        "half.test": {"A": ["127.0.0.2"], "AAAA": "servfail"},  # for one type
        "slow.test": {"A": ["127.0.0.3"], "delay": 5.0},   # answer after 5 s
        "big.test": {"A": [...], "truncate": true},    # UDP answer truncated (TC)
        "s._domainkey.example.test": {"TXT": [["v=DKIM1; k=rsa; p=MIIB...", "...QAB"]]},
        "_25._tcp.mx1.example.test": {"TLSA": [[3, 1, 1, "8f00..."]], "secure": true},
    }

A name that is not in the zone is NXDOMAIN; a name without records of
the asked type is NODATA (NOERROR, empty answer).  Both negative answers
carry an SOA (owned by the root) whose TTL and MINIMUM are
C{negative_ttl}, so resolvers can compute the RFC 2308 negative TTL.
C{"ttl"} sets the TTL of a name's records (default 300).  C{"servfail"}
may also be a list of types.  A UDP answer larger than the client's
EDNS0 size (or 512) is sent empty with TC set, as C{"truncate"} forces;
the client then asks again over TCP.  C{DNSTestServer.queries} records
every query as (name, type, "udp"/"tcp").

C{"secure": true} plays a validating resolver's part for DNSSEC: an
answer whose every name (along a CNAME chain) is secure has the AD bit
set (RFC 4035 section 3.2.3), when the query asked for it with AD or
DO (RFC 6840 section 5.7), or always with C{ad_unasked} (some resolvers
set it unasked; a client not using DNSSEC must not believe it).  Nothing
is signed; a client that trusts the AD bit of its resolver, as the MTA
does with C{[delivery] dnssec}, needs no more.  A bogus answer is what
a validating resolver turns into SERVFAIL, which C{"servfail"} gives.  TLSA records (RFC 6698) are
C{[usage, selector, matching type, "hex data"]}.

Run as a program it serves a zone from a JSON file in the format above,
for tests that run the MTA in another process::

    python tests/dnsserver.py zone.json [--port N] [--negative-ttl S]

It prints the port number on the first line of stdout, then serves until
killed; SIGHUP re-reads the zone file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.names import dns, server

DEFAULT_TTL = 300
TLSA = 52  # RFC 6698; twisted.names has no record class for it
RECORD_TYPES = {
    "MX": dns.MX,
    "A": dns.A,
    "AAAA": dns.AAAA,
    "CNAME": dns.CNAME,
    "TXT": dns.TXT,
    "TLSA": TLSA,
}
_TYPE_NAMES = {v: k for k, v in RECORD_TYPES.items()}
_ENTRY_KEYS = {*RECORD_TYPES, "ttl", "servfail", "delay", "truncate", "secure"}
_DO = 0x8000  # the DNSSEC OK bit in an OPT record's TTL field (RFC 3225)

Zone = dict[str, dict[str, Any]]


def normalize_zone(zone: Zone) -> Zone:
    """Check a zone and return it with lower-case names; ValueError if malformed."""
    out: Zone = {}
    for name, entry in zone.items():
        if not isinstance(entry, dict):
            raise ValueError(f"zone entry for {name!r} must be an object")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"zone entry for {name!r}: unknown keys {sorted(unknown)}")
        out[name.lower().rstrip(".")] = entry
    return out


def _wants_dnssec(query: dns.Message) -> bool:
    """Whether a query asked for the AD bit: AD set (RFC 6840 5.7) or EDNS0 DO."""
    if query.authenticData:
        return True
    return any(rr.type == dns.OPT and int(rr.ttl) & _DO for rr in query.additional)


def _udp_limit(query: dns.Message) -> int:
    """The largest UDP answer the client takes: its EDNS0 size or 512 (RFC 6891 6.2.3)."""
    for rr in query.additional:
        if rr.type == dns.OPT:
            return max(512, int(rr.cls))
    return 512


class ZoneServerFactory(server.DNSServerFactory):
    """Answers every query from a zone table (see the module docstring)."""

    def __init__(self, zone: Zone, *, reactor: Any, negative_ttl: int = 60) -> None:
        super().__init__(verbose=0)
        self.zone = normalize_zone(zone)
        self.negative_ttl = negative_ttl
        self.reactor = reactor
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"/"tcp")
        self.delayed: list[IDelayedCall] = []
        self.ad_unasked = False  # set AD on secure answers whether asked or not

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        name = query.name.name.decode("ascii", "replace").lower().rstrip(".")
        qtype = _TYPE_NAMES.get(query.type, dns.QUERY_TYPES.get(query.type, str(query.type)))
        udp = address is not None
        self.queries.append((name, qtype, "udp" if udp else "tcp"))
        response = dns.Message(
            id=message.id,
            answer=1,
            opCode=message.opCode,
            recDes=message.recDes,
            recAv=1,
            auth=1,
        )
        response.queries = message.queries
        response.timeReceived = message.timeReceived  # sendReply reads it
        entry = self.zone.get(name, {})
        secure = self._answer(response, name, query.type)
        if secure and response.rCode == dns.OK and (self.ad_unasked or _wants_dnssec(message)):
            response.authenticData = 1
        response.maxSize = 0  # no limit over TCP; over UDP, truncate whole records
        if udp and (entry.get("truncate") or len(response.toStr()) > _udp_limit(message)):
            response.answers, response.authority, response.trunc = [], [], 1
        delay = float(entry.get("delay", 0))
        if delay > 0:
            call = self.reactor.callLater(delay, self._send_later, protocol, response, address)
            self.delayed.append(call)
        else:
            self.sendReply(protocol, response, address)

    def _send_later(self, protocol: Any, response: dns.Message, address: Any) -> None:
        self.delayed = [c for c in self.delayed if c.active()]
        # A TCP client may have given up meanwhile; writing to its closed
        # transport is then a no-op.
        self.sendReply(protocol, response, address)

    def _answer(self, response: dns.Message, name: str, qtype: int) -> bool:
        """Fill in C{response} for C{name}/C{qtype}, following CNAMEs.

        Returns whether every name on the way is marked secure.
        """
        secure = True
        for _ in range(8):
            entry = self.zone.get(name)
            if entry is None:
                response.rCode = dns.ENAME
                response.authority = [self._soa()]
                return False
            secure = secure and bool(entry.get("secure", False))
            servfail = entry.get("servfail", False)
            wanted = _TYPE_NAMES.get(qtype)
            if servfail is True or (isinstance(servfail, list) and wanted in servfail):
                response.rCode = dns.ESERVER
                response.answers = []
                return False
            ttl = int(entry.get("ttl", DEFAULT_TTL))
            if "CNAME" in entry and qtype != dns.CNAME:
                target = str(entry["CNAME"]).lower().rstrip(".")
                record = dns.Record_CNAME(target.encode(), ttl=ttl)
                response.answers.append(self._rr(name, dns.CNAME, ttl, record))
                name = target
                continue
            value = entry.get(wanted) if wanted else None
            if value == "servfail":
                response.rCode = dns.ESERVER
                response.answers = []
                return False
            if not value:
                response.authority = [self._soa()]
                return secure
            for item in value:
                response.answers.append(self._rr(name, qtype, ttl, self._record(qtype, item, ttl)))
            return secure
        response.rCode = dns.ESERVER  # CNAME loop
        return False

    @staticmethod
    def _record(qtype: int, item: Any, ttl: int) -> Any:
        if qtype == dns.MX:
            preference, exchange = item
            exchange = str(exchange).rstrip(".")
            return dns.Record_MX(int(preference), exchange.encode(), ttl=ttl)
        if qtype == dns.A:
            return dns.Record_A(str(item), ttl=ttl)
        if qtype == dns.AAAA:
            return dns.Record_AAAA(str(item), ttl=ttl)
        if qtype == TLSA:
            usage, selector, mtype, data = item
            wire = bytes([int(usage), int(selector), int(mtype)]) + bytes.fromhex(str(data))
            return dns.UnknownRecord(wire, ttl=ttl)
        if qtype == dns.TXT:
            # One record: a string, or a list of its character-strings (<= 255 each).
            parts = [item] if isinstance(item, str) else list(item)
            return dns.Record_TXT(*(str(p).encode() for p in parts), ttl=ttl)
        return dns.Record_CNAME(str(item).encode(), ttl=ttl)

    @staticmethod
    def _rr(name: str, qtype: int, ttl: int, record: Any) -> dns.RRHeader:
        return dns.RRHeader(name.encode(), qtype, dns.IN, ttl, record, auth=True)

    def _soa(self) -> dns.RRHeader:
        ttl = self.negative_ttl
        record = dns.Record_SOA(b"ns.test", b"hostmaster.test", 1, 3600, 600, 86400, ttl, ttl=ttl)
        return dns.RRHeader(b"", dns.SOA, dns.IN, ttl, record, auth=True)


class DNSTestServer:
    """A L{ZoneServerFactory} listening on UDP and TCP on one loopback port.

    C{start()} returns the port; C{stop()} closes everything, cancels
    answers still waiting out a C{"delay"}, and returns a Deferred.
    C{zone} may be replaced while the server runs.
    """

    def __init__(
        self,
        zone: Zone,
        *,
        reactor: Any = None,
        negative_ttl: int = 60,
        interface: str = "127.0.0.1",
    ) -> None:
        self.reactor = global_reactor if reactor is None else reactor
        self.interface = interface
        self.factory = ZoneServerFactory(zone, reactor=self.reactor, negative_ttl=negative_ttl)
        self.udp: IListeningPort | None = None
        self.tcp: IListeningPort | None = None

    @property
    def zone(self) -> Zone:
        return self.factory.zone

    @zone.setter
    def zone(self, zone: Zone) -> None:
        self.factory.zone = normalize_zone(zone)

    @property
    def queries(self) -> list[tuple[str, str, str]]:
        """Every query received: (name, type, "udp" or "tcp")."""
        return self.factory.queries

    @property
    def port(self) -> int:
        assert self.udp is not None, "not started"
        return int(self.udp.getHost().port)

    def start(self, port: int = 0) -> int:
        """Listen on C{port} (0: a free one) for UDP and TCP; return the port."""
        for _attempt in range(20):
            udp = self.reactor.listenUDP(
                port, dns.DNSDatagramProtocol(self.factory), interface=self.interface
            )
            chosen = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(chosen, self.factory, interface=self.interface)
            except (OSError, CannotListenError):
                # The UDP port's TCP twin is taken (by a concurrent test run).
                udp.stopListening()
                if port:
                    raise
                continue
            self.udp, self.tcp = udp, tcp
            return int(chosen)
        raise RuntimeError("no port free for both UDP and TCP")

    def stop(self) -> defer.Deferred[Any]:
        for call in self.factory.delayed:
            if call.active():
                call.cancel()
        self.factory.delayed = []
        for proto in list(self.factory.connections):
            proto.transport.loseConnection()
        waits = [p.stopListening() for p in (self.udp, self.tcp) if p is not None]
        self.udp = self.tcp = None
        return defer.gatherResults([d for d in waits if d is not None])


def load_zone(path: str) -> Zone:
    with open(path, encoding="utf-8") as f:
        zone = json.load(f)
    if not isinstance(zone, dict):
        raise ValueError(f"{path}: the zone must be a JSON object")
    return normalize_zone(zone)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a test DNS zone on loopback.")
    parser.add_argument("zone", help="JSON file: name -> records (see tests/dnsserver.py)")
    parser.add_argument("--port", type=int, default=0, help="port for UDP and TCP (0: any)")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--negative-ttl", type=int, default=60)
    args = parser.parse_args(argv)
    reactor: Any = global_reactor
    dns_server = DNSTestServer(
        load_zone(args.zone),
        reactor=reactor,
        negative_ttl=args.negative_ttl,
        interface=args.interface,
    )
    port = dns_server.start(args.port)

    def reload(signum: int, frame: Any) -> None:
        reactor.callFromThread(_reload, dns_server, args.zone)

    signal.signal(signal.SIGHUP, reload)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    reactor.run()


def _reload(dns_server: DNSTestServer, path: str) -> None:
    try:
        dns_server.zone = load_zone(path)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"dnsserver: cannot reload {path}: {e}\n")


if __name__ == "__main__":
    main()
