"""Tests for L{mta.spool.format} (the envelope file) and L{mta.spool.queueid}."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import Envelope, Recipient, RecipientState
from mta.spool.format import FORMAT, FormatError, dumps, format_time, from_json, loads, to_json
from mta.spool.queueid import LENGTH, QueueIdGenerator, arrival_of, is_queue_id

# The top-level keys of docs/spool-format.md; anything else is "extra".
KNOWN_KEYS = {
    "format", "id", "kind", "arrival", "sender", "size", "body", "smtputf8", "dsn",
    "auth_user", "client", "message_id", "recipients",
}  # fmt: skip


def full_envelope() -> Envelope:
    """An envelope with every field set to something other than its default."""
    return Envelope(
        queue_id="0123456789ABCDE",
        sender="jörg@exämple.com",
        recipients=[
            Recipient(
                address="bob@example.com",
                notify=("FAILURE", "SUCCESS"),
                orcpt="rfc822;bob+tag@example.com",
                state=RecipientState.DEFERRED,
                attempts=3,
                last_attempt=1700000100.25,
                next_attempt=1700000400.000001,
                reply="451 4.7.1 greylisted, try again later",
                dsn_status="4.7.1",
                relay="mx.example.com[192.0.2.1]:25",
                delay_notified=True,
                category="greylist",
            ),
            Recipient(address="carol@example.net"),
        ],
        arrival=1700000000.123456,
        size=12345,
        body="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="QQ314159",
        auth_user="alice@example.com",
        client_address="2001:db8::7",
        client_helo="client.example.org",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)",
        message_id="<m1@example.com>",
        kind="dsn",
        extra={"x-future": {"nested": [1, "two", None]}},
    )


def document() -> dict[str, Any]:
    """The JSON document of L{full_envelope}, for breaking."""
    return json.loads(dumps(full_envelope()))


times = st.integers(min_value=0, max_value=2**52).map(lambda m: m / 1_000_000)
texts = st.text(max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
recipients = st.builds(
    Recipient,
    address=texts,
    notify=st.none() | st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"])).map(tuple),
    orcpt=st.none() | texts,
    state=st.sampled_from(list(RecipientState)),
    attempts=st.integers(min_value=0, max_value=10**6),
    last_attempt=st.none() | times,
    next_attempt=st.none() | times,
    reply=st.none() | texts,
    dsn_status=st.none() | texts,
    relay=st.none() | texts,
    delay_notified=st.booleans(),
    category=st.none() | texts,
)
envelopes = st.builds(
    Envelope,
    queue_id=texts,
    sender=texts,
    recipients=st.lists(recipients, min_size=1, max_size=4),
    arrival=times,
    size=st.integers(min_value=0, max_value=2**40),
    body=st.none() | st.sampled_from(["7BIT", "8BITMIME"]),
    smtputf8=st.booleans(),
    ret=st.none() | st.sampled_from(["FULL", "HDRS"]),
    envid=st.none() | texts,
    auth_user=st.none() | texts,
    client_address=st.none() | texts,
    client_helo=st.none() | texts,
    tls=st.none() | texts,
    message_id=st.none() | texts,
    kind=st.sampled_from(["message", "dsn"]),
    extra=st.dictionaries(st.text(max_size=8).map(lambda k: "x-" + k), json_values, max_size=3),
)


class RoundTripTests(SynchronousTestCase):
    """Envelope files written and read back: a full envelope and any envelope Hypothesis makes, text
    exactly as json.dumps with indent=2 would write it, floats and nesting in extra keys, values
    JSON cannot hold refused, readable UTF-8 for cat and jq, the documented layout, and
    format_time."""

    def test_full_envelope(self) -> None:
        env = full_envelope()
        self.assertEqual(loads(dumps(env)), env)

    @given(envelopes)
    def test_any_envelope(self, env: Envelope) -> None:
        data = dumps(env)
        self.assertEqual(loads(data), env)
        self.assertEqual(dumps(loads(data)), data)

    @given(envelopes)
    def test_text_is_the_standard_librarys(self, env: Envelope) -> None:
        """L{dumps} writes what C{json.dumps(indent=2, ensure_ascii=False)} would."""
        expected = json.dumps(to_json(env), indent=2, ensure_ascii=False) + "\n"
        self.assertEqual(dumps(env), expected.encode("utf-8"))

    def test_floats_and_nesting_in_extra_keys(self) -> None:
        env = full_envelope()
        env.extra = {"x-f": [1.5, 1e300, -0.0, {"a": [], "b": {}}], "x-e": {}, "x-l": []}
        expected = json.dumps(to_json(env), indent=2, ensure_ascii=False) + "\n"
        self.assertEqual(dumps(env), expected.encode("utf-8"))

    def test_values_json_cannot_hold_are_refused(self) -> None:
        env = full_envelope()
        env.extra = {"x-bad": object()}
        self.assertRaises(TypeError, dumps, env)
        env.extra = {"x-bad": {1: "int key"}}
        self.assertRaises(TypeError, dumps, env)

    def test_readable(self) -> None:
        """Indented UTF-8 for C{cat} and C{jq}; non-ASCII is not escaped."""
        data = dumps(full_envelope())
        self.assertTrue(data.endswith(b"}\n"))
        self.assertIn(b'\n  "format": "mta-envelope/2",\n', data)
        self.assertIn('"sender": "jörg@exämple.com"'.encode(), data)

    def test_layout(self) -> None:
        """The documented document shape (docs/spool-format.md)."""
        doc = document()
        self.assertEqual(doc["format"], FORMAT)
        self.assertEqual(doc["arrival"], "2023-11-14T22:13:20.123456Z")
        self.assertEqual(doc["dsn"], {"ret": "HDRS", "envid": "QQ314159"})
        self.assertEqual(
            doc["client"],
            {
                "address": "2001:db8::7",
                "helo": "client.example.org",
                "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)",
            },
        )
        rcpt = doc["recipients"][0]
        self.assertEqual(rcpt["state"], "deferred")
        self.assertEqual(rcpt["notify"], ["FAILURE", "SUCCESS"])
        self.assertEqual(rcpt["status"], "4.7.1")
        self.assertEqual(rcpt["next_attempt"], "2023-11-14T22:20:00.000001Z")
        self.assertEqual(doc["recipients"][1]["last_attempt"], None)

    def test_format_time(self) -> None:
        self.assertEqual(format_time(0), "1970-01-01T00:00:00.000000Z")
        self.assertIsNone(format_time(None))

    def test_format_time_is_datetimes(self) -> None:
        """The same text as datetime's, rounding included, in the same second and across."""
        rng = random.Random(7)
        whens = [1.9999995, 1.0000005, 1700000000.9999996, -1.5, -0.0000004, 2**31 + 0.5]
        whens += [rng.uniform(0, 4e9) for _ in range(2000)]
        whens += [1765000000 + rng.random() for _ in range(200)]
        for when in whens:
            expected = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            self.assertEqual(format_time(when), expected, when)


