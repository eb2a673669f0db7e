"""The versioned JSON envelope format (C{docs/spool-format.md}).

JSON because a person must be able to read a queue with C{cat} and C{jq},
and because it cannot execute anything when loaded (never pickle).  Times
are ISO 8601 in UTC with microseconds.  Unknown top-level keys from a newer
minor revision are kept in C{Envelope.extra} and written back unchanged.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from json.encoder import encode_basestring as _encode_string
from typing import Any

from mta.envelope import Envelope, Recipient, RecipientState

FORMAT = "mta-envelope/2"  # a record in a message file (mta-spool/2)
FORMAT_V1 = "mta-envelope/1"  # envelope.json of mta-spool/1, read when upgrading
_FORMATS = (FORMAT, FORMAT_V1)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_TOP_KEYS = {
    "format", "id", "kind", "arrival", "sender", "size", "body", "smtputf8", "dsn",
    "auth_user", "client", "message_id", "recipients", "redacted",
}  # fmt: skip


class FormatError(ValueError):
    """An envelope file that is not a valid envelope of a known format."""


class MissingEnvelopeError(FormatError):
    """A message in the spool without its envelope."""


#: The last whole second formatted, and its text (a list: one slot to replace).
_second: list[tuple[int, str]] = [(-1, "")]


def format_time(when: float | None) -> str | None:
    """C{when} (seconds since the epoch) as ISO 8601 in UTC with microseconds,
    as C{datetime.fromtimestamp(when, UTC)} rounds them (half to even).

    A message's records format a few times each, nearly all in the same
    second: that second's text is kept and only the microseconds added.
    """
    if when is None:
        return None
    frac, whole = math.modf(when)
    micro = round(frac * 1e6)
    if micro >= 1_000_000:
        micro -= 1_000_000
        whole += 1.0
    elif micro < 0:
        micro += 1_000_000
        whole -= 1.0
    second, cached = int(whole), _second[0]  # one read: the spool threads call it too
    if second != cached[0]:
        if second < 0:
            return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        cached = _second[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}Z"


def parse_time(text: object) -> float | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise FormatError(f"time must be a string, not {text!r}")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as e:
        raise FormatError(f"bad time {text!r}") from e


def recipient_to_json(r: Recipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "notify": list(r.notify) if r.notify is not None else None,
        "orcpt": r.orcpt,
        "state": r.state.value,
        "attempts": r.attempts,
        "last_attempt": format_time(r.last_attempt),
        "next_attempt": format_time(r.next_attempt),
        "reply": r.reply,
        "status": r.dsn_status,
        "relay": r.relay,
        "category": r.category,
        "delay_notified": r.delay_notified,
        "final_notified": r.final_notified,
    }


def to_json(env: Envelope) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "id": env.queue_id,
        "kind": env.kind,
        "arrival": format_time(env.arrival),
        "sender": env.sender,
        "size": env.size,
        "body": env.body,
        "smtputf8": env.smtputf8,
        "dsn": {"ret": env.ret, "envid": env.envid},
        "auth_user": env.auth_user,
        "client": {
            "address": env.client_address,
            "helo": env.client_helo,
            "tls": env.tls,
        },
        "message_id": env.message_id,
        "redacted": format_time(env.redacted),
        "recipients": [recipient_to_json(r) for r in env.recipients],
    }
    for key, value in env.extra.items():
        doc.setdefault(key, value)
    return doc


def dumps(env: Envelope) -> bytes:
    """Serialise an envelope: indented UTF-8 JSON ending in a newline.

    The text is exactly C{json.dumps(doc, indent=2, ensure_ascii=False)},
    made by L{_indented}: the standard library's encoder falls back to pure
    Python whenever it indents, which made envelope writing the largest
    single item in the daemon's Python profile.
    """
    out: list[str] = []
    _indented(to_json(env), "", out)
    out.append("\n")
    return "".join(out).encode("utf-8")


def _indented(value: Any, indent: str, out: list[str]) -> None:
    """Append C{value} as JSON indented by two spaces per level, as C{json.dumps} would."""
    if isinstance(value, str):
        out.append(_encode_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(json.dumps(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        inner = indent + "  "
        sep = "{\n" + inner
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"envelope keys must be strings, not {key!r}")
            out += (sep, _encode_string(key), ": ")
            _indented(item, inner, out)
            sep = ",\n" + inner
        out.append("\n" + indent + "}")
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]")
            return
        inner = indent + "  "
        sep = "[\n" + inner
        for item in value:
            out.append(sep)
            _indented(item, inner, out)
            sep = ",\n" + inner
        out.append("\n" + indent + "]")
    else:
        raise TypeError(f"{type(value).__name__} cannot be written to an envelope")


def _get(
    doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *, null: bool = False
) -> Any:
    value = doc.get(key)
    if value is None and null:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{key!r} has the wrong type or is missing")
    return value


def _notify(value: list[Any] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not all(isinstance(n, str) for n in value):
        raise FormatError("'notify' must be a list of strings")
    return tuple(value)


def recipient_from_json(doc: object) -> Recipient:
    if not isinstance(doc, dict):
        raise FormatError("a recipient must be an object")
    notify = _get(doc, "notify", list, null=True)
    try:
        state = RecipientState(_get(doc, "state", str))
    except ValueError as e:
        raise FormatError(f"unknown recipient state {doc.get('state')!r}") from e
    return Recipient(
        address=_get(doc, "address", str),
        notify=_notify(notify),
        orcpt=_get(doc, "orcpt", str, null=True),
        state=state,
        attempts=_get(doc, "attempts", int),
        last_attempt=parse_time(doc.get("last_attempt")),
        next_attempt=parse_time(doc.get("next_attempt")),
        reply=_get(doc, "reply", str, null=True),
        dsn_status=_get(doc, "status", str, null=True),
        relay=_get(doc, "relay", str, null=True),
        category=_get(doc, "category", str, null=True),
        delay_notified=_get(doc, "delay_notified", bool),
        final_notified=bool(_get(doc, "final_notified", bool, null=True)),
    )


def from_json(doc: object) -> Envelope:
    if not isinstance(doc, dict):
        raise FormatError("an envelope must be a JSON object")
    if doc.get("format") not in _FORMATS:
        raise FormatError(f"unknown envelope format {doc.get('format')!r}")
    dsn = _get(doc, "dsn", dict)
    client = _get(doc, "client", dict)
    arrival = parse_time(_get(doc, "arrival", str))
    assert arrival is not None
    recipients = [recipient_from_json(r) for r in _get(doc, "recipients", list)]
    if not recipients:
        raise FormatError("an envelope needs at least one recipient")
    return Envelope(
        queue_id=_get(doc, "id", str),
        kind=_get(doc, "kind", str),
        sender=_get(doc, "sender", str),
        recipients=recipients,
        arrival=arrival,
        size=_get(doc, "size", int),
        body=_get(doc, "body", str, null=True),
        smtputf8=_get(doc, "smtputf8", bool),
        ret=_get(dsn, "ret", str, null=True),
        envid=_get(dsn, "envid", str, null=True),
        auth_user=_get(doc, "auth_user", str, null=True),
        client_address=_get(client, "address", str, null=True),
        client_helo=_get(client, "helo", str, null=True),
        tls=_get(client, "tls", str, null=True),
        message_id=_get(doc, "message_id", str, null=True),
        redacted=parse_time(doc.get("redacted")),
        extra={k: v for k, v in doc.items() if k not in _TOP_KEYS},
    )


def loads(data: bytes) -> Envelope:
    """Parse an envelope file; raise L{FormatError} for anything invalid."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"not valid JSON: {e}") from e
    return from_json(doc)


