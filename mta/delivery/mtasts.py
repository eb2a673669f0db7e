"""MTA-STS (RFC 8461): a domain's policy, discovered, fetched, checked and cached.

A domain that publishes MTA-STS says, over DNS and HTTPS, which MX hosts
may receive its mail and that they must be reached over TLS with a
certificate valid for their name.  The steps (RFC 8461 sections 3 and 5.1):

  1. the TXT record C{_mta-sts.DOMAIN} (L{policy_id}): exactly one record
     that starts with C{v=STSv1}, with an C{id} that changes whenever the
     policy does;
  2. when the id differs from the cached policy's (or nothing is cached),
     C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt} (L{PolicyFetcher}):
     a certificate valid for that name from a trusted CA, status 200 and
     nothing else (no redirects, section 3.3), C{text/plain}, at most
     L{MAX_POLICY_SIZE} octets, within a time limit;
  3. the body, parsed strictly (L{parse_policy}, section 3.2);
  4. the policy is kept for its C{max_age} (L{PolicyCache}, on disk in
     the spool's C{state/mta-sts/}, so a restart keeps it).

When the TXT record is gone, broken or cannot be looked up, or the fetch
fails, a cached policy that has not expired still applies (section 3.3:
"if no 'live' policy can be discovered ... but a valid (non-expired)
policy exists in the sender's cache, the sender MUST apply that cached
policy"); with nothing cached, the domain has no policy.  A failed fetch
is not tried again for the same id for L{RETRY_AFTER} seconds, so that a
dead policy host does not cost every delivery a timeout.  A cached policy
older than L{REFRESH_AFTER} is fetched again in the background when it is
used, so that its C{max_age} starts anew while the domain gets mail.

Everything runs in the reactor: DNS through the injected L{IResolver},
HTTP with C{twisted.web.client.Agent}, file access through an injected
runner.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mta.address import Network, in_networks
from mta.batch import Runner
from mta.delivery.dns import DNSError
from mta.interfaces import IResolver

log = Logger(namespace="mta.delivery")

#: The largest policy body read; RFC 8461 section 3.3 lets senders bound
#: it, and real policies are a few hundred octets.
MAX_POLICY_SIZE = 64 * 1024
#: RFC 8461 section 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
#: After a failed fetch, the seconds before the same policy id is fetched again.
RETRY_AFTER = 300.0
#: A cached policy older than this is fetched again in the background when
#: used, so that a domain mailed often never sees its policy expire (RFC 8461
#: section 3.3: "MTAs SHOULD proactively refresh cached policies before they
#: expire; a suggested refresh frequency is once per day").
REFRESH_AFTER = 86400.0
#: The well-known path of the policy (RFC 8461 section 3.2).
POLICY_PATH = "/.well-known/mta-sts.txt"

MODES = ("enforce", "testing", "none")

_EXT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
_TXT_FIELD = re.compile(rf"({_EXT_NAME})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_TXT_SEP = re.compile(r"[ \t]*;[ \t]*")
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_POLICY_LINE = re.compile(rf"({_EXT_NAME}):[ \t]*(.*?)[ \t]*")
# Printable ASCII, the space, and any non-ASCII (UTF-8 decoded) character.
_POLICY_VALUE = re.compile(r"[\x21-\x7e\u0080-\U0010ffff](?:[\x20-\x7e\u0080-\U0010ffff]*"
                           r"[\x21-\x7e\u0080-\U0010ffff])?")  # fmt: skip
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+")


class PolicyError(Exception):
    """A TXT record or policy that is not valid, or a fetch that failed; says why."""


@dataclass(frozen=True)
class Policy:
    """A parsed MTA-STS policy (RFC 8461 section 3.2)."""

    mode: str
    max_age: int
    mx: tuple[str, ...]

    def matches(self, host: str) -> bool:
        """Whether MX host C{host} is one the policy names (RFC 8461 section 4.1).

        A pattern is a host name, or C{*.} and a domain, which matches
        exactly one more label on the left: C{*.example.com} matches
        C{mx1.example.com}, not C{example.com} nor C{a.b.example.com}.
        Names compare in their A-label form, without case.
        """
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = name.partition(".")
                if first and dot and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    def __str__(self) -> str:
        return f"mode={self.mode} max_age={self.max_age} mx={','.join(self.mx) or '-'}"


def parse_txt(record: str) -> str:
    """The C{id} of one C{_mta-sts} TXT record (RFC 8461 section 3.1); PolicyError if invalid.

    The record is C{v=STSv1} and fields separated by C{;} (spaces or
    tabs around it allowed), e.g. C{v=STSv1; id=20160831085700Z;}.
    C{id} is 1 to 32 letters and digits and must appear once; other
    fields must be well formed and are ignored.
    """
    if not record.startswith("v=STSv1"):
        raise PolicyError(f"TXT record {record[:60]!r} does not start with v=STSv1")
    parts = _TXT_SEP.split(record[len("v=STSv1") :])
    if parts[0] != "":
        raise PolicyError(f"TXT record {record[:60]!r}: expected ';' after v=STSv1")
    fields = parts[1:]
    if fields and fields[-1] == "":
        fields.pop()  # one trailing separator is allowed
    ids = []
    for text in fields:
        m = _TXT_FIELD.fullmatch(text)
        if m is None:
            raise PolicyError(f"TXT record {record[:60]!r}: malformed field {text[:40]!r}")
        if m.group(1) == "id":
            ids.append(m.group(2))
    if len(ids) != 1:
        raise PolicyError(f"TXT record {record[:60]!r}: needs exactly one id, has {len(ids)}")
    if not _TXT_ID.fullmatch(ids[0]):
        raise PolicyError(f"TXT record {record[:60]!r}: id must be 1-32 letters and digits")
    return ids[0]


def policy_id(records: Sequence[str]) -> str:
    """The policy id from all TXT records of C{_mta-sts.DOMAIN}; PolicyError if none.

    RFC 8461 section 3.1: records not starting with C{v=STSv1} are
    discarded; unless exactly one is left, and valid, the domain has no
    MTA-STS policy.
    """
    candidates = [r for r in records if re.match(r"v=STSv1(?:[ \t;]|$)", r)]
    if len(candidates) != 1:
        raise PolicyError(f"{len(candidates)} v=STSv1 TXT records, not exactly one")
    return parse_txt(candidates[0])


def parse_policy(body: bytes) -> Policy:
    """Parse a policy file strictly (RFC 8461 section 3.2); PolicyError says what is wrong.

    Lines are C{name: value} and end with LF or CRLF; trailing empty
    lines are ignored, but an empty line between fields is an error.
    C{version} must be C{STSv1}; C{mode} one of C{enforce}, C{testing},
    C{none}; C{max_age} 1 to 10 digits (values over L{MAX_AGE_LIMIT} are
    cut to it); each must appear exactly once.  C{mx} (a host name, or
    C{*.} and a domain, as A-labels) must appear at least once unless
    the mode is C{none}.  Other well-formed fields are ignored, as the
    RFC says; field names are case-sensitive.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not UTF-8 text") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise PolicyError("the policy is empty")
    once: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(lines, 1):
        m = _POLICY_LINE.fullmatch(line)
        if m is None or not _POLICY_VALUE.fullmatch(m.group(2)):
            raise PolicyError(f"line {number} is not 'name: value': {line[:60]!r}")
        name, value = m.group(1), m.group(2)
        if name == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise PolicyError(f"line {number}: {value[:60]!r} is not an MX host pattern")
            mx.append(pattern)
        elif name in ("version", "mode", "max_age"):
            if name in once:
                raise PolicyError(f"line {number}: {name} appears twice")
            once[name] = value
    for name in ("version", "mode", "max_age"):
        if name not in once:
            raise PolicyError(f"the policy has no {name}")
    if once["version"] != "STSv1":
        raise PolicyError(f"version {once['version'][:20]!r} is not STSv1")
    mode = once["mode"]
    if mode not in MODES:
        raise PolicyError(f"mode {mode[:20]!r} is not enforce, testing or none")
    if not re.fullmatch(r"[0-9]{1,10}", once["max_age"]):
        raise PolicyError(f"max_age {once['max_age'][:20]!r} is not a number of seconds")
    if not mx and mode != "none":
        raise PolicyError("the policy names no mx")
    return Policy(mode, min(int(once["max_age"]), MAX_AGE_LIMIT), tuple(mx))


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as fetched: its domain, TXT id, fetch time (epoch seconds) and body."""

    domain: str
    id: str
    fetched: float
    policy: Policy
    body: str

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def to_json(self) -> str:
        return json.dumps(
            {"domain": self.domain, "id": self.id, "fetched": self.fetched, "policy": self.body},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> CachedPolicy:
        """Read a cache file back; ValueError (or PolicyError) if it is not one."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        domain, sts_id, fetched, body = doc["domain"], doc["id"], doc["fetched"], doc["policy"]
        if not (isinstance(domain, str) and isinstance(sts_id, str) and isinstance(body, str)):
            raise ValueError("wrong types")
        if not isinstance(fetched, int | float) or isinstance(fetched, bool):
            raise ValueError("fetched is not a number")
        return cls(domain, sts_id, float(fetched), parse_policy(body.encode()), body)