class ExtraKeysTests(SynchronousTestCase):
    """Unknown top-level keys (from a newer revision) survive a rewrite."""

    def test_preserved(self) -> None:
        doc = document()
        doc["x-added-later"] = {"a": [1, 2]}
        doc["also_new"] = "text"
        env = from_json(doc)
        self.assertEqual(
            env.extra,
            {"x-future": {"nested": [1, "two", None]}, "x-added-later": {"a": [1, 2]},
             "also_new": "text"},
        )  # fmt: skip
        self.assertEqual(json.loads(dumps(env)), doc)

    def test_known_keys_not_extra(self) -> None:
        self.assertEqual(set(from_json(document()).extra), {"x-future"})

    def test_extra_cannot_override_known_keys(self) -> None:
        env = full_envelope()
        env.extra = {"sender": "mallory@example.com", "format": "other"}
        doc = to_json(env)
        self.assertEqual(doc["sender"], "jörg@exämple.com")
        self.assertEqual(doc["format"], FORMAT)


class FormatErrorTests(SynchronousTestCase):
    """Envelope files that are not valid: a wrong or missing format tag, missing required fields (of
    the envelope or a recipient; optional ones may be absent), wrong types at every level,
    delay_notified and NOTIFY items of the wrong type, no recipients, not an object, bad JSON;
    FormatError is a ValueError."""

    def assertInvalid(self, doc: object) -> FormatError:
        return self.assertRaises(FormatError, loads, json.dumps(doc).encode())

    def test_wrong_format_tag(self) -> None:
        for tag in ["mta-envelope/3", "mta-users/1", None, 1]:
            with self.subTest(tag=tag):
                doc = document()
                doc["format"] = tag
                self.assertIn("format", str(self.assertInvalid(doc)))

    def test_missing_format_tag(self) -> None:
        doc = document()
        del doc["format"]
        self.assertInvalid(doc)

    def test_missing_required_fields(self) -> None:
        for key in ["id", "kind", "arrival", "sender", "size", "smtputf8", "dsn", "client",
                    "recipients"]:  # fmt: skip
            with self.subTest(key=key):
                doc = document()
                del doc[key]
                self.assertInvalid(doc)

    def test_missing_recipient_fields(self) -> None:
        for key in ["address", "state", "attempts"]:
            with self.subTest(key=key):
                doc = document()
                del doc["recipients"][0][key]
                self.assertInvalid(doc)

    def test_missing_optional_fields(self) -> None:
        """Fields that may be null may also be absent."""
        doc = document()
        for key in ["body", "auth_user", "message_id"]:
            del doc[key]
        env = from_json(doc)
        self.assertEqual((env.body, env.auth_user, env.message_id), (None, None, None))

    def test_wrong_types(self) -> None:
        cases: list[tuple[str, object]] = [
            ("id", 12),
            ("sender", None),
            ("size", "12"),
            ("size", True),
            ("size", 1.5),
            ("smtputf8", "yes"),
            ("smtputf8", 1),
            ("arrival", 1700000000),
            ("arrival", "yesterday"),
            ("dsn", []),
            ("client", "192.0.2.1"),
            ("recipients", {}),
            ("recipients", ["bob@example.com"]),
            ("body", 8),
            ("message_id", ["<a@b>"]),
        ]
        for key, value in cases:
            with self.subTest(key=key, value=value):
                doc = document()
                doc[key] = value
                self.assertInvalid(doc)

    def test_wrong_nested_types(self) -> None:
        cases: list[tuple[str, str, object]] = [
            ("dsn", "ret", 1),
            ("dsn", "envid", False),
            ("client", "address", 1),
            ("client", "tls", {}),
        ]
        for part, key, value in cases:
            with self.subTest(part=part, key=key):
                doc = document()
                doc[part][key] = value
                self.assertInvalid(doc)

    def test_wrong_recipient_types(self) -> None:
        cases: list[tuple[str, object]] = [
            ("address", None),
            ("attempts", "3"),
            ("attempts", False),
            ("state", "lost"),
            ("state", 1),
            ("notify", "SUCCESS"),
            ("last_attempt", 5),
            ("next_attempt", "soon"),
            ("reply", 451),
        ]
        for key, value in cases:
            with self.subTest(key=key, value=value):
                doc = document()
                doc["recipients"][0][key] = value
                self.assertInvalid(doc)

    def test_delay_notified_must_be_boolean(self) -> None:
        doc = document()
        doc["recipients"][1]["delay_notified"] = "false"
        self.assertInvalid(doc)

    def test_notify_items_must_be_strings(self) -> None:
        doc = document()
        doc["recipients"][0]["notify"] = [1]
        self.assertInvalid(doc)

    def test_no_recipients(self) -> None:
        doc = document()
        doc["recipients"] = []
        self.assertInvalid(doc)

    def test_not_an_object(self) -> None:
        for doc in [[], None, "envelope", 1]:
            with self.subTest(doc=doc):
                self.assertInvalid(doc)

    def test_bad_json(self) -> None:
        for data in [b"", b"{", b'{"format": "mta-envelope/1",}', b"\xff\xfe{}", b"NaN}"]:
            with self.subTest(data=data):
                self.assertRaises(FormatError, loads, data)

    def test_format_error_is_value_error(self) -> None:
        """Callers that only know ValueError still catch it."""
        self.assertTrue(issubclass(FormatError, ValueError))


