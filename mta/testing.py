"""Public test doubles.  Each fake implements the same interface as the real
part and is checked with C{verifyObject} in the tests.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from argon2 import PasswordHasher
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mta.batch import run_now
from mta.delivery.fakedns import FakeResolver
from mta.delivery.job import DeliveryJob, RecipientResult
from mta.envelope import Envelope, Recipient
from mta.errors import SharedStateError
from mta.interfaces import IDeliveryAgent, IQueueStore, ISharedState
from mta.spool import FileOps
from mta.spool.memory import MemorySpool, MemoryStore
from mta.spool.queueid import QueueIdGenerator
from mta.users import User, UserFile

__all__ = [
    "DROP",
    "FAST_HASHER",
    "HANG",
    "DeliverySpy",
    "FailingOps",
    "FakeResolver",
    "MemorySpool",
    "MemoryStore",
    "NoSyncOps",
    "QueuedRunner",
    "SinkBehaviour",
    "SinkFactory",
    "SinkServer",
    "SwitchableState",
    "TLSStringTransport",
    "queue_message",
    "run_inline",
    "write_users",
]

T = TypeVar("T")

# Cheap argon2id parameters so that tests check real hashes quickly.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


run_inline = run_now  # the same runner under the name the tests use


class QueuedRunner:
    """A runner that only queues the work; the test runs it with L{run_next}.

    It stands for the thread pool: while work is queued here it is "in
    flight" (a group commit being written, say), as it is when a daemon is
    killed.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((work, d))
        return d

    def run_next(self, index: int = 0) -> None:
        """Run one piece of queued work (the oldest, or the one at C{index})."""
        work, d = self.queue.pop(index)
        try:
            result = work()
        except BaseException:
            d.errback()
        else:
            d.callback(result)

    def run_all(self) -> None:
        """Run queued work, including work queued meanwhile, until none is left."""
        while self.queue:
            self.run_next()


def write_users(path: str, users: dict[str, str], **rights: dict[str, list[str]]) -> UserFile:
    """Create a users file: C{users} maps login to password.

    C{aliases={"login": [...]}} and C{domains={"login": [...]}} add rights.
    """
    user_file = UserFile(path)
    with user_file.editing() as table:
        for email, password in users.items():
            table[email] = User(
                email,
                FAST_HASHER.hash(password),
                aliases=list(rights.get("aliases", {}).get(email, [])),
                domains=list(rights.get("domains", {}).get(email, [])),
            )
    return user_file


class NoSyncOps(FileOps):
    """File operations without fsync, for tests where durability is not the
    subject and thousands of fsyncs would only make them slow."""

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: str) -> None:
        pass

    def syncfs(self, path: str) -> None:
        pass


class FailingOps(FileOps):
    """File operations that fail on the Nth call of one kind with an errno.

    C{FailingOps("fsync_dir", errno.EIO, after=1)} lets one directory fsync
    succeed and fails the next one; C{times} bounds how often it fails.
    The kinds are the methods of L{FileOps}: create, append, write, fsync,
    fsync_dir, syncfs, rename, unlink.
    """

    def __init__(self, operation: str, code: int = errno.EIO, after: int = 0, times: int = 1):
        self.operation = operation
        self.code = code
        self.after = after
        self.times = times
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, name: str) -> None:
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        if name == self.operation and self.after <= count < self.after + self.times:
            raise OSError(self.code, os.strerror(self.code))

    def create(self, path: str) -> int:
        self._maybe_fail("create")
        return super().create(path)

    def append(self, path: str) -> int:
        self._maybe_fail("append")
        return super().append(path)

    def write(self, fd: int, data: bytes) -> None:
        self._maybe_fail("write")
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self._maybe_fail("fsync_dir")
        super().fsync_dir(path)

    def syncfs(self, path: str) -> None:
        self._maybe_fail("syncfs")
        super().syncfs(path)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename")
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._maybe_fail("unlink")
        super().unlink(path)


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.tls_started_with: object | None = None
        self.written_before_tls = b""

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
        self.written_before_tls = self.value()  # type: ignore[no-untyped-call]