_SAFE_NAME = re.compile(r"[a-z0-9_-][a-z0-9._-]*")


class PolicyCache:
    """Policies by domain, in memory and one JSON file per domain in C{directory}.

    A file is written (through C{runner}: write, fsync, rename) when a
    policy is fetched, and read the first time the domain is asked for
    after a start.  An expired or unreadable file is treated as no
    policy; the next fetch replaces it.  At most C{memory_limit} domains
    are remembered in memory (the disk keeps the rest).
    """

    def __init__(
        self,
        directory: str,
        runner: Runner[Any],
        clock: IReactorTime,
        *,
        memory_limit: int = 10_000,
    ) -> None:
        self.directory = directory
        self._runner = runner
        self._clock = clock
        self._memory_limit = memory_limit
        # domain -> policy, or None for "no file" (so the disk is read once)
        self._memory: OrderedDict[str, CachedPolicy | None] = OrderedDict()

    def _path(self, domain: str) -> str | None:
        if not _SAFE_NAME.fullmatch(domain):
            return None
        return os.path.join(self.directory, domain + ".json")

    async def get(self, domain: str) -> CachedPolicy | None:
        """The domain's cached policy if it has not expired, else None."""
        if domain in self._memory:
            entry = self._memory[domain]
            self._memory.move_to_end(domain)
        else:
            entry = await self._runner(lambda: self._read(domain))
            self._remember(domain, entry)
        if entry is None or self._clock.seconds() >= entry.expires:
            return None
        return entry

    async def put(self, entry: CachedPolicy) -> None:
        """Keep C{entry}; the file write's failure is logged, the memory copy stays."""
        self._remember(entry.domain, entry)
        try:
            await self._runner(lambda: self._write(entry))
        except OSError as e:
            log.error(
                "MTA-STS: cannot write the cached policy of {domain} to {dir}: {error}",
                domain=entry.domain, dir=self.directory, error=e,
            )  # fmt: skip

    def _remember(self, domain: str, entry: CachedPolicy | None) -> None:
        self._memory[domain] = entry
        self._memory.move_to_end(domain)
        while len(self._memory) > self._memory_limit:
            self._memory.popitem(last=False)

    def _read(self, domain: str) -> CachedPolicy | None:
        path = self._path(domain)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                entry = CachedPolicy.from_json(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, PolicyError) as e:
            log.warn("MTA-STS: ignoring the unreadable cache file {path}: {error}", path=path,
                     error=e)  # fmt: skip
            return None
        return entry if entry.domain == domain else None

    def _write(self, entry: CachedPolicy) -> None:
        path = self._path(entry.domain)
        if path is None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(entry.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class _BoundedBody(Protocol):
    """Collects a response body of at most C{limit} octets; more aborts the connection.

    C{finished} fires with the body; cancelling it (the fetch's timeout)
    aborts the connection too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.finished: Deferred[bytes] = Deferred(self._cancel)
        self.parts: list[bytes] = []
        self.size = 0
        self.done = False

    def _cancel(self, _: Deferred[bytes]) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done = True
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.finished.errback(PolicyError(f"the policy is larger than {self.limit} octets"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done:
            return
        self.done = True
        # PotentialDataLoss: a body without a length that ended with the
        # connection, which is how HTTP/1.0 servers end one.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(PolicyError(f"reading the policy: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    """For a response whose body is not wanted: close the connection at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@implementer(IStreamClientEndpoint)
class _PolicyHostEndpoint:
    """TLS to the policy host: addresses from our resolver, refused networks skipped.

    The policy host's name is looked up like an MX host's, through the
    same resolver and with the same C{refuse_networks}: a domain must not
    make this server fetch from its own loopback services.
    """

    def __init__(self, fetcher: PolicyFetcher, host: str) -> None:
        self.fetcher = fetcher
        self.host = host

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        f = self.fetcher
        addresses: list[str] = []
        problems: list[str] = []
        for family in f.families:
            try:
                answer = await f.resolver.lookup_addresses(self.host, family)
            except DNSError as e:
                problems.append(str(e))
                continue
            addresses += [str(a) for a in answer.records]
        allowed = [a for a in addresses if not in_networks(a, f.refuse_networks)]
        if not allowed:
            why = "only refused addresses" if addresses else "; ".join(problems) or "no address"
            raise PolicyError(f"{self.host}: {why}")
        creator = optionsForClientTLS(self.host, trustRoot=f.trust_root)
        last: Exception | None = None
        for address in allowed[:2]:
            v6 = ipaddress.ip_address(address).version == 6
            kind = TCP6ClientEndpoint if v6 else TCP4ClientEndpoint
            tcp = kind(f.reactor, address, f.port, timeout=f.timeout)
            try:
                return await wrapClientTLS(creator, tcp).connect(factory)
            except ConnectError as e:
                last = e
        raise PolicyError(f"connect to {self.host}:{f.port}: {last}")


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, fetcher: PolicyFetcher) -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return _PolicyHostEndpoint(self.fetcher, uri.host.decode("ascii"))


