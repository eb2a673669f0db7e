"""The submission server: one ESMTP session per connection (RFC 5321, 6409).

Why not Twisted's C{smtp.ESMTP}: it advertises no extensions of its own,
drops MAIL/RCPT parameters, offers AUTH before TLS, reads DATA line by line
with LF tolerance, and keeps buffered plaintext across STARTTLS.  Each of
those is a rule this server must get right, so the session is written here
on C{Protocol} directly.  It is a small state machine:

  - command lines are read strictly (CRLF, at most 512 octets; 12288 for
    AUTH, RFC 4954) and handled in order; a handler returns a L{Reply} or a
    Deferred of one, and while a Deferred is pending no further input is
    processed, so pipelined commands (RFC 2920) get their replies in order;
  - after C{354}, input goes to the L{DataReader} until C{CRLF.CRLF};
  - after C{BDAT n} (CHUNKING, RFC 3030), the next C{n} octets go to the
    transaction's L{ChunkReader} whatever they are, and only then is the
    command answered; the chunk marked C{LAST} ends the message;
  - the message goes through L{MessageBuilder} into a spool transaction
    that was opened at MAIL and is committed before C{250} is sent.

Reply texts are written for the person reading them in a mail client.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta import address as addr
from mta.checks import Action, MessageInfo, SessionInfo, Verdict
from mta.envelope import Envelope, Recipient
from mta.errors import Reply, SMTPReplyError, StorageError
from mta.interfaces import ISpool, ISpoolTransaction, IUserDirectory
from mta.metrics import Metrics
from mta.smtp import auth
from mta.smtp.dataread import BodyReader, ChunkReader, DataReader
from mta.smtp.message import MessageBuilder, TraceInfo
from mta.tls import ServerTLS, describe_connection

if TYPE_CHECKING:
    from mta.checks.host import Checks
from mta.users import User

log = Logger(namespace="mta.smtpd")

MAX_COMMAND_LINE = 512  # RFC 5321 section 4.5.3.1.4, CRLF included
MAX_PAUSED_INPUT = 256 * 1024  # pipelined input held while a reply is pending
CLOSE_GRACE = 30.0  # seconds an orderly close may take before the connection is aborted
# Commands that do not move a mail transaction on (Postfix smtpd_junk_command_limit).
JUNK_COMMANDS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "HELP", "VRFY", "EXPN"})

OK = Reply(250, "2.0.0", "Ok")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_AUTH = Reply(
    530, "5.7.0", "Authentication required: log in with your email address and password"
)
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NO_PARAMS = Reply(501, "5.5.4", "This command takes no arguments")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
# RFC 3030 section 3: a chunk size is 1*DIGIT; more than 20 digits is no size.
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.IGNORECASE)
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded; closing connection")


def storage_reply(e: StorageError) -> Reply:
    if e.disk_full:
        return Reply(452, "4.3.1", "Insufficient system storage; try again later")
    return Reply(451, "4.3.0", "Temporary failure storing the message; try again later")


@dataclass(frozen=True)
class SessionLimits:
    """What a listener and its sessions allow (C{[limits]}, built by L{mta.service})."""

    message_size: int  # octets, advertised in SIZE (RFC 1870)
    recipients: int  # per message; the next gets 452 4.5.3
    received_headers: int  # more is a loop (554 5.4.6)
    connections_per_ip: int  # per client address (IPv6: per /64), per listener
    connections: int  # per listener
    idle_timeout: float  # seconds (RFC 5321 section 4.5.3.2)
    errors: int  # error replies before the session is closed
    junk_commands: int  # commands that do not move a transaction on, ditto
    header_size: int  # octets of a message's header section
    data_min_rate: int  # octets per second that buy time in DATA/BDAT; 0: any progress
    bare_newline: str  # "normalize" or "reject" (see mta.smtp.dataread)


@dataclass(frozen=True)
class SessionSettings:
    """What every session of one listener shares (built by the service).

    A reload hands the factories new settings (L{SubmissionFactory.configure});
    a session keeps those it was built with until it ends.
    """

    hostname: str
    limits: SessionLimits
    tls: ServerTLS
    spool: ISpool
    users: IUserDirectory  # the login's account, for the sender's alignment
    auth: auth.Authenticator  # what the AUTH exchanges check passwords with
    clock: IReactorTime
    trusted_networks: tuple[addr.Network, ...] = ()
    metrics: Metrics = field(default_factory=Metrics)
    checks: Checks | None = None  # the plugins (mta.checks.host); None: none at all


@dataclass
class _Transaction:
    """A mail transaction from MAIL to the end of DATA."""

    sender: str
    spool: ISpoolTransaction
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    recipients: list[Recipient] = field(default_factory=list)
    started: float = 0.0  # when MAIL was accepted, for the latency metric
    seen: set[str] = field(default_factory=set)  # the recipients, lower-cased ASCII

    def add(self, rcpt: Recipient) -> None:
        self.recipients.append(rcpt)
        self.seen.add(addr.ascii_lower(rcpt.address))


@dataclass
class _Chunked:
    """The message of a transaction that BDAT is sending (RFC 3030)."""

    reader: ChunkReader
    builder: MessageBuilder
    failed: Reply | None = None  # a chunk failed: every later chunk is discarded with this


@dataclass
class _Chunk:
    """The BDAT chunk being read: how many of its octets are still to come."""

    size: int
    left: int
    last: bool
    refused: Reply | None = None  # read only to be discarded, then answered with this


@implementer(IHandshakeListener, IPushProducer)
class SubmissionSession(Protocol):
    """One client connection to a submission listener.

    Flow control both ways: input is not processed while a reply is
    pending (and not read once a lot is waiting), and not read either
    while our replies pile up unread in the transport, so a client that
    sends and never reads cannot make the server buffer without bound.
    As the transport's producer, the session is told when that happens.
    """

    def __init__(
        self,
        settings: SessionSettings,
        *,
        implicit_tls: bool,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.s = settings
        self._on_close = on_close
        self.limits = settings.limits
        self.implicit_tls = implicit_tls
        self._timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self.tls_active = implicit_tls
        self.tls_info: str | None = None
        self.peer = "unknown"
        self.helo: str | None = None
        self.esmtp = False
        self.login: str | None = None
        self.trusted = False  # a client in [auth] trusted_networks
        self.txn: _Transaction | None = None
        self._buffer = b""
        self._discarding = False  # inside an over-long line
        self._busy = False
        self._paused = False  # reading from the transport is paused
        self._output_blocked = False  # the transport's write buffer is full
        self._junk = 0  # commands that do not move a transaction on
        self._closed = False
        self._reader: DataReader | None = None
        self._builder: MessageBuilder | None = None
        self._chunked: _Chunked | None = None  # BDAT began in this transaction
        self._chunk: _Chunk | None = None  # inside a BDAT chunk
        self._sasl: auth.SASLExchange | None = None  # waiting for the client's response
        self._errors = 0
        self.stats: Counter[str] = Counter()

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = getattr(peer, "host", "unknown")
        self.trusted = addr.in_networks(self.peer, self.s.trusted_networks)
        log.info("connect from [{peer}]", peer=self.peer)
        listener = "submissions" if self.implicit_tls else "submission"
        self.s.metrics.connections_in.labels(listener).inc()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._reset_timer()
        if self.s.checks is None:
            self._write(Reply(220, None, f"{self.s.hostname} ESMTP mta"))
        else:
            self._run(self._greet)

    def _greet(self) -> Reply | Deferred[Reply] | None:
        def decide(verdict: Verdict) -> Reply | None:
            if not verdict.refuses:
                return Reply(220, None, f"{self.s.hostname} ESMTP mta")
            reply = verdict.to_reply()
            if reply.permanent:
                reply = Reply(554, "5.7.1", reply.text)  # RFC 5321 section 3.1
            else:
                reply = Reply(421, "4.7.0", reply.text)
            log.info("reject: connect from [{peer}]: {reply}", peer=self.peer, reply=str(reply))
            self._write(reply)
            self._close()
            return None

        assert self.s.checks is not None
        return _then(self.s.checks.connect(self.info()), decide)  # type: ignore[no-any-return]

    def info(self) -> SessionInfo:
        """The session as plugins see it."""
        return SessionInfo(
            peer=self.peer, helo=self.helo, login=self.login, tls=self.tls_info,
            trusted=self.trusted,
        )  # fmt: skip

    def _refused(self, phase: str, verdict: Verdict, qid: str | None = None) -> Reply:
        """The reply for a plugin's refusal; a disconnect closes after it."""
        reply = verdict.to_reply()
        log.info(
            "{qid}reject: {phase} from [{peer}]: {reply}",
            qid=f"{qid}: " if qid else "",
            phase=phase,
            peer=self.peer,
            reply=str(reply),
        )
        if verdict.action is Action.DISCONNECT and reply.code != 421:
            reply = Reply(421, "4.7.0", reply.text)  # a 421 reply closes (see _reply)
        return reply

    # IPushProducer: the transport's verdict on our output.

    def pauseProducing(self) -> None:
        self._output_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_blocked = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        self._closed = True

    def _update_reading(self) -> None:
        """Pause reading while much input waits that cannot be processed now.

        Input waits while a reply is pending or our output is blocked.
        Reading itself is only paused once the waiting input is large: the
        TLS layer also blocks our output during its handshake, and that
        handshake must still be read.
        """
        stalled = self._busy or self._output_blocked
        want = stalled and len(self._buffer) > MAX_PAUSED_INPUT
        if want != self._paused and not self._closed:
            self._paused = want
            if want:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            else:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.tls_info = describe_connection(self.transport.getHandle())  # type: ignore[union-attr]
        self.s.metrics.tls_in.labels((self.tls_info or "").split(" ")[0] or "unknown").inc()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._abort_transaction()
        if self._on_close is not None:
            self._on_close()
        counts = " ".join(f"{k}={v}" for k, v in self.stats.items())
        log.info("disconnect from [{peer}] {counts}", peer=self.peer, counts=counts)

    def _reset_timer(self) -> None:
        """Idle timeout (RFC 5321 section 4.5.3.2), restarted by any input."""
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.limits.idle_timeout)
        else:
            self._timer = self.s.clock.callLater(self.limits.idle_timeout, self._timed_out)

    def _data_progress(self, octets: int) -> None:
        """Inside DATA, input buys time at C{data_min_rate}, up to the idle timeout.

        Restarting the idle timer at every packet would let a client that
        sends a byte a second hold the connection for ever.
        """
        rate = self.limits.data_min_rate
        timer = self._timer
        if not rate or timer is None or not timer.active():
            self._reset_timer()
            return
        now = self.s.clock.seconds()
        deadline = min(timer.getTime() + octets / rate, now + self.limits.idle_timeout)
        timer.reset(max(0.0, deadline - now))

    def _timed_out(self) -> None:
        if self._closed:
            return  # closing already (e.g. after QUIT); the abort timer sees to it
        if self._busy:
            # Our own work (a commit) is in progress: its reply is owed
            # first; a 421 now could precede a 250 for a queued message.
            self._reset_timer()
            return
        log.info("timeout after {state} from [{peer}]", state=self._state(), peer=self.peer)
        self._write(TIMEOUT)
        self._close()

    def _state(self) -> str:
        if self._reader is not None:
            return "DATA"
        if self._chunk is not None:
            return "BDAT"
        if self._sasl is not None:
            return "AUTH"
        return "RCPT" if self.txn else "command"

    def _write(self, reply: Reply) -> None:
        if not self._closed:
            self.transport.write(reply.wire)  # type: ignore[union-attr]

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A transport with a registered producer waits for it to go away
        # before it closes (TLS would never send its close_notify).
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        # An orderly close waits until our last reply is sent: a client
        # that never reads, or never finishes a TLS handshake (TLS holds
        # the reply until then), would hold the connection open for ever.
        if self._abort_timer is None:
            grace = min(CLOSE_GRACE, self.limits.idle_timeout)
            self._abort_timer = self.s.clock.callLater(grace, self._abort)

    def _abort(self) -> None:
        log.info("aborting the connection from [{peer}]: it did not close", peer=self.peer)
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._reader is not None or self._chunk is not None:
            self._data_progress(len(data))
        self._buffer += data
        self._update_reading()
        self._process()

    def _process(self) -> None:
        while self._buffer and not self._busy and not self._closed and not self._output_blocked:
            if self._chunk is not None:
                self._chunk_octets()
                continue
            if self._reader is not None:
                rest = self._reader.feed(self._buffer)
                self._buffer = b""
                if rest is not None:
                    self._buffer = rest
                    self._run(self._end_of_data)
                continue
            line = self._next_line()
            if line is None:
                break
            # Only a whole command line counts as activity: a client that
            # trickles a byte at a time does not hold a connection forever.
            self._reset_timer()
            self._line(line)
        self._update_reading()

    def _chunk_octets(self) -> None:
        """Take what is buffered of the current BDAT chunk, at most its rest."""
        chunk = self._chunk
        assert chunk is not None
        octets = self._buffer[: chunk.left]
        self._buffer = self._buffer[len(octets) :]
        chunk.left -= len(octets)
        if octets and chunk.refused is None:
            assert self._chunked is not None
            self._chunked.reader.feed(octets)
        if chunk.left == 0:
            self._run(self._end_of_chunk)

    def _next_line(self) -> bytes | None:
        """Take one line from the buffer, handling over-long ones.

        Returns the line with its terminator, or None when no full line is
        buffered.  A line longer than the AUTH limit is skipped to its end
        with a single 500 reply.
        """
        while True:
            end = self._buffer.find(b"\n")
            # Too long whether or not its end has arrived yet: the same
            # answer however the line was split into packets.
            too_long = (
                end + 1 > auth.MAX_AUTH_LINE
                if end >= 0
                else (len(self._buffer) > auth.MAX_AUTH_LINE)
            )
            if too_long and not self._discarding:
                self._discarding = True
                self._reply(Reply(500, "5.5.2", "Line too long"))
            if end < 0:
                if self._discarding:
                    self._buffer = b""
                return None
            line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
            if not self._discarding:
                return line
            self._discarding = False

    def _line(self, raw: bytes) -> None:
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            self._reply(Reply(500, "5.5.2", "Lines must end with CRLF (bare LF or CR received)"))
            return
        try:
            text = raw[:-2].decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(500, "5.5.2", "Command is not valid UTF-8"))
            return
        if self._sasl is not None:
            exchange, self._sasl = self._sasl, None
            self._run(lambda: self._sasl_step(exchange, exchange.respond(text)))
            return
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        if len(raw) > MAX_COMMAND_LINE and verb != "AUTH":
            self._reply(Reply(500, "5.5.2", "Line too long"))
            return
        handler = self._handlers.get(verb)
        if handler is None:
            if verb in ("GET", "POST", "HEAD", "PUT", "CONNECT", "USER"):
                log.info("non-SMTP command {verb} from [{peer}]", verb=verb, peer=self.peer)
                self._write(Reply(421, "4.7.0", "This is an SMTP server; closing connection"))
                self._close()
                return
            self.stats["unknown"] += 1
            self._reply(Reply(500, "5.5.2", "Command not recognized"))
            return
        self.stats[verb.lower()] += 1
        if verb in JUNK_COMMANDS:
            self._junk += 1
            if self._junk > self.limits.junk_commands:
                log.info("too many junk commands from [{peer}]", peer=self.peer)
                self._write(Reply(421, "4.7.0", "Too many commands without mail; closing"))
                self._close()
                return
        self._run(lambda: handler(self, args.strip(" ")))

    def _run(self, action: Callable[[], Reply | Deferred[Reply] | None]) -> None:
        """Run a handler; hold further input until its reply is sent."""
        try:
            result = action()
        except SMTPReplyError as e:
            result = e.reply
        except Exception:
            log.failure("error handling a command from [{peer}]", peer=self.peer)
            result = Reply(451, "4.3.0", "Internal error; try again later")
        if result is None:
            return
        if isinstance(result, Reply):
            self._reply(result)
            return
        self._busy = True

        def done(outcome: Reply | Failure) -> None:
            self._busy = False
            if isinstance(outcome, Failure):
                if outcome.check(SMTPReplyError):
                    reply = outcome.value.reply  # type: ignore[union-attr]
                else:
                    log.failure("error handling a command", outcome)
                    reply = Reply(451, "4.3.0", "Internal error; try again later")
            else:
                reply = outcome
            if reply is not None:
                self._reply(reply)
            self._process()

        result.addBoth(done)

    def _reply(self, reply: Reply) -> None:
        self._write(reply)
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
            if self._errors >= self.limits.errors:
                log.info("too many errors from [{peer}]", peer=self.peer)
                self._write(Reply(421, "4.7.0", "Too many errors; closing connection"))
                self._close()
        elif reply.code == 421:
            self._close()

    # -- commands ----------------------------------------------------------

    def _extensions(self) -> list[str]:
        ext = [
            "PIPELINING",
            f"SIZE {self.limits.message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
        ]
        if self.tls_active:
            ext.append("AUTH " + " ".join(auth.MECHANISMS))
        elif not self.implicit_tls:
            ext.append("STARTTLS")
        return ext

    def do_EHLO(self, args: str) -> Reply:
        if not self._valid_helo(args):
            return Reply(501, "5.5.4", "Syntax: EHLO your-hostname")
        self._abort_transaction()
        self.helo, self.esmtp = args, True
        return Reply(250, None, "\n".join([self.s.hostname, *self._extensions()]))

    def do_HELO(self, args: str) -> Reply:
        if not self._valid_helo(args):
            return Reply(501, "5.5.4", "Syntax: HELO your-hostname")
        self._abort_transaction()
        self.helo, self.esmtp = args, False
        return Reply(250, None, self.s.hostname)

    @staticmethod
    def _valid_helo(args: str) -> bool:
        return bool(args) and " " not in args and len(args) <= 255 and args.isprintable()

    def do_STARTTLS(self, args: str) -> Reply | None:
        if args:
            return NO_PARAMS
        if self.implicit_tls:
            return Reply(502, "5.5.1", "STARTTLS is not offered on this port (TLS is already on)")
        if self.tls_active:
            return Reply(503, "5.5.1", "TLS is already active")
        if self.helo is None:
            return NEED_EHLO
        if self._buffer:
            # CVE-2011-0411: nothing sent before the handshake may be taken
            # as sent inside it.
            log.info(
                "discarding {n} octets pipelined after STARTTLS from [{peer}]",
                n=len(self._buffer),
                peer=self.peer,
            )
            self._buffer = b""
        self._write(Reply(220, "2.0.0", "Ready to start TLS"))
        self.transport.startTLS(self.s.tls)  # type: ignore[union-attr]
        self.tls_active = True
        # RFC 3207 section 4.2: forget everything learnt before TLS.
        self._abort_transaction()
        self.helo, self.esmtp, self.login = None, False, None
        return None

    def do_AUTH(self, args: str) -> Reply | Deferred[Reply]:
        """AUTH (RFC 4954): the session's conditions here, the SASL exchange in L{auth}."""
        if not self.tls_active:
            return Reply(538, "5.7.11", "Encryption required: issue STARTTLS before AUTH")
        if not self.esmtp:
            return NEED_EHLO
        if self.login is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self.txn is not None:
            return Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
        exchange = self.s.auth.exchange(self.peer)
        return self._sasl_step(exchange, exchange.start(args))

    def _sasl_step(
        self, exchange: auth.SASLExchange, step: auth.Step | Deferred[auth.Step]
    ) -> Reply | Deferred[Reply]:
        """The reply to a step of an AUTH exchange; after a challenge the
        next line goes to the exchange, after success the session has its login."""

        def settle(step: auth.Step) -> Reply:
            if isinstance(step, auth.Challenge):
                self._sasl = exchange
            elif step.login is not None:
                self.login = step.login
            return step.reply

        if isinstance(step, Deferred):
            return step.addCallback(settle)
        return settle(step)

    def _user(self) -> User:
        assert self.login is not None
        user: User | None = self.s.users.get(self.login)
        if user is None:
            # Deleted since login: the session's rights end with the account.
            raise SMTPReplyError(Reply(535, "5.7.8", "Your account no longer exists"))
        return user

    def do_MAIL(self, args: str) -> Reply | Deferred[Reply]:
        if self.helo is None:
            return NEED_EHLO
        if not self.trusted:
            if not self.tls_active:
                return NEED_STARTTLS
            if self.login is None:
                return NEED_AUTH
        if self.txn is not None:
            return Reply(503, "5.5.1", "Nested MAIL command")
        path, param_text = addr.split_path(args, "FROM:")
        params = addr.parse_params(param_text, utf8=True)
        if params and not self.esmtp:
            return Reply(555, "5.5.4", "Parameters need EHLO, not HELO")
        smtputf8 = "SMTPUTF8" in params
        if not smtputf8:
            params = addr.parse_params(param_text, utf8=False)
        size = self._mail_params(params)
        if not path and self.login is not None:
            return Reply(550, "5.7.1", "A null sender <> is not accepted for submission")
        sender = str(addr.parse_mailbox(path, utf8=smtputf8)) if path else ""
        user = self._user() if self.login is not None else None
        if user is not None and not user.may_send_as(sender):
            return Reply(
                550,
                "5.7.1",
                f"Sender address <{sender}> does not belong to your login <{user.email}>; "
                "make sure your From address matches your authenticated address",
            )
        if self.s.checks is None:
            return self._begin(sender, size, smtputf8, params)

        def decide(verdict: Verdict) -> Reply:
            if verdict.refuses:
                return self._refused("MAIL", verdict)
            if self._closed:
                return Reply(421, "4.4.2", "Connection closed")
            return self._begin(sender, size, smtputf8, params)

        return _then(self.s.checks.mail(self.info(), sender), decide)  # type: ignore[no-any-return]

    def _begin(
        self, sender: str, size: int | None, smtputf8: bool, params: dict[str, str | None]
    ) -> Reply:
        """Open the spool transaction for an accepted MAIL."""
        try:
            spool_txn = self.s.spool.begin()
        except StorageError as e:
            log.error("cannot start a message: {e}", e=str(e))
            return storage_reply(e)
        # A large message is written to disk as it arrives; when the disk
        # lags, the spool pauses this client (ISpoolTransaction.producer).
        spool_txn.producer = self.transport
        self.txn = _Transaction(sender=sender, spool=spool_txn, size=size, smtputf8=smtputf8)
        self.txn.started = self.s.clock.seconds()
        self.txn.body = params.get("BODY")
        self.txn.ret = params.get("RET")
        if "ENVID" in params:
            self.txn.envid = addr.parse_envid(params["ENVID"])
        return Reply(250, "2.1.0", f"Sender <{sender}> OK")

    def _mail_params(self, params: dict[str, str | None]) -> int | None:
        size: int | None = None
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise SMTPReplyError(Reply(501, "5.5.4", "SIZE needs a number"))
                size = int(value)
                if size > self.limits.message_size:
                    raise SMTPReplyError(
                        Reply(
                            552,
                            "5.3.4",
                            f"Message size exceeds the limit of {self.limits.message_size} bytes",
                        )
                    )
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPReplyError(Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME"))
                params[key] = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    raise SMTPReplyError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise SMTPReplyError(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
                params[key] = value.upper()
            elif key in ("ENVID", "AUTH"):
                # ENVID is decoded by the caller; AUTH= (RFC 4954 section 5)
                # is accepted and ignored: the login is what counts.
                pass
            else:
                raise SMTPReplyError(Reply(555, "5.5.4", f"Unsupported parameter {key}"))
        return size

    def do_RCPT(self, args: str) -> Reply | Deferred[Reply]:
        if self.txn is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if self._chunked is not None:
            return Reply(503, "5.5.1", "RCPT after BDAT: the message is already being sent")
        if len(self.txn.recipients) >= self.limits.recipients:
            return Reply(
                452, "4.5.3", f"Too many recipients (at most {self.limits.recipients} per message)"
            )
        path, param_text = addr.split_path(args, "TO:")
        params = addr.parse_params(param_text, utf8=self.txn.smtputf8)
        rcpt = Recipient(address=str(addr.parse_mailbox(path, utf8=self.txn.smtputf8)))
        for key, value in params.items():
            if key == "NOTIFY":
                rcpt.notify = addr.parse_notify(value)
            elif key == "ORCPT":
                rcpt.orcpt = addr.parse_orcpt(value)
            else:
                return Reply(555, "5.5.4", f"Unsupported parameter {key}")
        ok = Reply(250, "2.1.5", f"Recipient <{rcpt.address}> OK")
        # A repeated recipient is accepted but kept once (duplicate filter).
        if addr.ascii_lower(rcpt.address) in self.txn.seen:
            return ok
        txn = self.txn
        if self.s.checks is None:
            txn.add(rcpt)
            return ok

        def decide(verdict: Verdict) -> Reply:
            if verdict.refuses:
                return self._refused("RCPT", verdict, txn.spool.queue_id)
            if self.txn is not txn:
                return Reply(503, "5.5.1", "The transaction ended")
            txn.add(rcpt)
            return ok

        accepted = [r.address for r in txn.recipients]
        verdict = self.s.checks.rcpt(self.info(), txn.sender, accepted, rcpt.address)
        return _then(verdict, decide)  # type: ignore[no-any-return]

    def do_DATA(self, args: str) -> Reply:
        if args:
            return NO_PARAMS
        if self.txn is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if self._chunked is not None:
            # RFC 3030 section 3: DATA and BDAT do not mix in one transaction.
            return Reply(503, "5.5.1", "DATA after BDAT: send the rest with BDAT, or RSET")
        if not self.txn.recipients:
            return Reply(554, "5.5.1", "No valid recipients")
        self._builder = self._new_builder(self.txn)
        self._reader = DataReader(
            self._builder.write, self.limits.message_size, bare_newline=self.limits.bare_newline
        )
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _new_builder(self, txn: _Transaction) -> MessageBuilder:
        """What turns the message of C{txn} into its stored form (DATA or BDAT)."""
        trace = TraceInfo(
            hostname=self.s.hostname,
            queue_id=txn.spool.queue_id,
            helo=self.helo or "unknown",
            client_address=self.peer,
            tls=self.tls_info,
            smtputf8=txn.smtputf8,
            recipients=tuple(r.address for r in txn.recipients),
            when=self.s.clock.seconds(),
            authenticated=self.login is not None,
            encrypted=self.tls_active,
        )
        return MessageBuilder(
            trace,
            self._user() if self.login is not None else None,
            txn.spool.write,
            max_received=self.limits.received_headers,
            max_header_size=self.limits.header_size,
            removed=self.s.checks.owned_fields() if self.s.checks is not None else frozenset(),
        )

    def do_BDAT(self, args: str) -> Reply | Deferred[Reply] | None:
        """C{BDAT size [LAST]} (RFC 3030): the next C{size} octets are message.

        The chunk is read before it is answered, also when it is refused
        (no MAIL, no recipient, an earlier chunk failed): its octets are
        never taken for commands.  Only a command whose size cannot be
        read leaves the octets to be read as commands (C{501}), as Postfix
        does; a client that sent it cannot be followed anyway.
        """
        m = _BDAT_ARGS.fullmatch(args)
        if m is None:
            return BDAT_SYNTAX
        size = int(m.group(1))
        refused = self._chunk_refusal()
        if refused is None and self._chunked is None:
            assert self.txn is not None
            try:
                builder = self._new_builder(self.txn)
            except SMTPReplyError as e:
                refused = e.reply  # the login's account is gone
            else:
                reader = ChunkReader(
                    builder.write, self.limits.message_size, bare_newline=self.limits.bare_newline
                )
                self._chunked = _Chunked(reader, builder)
        self._chunk = _Chunk(size=size, left=size, last=m.group(2) is not None, refused=refused)
        if size == 0:
            return self._end_of_chunk()
        return None  # answered once the chunk has been read (_chunk_octets)

    def _chunk_refusal(self) -> Reply | None:
        """Why the chunk about to be read cannot be taken, or None."""
        if not self.esmtp:
            return Reply(503, "5.5.1", "BDAT needs EHLO first")
        if self.txn is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if not self.txn.recipients:
            return Reply(554, "5.5.1", "No valid recipients")
        if self._chunked is not None and self._chunked.failed is not None:
            return self._chunked.failed
        return None

    def _end_of_chunk(self) -> Reply | Deferred[Reply]:
        """All octets of a chunk are in: answer it; after LAST, queue the message."""
        chunk, chunked, txn = self._chunk, self._chunked, self.txn
        self._chunk = None
        assert chunk is not None
        if chunk.refused is not None:
            if chunk.last and chunked is not None:
                # The failed message's last chunk ends its transaction.
                self._chunked, self.txn = None, None
            return chunk.refused
        assert chunked is not None
        assert txn is not None
        if chunk.last:
            self._chunked, self.txn = None, None
            chunked.reader.finish()
            return self._finish_message(chunked.reader, chunked.builder, txn, "BDAT")
        builder = chunked.builder
        error = chunked.reader.error or builder.error
        if error is None and builder.storage_error is not None:
            log.error("{qid}: {e}", qid=txn.spool.queue_id, e=str(builder.storage_error))
            error = storage_reply(builder.storage_error)
        if error is None:
            return Reply(250, "2.0.0", f"Ok: {chunk.size} octets received")
        # RFC 3030 section 3: the rest of the message is read and discarded,
        # each further chunk answered with this, until LAST or RSET.
        txn.spool.abort()
        chunked.failed = error
        log.info(
            "{qid}: reject: BDAT from [{peer}]: {reply}",
            qid=txn.spool.queue_id,
            peer=self.peer,
            reply=str(error),
        )
        return error

    def _end_of_data(self) -> Reply | Deferred[Reply]:
        reader, builder, txn = self._reader, self._builder, self.txn
        self._reader = self._builder = None
        self.txn = None
        assert reader is not None
        assert builder is not None
        assert txn is not None
        return self._finish_message(reader, builder, txn, "DATA")

    def _finish_message(
        self, reader: BodyReader, builder: MessageBuilder, txn: _Transaction, verb: str
    ) -> Reply | Deferred[Reply]:
        """The whole message is in: checks, then the commit (DATA and BDAT alike)."""
        try:
            if reader.error is None:
                builder.finish()
        except BaseException:
            txn.spool.abort()
            raise
        error = reader.error or builder.error
        if error is None and builder.storage_error is not None:
            log.error("{qid}: {e}", qid=txn.spool.queue_id, e=str(builder.storage_error))
            error = storage_reply(builder.storage_error)
        if error is not None:
            txn.spool.abort()
            log.info(
                "{qid}: reject: {verb} from [{peer}]: {reply}",
                qid=txn.spool.queue_id,
                verb=verb,
                peer=self.peer,
                reply=str(error),
            )
            return error
        if reader.bare_lf:
            log.info(
                "{qid}: {n} lines from [{peer}] ended in a bare LF; stored with CRLF",
                qid=txn.spool.queue_id,
                n=reader.bare_lf,
                peer=self.peer,
            )
        forged = sorted({n.decode("ascii") for n in builder.removed_fields} - {"bcc"})
        if forged:
            log.info(
                "{qid}: removed the client's own {names}: the checks write those",
                qid=txn.spool.queue_id,
                names=", ".join(forged),
            )
        envelope = Envelope(
            queue_id=txn.spool.queue_id,
            sender=txn.sender,
            recipients=txn.recipients,
            arrival=self.s.clock.seconds(),
            size=txn.spool.size,
            # What the message really is: the delivery agent then need not
            # read it again to decide about BODY=8BITMIME or a downgrade.
            body="8BITMIME" if reader.eight_bit else (txn.body or "7BIT"),
            smtputf8=txn.smtputf8,
            ret=txn.ret,
            envid=txn.envid,
            auth_user=self.login,
            client_address=self.peer,
            client_helo=self.helo,
            tls=self.tls_info,
            message_id=builder.message_id,
        )

        checks = self.s.checks
        if checks is None:
            return self._commit(txn, envelope)
        info = MessageInfo(
            queue_id=txn.spool.queue_id,
            sender=txn.sender,
            recipients=tuple(r.address for r in txn.recipients),
            size=txn.spool.size,
            eight_bit=reader.eight_bit,
            opener=txn.spool.open_written,
        )
        session = self.info()

        def decide(verdict: Verdict) -> Reply | Deferred[Reply]:
            if verdict.refuses:
                txn.spool.abort()
                return self._refused("DATA", verdict, txn.spool.queue_id)
            if self._closed:
                txn.spool.abort()  # the client is gone: it would never see a 250
                return Reply(421, "4.4.2", "Connection closed")
            if info.notes:
                # What the hooks keep with the message, for their outbound hooks.
                envelope.extra["plugins"] = dict(info.notes)
            return self._commit(txn, envelope, lambda: checks.queued(session, info))

        try:
            verdict = checks.message(session, info)
        except BaseException:
            txn.spool.abort()
            raise
        return _then(verdict, decide)  # type: ignore[no-any-return]

    def _commit(
        self, txn: _Transaction, envelope: Envelope, on_queued: Callable[[], None] | None = None
    ) -> Deferred[Reply]:
        def queued(queue_id: str) -> Reply:
            if on_queued is not None:
                on_queued()
            self.s.metrics.messages_accepted.inc()
            self.s.metrics.submission_latency.observe(self.s.clock.seconds() - txn.started)
            log.info(
                "{qid}: client=[{peer}], sasl_username={login}, message-id={mid}, "
                "from=<{sender}>, size={size}, nrcpt={n} (queued)",
                qid=queue_id,
                peer=self.peer,
                login=self.login,
                mid=envelope.message_id,
                sender=envelope.sender,
                size=envelope.size,
                n=len(envelope.recipients),
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(f: Failure) -> Reply:
            f.trap(StorageError)
            log.error("{qid}: not queued: {e}", qid=txn.spool.queue_id, e=str(f.value))
            return storage_reply(f.value)  # type: ignore[arg-type]

        return maybeDeferred(txn.spool.commit, envelope).addCallbacks(queued, failed)

    def do_RSET(self, args: str) -> Reply:
        if args:
            return NO_PARAMS
        self._abort_transaction()
        return OK

    def do_NOOP(self, args: str) -> Reply:
        return OK

    def do_QUIT(self, args: str) -> None:
        self._write(Reply(221, "2.0.0", "Bye"))
        self._close()

    def do_HELP(self, args: str) -> Reply:
        return Reply(214, "2.0.0", "See RFC 5321; log in with AUTH, then MAIL, RCPT, DATA")

    def do_VRFY(self, args: str) -> Reply:
        return Reply(252, "2.5.0", "Cannot VRFY; send the message and it will be tried")

    def do_EXPN(self, args: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN is not available")

    _handlers: dict[str, Callable[[Any, str], Reply | Deferred[Reply] | None]] = {
        "EHLO": do_EHLO,
        "HELO": do_HELO,
        "STARTTLS": do_STARTTLS,
        "AUTH": do_AUTH,
        "MAIL": do_MAIL,
        "RCPT": do_RCPT,
        "DATA": do_DATA,
        "RSET": do_RSET,
        "NOOP": do_NOOP,
        "QUIT": do_QUIT,
        "HELP": do_HELP,
        "VRFY": do_VRFY,
        "EXPN": do_EXPN,
        "BDAT": do_BDAT,
    }

    def _abort_transaction(self) -> None:
        if self.txn is not None:
            self.txn.spool.abort()
            self.txn = None
        self._reader = self._builder = None
        self._chunked = None


@implementer(interfaces.IProtocolFactory)
class SubmissionFactory(Factory):
    """Builds sessions for one listener and enforces connection limits."""

    noisy = False

    def __init__(self, settings: SessionSettings, *, implicit_tls: bool) -> None:
        self.settings = settings
        self.implicit_tls = implicit_tls
        self.per_ip: Counter[str] = Counter()
        self.total = 0

    def configure(self, settings: SessionSettings) -> None:
        """New settings (a reload): new connections are counted against the
        new limits and their sessions get them; open sessions keep theirs."""
        self.settings = settings

    def buildProtocol(self, addr: Any) -> Protocol:
        # IPv6 clients are counted per /64, as the AUTH throttle does.
        host = auth.client_key(getattr(addr, "host", "unknown"))
        limits = self.settings.limits
        if self.total >= limits.connections:
            return _Refuse(Reply(421, "4.3.2", "Too many connections; try again later"))
        if self.per_ip[host] >= limits.connections_per_ip:
            log.info("too many connections from [{host}]", host=host)
            return _Refuse(Reply(421, "4.7.0", "Too many connections from your address"))
        self.per_ip[host] += 1
        self.total += 1

        def closed() -> None:
            self.per_ip[host] -= 1
            if self.per_ip[host] <= 0:
                del self.per_ip[host]
            self.total -= 1

        session = SubmissionSession(self.settings, implicit_tls=self.implicit_tls, on_close=closed)
        session.factory = self
        return session


class _Refuse(Protocol):
    """Says why, then hangs up (RFC 5321 section 3.1: 421 at greeting)."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self._reply.encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def _then(result: Verdict | Deferred[Verdict], f: Callable[[Verdict], Any]) -> Any:
    """Apply C{f} to a verdict now, or when its Deferred fires."""
    if isinstance(result, Deferred):
        return result.addCallback(f)
    return f(result)
