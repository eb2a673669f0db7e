"""The seams between the parts of the MTA, as zope Interfaces.

Each interface's docstring is its contract.  Real implementations live
beside the code that owns the concern; fakes for tests live in
L{mta.testing} and are checked with C{verifyObject} like the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mta.envelope import Committed, Envelope, ProgressRecord, QueueState
from mta.errors import StorageError


class ISpoolTransaction(Interface):
    """One message being received into the spool.

    Opened at MAIL (so the queue ID exists for logs and the trace header),
    fed the message bytes during DATA, then either committed or aborted.
    Nothing of an uncommitted transaction survives a restart.
    """

    queue_id = Attribute("The queue ID this message will have once committed.")
    size = Attribute("Number of message octets written so far.")
    producer = Attribute(
        "The client's transport (an IPushProducer), or None: the spool pauses it "
        "while what was written waits for the disk."
    )

    def write(data: bytes) -> None:
        """Append message bytes.  Raises L{mta.errors.StorageError}."""

    def commit(envelope: Envelope) -> Deferred[str]:
        """Make the message durable; fires with the queue ID.

        Fires only after the message, its envelope and the directory entry
        are on stable storage (fsync of the file and of its directory).  Fails with
        L{mta.errors.StorageError} otherwise, in which case nothing of the
        message is left in the queue.
        """

    def abort() -> None:
        """Forget the message; safe to call more than once and after a failure."""

    def open_written() -> IO[bytes]:
        """A new binary file of the bytes written so far, from the start.

        For content checks between the end of data and the commit, and for
        on-queued hooks after it: once committed, the file is the queued
        message wherever it is in the spool by then.  Raises
        L{mta.errors.StorageError} (after an abort, or when a committed
        message has already left the spool).
        """


class ISpool(Interface):
    """The way into the durable message store (C{docs/spool-format.md})."""

    def begin() -> ISpoolTransaction:
        """Start receiving a message.  Raises L{mta.errors.StorageError}."""

    def add_listener(listener: Callable[[Committed], None]) -> None:
        """Call C{listener(committed)} after each message is committed
        (L{mta.envelope.Committed}: its ID, envelope and, when the spool
        still has them, its bytes)."""


class IQueueStore(Interface):
    """The queued messages: reading them and moving them between states.

    Everything outside L{mta.spool} reaches the spool through this
    interface; only the implementation knows paths and the layout on disk
    (L{mta.spool.fs.FileStore}; L{mta.spool.memory.MemoryStore} keeps the
    same contract in memory, and one conformance suite tests both).

    States are L{mta.envelope.QueueState}s.  Methods block (the file
    system implementation does I/O): the daemon calls them in its spool
    threads, except L{journal} and L{release}, which are quick and called
    in the reactor thread.  A change is durable when the method returns,
    unless its description says otherwise.  Failures to read or write raise
    L{mta.errors.StorageError}; a message that is not (or no longer) in
    the queue raises C{KeyError}; an envelope that cannot be read raises
    L{mta.spool.format.FormatError}.
    """

    def recover(*, incomplete: bool = True) -> Any:
        """At start-up, by the only process that owns the spool: apply the
        sent journal to the messages a crash left in delivery and (with
        C{incomplete}) forget the messages whose reception never completed.
        Returns a L{mta.spool.journal.Recovery} with the counts, for the log."""

    def scan() -> Any:
        """A L{mta.envelope.QueueScan} of the messages to deliver: those a crash
        left in delivery and the new ones (ready now, in that order, each by
        queue ID), and the deferred ones with the time each is due (a hint
        kept beside the message, so the scan reads no envelope)."""

    def ids(state: QueueState) -> Iterator[str]:
        """The queue IDs in one state, in no particular order."""

    def count(state: QueueState) -> int:
        """How many messages are in one state (for metrics)."""

    def locate(queue_id: str) -> QueueState:
        """The state a message is in; C{KeyError} if it is not in the queue."""

    def load(queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        """A message's state and envelope, as last recorded."""

    def view(queue_id: str, state: QueueState | None = None) -> tuple[QueueState, Envelope]:
        """As L{load}, with the deliveries of the sent journal applied (read-only),
        for readers such as C{mtactl queue list} while a daemon delivers."""

    def listing(states: Sequence[QueueState]) -> Iterator[tuple[str, QueueState, Any]]:
        """(ID, state, envelope) of every message in C{states}, by state then ID,
        as L{view} gives them; in place of the envelope the
        L{mta.spool.format.FormatError} of one that cannot be read.  Reads one
        envelope at a time (a queue may be large)."""

    def journaled(queue_id: str) -> list[ProgressRecord]:
        """The progress journal's records of a message not yet in its file."""

    def location(queue_id: str, state: QueueState) -> str:
        """Where a person finds the message (a path), for display only."""

    def open_message(queue_id: str, state: QueueState | None = None) -> IO[bytes]:
        """A new binary file of the message's bytes (exactly the message),
        in whatever state it is now; L{mta.errors.StorageError} if it is gone."""

    def add(envelope: Envelope, data: bytes) -> None:
        """Commit one whole message to C{incoming} (C{mta-sendmail}, reports, tests)."""

    def activate(queue_id: str) -> Envelope | None:
        """Take a waiting message for delivery (reading it): it is C{active}
        afterwards (in this process; its file stays where it was).

        Returns None when the message is not waiting any more (gone, on
        hold, finished).  A message whose envelope cannot be read is moved
        to C{corrupt} and L{mta.spool.format.FormatError} raised, saying why.
        """

    def claim(queue_id: str) -> bool:
        """Take a message this process has just committed for delivery, without
        reading it (reactor thread, no I/O): True when the store still knows
        it from the commit, else the caller must L{activate} it."""

    def file(
        items: Sequence[tuple[Envelope, QueueState, float | None]],
    ) -> list[StorageError | None]:
        """File active messages at the end of their round, as one group.

        Each item is (envelope, target state, time): for C{deferred} the
        time the message is due, for C{done} the time it was finished.
        The result for each item is None (recorded and moved) or the error
        that left that message active.  Not durable by itself: the results
        are in the journal until the filing is.
        """

    def settle(
        envelope: Envelope, src: QueueState, dst: QueueState, due: float | None = None
    ) -> None:
        """Record a message's envelope and move it from C{src} to C{dst}
        (operator actions); C{due} as for L{file}."""

    def move(queue_id: str, src: QueueState, dst: QueueState) -> None:
        """Move a message to another state without changing its envelope."""

    def remove(queue_id: str, state: QueueState) -> None:
        """Take a message out of the spool."""

    def finished_before(state: QueueState, when: float) -> list[str]:
        """The finished messages (C{done} or C{redacted}) filed before C{when}."""

    def redact(queue_id: str, transform: Callable[[bytes], bytes], when: float) -> bool:
        """Replace a C{done} message's bytes with C{transform(bytes)}, mark its
        envelope redacted at C{when} and move it to C{redacted}.  False when
        the message is no longer in C{done}."""

    def journal(records: list[ProgressRecord]) -> object | None:
        """Write recipients' results ahead of the message file (reactor
        thread; no I/O there: written in batches by the spool threads).
        Returns a token for L{release}, or None when there was nothing to
        write (the journal is only a way to send fewer duplicates after a
        crash: a failure to write it is logged, never raised)."""

    def release(token: object | None) -> None:
        """The message of a L{journal} call is filed: its records may go."""

    def writable() -> bool:
        """Whether new messages can be stored (for the health check)."""

    def close() -> None:
        """At shutdown: close what the store keeps open (the journal)."""