class PolicyFetcher:
    """Fetches C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt} (RFC 8461 section 3.3).

    @param trust_root: the CAs the policy host's certificate must chain
        to (C{twisted.internet.ssl.platformTrust()} for the system's, or
        L{mta.delivery.pkix.TrustStore.trust_root}).
    @param port: the HTTPS port, 443 but in tests.
    @param timeout: seconds for the whole fetch: DNS, connection, TLS,
        request and body.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        trust_root: Any,  # an IOpenSSLTrustRoot (not exported by twisted.internet.ssl)
        *,
        port: int = 443,
        timeout: float = 30.0,
        families: tuple[str, ...] = ("A", "AAAA"),
        refuse_networks: tuple[Network, ...] = (),
        max_size: int = MAX_POLICY_SIZE,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.trust_root = trust_root
        self.port = port
        self.timeout = timeout
        self.families = families
        self.refuse_networks = refuse_networks
        self.max_size = max_size
        self._agent = Agent.usingEndpointFactory(reactor, _Endpoints(self))

    def fetch(self, domain: str) -> Deferred[bytes]:
        """The policy body of C{domain} (an A-label name); fails with PolicyError."""
        d = Deferred.fromCoroutine(self._fetch(domain))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()  # aborts whatever is in progress: DNS wait, connection, body

        timer = self.reactor.callLater(self.timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if expired:
                return Failure(PolicyError(f"no policy within {self.timeout:g} s"))
            if result.check(PolicyError):
                return result
            return Failure(PolicyError(_describe(result)))

        return d.addBoth(done)

    async def _fetch(self, domain: str) -> bytes:
        url = f"https://mta-sts.{domain}{POLICY_PATH}".encode("ascii")
        headers = Headers({b"User-Agent": [b"mta (MTA-STS, RFC 8461)"]})
        # Agent never follows redirects (RedirectAgent would); a 3xx is
        # just not 200 (section 3.3: "HTTP 3xx redirects MUST NOT be followed").
        response: IResponse = await self._agent.request(b"GET", url, headers)
        if response.code != 200:
            response.deliverBody(_Discard())
            raise PolicyError(f"{url.decode()}: HTTP {response.code} (only 200 is a policy)")
        kinds = response.headers.getRawHeaders(b"content-type") or [b""]
        media = kinds[0].split(b";")[0].strip().lower()
        if media != b"text/plain":
            response.deliverBody(_Discard())
            shown = media.decode("ascii", "replace") or "none"
            raise PolicyError(f"{url.decode()}: media type {shown}, not text/plain")
        reader = _BoundedBody(self.max_size)
        response.deliverBody(reader)
        return await reader.finished


def _describe(failure: Failure) -> str:
    """A short text for a failed request, looking inside Agent's wrapper exceptions."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = failure.getErrorMessage()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