@implementer(ISharedState)
class SwitchableState:
    """An L{ISharedState} (around a real one) that fails every call with
    L{SharedStateError} while C{down} is set: Redis gone, for the session.
    With method names in C{only}, only those fail (gone at that moment)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.only: set[str] = set()

    def _call(self, name: str, *args: Any) -> Deferred[Any]:
        if self.down and (not self.only or name in self.only):
            return fail(SharedStateError("Redis at tcp:host=127.0.0.1:port=1 is unreachable"))
        return getattr(self.inner, name)(*args)  # type: ignore[no-any-return]

    def sent_today(self, login: str) -> Deferred[int]:
        return self._call("sent_today", login)

    def add_sent(self, login: str, n: int) -> Deferred[int]:
        return self._call("add_sent", login, n)

    def auth_failures(self, client: str, since: float) -> Deferred[Any]:
        return self._call("auth_failures", client, since)

    def auth_failed_before(self, client: str, digest: bytes, since: float) -> Deferred[bool]:
        return self._call("auth_failed_before", client, digest, since)

    def add_auth_failure(
        self, client: str, digest: bytes, when: float, window: float
    ) -> Deferred[Any]:
        return self._call("add_auth_failure", client, digest, when, window)

    def destination_limits(self, instance: str, now: float, window: float) -> Deferred[Any]:
        return self._call("destination_limits", instance, now, window)

    def destination_change(self, destination: str, doc: Any, token: str) -> Deferred[Any]:
        return self._call("destination_change", destination, doc, token)

    def close(self) -> Deferred[None]:
        return self.inner.close()  # type: ignore[no-any-return]


# -- a scriptable SMTP server (the far end of outbound delivery) -------------

_LENIENT_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")
HANG = "<hang>"  # a reply that is never sent
DROP = "<drop>"  # close the connection instead of replying


@dataclass
class SinkBehaviour:
    """What a L{SinkServer} answers; each hook returns a reply line (or lines
    joined by newlines), L{HANG} or L{DROP}.  Replies may be multi-line:
    C{"250-a\\n250 b"}."""

    greeting: str = "220 sink.test ESMTP"
    extensions: tuple[str, ...] = (
        "PIPELINING",
        "SIZE 104857600",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    )
    ehlo: Callable[[str], str] | None = None
    mail: Callable[[str], str] = lambda line: "250 2.1.0 Ok"
    rcpt: Callable[[str], str] = lambda line: "250 2.1.5 Ok"
    data: Callable[[], str] = lambda: "354 End data with <CR><LF>.<CR><LF>"
    message: Callable[[bytes], str] = lambda data: "250 2.0.0 Ok: queued as SINK"
    drop_after_data_bytes: int | None = None  # lose the connection mid-DATA
    # Read DATA like a careless server: NULs dropped, and any of LF, CR or
    # CRLF around the "." ends the message.  A server like that splits a
    # message into two if bare line ends or NULs reach it (SMTP smuggling);
    # the attack tests use it to show that what we send never does.
    lenient_end: bool = False
    starttls: str = "220 2.0.0 Ready to start TLS"


@dataclass
class SinkMessage:
    sender_line: str
    rcpt_lines: list[str]
    data: bytes  # unstuffed, CRLF line ends, without the final "."


class SinkServer(Protocol):
    """A small SMTP server that follows a L{SinkBehaviour} and records what it got."""

    def __init__(self, factory: SinkFactory) -> None:
        self.f = factory
        self.buffer = b""
        self.in_data = False
        self.data = b""
        self.mail: str | None = None
        self.rcpts: list[str] = []
        self.hung = False
        self.tls = False
        self.commands: list[str] = []
        self._search = 0

    def connectionMade(self) -> None:
        self.f.connections += 1
        self._reply(self.f.behaviour.greeting)

    def _reply(self, reply: str) -> None:
        if reply == HANG:
            self.hung = True
            return
        if reply == DROP:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.transport.write(("\r\n".join(reply.split("\n")) + "\r\n").encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.hung:
            return
        self.buffer += data
        while not self.hung:
            if self.in_data:
                if not self._data_step():
                    return
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end].decode("utf-8", "replace"), self.buffer[end + 2 :]
            self._command(line)

    def _data_step(self) -> bool:
        """Collect DATA; at CRLF.CRLF record the message and answer it."""
        self.data += self.buffer
        self.buffer = b""
        limit = self.f.behaviour.drop_after_data_bytes
        if limit is not None and len(self.data) >= limit:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.hung = True
            return False
        stream = b"\r\n" + self.data
        if self.f.behaviour.lenient_end:
            stream = stream.replace(b"\x00", b"")
            m = _LENIENT_END.search(stream)
            if m is None:
                return False
            body = stream[2 : m.start()] + b"\r\n" if m.start() >= 2 else b""
            self.buffer = stream[m.end() :]
            self.in_data, self.data, self._search = False, b"", 0
            self._message(body)
            return True
        end = stream.find(b"\r\n.\r\n", self._search)
        if end < 0:
            self._search = max(0, len(stream) - 4)
            return False
        body, self.buffer = stream[2 : end + 2], stream[end + 5 :]
        self.in_data, self.data, self._search = False, b"", 0
        self._message(body)
        return True

    def _message(self, body: bytes) -> None:
        unstuffed = (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]
        assert self.mail is not None
        self.f.messages.append(SinkMessage(self.mail, list(self.rcpts), unstuffed))
        self.mail, self.rcpts = None, []
        self._reply(self.f.behaviour.message(unstuffed))

    def _command(self, line: str) -> None:
        self.commands.append(line)
        self.f.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        b = self.f.behaviour
        if verb == "EHLO":
            if b.ehlo is not None:
                self._reply(b.ehlo(line))
                return
            ext = list(b.extensions)
            if self.f.tls is not None and not self.tls:
                ext.append("STARTTLS")
            lines = ["sink.test", *ext]
            self._reply("\n".join([*(f"250-{x}" for x in lines[:-1]), f"250 {lines[-1]}"]))
        elif verb == "HELO":
            self._reply("250 sink.test")
        elif verb == "STARTTLS" and self.f.tls is not None:
            self._reply(b.starttls)
            if b.starttls.startswith("220"):
                self.buffer = b""
                self.transport.startTLS(self.f.tls)  # type: ignore[union-attr]
                self.tls = True
        elif verb == "AUTH":
            self._reply("235 2.7.0 Authentication successful")
        elif verb == "MAIL":
            reply = b.mail(line)
            if reply.startswith("250"):
                self.mail, self.rcpts = line, []
            self._reply(reply)
        elif verb == "RCPT":
            if self.mail is None:
                self._reply("503 5.5.1 Error: need MAIL command")
                return
            reply = b.rcpt(line)
            if reply.startswith("25"):
                self.rcpts.append(line)
            self._reply(reply)
        elif verb == "DATA":
            if self.mail is None:
                self._reply("503 5.5.1 Error: need RCPT command")
                return
            if not self.rcpts:
                self._reply("554 5.5.1 No valid recipients")
                return
            reply = b.data()
            if reply.startswith("354"):
                self.in_data = True
                self.data, self._search = b"", 0
            self._reply(reply)
        elif verb == "RSET":
            self.mail, self.rcpts = None, []
            self._reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self._reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self._reply("502 5.5.2 Error: command not recognized")


class SinkFactory(Factory):
    """Builds L{SinkServer}s sharing one behaviour and one record of messages.

    C{tls} is a server TLS context factory (e.g. L{mta.tls.ServerTLS}) to
    offer STARTTLS, or None.
    """

    noisy = False

    def __init__(self, behaviour: SinkBehaviour | None = None, tls: Any = None) -> None:
        self.behaviour = behaviour or SinkBehaviour()
        self.tls = tls
        self.messages: list[SinkMessage] = []
        self.commands: list[str] = []
        self.connections = 0

    def buildProtocol(self, addr: Any) -> SinkServer:
        return SinkServer(self)


# -- the queue manager's collaborators -----------------------------------------


@implementer(IDeliveryAgent)
class DeliverySpy:
    """Stands in for the delivery agent: records jobs, answers when told.

    Each delivery returns an unfired Deferred; the test fires it with
    L{answer} (one reply for every recipient of the job) or L{answer_each}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[DeliveryJob, Deferred[list[RecipientResult]]]] = []

    def deliver(self, job: DeliveryJob) -> Deferred[list[RecipientResult]]:
        d: Deferred[list[RecipientResult]] = Deferred()
        self.calls.append((job, d))
        return d

    @property
    def waiting(self) -> list[Any]:
        return [job for job, d in self.calls if not d.called]

    def answer(
        self,
        index: int,
        reply: Any,
        kind: str = "remote",
        relay: str = "mx.test[192.0.2.1]:25",
        connected: bool | None = None,
    ) -> None:
        job, _ = self.calls[index]
        self.answer_each(index, [reply] * len(job.recipients), kind, relay, connected)

    def answer_each(
        self,
        index: int,
        replies: list[Any],
        kind: str = "remote",
        relay: str = "mx.test[192.0.2.1]:25",
        connected: bool | None = None,
    ) -> None:
        """Answer a job; C{connected} defaults to whether a server replied."""
        job, d = self.calls[index]
        session = kind == "remote" if connected is None else connected
        d.callback(
            [
                RecipientResult(r.address, reply, kind, relay, connected=session)
                for r, reply in zip(job.recipients, replies, strict=True)
            ]
        )


_test_clock = [0.0]
_test_ids = QueueIdGenerator(lambda: _test_clock[0])  # strictly increasing IDs


def queue_message(
    store: IQueueStore,
    sender: str,
    recipients: list[str],
    data: bytes = b"From: a@example.com\r\nSubject: test\r\n\r\nbody\r\n",
    *,
    arrival: float = 1_700_000_000.0,
    queue_id: str | None = None,
) -> str:
    """Put a committed message straight into a store's incoming (for tests)."""
    _test_clock[0] = arrival
    queue_id = queue_id or _test_ids()
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=[Recipient(r) for r in recipients],
        arrival=arrival,
        size=len(data),
    )
    store.add(envelope, data)
    return queue_id