class IDeliveryAgent(Interface):
    """Delivers jobs (L{mta.delivery.relay.DeliveryAgent}; L{mta.testing.DeliverySpy})."""

    def deliver(job: Any) -> Deferred[Any]:
        """Deliver a L{mta.delivery.job.DeliveryJob}; fires with one
        L{mta.delivery.job.RecipientResult} per recipient, in order.

        Never fails: every problem becomes a result, so that the queue can
        record and classify it.
        """


class IResolver(Interface):
    """DNS lookups for delivery; never blocks the reactor.

    Implementations: L{mta.delivery.dns.DNSPythonResolver} (dnspython run in
    a thread pool, servers and port configurable) and
    L{mta.testing.FakeResolver} (a table, from L{mta.delivery.fakedns}).  Both fail with
    L{mta.delivery.dns.DNSError}, whose C{kind} is C{"nxdomain"} (the name
    does not exist), C{"nodata"} (it exists but has no record of that type)
    or C{"temporary"} (SERVFAIL, timeout, refused, no server reachable).
    """

    def lookup_mx(domain: str) -> Deferred[Any]:
        """Fire with a L{mta.delivery.dns.Answer} of L{mta.delivery.dns.MXRecord}."""

    def lookup_addresses(host: str, rdtype: str) -> Deferred[Any]:
        """Fire with an L{mta.delivery.dns.Answer} of address strings.

        C{rdtype} is C{"A"} or C{"AAAA"}.
        """

    def lookup_txt(name: str) -> Deferred[Any]:
        """Fire with an L{mta.delivery.dns.Answer} of TXT records as text.

        Each record's character-strings are joined (RFC 8461 section 3.1
        reads the C{_mta-sts} record that way).
        """

    def lookup_tlsa(name: str) -> Deferred[Any]:
        """Fire with an L{mta.delivery.dns.Answer} of L{mta.delivery.dns.TLSARecord}.

        C{Answer.secure} says whether the resolver validated it (RFC 7672
        section 2.1: only DNSSEC-validated TLSA records may be used).
        """


