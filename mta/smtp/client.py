"""The outbound ESMTP client: one connection, any number of transactions.

Why not Twisted's C{SMTPClient}: it does not pipeline, passes no MAIL/RCPT
parameters, and dot-stuffs each 16 KiB chunk on its own, so a line "."
that begins exactly at a chunk boundary goes out unstuffed and ends the
message early.  This client keeps the stuffing state across chunks
(L{DotStuffer}), pipelines MAIL/RCPT/DATA when the server offers
PIPELINING (RFC 2920), and reports every recipient's own reply.

Layers:
  - L{ClientProtocol} reads replies (RFC 5321 section 4.2) and hands each
    to the next waiting Deferred, with a timeout per step (section
    4.5.3.2);
  - L{OutboundConnection} runs the dialogue on it: greeting, EHLO, STARTTLS
    (and, when the policy has a L{PeerCheck}, the check of the server's
    certificate chain before anything is sent inside TLS), AUTH,
    transactions, QUIT;
  - L{connect} makes a TCP connection and returns a ready connection.

All failures that concern the whole attempt are L{DeliveryError}s; the
caller classifies them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import typing
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.address import xtext_encode
from mta.errors import DeliveryError, Reply

log = Logger(namespace="mta.smtp")

MAX_REPLY_LINE = 2048  # RFC 5321 allows 512; be tolerant, not unbounded
MAX_REPLY_LINES = 100
# A message up to this size goes out in one write (dot-stuffed in memory).
WHOLE_WRITE = 256 * 1024
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait for each step (RFC 5321 section 4.5.3.2; Postfix names)."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    starttls: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    quit: float = 30.0


TLS_POLICIES = ("none", "may", "encrypt", "verify")


class PeerCheck(typing.Protocol):
    """A check of the server's certificate chain once the TLS handshake is done.

    The TLS policies of L{mta.delivery.tlspolicy} (DANE, MTA-STS, the
    PKIX check of C{tls = "verify"}) provide it.  C{name} says in replies
    and logs whose rule it is (C{"DANE"}, C{"MTA-STS policy of
    example.com"}); when C{enforced} is False (an MTA-STS policy in
    C{testing} mode) a failure is only logged.
    """

    @property
    def name(self) -> str: ...

    @property
    def enforced(self) -> bool: ...

    def problem(self, chain: Sequence[x509.Certificate]) -> str | None:
        """None if the chain (the server's certificate first) passes, else why not."""


@dataclass(frozen=True)
class ClientPolicy:
    """How to talk to one destination.

    C{tls}: C{"none"} never STARTTLS; C{"may"} use it when offered
    (opportunistic, no certificate check); C{"encrypt"} require TLS, no
    certificate check; C{"verify"} require TLS with a certificate valid for
    the host name (the system's CAs, or C{ca_file}).

    C{check}, when set, is run on the server's chain after the handshake
    and before the second EHLO (the handshake itself then checks nothing);
    with C{tls = "encrypt"} and an enforced check, a failure ends the
    session with C{451 4.7.5}.  C{label} is what the delivery log calls
    the policy (C{tls=dane}); by default the C{tls} level.
    """

    hostname: str
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    tls: str = "may"
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    check: PeerCheck | None = None
    label: str = ""

    @property
    def tls_required(self) -> bool:
        return self.tls in ("encrypt", "verify")

    @property
    def tls_label(self) -> str:
        return self.label or self.tls


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # "type;address", decoded


@dataclass
class OutboundMessage:
    """One transaction's worth: envelope and a way to read the message."""

    sender: str
    recipients: list[OutboundRecipient]
    open: Callable[[], IO[bytes]]
    size: int
    eight_bit: bool = False  # send with BODY=8BITMIME
    smtputf8: bool = False  # send with SMTPUTF8
    ret: str | None = None
    envid: str | None = None


@dataclass
class TransactionResult:
    """Each recipient's reply, in order: its RCPT reply if refused, else the
    final reply to the message.  C{dsn} says whether the DSN parameters were
    passed on (the server offered DSN, RFC 3461 section 4)."""

    replies: list[Reply]
    dsn: bool
    data_reply: Reply | None = None


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """Build a L{Reply} from complete reply lines (codes already checked)."""
    code = int(lines[0][:3])
    texts = [ln[4:].decode("utf-8", "replace") for ln in lines]
    enhanced = None
    m = _ENHANCED.match(texts[0])
    if m and m.group(1) == str(code)[0]:
        enhanced = m.group(0).strip()
        texts = [_ENHANCED.sub("", t, count=1) if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


class DotStuffer:
    """Stateful dot-stuffing across chunks (RFC 5321 section 4.5.2).

    The message in the spool has CRLF line ends.  A dot at the start of a
    line gets a second dot; the state carries whether the last chunk ended
    at a line start or in the middle of a CRLF, so a line beginning exactly
    at a chunk boundary is handled like any other.
    """

    LINE_START, MID_LINE, AFTER_CR = range(3)

    def __init__(self) -> None:
        self.state = self.LINE_START

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        prefix = b""
        if self.state == self.LINE_START and chunk[:1] == b".":
            prefix = b"."
        elif self.state == self.AFTER_CR and chunk[:2] == b"\n.":
            chunk = b"\n." + chunk[1:]
        out = prefix + chunk.replace(b"\r\n.", b"\r\n..")
        if chunk.endswith(b"\r\n") or (chunk == b"\n" and self.state == self.AFTER_CR):
            self.state = self.LINE_START
        elif chunk.endswith(b"\r"):
            self.state = self.AFTER_CR
        else:
            self.state = self.MID_LINE
        return out

    def terminator(self) -> bytes:
        """What ends the data: CRLF if the message lacked a final one, then "."."""
        return b".\r\n" if self.state == self.LINE_START else b"\r\n.\r\n"


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """Reads SMTP replies and gives each to the next waiter, in order."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiters: deque[tuple[Deferred[Reply], float]] = deque()
        self._timer: IDelayedCall | None = None
        self._error: DeliveryError | None = None
        self.remote = "unknown"
        self.tls_handshaking = False
        self.tls_done = False
        self.lost = False
        self._closed_waiters: list[Deferred[None]] = []
        self._handshake_waiters: list[Deferred[None]] = []
        self._handshake_timer: IDelayedCall | None = None

    def handshakeCompleted(self) -> None:
        self.tls_handshaking = False
        self.tls_done = True
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.callback(None)

    def wait_handshake(self, timeout: float) -> Deferred[None]:
        """Fires when the TLS handshake is done; fails as the connection does.

        A handshake that takes longer than C{timeout} seconds aborts the
        connection (kind C{"timeout"}).
        """
        d: Deferred[None] = Deferred()
        if self._error is not None:
            d.errback(self._error)
        elif self.tls_done:
            d.callback(None)
        else:
            self._handshake_waiters.append(d)
            if self._handshake_timer is None:
                self._handshake_timer = self.clock.callLater(timeout, self._handshake_timed_out)
        return d

    def _handshake_timed_out(self) -> None:
        self._fail(
            DeliveryError(
                Reply(451, "4.4.2", f"{self.remote}: timeout in the TLS handshake"),
                "timeout",
                remote=self.remote,
            )
        )
        self.abort()

    def peer_chain(self) -> list[x509.Certificate]:
        """The certificate chain the server sent, its own certificate first."""
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        if not isinstance(handle, SSL.Connection):
            return []
        return handle.get_peer_cert_chain(as_cryptography=True) or []

    def expect(self, timeout: float) -> Deferred[Reply]:
        """A Deferred for the next reply; fails after C{timeout} seconds."""
        d: Deferred[Reply] = Deferred()
        if self._error is not None:
            d.errback(self._error)
            return d
        self._waiters.append((d, timeout))
        if len(self._waiters) == 1:
            self._arm(timeout)
        return d

    def _arm(self, timeout: float) -> None:
        # Each command re-arms it: moving the call is cheaper than a new one.
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def retime(self, timeout: float) -> None:
        """Give the reply now awaited a new timeout, counted from now."""
        if self._waiters:
            d, _ = self._waiters[0]
            self._waiters[0] = (d, timeout)
            self._arm(timeout)

    def touch(self) -> None:
        """Progress on our side (data sent): restart the current timeout."""
        if self._timer is not None and self._timer.active() and self._waiters:
            self._timer.reset(self._waiters[0][1])

    def _timed_out(self) -> None:
        self._fail(
            DeliveryError(
                Reply(451, "4.4.2", f"{self.remote}: timeout waiting for a reply"),
                "timeout",
                remote=self.remote,
            )
        )
        self.abort()

    @property
    def failed(self) -> bool:
        """Whether a timeout or protocol error ended this connection."""
        return self._error is not None

    def start_tls(self, creator: Any) -> None:
        """Switch to TLS after the server's 220.

        Anything the server sent after that reply, before the handshake,
        would otherwise be read as the answer to our first command inside
        TLS (the client side of the CVE-2011-0411 class): refuse it.
        """
        if self._buffer or self._lines:
            self._protocol_error("data after the STARTTLS reply")
            raise DeliveryError(
                Reply(451, "4.5.0", f"{self.remote}: data after the STARTTLS reply"),
                "protocol",
                remote=self.remote,
            )
        self.tls_handshaking = True
        self.transport.startTLS(creator)  # type: ignore[union-attr]

    def send_line(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            line = raw.rstrip(b"\r")
            if (
                len(line) < 3
                or not line[:3].isdigit()
                or line[3:4] not in (b"", b" ", b"-")
                or not 200 <= int(line[:3]) <= 599
            ):
                self._protocol_error(f"malformed reply line {line[:60]!r}")
                return
            if self._lines and line[:3] != self._lines[0][:3]:
                self._protocol_error("reply lines with different codes")
                return
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("reply too long")
                return
            if line[3:4] != b"-":
                reply = parse_reply_lines(self._lines)
                self._lines = []
                self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        if not self._waiters:
            self._protocol_error(f"unexpected reply {reply}")
            return
        d, _ = self._waiters.popleft()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._waiters:
            self._arm(self._waiters[0][1])
        d.callback(reply)

    def _protocol_error(self, what: str) -> None:
        self._fail(
            DeliveryError(
                Reply(451, "4.5.0", f"{self.remote}: protocol error: {what}"),
                "protocol",
                remote=self.remote,
            )
        )
        self.abort()

    def _fail(self, error: DeliveryError) -> None:
        if self._error is None:
            self._error = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        waiters, self._waiters = self._waiters, deque()
        for d, _ in waiters:
            d.errback(self._error)
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        handshakes, self._handshake_waiters = self._handshake_waiters, []
        for waiter in handshakes:
            waiter.errback(self._error)

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.tls_handshaking:
            error = DeliveryError(
                Reply(
                    454, "4.7.0", f"{self.remote}: TLS handshake failed: {reason.getErrorMessage()}"
                ),
                "tls",
                remote=self.remote,
            )
        else:
            error = DeliveryError(
                Reply(451, "4.4.2", f"{self.remote}: lost connection"),
                "network",
                remote=self.remote,
            )
        self._fail(error)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _OpportunisticTLS:
    """TLS without certificate checks, with SNI (Postfix "may"/"encrypt")."""

    def __init__(self, server_name: str) -> None:
        self._server_name = server_name
        self._context = CertificateOptions(
            raiseMinimumTo=TLSVersion.TLSv1_2, verify=False
        ).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if not _is_ip(self._server_name):  # RFC 6066 section 3: no literal addresses in SNI
            try:
                conn.set_tlsext_host_name(self._server_name.encode("idna"))
            except (UnicodeError, ValueError):
                pass
        conn.set_connect_state()
        return conn


def tls_creator(policy: ClientPolicy, server_name: str) -> Any:
    """The client TLS settings for a policy and the host we connected to.

    With a L{PeerCheck} the handshake checks nothing: the check runs on
    the chain afterwards.  SNI names the host either way (RFC 7672
    section 8.1 asks for it with DANE).
    """
    if policy.tls == "verify" and policy.check is None:
        if policy.ca_file:
            with open(policy.ca_file, "rb") as f:
                root = Certificate.loadPEM(f.read())
            return optionsForClientTLS(server_name, trustRoot=root)
        return optionsForClientTLS(server_name)
    return _OpportunisticTLS(server_name)


class OutboundConnection:
    """An SMTP session with one server, ready for transactions after L{setup}."""

    def __init__(self, protocol: ClientProtocol, policy: ClientPolicy, server_name: str) -> None:
        self.p = protocol
        self.policy = policy
        self.server_name = server_name
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.greeting: Reply | None = None
        self.transactions = 0
        self.broken = False
        self.verified = False  # the policy's PeerCheck passed

    @property
    def remote(self) -> str:
        return self.p.remote

    @property
    def tls(self) -> bool:
        return self.p.tls_done

    @property
    def usable(self) -> bool:
        # failed: a timeout or protocol error already aborted the connection,
        # even if connectionLost has not run yet.
        return not self.broken and not self.p.lost and not self.p.failed

    def _fail_reply(self, reply: Reply, kind: str = "remote") -> DeliveryError:
        self.broken = True
        return DeliveryError(reply, kind, remote=self.remote)

    async def _command(self, line: str, timeout: float) -> Reply:
        self.p.send_line(line)
        return await self.p.expect(timeout)

    async def setup(self) -> None:
        """Greeting, EHLO, STARTTLS when wanted, EHLO again, AUTH when configured."""
        t = self.policy.timeouts
        self.greeting = await self.p.expect(t.greeting)
        if self.greeting.code != 220:
            # RFC 5321 section 3.1: wait for QUIT's reply no more than politely.
            self.p.send_line("QUIT")
            raise self._fail_reply(self.greeting)
        await self._hello()
        check = self.policy.check
        by = f" by the {check.name}" if check is not None else ""
        if "STARTTLS" in self.extensions and self.policy.tls != "none":
            reply = await self._command("STARTTLS", t.starttls)
            if reply.code != 220:
                if self.policy.tls_required:
                    raise self._fail_reply(
                        Reply(451, "4.7.5", f"{self.remote}: STARTTLS refused: {reply}"),
                        "tls",
                    )
                self._not_enforced(f"STARTTLS refused: {reply}")
            else:
                self.p.start_tls(tls_creator(self.policy, self.server_name))
                if check is not None:
                    # Nothing goes inside TLS before the server is authenticated.
                    await self.p.wait_handshake(t.starttls)
                    self._check_peer(check)
                await self._hello()
        elif self.policy.tls != "none" and not self.policy.tls_required:
            self._not_enforced("STARTTLS is not offered")
        if self.policy.tls_required and not self.tls:
            raise self._fail_reply(
                Reply(451, "4.7.4", f"{self.remote}: TLS is required{by} but not offered"),
                "tls",
            )
        if self.policy.username is not None:
            await self._auth()

    def _check_peer(self, check: PeerCheck) -> None:
        """Run the policy's check on the server's chain; raise or log a failure."""
        problem = check.problem(self.p.peer_chain())
        if problem is None:
            self.verified = True
            return
        if check.enforced:
            raise self._fail_reply(
                Reply(451, "4.7.5", f"{self.remote}: TLS authentication failed ({check.name}): "
                      f"{problem}"),
                "tls",
            )  # fmt: skip
        self._not_enforced(problem)

    def _not_enforced(self, problem: str) -> None:
        """A failure that a policy in testing mode only reports (RFC 8461 section 5)."""
        check = self.policy.check
        if check is not None and not check.enforced:
            log.warn(
                "{remote}: {problem}: the {name} (testing) would not deliver; delivering anyway",
                remote=self.remote, problem=problem, name=check.name,
            )  # fmt: skip

    async def _hello(self) -> None:
        t = self.policy.timeouts
        reply = await self._command(f"EHLO {self.policy.hostname}", t.helo)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params
            return
        if 500 <= reply.code < 600 and not self.tls:
            reply = await self._command(f"HELO {self.policy.hostname}", t.helo)
            if reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                return
        raise self._fail_reply(reply)

    async def _auth(self) -> None:
        if not self.tls:
            raise self._fail_reply(
                Reply(451, "4.7.0", f"{self.remote}: not sending a password without TLS"),
                "config",
            )
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        username, password = self.policy.username or "", self.policy.password or ""
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            reply = await self._command(f"AUTH PLAIN {token}", self.policy.timeouts.helo)
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", self.policy.timeouts.helo)
            if reply.code == 334:
                reply = await self._command(
                    base64.b64encode(username.encode()).decode(), self.policy.timeouts.helo
                )
            if reply.code == 334:
                reply = await self._command(
                    base64.b64encode(password.encode()).decode(), self.policy.timeouts.helo
                )
        else:
            raise self._fail_reply(
                Reply(451, "4.7.0", f"{self.remote}: offers no AUTH PLAIN or LOGIN"),
                "config",
            )
        if reply.code != 235:
            raise self._fail_reply(reply, "auth" if reply.code >= 500 else "remote")

    def _mail_line(self, msg: OutboundMessage, dsn: bool) -> str:
        params = []
        limit = self.extensions.get("SIZE")
        if limit is not None:
            params.append(f"SIZE={msg.size}")
        if msg.eight_bit and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if msg.smtputf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        if dsn:
            if msg.ret:
                params.append(f"RET={msg.ret}")
            if msg.envid:
                params.append(f"ENVID={xtext_encode(msg.envid)}")
        return " ".join([f"MAIL FROM:<{msg.sender}>", *params])

    def _rcpt_line(self, rcpt: OutboundRecipient, dsn: bool) -> str:
        params = []
        if dsn and rcpt.notify:
            params.append("NOTIFY=" + ",".join(rcpt.notify))
        if dsn and rcpt.orcpt:
            kind, _, address = rcpt.orcpt.partition(";")
            params.append(f"ORCPT={kind};{xtext_encode(address)}")
        return " ".join([f"RCPT TO:<{rcpt.address}>", *params])

    def size_limit(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None

    async def send(self, msg: OutboundMessage) -> TransactionResult:
        """One mail transaction; per-recipient replies.

        Raises L{DeliveryError} when the transaction failed as a whole (MAIL
        refused, connection lost, timeout): then no recipient was accepted.
        """
        t = self.policy.timeouts
        limit = self.size_limit()
        if limit is not None and msg.size > limit:
            raise DeliveryError(
                Reply(
                    552,
                    "5.3.4",
                    f"message size {msg.size} exceeds the limit {limit} of {self.remote}",
                ),
                "message",
                remote=self.remote,
            )
        self.transactions += 1
        dsn = "DSN" in self.extensions
        lines = [self._mail_line(msg, dsn)] + [self._rcpt_line(r, dsn) for r in msg.recipients]
        if "PIPELINING" in self.extensions:
            mail, rcpts, data = await self._pipelined(lines)
        else:
            mail, rcpts, data = await self._one_by_one(lines)
        if any(r.code == 421 for r in [mail, *rcpts, *([data] if data else [])]):
            # RFC 5321 section 3.8: the server is closing the connection.
            self.broken = True
        if mail.code != 250:
            if data is not None and data.code == 354:
                await self._command(".", t.data_done)
            await self._reset()
            raise DeliveryError(mail, "remote", remote=self.remote)
        accepted = [r.code in (250, 251) for r in rcpts]
        if not any(accepted):
            if data is not None and data.code == 354:
                # A server that accepted DATA with no valid recipient: end the
                # (empty) message so the session stays in step.
                await self._command(".", t.data_done)
            await self._reset()
            return TransactionResult(list(rcpts), dsn)
        if data is None or data.code != 354:
            final = data or Reply(451, "4.5.0", "no reply to DATA")
            if data is not None:
                await self._reset()
            return TransactionResult(
                [final if ok else r for ok, r in zip(accepted, rcpts, strict=True)], dsn, final
            )
        final = await self._transmit(msg)
        return TransactionResult(
            [final if ok else r for ok, r in zip(accepted, rcpts, strict=True)], dsn, final
        )

    async def _pipelined(self, lines: list[str]) -> tuple[Reply, list[Reply], Reply | None]:
        """RFC 2920: MAIL, every RCPT and DATA in one write, replies in order."""
        t = self.policy.timeouts
        self.p.transport.write(  # type: ignore[union-attr]
            b"".join(ln.encode("utf-8") + b"\r\n" for ln in [*lines, "DATA"])
        )
        waiting = [self.p.expect(t.mail)]
        waiting += [self.p.expect(t.rcpt) for _ in lines[1:]]
        waiting.append(self.p.expect(t.data_init))
        # Wait for all so that no failed Deferred is left unobserved.
        results = await DeferredList(waiting, consumeErrors=True)
        replies: list[Reply] = []
        for ok, value in results:
            if not ok:
                assert isinstance(value, Failure)
                value.raiseException()
            replies.append(value)
        return replies[0], replies[1:-1], replies[-1]

    async def _one_by_one(self, lines: list[str]) -> tuple[Reply, list[Reply], Reply | None]:
        t = self.policy.timeouts
        mail = await self._command(lines[0], t.mail)
        if mail.code != 250:
            return mail, [mail] * (len(lines) - 1), None
        rcpts = [await self._command(line, t.rcpt) for line in lines[1:]]
        if not any(r.code in (250, 251) for r in rcpts):
            return mail, rcpts, None
        data = await self._command("DATA", t.data_init)
        return mail, rcpts, data

    async def _transmit(self, msg: OutboundMessage) -> Reply:
        t = self.policy.timeouts
        stuffer = DotStuffer()

        def transform(chunk: bytes) -> bytes:
            self.p.touch()
            return stuffer(chunk)

        try:
            f = msg.open()
        except OSError as e:
            self.abort()
            raise DeliveryError(
                Reply(451, "4.3.0", f"cannot read the queued message: {e}"), "local"
            ) from None
        # While sending, each chunk restarts the data block timeout; then the
        # final reply gets the (longer) data termination timeout.
        done = self.p.expect(t.data_block)
        transport: Any = self.p.transport
        try:
            # The first WHOLE_WRITE octets in one write (a typical message
            # whole, with the end of data: one send, no producer); the rest,
            # if any, streamed as the connection takes it.
            head = f.read(WHOLE_WRITE + 1)
            if len(head) <= WHOLE_WRITE:
                transport.write(transform(head) + stuffer.terminator())
            else:
                transport.write(transform(head))
                await FileSender().beginFileTransfer(f, transport, transform)
                transport.write(stuffer.terminator())
        except OSError as e:
            self.abort()
            done.addErrback(lambda _: None)
            raise DeliveryError(
                Reply(451, "4.3.0", f"cannot read the queued message: {e}"), "local"
            ) from None
        except Exception:
            # The connection went away while sending; the waiter says why.
            return await done
        finally:
            f.close()
        self.p.retime(t.data_done)
        reply = await done
        if reply.code == 421:
            self.broken = True
        return reply

    async def _reset(self) -> None:
        if self.broken:
            return
        try:
            reply = await self._command("RSET", self.policy.timeouts.mail)
        except DeliveryError:
            self.broken = True
            return
        if reply.code != 250:
            self.broken = True

    async def quit(self) -> None:
        """Say goodbye politely and wait until the connection is closed.

        Errors are of no interest any more; a server that does not answer
        within the quit timeout is cut off.
        """
        if self.p.lost:
            return
        closed = self.p.when_closed()
        try:
            await self._command("QUIT", self.policy.timeouts.quit)
        except DeliveryError:
            pass
        if not self.p.lost and self.p.transport is not None:
            self.p.transport.loseConnection()
        await closed

    def abort(self) -> None:
        self.broken = True
        self.p.abort()


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        p = ClientProtocol(self.clock)
        p.factory = self
        return p


async def connect(
    reactor: Any,
    host: str,
    address: str,
    port: int,
    policy: ClientPolicy,
) -> OutboundConnection:
    """Connect to C{address}:C{port} (for MX C{host}) and set the session up."""
    remote = f"{host}[{address}]:{port}"
    endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, address, port, timeout=policy.timeouts.connect)
    try:
        protocol = await endpoint.connect(_ClientFactory(reactor))
    except ConnectionRefusedError:
        raise DeliveryError(
            Reply(451, "4.4.1", f"connect to {remote}: Connection refused"),
            "network",
            remote=remote,
        ) from None
    except TimeoutError:
        raise DeliveryError(
            Reply(451, "4.4.1", f"connect to {remote}: Connection timed out"),
            "timeout",
            remote=remote,
        ) from None
    except ConnectError as e:
        raise DeliveryError(
            Reply(451, "4.4.1", f"connect to {remote}: {e.osError or e}"),
            "network",
            remote=remote,
        ) from None
    assert isinstance(protocol, ClientProtocol)
    protocol.remote = remote
    conn = OutboundConnection(protocol, policy, host)
    try:
        await conn.setup()
    except BaseException:
        conn.abort()
        raise
    return conn
