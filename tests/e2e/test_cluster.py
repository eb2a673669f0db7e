"""End to end: two mta instances behind a real HAProxy, sharing a real Redis.

Everything is a real process on loopback ports of its own: a private
redis-server (append-only file, fsync'd at every write, as
docs/operations.md advises), two twistd daemons (each with its own spool,
PROXY listeners, metrics and health; users, daily counts and AUTH
failures in Redis), HAProxy in front of them (TCP mode, round robin,
C{send-proxy-v2}, health checks on C{/health}), and a sink for delivery.
The clients bind to addresses of their own in 127.0.0.0/8 (127.0.0.2,
...), so that "the real client" differs from HAProxy's 127.0.0.1.

What it shows (issue 17): the daily limit holds for the cluster (the
N+1st message is refused whichever instance gets it), wrong passwords
count across both instances, C{Received:} and the logs name the real
client, Redis killed gives temporary replies (and mail that needs no
Redis still flows), and Redis back restores service by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import ssl
import tempfile
import time
import urllib.request
from email import message_from_bytes
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mta.tls import ensure_selfsigned
from tests.e2e.daemon import Daemon, Helper, at_sink, free_port, wait_for
from tests.haproxy import Backend, HAProxy
from tests.redisserver import RedisServer

pytestmark = pytest.mark.e2e

PASSWORD = "cluster-test-password"
LIMITED = "limited@example.com"  # daily limit 3
GUESSED = "guessed@example.com"
SENDER = "sender@example.com"
DAILY = 3


class ClusterEndToEnd(SynchronousTestCase):
    """Two daemons behind HAProxy sharing one Redis: the daily limit and wrong passwords count
    across both instances, Received: and the logs name the real client the PROXY header carries;
    with Redis killed AUTH gets 454 4.3.0 on both while trusted-network mail is still delivered
    and /health stays ok, and logins and counts are back with Redis."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-cluster-")
        cls.redis = cls.sink = cls.haproxy = None  # type: ignore[assignment]
        cls.daemons = []
        try:
            cls.start_all()
        except BaseException:
            cls.tearDownClass()  # unittest does not when setUpClass fails
            raise

    @classmethod
    def start_all(cls) -> None:
        cls.redis = RedisServer(os.path.join(cls.tmp, "redis"), persistent=True).start()
        cls.out = os.path.join(cls.tmp, "sink")
        cls.sink = Helper(["tests/e2e/sink.py", cls.out], os.path.join(cls.tmp, "sink.log"))
        cert, key = ensure_selfsigned(os.path.join(cls.tmp, "cert"), "localhost")
        cls.cafile = cert
        backends = []
        for name in ("mta-a", "mta-b"):
            ports = {"tls": free_port(), "plain": free_port(), "metrics": free_port()}
            daemon = Daemon(
                os.path.join(cls.tmp, name),
                {
                    "server": {"hostname": f"{name}.localhost"},
                    "tls": {"certificate": cert, "key": key},
                    "listen": {
                        "proxy_submissions": [f"tcp:{ports['tls']}:interface=127.0.0.1"],
                        "proxy_submission": [f"tcp:{ports['plain']}:interface=127.0.0.1"],
                        "proxy_from": ["127.0.0.1/32"],
                    },
                    "metrics": {"listen": [f"tcp:{ports['metrics']}:interface=127.0.0.1"]},
                    "auth": {"max_failures": 4, "trusted_networks": ["127.0.0.4/32"]},
                    "limits": {"daily_messages": 100},
                    "cluster": {
                        "redis": cls.redis.endpoint,
                        "instance": name,
                        "users": "redis",
                        "users_refresh": 0.2,
                        "timeout": 0.5,
                        "retry": 0.2,
                    },
                    "routes": {"*": f"[127.0.0.1]:{cls.sink.port}"},
                    "delivery": {"connection_cache_time": 0},
                },
            )
            daemon.metrics_port = ports["metrics"]  # type: ignore[attr-defined]
            cls.daemons.append(daemon)
            backends.append(Backend(name, ports["tls"], ports["plain"], ports["metrics"]))
        # Users go to Redis through mtactl (either instance's configuration).
        a = cls.daemons[0]
        a.add_user(LIMITED, PASSWORD, "--daily-limit", str(DAILY))
        a.add_user(GUESSED, PASSWORD)
        a.add_user(SENDER, PASSWORD)
        for daemon in cls.daemons:
            daemon.start()
        cls.haproxy = HAProxy(os.path.join(cls.tmp, "haproxy"), backends).start()
        # Both instances up behind the balancer (health checks passed).
        wait_for(
            lambda: {cls.greet(source="127.0.0.9") for _ in range(4)} == {"mta-a", "mta-b"},
            what="both instances behind HAProxy",
        )

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.haproxy is not None:
            cls.haproxy.stop()
        for daemon in cls.daemons:
            daemon.stop()
        if cls.sink is not None:
            cls.sink.stop()
        if cls.redis is not None:
            cls.redis.stop()
        if not os.environ.get("MTA_KEEP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    # -- clients ---------------------------------------------------------------

    @classmethod
    def connect(cls, source: str, *, tls: bool = True) -> tuple[smtplib.SMTP, str]:
        """A client session from C{source} through HAProxy; (session, instance)."""
        context = ssl.create_default_context(cafile=cls.cafile)
        smtp: smtplib.SMTP
        if tls:
            smtp = smtplib.SMTP_SSL(context=context, timeout=30, source_address=(source, 0))
            smtp._host = "localhost"  # the name to verify (smtplib sets it only from __init__)
            code, greeting = smtp.connect("localhost", cls.haproxy.tls_port)
        else:
            smtp = smtplib.SMTP(timeout=30, source_address=(source, 0))
            smtp._host = "localhost"
            code, greeting = smtp.connect("localhost", cls.haproxy.plain_port)
        assert code == 220, greeting
        return smtp, greeting.decode().split(".", 1)[0]

    @classmethod
    def greet(cls, source: str) -> str:
        try:
            smtp, instance = cls.connect(source)
        except (OSError, ValueError, AssertionError, smtplib.SMTPException):
            return ""
        smtp.quit()
        return instance

    @staticmethod
    def login(smtp: smtplib.SMTP, login: str, password: str) -> tuple[int, str]:
        """AUTH PLAIN once (smtplib's login() would try LOGIN after a failure too)."""
        smtp.ehlo_or_helo_if_needed()
        smtp.user, smtp.password = login, password
        try:
            code, text = smtp.auth("PLAIN", smtp.auth_plain, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error.decode()
        return code, text.decode()

    def message(self, sender: str, subject: str) -> str:
        return f"From: {sender}\r\nTo: rcpt@example.net\r\nSubject: {subject}\r\n\r\nHello.\r\n"

    def submit(self, source: str, login: str, subject: str, tls: bool = True) -> tuple[str, Any]:
        """One message; (instance, reply to the first refused step or (250, queue ID))."""
        smtp, instance = self.connect(source, tls=tls)
        try:
            if not tls:
                smtp.starttls(context=ssl.create_default_context(cafile=self.cafile))
            code, reply = self.login(smtp, login, PASSWORD)
            if code != 235:
                return instance, (code, reply)
            code, text = smtp.mail(login)
            if code != 250:
                return instance, (code, text.decode())
            smtp.rcpt("rcpt@example.net")
            code, text = smtp.data(self.message(login, subject))
            return instance, (code, text.decode().rpartition(" ")[2] if code == 250 else text)
        finally:
            smtp.close()

    def auth(self, source: str, login: str, password: str) -> tuple[str, int, str]:
        smtp, instance = self.connect(source)
        try:
            return (instance, *self.login(smtp, login, password))
        finally:
            smtp.close()

    def delivered(self, subject: str) -> bytes:
        return at_sink(
            self.out,
            f"Subject: {subject}\r\n".encode(),
            what=f"the message {subject!r} at the sink",
        )

    def health(self, daemon: Daemon) -> dict[str, Any]:
        url = f"http://127.0.0.1:{daemon.metrics_port}/health"  # type: ignore[attr-defined]
        with urllib.request.urlopen(url, timeout=10) as r:
            return dict(json.loads(r.read()))

    # -- the tests -------------------------------------------------------------

    def test_daily_limit_holds_across_instances(self) -> None:
        results = [self.submit("127.0.0.5", LIMITED, f"limit {i}") for i in range(DAILY + 3)]
        accepted = [r for r in results if r[1][0] == 250]
        refused = [r for r in results if r[1][0] != 250]
        self.assertEqual(len(accepted), DAILY, results)
        self.assertEqual(results[:DAILY], accepted)  # the first N, then none
        for _, (code, text) in refused:
            self.assertEqual(code, 451)
            self.assertIn(f"4.7.1 Daily sending limit of {DAILY} messages reached", text)
        self.assertEqual({i for i, _ in accepted}, {"mta-a", "mta-b"}, results)
        self.assertEqual({i for i, _ in refused}, {"mta-a", "mta-b"}, results)

    def test_wrong_passwords_count_across_instances(self) -> None:
        failed = [self.auth("127.0.0.2", GUESSED, f"guess {i}") for i in range(4)]
        self.assertEqual([code for _, code, _ in failed], [535] * 4)
        self.assertEqual({i for i, _, _ in failed}, {"mta-a", "mta-b"}, failed)
        blocked = [self.auth("127.0.0.2", GUESSED, PASSWORD) for _ in range(2)]
        for _, code, text in blocked:
            self.assertEqual(code, 454)
            self.assertIn("4.7.0 Too many failed login attempts", text)
        self.assertEqual({i for i, _, _ in blocked}, {"mta-a", "mta-b"}, blocked)
        # The block is the real client's (127.0.0.2), not the balancer's.
        self.assertEqual(self.auth("127.0.0.3", GUESSED, PASSWORD)[1], 235)

    def test_received_and_logs_name_the_real_client(self) -> None:
        for tls, subject in ((True, "via 465"), (False, "via 587")):
            instance, (code, queue_id) = self.submit("127.0.0.3", SENDER, subject, tls=tls)
            self.assertEqual(code, 250)
            data = self.delivered(subject)
            received = message_from_bytes(data)["Received"]
            self.assertIn("([127.0.0.3])", received)
            self.assertIn(f"by {instance}.localhost (mta) with ESMTPSA id {queue_id}", received)
            [daemon] = [d for d in self.daemons if os.path.basename(d.dir) == instance]
            wait_for(
                lambda d=daemon, q=queue_id: f"{q}: client=[127.0.0.3]" in d.log(),
                what="the queued line in the log",
            )
            self.assertIn("connect from [127.0.0.3]", daemon.log())
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.daemons[1].metrics_port}/metrics",  # type: ignore[attr-defined]
            timeout=10,
        ) as r:
            self.assertIn(b'mta_messages_accepted_total{mta_instance="mta-b"}', r.read())

    def test_redis_killed_and_back(self) -> None:
        self.redis.stop()  # SIGKILL
        try:
            down = [self.auth("127.0.0.6", SENDER, PASSWORD) for _ in range(2)]
            for _, code, text in down:
                self.assertEqual(code, 454)
                self.assertIn("4.3.0 Logins cannot be checked right now", text)
            self.assertEqual({i for i, _, _ in down}, {"mta-a", "mta-b"}, down)
            # Mail that needs no Redis (a trusted network: no login, no
            # count) is accepted and delivered meanwhile.
            smtp, _ = self.connect("127.0.0.4", tls=False)
            with smtp:
                smtp.sendmail("app@example.com", ["rcpt@example.net"], self.message(
                    "app@example.com", "while Redis is down"
                ))  # fmt: skip
            self.delivered("while Redis is down")
            for daemon in self.daemons:
                self.assertIsNone(daemon.process.poll())  # type: ignore[union-attr]
                self.assertEqual(self.health(daemon)["status"], "ok")
        finally:
            self.redis.start()
        # Back by itself: logins, the users and the counts (fsync'd in the
        # append-only file) are there again, on both instances.
        seen: set[str] = set()

        def serves() -> bool:
            instance, (code, _) = self.submit("127.0.0.6", SENDER, f"after Redis {time.time()}")
            if code == 250:
                seen.add(instance)
            return seen == {"mta-a", "mta-b"}

        wait_for(serves, timeout=20, what="both instances serving again")
        for daemon in self.daemons:
            self.assertEqual(self.health(daemon)["redis"], "connected")
            self.assertIn("is reachable again", daemon.log())