class ISharedState(Interface):
    """What the instances of one site must count together (SPEC sections 2 and 9).

    Several mta processes behind a load balancer are one service to a user
    and to a receiver: the user's daily sending count and the wrong
    passwords from one client address must add up over all of them.
    L{mta.cluster.local.LocalState} keeps them in this process (as one
    instance always has: daily counts in C{spool/state/}, failures in
    memory); L{mta.cluster.redisstate.RedisState} keeps them in Redis, where
    every instance sees every change at once.  One conformance suite tests
    both (C{tests/test_shared_state.py}).

    Each method is one atomic operation on the store and returns a
    Deferred.  It fails with L{mta.errors.SharedStateError} when the store
    cannot answer in time (unreachable, restarting, too slow); the caller
    then fails closed, with a temporary reply, and asks again next time:
    an implementation recovers by itself when its store comes back.  Times
    are given by the caller (its injected clock), so that the store needs
    no clock of its own and all instances judge a window alike.

    The traffic-shaping limits per destination (SPEC section 6,
    L{mta.queue.shaping}) are shared too, so that the cluster as a whole
    keeps one receiver's rate: the C{destination_*} methods, in their own
    key space of the store (Redis: C{PREFIX:shape:...}), with the same
    failure contract, except that a failure there never stops delivery
    (the instance goes on with its own limits).
    """

    def sent_today(login: str) -> Deferred[int]:
        """How many units (messages or recipients) C{login} sent this UTC day."""

    def add_sent(login: str, n: int) -> Deferred[int]:
        """Count C{n} more units for C{login} today; fires with the new total.

        Counts of a day are kept at least until that day is over; a
        restart of the instance (or of Redis, with persistence on) keeps them.
        """

    def auth_failures(client: str, since: float) -> Deferred[Any]:
        """The wrong passwords recorded for a client key after C{since}:
        a L{mta.cluster.FailureCounts} (distinct pairs, all attempts)."""

    def auth_failed_before(client: str, digest: bytes, since: float) -> Deferred[bool]:
        """Whether this client key failed with exactly this (keyed) digest of
        username, password and stored hash after C{since}."""

    def add_auth_failure(client: str, digest: bytes, when: float, window: float) -> Deferred[Any]:
        """Record one wrong password at C{when}; older than C{when - window}
        is forgotten.  Fires with the L{mta.cluster.FailureCounts} after it."""

    def destination_limits(instance: str, now: float, window: float) -> Deferred[Any]:
        """Note C{instance} as alive at C{now}; fires with a
        L{mta.cluster.SharedLimits}: how many instances were alive within
        C{window} seconds (this one included) and every destination's
        shaping document (L{mta.queue.shaping.Limits.to_doc}) by name."""

    def destination_change(destination: str, doc: Any, token: str) -> Deferred[Any]:
        """Compare and set one destination's document.

        When the stored document's C{token} is C{token} ("": none is
        stored, or one that is not a document), C{doc} replaces it (None
        removes it: the limits ended) and this fires with C{(True, doc)};
        otherwise nothing changes and it fires with C{(False, the stored
        document or None)}, for the caller to take and apply its change to
        again.
        """

    def close() -> Deferred[None]:
        """At shutdown: flush and close what the store keeps open."""