class MTASTS:
    """The current MTA-STS policy of a domain, by the steps of the module docstring.

    @param fetch: the policy body for a domain (L{PolicyFetcher.fetch}).
    """

    def __init__(
        self,
        resolver: IResolver,
        fetch: Callable[[str], Deferred[bytes]],
        cache: PolicyCache,
        clock: IReactorTime,
        *,
        retry_after: float = RETRY_AFTER,
        refresh_after: float = REFRESH_AFTER,
    ) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.cache = cache
        self.clock = clock
        self.retry_after = retry_after
        self.refresh_after = refresh_after
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> when
        self._in_flight: dict[str, list[Deferred[CachedPolicy | None]]] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy for C{domain} (A-label form), or None; never fails."""
        try:
            entry = await self._policy(domain)
        except Exception:
            log.failure("MTA-STS: looking up the policy of {domain} failed", domain=domain)
            return None
        return None if entry is None else entry.policy

    async def _policy(self, domain: str) -> CachedPolicy | None:
        cached = await self.cache.get(domain)
        try:
            answer = await self.resolver.lookup_txt(f"_mta-sts.{domain}")
            sts_id = policy_id(answer.records)
        except DNSError as e:
            if e.temporary and cached is not None:
                log.info("MTA-STS: {error}; using the cached policy of {domain}", error=e,
                         domain=domain)  # fmt: skip
            return cached
        except PolicyError as e:
            log.info("MTA-STS: _mta-sts.{domain}: {error}", domain=domain, error=e)
            return cached
        failed = self._failed.get((domain, sts_id))
        retry = failed is None or self.clock.seconds() - failed >= self.retry_after
        if cached is not None and cached.id == sts_id:
            old = self.clock.seconds() - cached.fetched >= self.refresh_after
            if old and retry and domain not in self._in_flight:
                refresh = Deferred.fromCoroutine(self._refresh(domain, sts_id, cached))
                refresh.addErrback(
                    lambda f: log.failure("MTA-STS: refreshing {domain}", f, domain=domain)
                )
            return cached
        if not retry:
            return cached
        return await self._refresh(domain, sts_id, cached)

    async def _refresh(
        self, domain: str, sts_id: str, cached: CachedPolicy | None
    ) -> CachedPolicy | None:
        """Fetch and store the policy; concurrent callers for a domain share one fetch."""
        waiters = self._in_flight.get(domain)
        if waiters is not None:
            mine: Deferred[CachedPolicy | None] = Deferred()
            waiters.append(mine)
            return await mine
        waiters = self._in_flight[domain] = []
        try:
            entry = await self._fetch_and_store(domain, sts_id, cached)
        finally:
            del self._in_flight[domain]
        for d in waiters:
            d.callback(entry)
        return entry

    async def _fetch_and_store(
        self, domain: str, sts_id: str, cached: CachedPolicy | None
    ) -> CachedPolicy | None:
        try:
            body = await self.fetch(domain)
            policy = parse_policy(body)
        except PolicyError as e:
            self._failed[(domain, sts_id)] = self.clock.seconds()
            self._prune_failures()
            what = "using the cached one" if cached is not None else "no policy applies"
            log.warn("MTA-STS: cannot get the policy of {domain} (id {id}): {error}; {what}",
                     domain=domain, id=sts_id, error=e, what=what)  # fmt: skip
            return cached
        entry = CachedPolicy(domain, sts_id, self.clock.seconds(), policy, body.decode("utf-8"))
        log.info("MTA-STS: policy of {domain} (id {id}): {policy}", domain=domain, id=sts_id,
                 policy=str(policy))  # fmt: skip
        self._failed.pop((domain, sts_id), None)
        await self.cache.put(entry)
        return entry

    def _prune_failures(self) -> None:
        now = self.clock.seconds()
        for key, when in list(self._failed.items()):
            if now - when >= self.retry_after:
                del self._failed[key]
