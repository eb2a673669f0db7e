"""mtactl: manage users and inspect the queue.

Exit status: 0 success, 1 the operation failed (no such user, unreadable
spool ...), 2 the command line was wrong.  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import copy
import getpass
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from mta import config as configmod
from mta.address import ascii_lower, domain_of, parse_mailbox, valid_domain
from mta.bounce import Classifier, parse_reply
from mta.checks import dkim
from mta.cluster.blocking import BlockingRedis
from mta.cluster.users import RedisUserStore
from mta.controlsocket import ControlSocketError, DaemonNotRunningError
from mta.controlsocket import request as control_request
from mta.envelope import Envelope, ProgressRecord, QueueState
from mta.errors import ConfigError, SMTPReplyError, StorageError
from mta.interfaces import IQueueStore
from mta.queue import actions
from mta.queue.actions import ActionError
from mta.queue.shaping_rules import DEFAULT_RULES as SHAPING_RULES
from mta.queue.shaping_rules import explain as explain_shaping
from mta.spool import FileStore, SpoolLock, journal, open_store, upgrade
from mta.spool.format import FormatError, dumps, format_time, recipient_text
from mta.users import MIN_PASSWORD, User, UserFile, hash_password, normalize_login

_CONTROLS = {c: "?" for c in [*range(0, 9), *range(11, 32), 127, *range(128, 160)]}


def printable(text: str) -> str:
    """Text from messages and servers, safe for a terminal (no escape codes)."""
    return text.translate(_CONTROLS)


class CommandError(Exception):
    """A failure to report on stderr with exit status 1."""


class UsageError(Exception):
    """Bad input on the command line: stderr and exit status 2."""


def _fail(message: str) -> NoReturn:
    raise CommandError(message)


def _valid_address(text: str, what: str) -> str:
    try:
        return str(parse_mailbox(text.strip(), utf8=True))
    except SMTPReplyError:
        _fail(f"{what} {text!r} is not a valid email address")


def _read_password(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.password_stdin or not stdin.isatty():
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            _fail("the passwords do not match")
    if len(password) < MIN_PASSWORD:
        _fail(f"the password must have at least {MIN_PASSWORD} characters")
    return password


def _users(config: configmod.Config) -> UserFile | RedisUserStore:
    """Where the daemon reads the users: the file, or Redis (C{[cluster] users})."""
    cluster = config.cluster
    if cluster.users != "redis":
        return UserFile(config.server.users_file)
    redis = BlockingRedis(
        cluster.redis, timeout=max(cluster.timeout, 5.0), password=cluster.password(config.source)
    )
    return RedisUserStore(redis, cluster.prefix)


def cmd_user_add(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    email = normalize_login(_valid_address(args.email, "login"))
    aliases = [_valid_address(a, "alias") for a in args.alias]
    domains = [ascii_lower(d.strip()) for d in args.domain]
    for domain in domains:
        if not valid_domain(domain, utf8=True) or domain.startswith("["):
            _fail(f"domain {domain!r} is not a valid domain name")
    password = _read_password(args, sys.stdin)
    with _users(config).editing() as users:
        if email in users:
            _fail(f"user {email} already exists (use 'mtactl user passwd')")
        users[email] = User(email, hash_password(password), aliases, domains, args.daily_limit)
    out.write(f"added {email}\n")
    return 0


def cmd_user_passwd(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    email = normalize_login(args.email)
    password = _read_password(args, sys.stdin)
    with _users(config).editing() as users:
        if email not in users:
            _fail(f"no user {email}")
        users[email].password = hash_password(password)
    out.write(f"changed the password of {email}\n")
    return 0


def cmd_user_limit(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    """Set (or with "default", clear) a user's own daily sending limit."""
    email = normalize_login(args.email)
    try:
        limit = None if args.limit == "default" else _count(args.limit)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"user limit: {e}") from None
    with _users(config).editing() as users:
        if email not in users:
            _fail(f"no user {email}")
        users[email].daily_limit = limit
    shown = "the default ([limits] daily_messages)" if limit is None else f"{limit} a day"
    out.write(f"daily limit of {email}: {shown}\n")
    return 0