# -- records: the envelope as it is kept in a message file (mta-spool/2) ------------
#
# A message file is the message, exactly as stored, followed by one or more
# records, each one line of compact JSON ending in LF.  The first record (at
# the commit) is a full envelope; later ones are either full envelopes or
# updates of the recipients that changed:
#
#     {"format":"mta-envelope/2","id":ID,"size":N,"update":{"3":{...}}}
#
# The state of a message is its last full record with the updates after it
# applied in order.  C{size} in every record is the message's length, which
# is where the records begin.


def recipient_text(rcpt: Recipient) -> str:
    """One recipient as compact JSON (a part of a record)."""
    return _COMPACT.encode(recipient_to_json(rcpt))


def full_record(env: Envelope, recipients: list[str] | None = None) -> bytes:
    """The envelope as a full record line; C{recipients} are the recipients'
    L{recipient_text}s when the caller has them already."""
    doc = to_json(env)
    del doc["recipients"]
    head = _COMPACT.encode(doc)
    texts = recipients if recipients is not None else [recipient_text(r) for r in env.recipients]
    return (head[:-1] + ',"recipients":[' + ",".join(texts) + "]}\n").encode("utf-8")


def update_record(queue_id: str, size: int, changed: dict[int, str]) -> bytes:
    """A record of the recipients that changed (index to L{recipient_text})."""
    head = _COMPACT.encode({"format": FORMAT, "id": queue_id, "size": size})
    parts = ",".join(f'"{index}":{text}' for index, text in sorted(changed.items()))
    return (head[:-1] + ',"update":{' + parts + "}}\n").encode("utf-8")


def parse_record(line: bytes) -> dict[str, Any] | None:
    """A record line as a JSON object, or None for one that is torn or not a record."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    if "update" in doc and not isinstance(doc["update"], dict):
        return None
    return doc


def fold(records: list[dict[str, Any]]) -> Envelope:
    """The envelope the records say: the last full one with later updates applied.

    Raises L{FormatError} when there is no full record or an update does not
    fit it (a recipient that is not there, or not valid).
    """
    start = max((i for i, r in enumerate(records) if "update" not in r), default=None)
    if start is None:
        raise FormatError("no full envelope record")
    env = from_json(records[start])
    for doc in records[start + 1 :]:
        for key, value in doc["update"].items():
            if not key.isdigit() or int(key) >= len(env.recipients):
                raise FormatError(f"an update names recipient {key!r}, which is not there")
            rcpt = recipient_from_json(value)
            if rcpt.address != env.recipients[int(key)].address:
                raise FormatError(f"an update of recipient {key} names another address")
            env.recipients[int(key)] = rcpt
    return env
