"""The seams between the parts of the MTA, as zope Interfaces.

Each interface's docstring is its contract.  Real implementations live
beside the code that owns the concern; fakes for tests live in
L{mta.testing} and are checked with C{verifyObject} like the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mta.envelope import Envelope


class ISpoolTransaction(Interface):
    """One message being received into the spool.

    Opened at MAIL (so the queue ID exists for logs and the trace header),
    fed the message bytes during DATA, then either committed or aborted.
    Nothing of an uncommitted transaction survives a restart.
    """

    queue_id = Attribute("The queue ID this message will have once committed.")
    size = Attribute("Number of message octets written so far.")

    def write(data: bytes) -> None:
        """Append message bytes.  Raises L{mta.errors.StorageError}."""

    def commit(envelope: Envelope) -> Deferred[str]:
        """Make the message durable; fires with the queue ID.

        Fires only after the message, its envelope and the directory entry
        are on stable storage (fsync of files and directory).  Fails with
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
    """The durable message store (C{docs/spool-format.md})."""

    def begin() -> ISpoolTransaction:
        """Start receiving a message.  Raises L{mta.errors.StorageError}."""

    def add_listener(listener: Callable[[str, str], None]) -> None:
        """Call C{listener(queue_id, state)} after each message is committed."""

    def ids(state: str) -> Iterator[str]:
        """The queue IDs in one state directory, in no particular order."""

    def load(queue_id: str) -> tuple[str, Envelope]:
        """Read one envelope; returns its state and the envelope.

        Raises C{KeyError} if the ID is not in the spool and
        L{mta.spool.format.FormatError} if its envelope is unreadable.
        """

    def message_path(queue_id: str, state: str) -> str:
        """The file holding the raw message of C{queue_id} in C{state}."""


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