def cmd_user_del(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    email = normalize_login(args.email)
    with _users(config).editing() as users:
        if users.pop(email, None) is None:
            _fail(f"no user {email}")
    out.write(f"deleted {email}\n")
    return 0


def cmd_user_list(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    users = _users(config).users()
    if args.json:
        doc = [
            {"email": u.email, "aliases": u.aliases, "domains": u.domains,
             "daily_limit": u.daily_limit}
            for u in sorted(users.values(), key=lambda u: u.email)
        ]  # fmt: skip
        out.write(json.dumps(doc, indent=2) + "\n")
        return 0
    for user in sorted(users.values(), key=lambda u: u.email):
        extra = []
        if user.aliases:
            extra.append("aliases: " + ", ".join(user.aliases))
        if user.domains:
            extra.append("domains: " + ", ".join(user.domains))
        out.write(user.email + (f"  ({'; '.join(extra)})" if extra else "") + "\n")
    return 0


def _store(config: configmod.Config) -> FileStore:
    root = os.path.abspath(config.server.spool)
    if _format_if_spool(root) == upgrade.FORMAT_V1:
        # Opening upgrades it, under the spool's lock (refused while a daemon
        # of either version holds it).
        store = open_store(root)
        sys.stderr.write(f"mtactl: upgraded spool {root} to {upgrade.FORMAT}\n")
        return store
    return open_store(root)


def _format_if_spool(root: str) -> object:
    """The format of the spool at C{root}; None where there is no readable spool
    (L{open_store} says why)."""
    try:
        return upgrade.spool_format(root)
    except StorageError:
        return None


def _lock_for_upgrade(store: FileStore) -> SpoolLock:
    """The spool lock, held; a clear refusal when a daemon holds it."""
    lock = store.lock()
    try:
        lock.acquire()
    except StorageError as e:
        _fail(
            f"{e}, and it is in the old format {upgrade.FORMAT_V1}: stop the daemon first "
            f"(mta upgrades the spool when it starts)"
        )
    except OSError as e:
        _fail(f"cannot lock spool {store.root}: {e.strerror}")
    return lock


def cmd_spool_upgrade(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    """Convert an C{mta-spool/1} spool to C{mta-spool/2} while no daemon runs."""
    root = os.path.abspath(args.spool or config.server.spool)
    found = upgrade.spool_format(root)
    if found == upgrade.FORMAT_V1:
        store = FileStore(root)
        lock = _lock_for_upgrade(store)
        try:
            found = upgrade.spool_format(root)  # another mtactl may have done it meanwhile
            if found == upgrade.FORMAT_V1:
                try:
                    report = upgrade.upgrade_v1(store)
                except (OSError, ValueError) as e:
                    _fail(
                        f"the upgrade of {root} stopped: {e}; what was converted stays "
                        f"converted: run 'mtactl spool upgrade' again when the cause is fixed"
                    )
                _print_upgrade(root, report, out)
                return 0
        finally:
            lock.release()
    if found == upgrade.FORMAT:
        out.write(f"spool {root} is {upgrade.FORMAT} already: nothing to do\n")
        return 0
    _fail(
        f"spool {root} has format {found!r}; this version upgrades {upgrade.FORMAT_V1} to "
        f"{upgrade.FORMAT} and reads {upgrade.FORMAT}"
    )


def _print_upgrade(root: str, report: upgrade.Upgraded, out: TextIO) -> None:
    out.write(f"spool {root} upgraded from {upgrade.FORMAT_V1} to {upgrade.FORMAT}: "
              f"{report.total} message{'s' if report.total != 1 else ''}\n")  # fmt: skip
    for state in upgrade.V1_STATES:
        n = report.converted.get(state, 0)
        if n:
            note = " (now incoming: they were being delivered)" if state == "active" else ""
            out.write(f"  {state + ':':<10} {n}{note}\n")
    if report.unreadable:
        out.write(f"unreadable envelopes, kept in corrupt/: {report.unreadable}\n")
    if report.deliveries:
        out.write(f"deliveries recorded from the sent journal: {report.deliveries}\n")
    if report.incomplete:
        out.write(f"half-received messages removed from tmp/: {report.incomplete}\n")


def _recipient_row(r: Any) -> dict[str, Any]:
    return {
        "address": r.address,
        "state": r.state.value,
        "attempts": r.attempts,
        "reply": r.reply,
        "next_attempt": format_time(r.next_attempt),
    }


def _queue_rows(store: IQueueStore, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The listing's rows, one message at a time (a queue may be large).

    Deliveries written ahead of their envelopes (a daemon killed before it
    filed them, or one filing them now) are shown as they are.
    """
    finished = (QueueState.DONE, QueueState.REDACTED)
    states = (
        [QueueState(s) for s in args.state]
        if args.state
        else [s for s in QueueState if args.all or s not in finished]
    )
    domain = ascii_lower(args.domain).rstrip(".") if args.domain else None
    sender = ascii_lower(args.sender) if args.sender else None
    for queue_id, state, env in store.listing(states):
        if isinstance(env, FormatError):
            if not (domain or sender):
                yield {"id": queue_id, "state": state.value, "error": str(env)}
            continue
        if sender is not None and ascii_lower(env.sender) != sender:
            continue
        if domain is not None and not any(domain_of(r.address) == domain for r in env.recipients):
            continue
        yield {
            "id": queue_id,
            "state": state.value,
            "arrival": format_time(env.arrival),
            "size": env.size,
            "sender": env.sender,
            "kind": env.kind,
            "recipients": [_recipient_row(r) for r in env.recipients],
        }


def cmd_queue_list(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    rows = _queue_rows(_store(config), args)
    if args.json:
        # A JSON array written as it is read: constant memory for any queue.
        first = True
        for row in rows:
            text = json.dumps(row, indent=2, ensure_ascii=False)
            out.write(("[\n" if first else ",\n") + _indent(text))
            first = False
        out.write("[]\n" if first else "\n]\n")
        return 0
    indent = " " * 57
    total = 0
    by_state: Counter[str] = Counter()
    for row in rows:
        if not by_state:
            out.write(
                f"{'-Queue ID-':<16} {'--Size--':>8} {'----Arrival Time----':<20} {'-State-':<9}"
                " -Sender/Recipient-------\n"
            )
        by_state[row["state"]] += 1
        if "error" in row:
            out.write(printable(f"{row['id']:<16} {'':>8} {'':<20} {row['state']:<9} "
                                f"unreadable envelope: {row['error']}") + "\n")  # fmt: skip
            continue
        total += row["size"]
        arrival = str(row["arrival"])[:19].replace("T", " ")
        sender = printable(row["sender"]) or "<>"
        out.write(f"{row['id']:<16} {row['size']:>8} {arrival:<20} {row['state']:<9} {sender}\n")
        for r in row["recipients"]:
            if r["reply"] and r["state"] != "sent":
                out.write(printable(f"{indent}({r['reply'][:100]})") + "\n")
            detail = [r["state"]]
            if r["attempts"]:
                detail.append(f"{r['attempts']} attempt{'s' if r['attempts'] != 1 else ''}")
            if r["next_attempt"] and r["state"] not in ("sent", "failed"):
                detail.append("next " + str(r["next_attempt"])[:19].replace("T", " "))
            out.write(printable(f"{indent}{r['address']} [{', '.join(detail)}]") + "\n")
    if not by_state:
        out.write("Mail queue is empty\n")
        return 0
    summary = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    count = sum(by_state.values())
    out.write(f"-- {(total + 1023) // 1024} Kbytes in {count} requests ({summary}).\n")
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))


def _act(
    config: configmod.Config, doc: dict[str, Any], offline: Callable[[IQueueStore], str]
) -> str:
    """Ask the running daemon to act; without one, act on the spool under its lock."""
    store = _store(config)
    try:
        ok, text = control_request(store.control_socket(), doc)
    except DaemonNotRunningError:
        lock = store.lock()
        try:
            lock.acquire()
        except StorageError:
            _fail(
                f"the spool {store.root} is locked by a daemon that does not answer on "
                f"{store.control_socket()} (is it starting?)"
            )
        try:
            if doc.get("op") != "delete":
                _recover_journal(store)
            return offline(store)
        finally:
            lock.release()
    except ControlSocketError as e:
        _fail(str(e))
    if not ok:
        _fail(text)
    return text


def _recover_journal(store: IQueueStore) -> None:
    """Record the results a killed daemon left in the progress journal before acting
    on the spool, so that no delivered recipient is bounced or sent again."""
    try:
        found = store.recover(incomplete=False)
    except OSError as e:
        _fail(f"cannot apply the progress journal: {e}")
    if found.kept:
        _fail(
            "cannot apply the progress journal (see the errors above); only delete works until then"
        )


def cmd_queue_action(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    op = args.command
    status = 0
    for queue_id in args.ids:

        def offline(store: IQueueStore, queue_id: str = queue_id) -> str:
            actions.apply(store, op, queue_id, time.time())
            return f"{queue_id}: {actions.DONE[op]}" + (
                " (the daemon sends the report when it starts)" if op == "bounce" else ""
            )

        try:
            out.write(printable(_act(config, {"op": op, "id": queue_id}, offline)) + "\n")
        except (CommandError, ActionError, StorageError) as e:
            sys.stderr.write(printable(f"mtactl: {e}") + "\n")
            status = 1
    return status


def cmd_queue_flush(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    if sum(bool(x) for x in (args.ids, args.domain, args.all)) != 1:
        raise UsageError("queue flush: give queue IDs, --domain DOMAIN or --all")
    if args.ids:
        args.command = "flush"
        return cmd_queue_action(config, args, out)
    domain = ascii_lower(args.domain.strip()).rstrip(".") if args.domain else None
    if domain is not None and not valid_domain(domain, utf8=True):
        raise UsageError(f"queue flush: {args.domain!r} is not a domain name")
    doc: dict[str, Any] = {"op": "flush", "all": True}
    if domain is not None:
        doc = {"op": "flush", "domain": domain}

    def offline(store: IQueueStore) -> str:
        ids = sorted(store.ids(QueueState.DEFERRED))
        if domain is not None:
            ids = actions.ids_for_domain(store, ids, domain)
        now = time.time()
        flushed = 0
        for queue_id in ids:
            try:
                actions.apply(store, "flush", queue_id, now)
                flushed += 1
            except (ActionError, StorageError) as e:
                # One bad message (e.g. an unreadable envelope) must not stop the rest.
                failures.append(str(e))
        return f"flushed {flushed} deferred message(s)" + (f" for {domain}" if domain else "")

    failures: list[str] = []
    out.write(printable(_act(config, doc, offline)) + "\n")
    for failure in failures:
        sys.stderr.write(printable(f"mtactl: {failure}") + "\n")
    return 1 if failures else 0


def _read_message(store: IQueueStore, queue_id: str) -> tuple[QueueState, Any, bytes]:
    """State, envelope and message bytes of a message, read consistently.

    The daemon may move the message between states while we read; a
    vanished file means "look again", a few times.
    """
    for _ in range(3):
        try:
            state, envelope = store.load(queue_id)
        except KeyError:
            _fail(f"no message {queue_id} in the queue")
        except FormatError as e:
            _fail(f"message {queue_id} has an unreadable envelope: {e}")
        try:
            with store.open_message(queue_id, state) as f:
                message = f.read()
        except StorageError:
            continue
        return state, envelope, message
    _fail(f"message {queue_id} kept moving or lost its files while being read")


def _unfiled(envelope: Envelope, records: list[ProgressRecord]) -> list[ProgressRecord]:
    """The journal's records that the message file does not have yet.

    A running daemon keeps the lines of messages it has filed until their
    segment is removed, so most lines say what the file says already.
    """
    current = copy.deepcopy(envelope)
    news = []
    for record in records:
        if record.index >= len(current.recipients):
            continue
        before = recipient_text(current.recipients[record.index])
        journal.apply(current, [record])
        if recipient_text(current.recipients[record.index]) != before:
            news.append(record)
    return news


def cmd_queue_show(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    store = _store(config)
    state, envelope, message = _read_message(store, args.id)
    out.write(f"# state: {state}\n# envelope: {store.location(args.id, state)}\n")
    if state.waiting:
        for record in _unfiled(envelope, store.journaled(args.id)):
            r = record.recipient
            out.write(
                printable(
                    f"# journal: {r.address} {r.state} at {format_time(r.last_attempt)} "
                    f"({r.reply}), not yet in the message file\n"
                )
            )
    out.write(printable(dumps(envelope).decode("utf-8", "replace")))
    if args.envelope_only:
        return 0
    out.write("\n# message\n")
    if not args.body:
        end = message.find(b"\r\n\r\n")
        message = message if end < 0 else message[: end + 2]
    out.write(printable(message.decode("utf-8", "replace").replace("\r\n", "\n")))
    return 0


def cmd_queue_shaping(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    """Show (or end) the limits traffic shaping set per destination, from the daemon."""
    if args.reset is not None and args.reset_all:
        raise UsageError("queue shaping: give --reset DESTINATION or --reset-all, not both")
    resetting = args.reset is not None or args.reset_all
    if resetting and args.json:
        raise UsageError("queue shaping: --json shows the limits; it does not go with a reset")
    doc: dict[str, Any] = {"op": "shaping"}
    if args.reset_all:
        doc["reset"] = True
    elif args.reset is not None:
        if not args.reset.strip():
            raise UsageError("queue shaping: --reset needs a destination as listed")
        doc["reset"] = args.reset.strip()
    store = _store(config)
    try:
        ok, text = control_request(store.control_socket(), doc)
    except DaemonNotRunningError:
        _fail(
            f"no daemon answers on {store.control_socket()}: traffic-shaping limits live "
            "in the running daemon (none apply while it is stopped)"
        )
    except ControlSocketError as e:
        _fail(str(e))
    if not ok:
        _fail(text)
    if resetting:
        out.write(printable(text) + "\n")
        return 0
    try:
        state = json.loads(text)
        rows = state["destinations"]
    except (ValueError, KeyError, TypeError):
        _fail("the daemon's answer about traffic shaping was not understood")
    if args.json:
        out.write(json.dumps(_shaping_json(state), indent=2, ensure_ascii=False) + "\n")
        return 0
    out.write(printable(_shaping_text(state, rows)))
    return 0


_SHAPING_TIMES = ("since", "hold_until", "next_increase", "recovered_by")


def _shaping_json(state: dict[str, Any]) -> dict[str, Any]:
    """The daemon's answer with times as in the spool (ISO 8601, UTC)."""
    rows = []
    for found in state["destinations"]:
        row = {**found, **{key: format_time(found.get(key)) for key in _SHAPING_TIMES}}
        row["reason"] = {**found["reason"], "at": format_time(found["reason"].get("at"))}
        rows.append(row)
    return {**state, "now": format_time(state.get("now")), "destinations": rows}


def _when(value: object) -> str:
    text = format_time(value) if isinstance(value, int | float) else None
    return "-" if text is None else text[:19].replace("T", " ")


def _per_minute(value: object) -> str:
    return "no limit" if value is None else f"{value:g}/min"


def _shaping_text(state: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What C{mtactl queue shaping} prints: per destination, the limits and why."""
    ceiling = f"{state.get('max_concurrency')} connections, rate " + _per_minute(
        state.get("max_rate_per_minute")
    )
    if not state.get("enabled", True):
        return "Traffic shaping is off ([shaping] enabled = false).\n"
    if not rows:
        return f"No destination has lowered limits (each may have {ceiling}).\n"
    lines = [f"{len(rows)} destination(s) with lowered limits (ceilings: {ceiling})"]
    if state.get("instances", 1) > 1:
        lines[0] += f"; limits shared by {state['instances']} instances, this one's share shown"
    for row in rows:
        reason = row.get("reason", {})
        rule = reason.get("rule", "")
        if reason.get("provider"):
            rule += f" ({reason['provider']})"
        lines += [
            "",
            str(row.get("destination")),
            f"  concurrency {row.get('concurrency')} of {row.get('max_concurrency')}, "
            f"rate {_per_minute(row.get('rate_per_minute'))} of "
            f"{_per_minute(row.get('max_rate_per_minute'))}; "
            f"{row.get('running', 0)} running, {row.get('waiting', 0)} waiting",
            f"  lowered {row.get('decreases')} time(s) since {_when(row.get('since'))}; "
            f"held until {_when(row.get('hold_until'))}, "
            f"next increase {_when(row.get('next_increase'))}, "
            f"back to the ceilings by {_when(row.get('recovered_by'))} if deliveries succeed",
            f"  last lowered at {_when(reason.get('at'))} by rule {rule} for:",
            f"    {reason.get('reply', '')}",
        ]
    return "\n".join(lines) + "\n"


def cmd_classify(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    """Print how a reply would be treated: retry or bounce, and why.

    The verdict is one JSON object; with C{--explain}, lines for people
    instead: the rule that decided (built-in, or the operator's with its
    configuration entry), what its conditions matched, and why the action.
    """
    text = " ".join(args.reply)
    if text == "-":
        text = sys.stdin.read()
    try:
        reply = parse_reply(text.strip())
    except ValueError as e:
        raise UsageError(f"classify: {e}") from None
    if reply.code < 400:
        raise UsageError(f"classify: {reply.code} is a success reply, not a failure")
    classifier = Classifier(extra=config.bounce_rules)
    if args.explain:
        lines = classifier.explain(reply).lines()
        shaping = config.shaping
        rules = (*config.shaping_rules, *SHAPING_RULES)
        lines += explain_shaping(rules, reply, shaping.decrease_factor, shaping.hold_time)
        out.write("".join(f"{printable(line)}\n" for line in lines))
        return 0
    out.write(json.dumps(classifier.classify(reply).to_json()) + "\n")
    return 0


def cmd_dkim_keygen(config: configmod.Config, args: argparse.Namespace, out: TextIO) -> int:
    """Make a DKIM key for a domain and print the DNS TXT record to publish."""
    domain = ascii_lower(args.domain.strip().rstrip("."))
    if not valid_domain(domain, utf8=False) or domain.startswith("["):
        raise UsageError(f"dkim keygen: {args.domain!r} is not a valid ASCII domain name")
    selector = args.selector or f"{args.type}-{time.strftime('%Y%m', time.gmtime())}"
    selector = selector.lower()
    if not dkim.valid_selector(selector):
        raise UsageError(f"dkim keygen: {selector!r} is not a valid selector")
    try:
        path, record = dkim.keygen(config.dkim.keys_dir, domain, selector, args.type)
    except FileExistsError:
        _fail(
            f"a key for selector {selector} of {domain} exists already; choose another --selector"
        )
    except OSError as e:
        _fail(f"cannot write the key into {config.dkim.keys_dir}: {e.strerror}")
    out.write(f"; private key written to {path}\n; publish this record in DNS:\n{record}\n")
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtactl", description="Manage an mta installation.")
    p.add_argument("-c", "--config", help="TOML configuration file (default: embedded)")
    sub = p.add_subparsers(dest="group", required=True, metavar="{user,queue,spool,classify,dkim}")

    user = sub.add_parser("user", help="manage submission users")
    usub = user.add_subparsers(dest="command", required=True)
    add = usub.add_parser("add", help="add a user (password from a prompt or stdin)")
    add.add_argument("email")
    add.add_argument("--alias", action="append", default=[], help="another address it may use")
    add.add_argument("--domain", action="append", default=[], help="a domain it may send from")
    add.add_argument("--daily-limit", type=_count, default=None, help="messages per day")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.set_defaults(func=cmd_user_add)
    pw = usub.add_parser("passwd", help="change a user's password")
    pw.add_argument("email")
    pw.add_argument("--password-stdin", action="store_true")
    pw.set_defaults(func=cmd_user_passwd)
    lim = usub.add_parser(
        "limit", help="set a user's daily sending limit", description="0 means no limit; "
        '"default" follows [limits] daily_messages again. The daemon sees it at once.',
    )  # fmt: skip
    lim.add_argument("email")
    lim.add_argument("limit", help='messages a day, or "default"')
    lim.set_defaults(func=cmd_user_limit)
    rm = usub.add_parser("del", help="delete a user")
    rm.add_argument("email")
    rm.set_defaults(func=cmd_user_del)
    ls = usub.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_user_list)

    queue = sub.add_parser("queue", help="inspect and steer the mail queue")
    qsub = queue.add_subparsers(dest="command", required=True)
    ql = qsub.add_parser("list", help="list queued messages (like mailq)")
    ql.add_argument("--json", action="store_true")
    ql.add_argument("--all", action="store_true", help="include finished, retained messages")
    ql.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in QueueState],
        help="only this state (may repeat)",
    )
    ql.add_argument("--domain", help="only messages with a recipient at this domain")
    ql.add_argument("--sender", help="only messages from this envelope sender")
    ql.set_defaults(func=cmd_queue_list)
    qf = qsub.add_parser("flush", help="retry deferred messages now")
    qf.add_argument("ids", nargs="*", metavar="ID")
    qf.add_argument("--domain", help="the messages with recipients at this domain")
    qf.add_argument("--all", action="store_true", help="every deferred message")
    qf.set_defaults(func=cmd_queue_flush)
    for name, text in (
        ("hold", "keep messages from delivery until released"),
        ("release", "let held messages be delivered again"),
        ("delete", "remove messages from the queue (no report is sent)"),
        ("bounce", "give up on messages now; the sender gets a failure report"),
        ("requeue", "put deferred, held or repaired corrupt messages back, due now"),
    ):
        qa = qsub.add_parser(name, help=text)
        qa.add_argument("ids", nargs="+", metavar="ID")
        qa.set_defaults(func=cmd_queue_action)
    qsh = qsub.add_parser(
        "shaping",
        help="show each destination's traffic-shaping limits and why",
        description="The limits the running daemon lowered for destinations whose replies "
        "asked it to slow down (rate limits, too many connections), the reply and rule behind "
        "them, since when and until when.",
    )
    qsh.add_argument("--json", action="store_true")
    qsh.add_argument("--reset", metavar="DESTINATION", help="end this destination's limits")
    qsh.add_argument("--reset-all", action="store_true", help="end every destination's limits")
    qsh.set_defaults(func=cmd_queue_shaping)
    qs = qsub.add_parser("show", help="show a message's envelope and headers")
    qs.add_argument("id")
    qs.add_argument("--body", action="store_true", help="show the body too")
    qs.add_argument("--envelope-only", action="store_true")
    qs.set_defaults(func=cmd_queue_show)
    sp = sub.add_parser("spool", help="maintain the spool directory")
    spsub = sp.add_subparsers(dest="command", required=True)
    up = spsub.add_parser(
        "upgrade",
        help=f"convert a {upgrade.FORMAT_V1} spool to {upgrade.FORMAT} (no daemon may run)",
        description=f"Converts a spool written by an older mta ({upgrade.FORMAT_V1}) to "
        f"{upgrade.FORMAT} in place and prints what it converted. The daemon does the same when "
        "it starts; this does it beforehand, while no daemon runs. Safe to run again after an "
        "interruption, and on a spool that is up to date (it says so).",
    )
    up.add_argument("--spool", metavar="DIR", help="the spool (default: [server] spool)")
    up.set_defaults(func=cmd_spool_upgrade)
    cl = sub.add_parser(
        "classify",
        help="show whether a reply would be retried or bounced",
        description='Classify an SMTP reply, e.g. mtactl classify "550 5.1.1 No such user". '
        'Multi-line replies as in logs work too; "-" reads the reply from stdin.',
    )
    cl.add_argument("reply", nargs="+", help="the reply text, or - for stdin")
    cl.add_argument(
        "--explain",
        action="store_true",
        help="say which rule decided (built-in, or which configuration entry) and what it matched",
    )
    cl.set_defaults(func=cmd_classify)
    dk = sub.add_parser("dkim", help="manage DKIM signing keys")
    dsub = dk.add_subparsers(dest="command", required=True)
    kg = dsub.add_parser(
        "keygen",
        help="make a signing key for a domain and print its DNS TXT record",
        description="Writes KEYS_DIR/DOMAIN/SELECTOR.key ([dkim] keys_dir, mode 0600) "
        "and prints the TXT record to publish at SELECTOR._domainkey.DOMAIN.",
    )
    kg.add_argument("domain")
    kg.add_argument("--selector", help="default: TYPE-YYYYMM, e.g. rsa-202611")
    kg.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="default: rsa")
    kg.set_defaults(func=cmd_dkim_keygen)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    out = out or sys.stdout
    try:
        config = configmod.load(args.config or os.environ.get("MTA_CONFIG"))
        return int(args.func(config, args, out))
    except (CommandError, ConfigError, StorageError, ActionError, ControlSocketError) as e:
        sys.stderr.write(f"mtactl: {e}\n")
        return 1
    except UsageError as e:
        sys.stderr.write(f"mtactl: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mtactl: interrupted\n")
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