class IUserDirectory(Interface):
    """The submission users, as the daemon reads them (L{mta.users.User}).

    L{mta.users.UserFile} reads a JSON file and re-reads it when it
    changes; L{mta.cluster.users.RedisUsers} keeps a copy of the users
    held in Redis, refreshed when C{mtactl} changes them, so that every
    instance of a cluster sees a change without a restart.  Reads are
    synchronous and cheap (they are made for every login and MAIL).
    """

    def users() -> dict[str, Any]:
        """Every user by normalised login address."""

    def get(email: str) -> Any:
        """The L{mta.users.User} of a login address, or None."""

    def ready() -> bool:
        """Whether the users are known at all (False: a Redis that has not
        answered since start-up).  Logins then get a temporary reply rather
        than "wrong password"."""


# -- plugins (docs/plugins.md) ------------------------------------------------
#
# A plugin is an object that provides ICheck and one or more of the hook
# interfaces below; the host (mta.checks.host) checks each with verifyObject
# at start.  A hook returns a mta.checks.Verdict, or a Deferred that fires
# with one.  An exception, a failed Deferred, a result that is not a Verdict
# or a hook slower than the plugin's timeout becomes a 451 for the client
# and a log entry; never a crash and never a silent pass.  Hooks run in the
# reactor: blocking work (file reads of large messages, signing) goes to
# the context's runner or to the network as Deferreds.


class ICheck(Interface):
    """A plugin named in C{[[plugins]]}."""

    name = Attribute("The plugin's name from the configuration, for logs.")


class IConnectHook(ICheck):
    def on_connect(session: Any) -> Any:
        """A client connected (L{mta.checks.SessionInfo}); before the greeting.

        reject → 554 greeting, tempfail → 421; either closes the connection.
        """


class IMailHook(ICheck):
    def on_mail(session: Any, sender: str) -> Any:
        """MAIL FROM passed the built-in checks (login, sender ownership, SIZE)."""


class IRcptHook(ICheck):
    def on_rcpt(session: Any, sender: str, accepted: list[str], recipient: str) -> Any:
        """One new RCPT TO; C{accepted} are the recipients accepted before it."""


class IMessageHook(ICheck):
    def on_message(session: Any, message: Any) -> Any:
        """The whole message (L{mta.checks.MessageInfo}) after end of data.

        Runs before the spool commit: any verdict but continue/accept means
        nothing is queued.
        """


class IQueuedHook(ICheck):
    def on_queued(session: Any, message: Any) -> None:
        """The message was committed; called just before the client's 250
        is sent (delivery may already have started).  No verdict.

        Exceptions are logged.
        """


class IOutboundHook(ICheck):
    def on_outbound(envelope: Envelope, data: bytes) -> Any:
        """The exact bytes about to be sent to a next hop; header lines to prepend.

        Called at each delivery attempt, after any 8-bit to 7-bit
        conversion, so that a signature covers what is sent.  Returns
        bytes (CRLF-terminated header fields, or b"") or a Deferred of them;
        a failure defers the delivery (a temporary error, retried later).
        """


class IStartupHook(ICheck):
    def startup() -> Any:
        """Called once when the service starts (e.g. to PING a daemon and log
        whether it answers).  May return a Deferred; failures are logged only."""
