"""Tests for L{mta.maillog.delivery_line}: the Postfix-shaped line and its tls= field."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta import maillog
from mta.errors import Reply

TIMES = {"arrival": 100.0, "activated": 100.5, "started": 101.0, "setup": 0.25, "transfer": 0.5}


class DeliveryLineTests(SynchronousTestCase):
    """The Postfix-shaped delivery log line: the fields in Postfix's order, and tls= after the reply
    and before a note."""

    def line(self, **kw: str) -> str:
        return maillog.delivery_line(
            "0000000000000ABC",
            "bob@example.test",
            relay="mx.example.test[192.0.2.1]:25",
            status="sent",
            reply=Reply(250, "2.0.0", "Ok: queued"),
            now=102.0,
            **TIMES,  # type: ignore[arg-type]
            **kw,
        )

    def test_without_tls(self) -> None:
        self.assertEqual(
            self.line(),
            "0000000000000ABC: to=<bob@example.test>, relay=mx.example.test[192.0.2.1]:25, "
            "delay=2, delays=0.5/0.5/0.25/0.5, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)",
        )

    def test_tls_after_the_reply_and_before_a_note(self) -> None:
        self.assertTrue(
            self.line(tls="dane").endswith("status=sent (250 2.0.0 Ok: queued), tls=dane")
        )
        self.assertTrue(
            self.line(tls="mta-sts", note="note").endswith(
                "(250 2.0.0 Ok: queued), tls=mta-sts, note"
            )
        )