class QueueIdTests(SynchronousTestCase):
    """L{QueueIdGenerator}: unique IDs, sortable by creation order."""

    def test_shape(self) -> None:
        clock = Clock()
        clock.advance(1700000000)
        queue_id = QueueIdGenerator(clock.seconds)()
        self.assertEqual(len(queue_id), LENGTH)
        self.assertTrue(is_queue_id(queue_id))

    def test_sorted_as_time_passes(self) -> None:
        clock = Clock()
        clock.advance(1700000000)
        make = QueueIdGenerator(clock.seconds)
        ids = []
        for step in [0.000001, 0.5, 1, 3600, 86400 * 365]:
            ids.append(make())
            clock.advance(step)
        self.assertEqual(sorted(ids), ids)

    def test_clock_standing_still(self) -> None:
        clock = Clock()
        clock.advance(1700000000)
        make = QueueIdGenerator(clock.seconds, randbits=lambda n: 0)
        ids = [make() for _ in range(1000)]
        self.assertEqual(len(set(ids)), 1000)
        self.assertEqual(sorted(ids), ids)

    def test_clock_going_backwards(self) -> None:
        """An NTP step backwards must not reorder or repeat IDs."""
        now = [1700000000.0]
        make = QueueIdGenerator(lambda: now[0], randbits=lambda n: (1 << n) - 1)
        ids = []
        for _ in range(100):
            ids.append(make())
            now[0] -= 10
        self.assertEqual(len(set(ids)), 100)
        self.assertEqual(sorted(ids), ids)

    def test_random_part_from_source(self) -> None:
        asked: list[int] = []

        def randbits(n: int) -> int:
            asked.append(n)
            return 0

        a = QueueIdGenerator(lambda: 1700000000.0, randbits=randbits)()
        b = QueueIdGenerator(lambda: 1700000000.0, randbits=lambda n: 1)()
        self.assertEqual(asked, [20])
        self.assertEqual(a[:-4], b[:-4])
        self.assertEqual((a[-4:], b[-4:]), ("0000", "0001"))

    def test_arrival_of(self) -> None:
        for when in [1.5, 1700000000.5, 1700000000.25]:
            with self.subTest(when=when):
                self.assertEqual(arrival_of(QueueIdGenerator(lambda w=when: w)()), when)

    @given(st.floats(min_value=1, max_value=2**34))
    def test_arrival_of_any_time(self, when: float) -> None:
        arrival = arrival_of(QueueIdGenerator(lambda: when)())
        self.assertLessEqual(abs(arrival - when), 2e-6)

    def test_arrival_of_exact_microsecond(self) -> None:
        when = 1107379407.288915
        self.assertEqual(arrival_of(QueueIdGenerator(lambda: when)()), when)

    def test_is_queue_id(self) -> None:
        make = QueueIdGenerator(lambda: 1700000000.0)
        self.assertTrue(is_queue_id(make()))
        for text in [
            "",
            "0123456789abcde",  # lower case
            "0123456789ABCD",  # too short
            "0123456789ABCDEF",  # too long
            "0123456789ABCDI",  # I, L, O and U are not in the alphabet
            "0123456789ABCDL",
            "0123456789ABCDO",
            "0123456789ABCDU",
            "../../etc/passw",
            "0123456789ABCD/",
            "0123456789ABCD.",
        ]:
            with self.subTest(text=text):
                self.assertFalse(is_queue_id(text))

    def test_is_queue_id_trailing_newline(self) -> None:
        self.assertFalse(is_queue_id("0123456789ABCDE\n"))
