"""The listen backlog that TCP listeners get unless their description sets one."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mta.service import LISTEN_BACKLOG, with_backlog


class BacklogTests(SynchronousTestCase):
    """with_backlog: tcp and tcp6 listener descriptions get a backlog of 1024 unless they set one,
    other endpoints are left alone, and the result still parses."""

    def test_tcp_gets_the_backlog(self) -> None:
        self.assertEqual(
            with_backlog("tcp:465:interface=127.0.0.1"),
            f"tcp:465:interface=127.0.0.1:backlog={LISTEN_BACKLOG}",
        )
        self.assertEqual(
            with_backlog("tcp6:587:interface=\\:\\:"),
            f"tcp6:587:interface=\\:\\::backlog={LISTEN_BACKLOG}",
        )

    def test_an_explicit_backlog_is_kept(self) -> None:
        self.assertEqual(with_backlog("tcp:465:backlog=10"), "tcp:465:backlog=10")

    def test_other_endpoints_are_unchanged(self) -> None:
        self.assertEqual(with_backlog("unix:/run/mta.sock"), "unix:/run/mta.sock")

    def test_the_description_parses(self) -> None:
        from twisted.internet import reactor  # noqa: PLC0415
        from twisted.internet.endpoints import serverFromString  # noqa: PLC0415

        endpoint = serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1"))
        self.assertEqual(endpoint._backlog, LISTEN_BACKLOG)  # type: ignore[attr-defined]
