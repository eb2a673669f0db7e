"""The whole service on real loopback sockets with real TLS.

The service runs in the test's reactor; Python's smtplib and ssl talk to it
from a worker thread, as a real client would.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import warnings
from email.message import EmailMessage
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mta.config import parse
from mta.envelope import QueueState
from mta.service import MTAService
from mta.spool.fs import FileStore
from mta.testing import write_users
from mta.tls import ensure_selfsigned, fingerprint

LOGIN = "app@example.com"
PASSWORD = "s3cret password"


def queued(store: FileStore) -> list[str]:
    """Every message in the spool, whatever its state (delivery runs at once)."""
    return [qid for state in QueueState for qid in store.ids(state)]


def message(sender: str = LOGIN, body: str = "Hello over TLS.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"App <{sender}>"
    msg["To"] = "someone@example.net"
    msg["Subject"] = "socket test"
    msg.set_content(body)
    return msg


class ServiceOnSockets(TestCase):
    """The whole service on real loopback sockets with real TLS, smtplib in a thread as the client:
    submission on 465 and with STARTTLS on 587, TLS below 1.2 refused, a wrong password and a
    From mismatch, STARTTLS injection over a socket, and the certificate swapped on SIGHUP for
    new connections while old ones carry on."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        write_users(os.path.join(self.dir, "users.json"), {LOGIN: PASSWORD})
        doc = {
            "server": {"hostname": "localhost", "spool": "spool", "users_file": "users.json"},
            "listen": {
                "submissions": "tcp:0:interface=127.0.0.1",
                "submission": "tcp:0:interface=127.0.0.1",
            },
            "auth": {"failure_delay": 0.01},
            # Deliveries go to a closed loopback port: nothing leaves the machine.
            "delivery": {"dns_servers": ["127.0.0.1"], "dns_port": 9, "dns_timeout": 1},
            "routes": {"*": "[127.0.0.1]:9"},
        }
        config = parse(doc, "test.toml", self.dir)
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.service = MTAService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.tls_port = self.service.ports[0].getHost().port
        self.plain_port = self.service.ports[1].getHost().port
        self.cafile = os.path.join(self.dir, "spool", "selfsigned", "cert.pem")

    def context(self, **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        for key, value in kw.items():
            setattr(ctx, key, value)
        return ctx

    def store(self) -> FileStore:
        return FileStore(os.path.join(self.dir, "spool"))

    def test_implicit_tls_submission(self) -> Any:
        """The seed's smtplib.SMTP_SSL + login + sendmail, on the 465 listener."""

        def client() -> tuple[dict[str, Any], str]:
            with smtplib.SMTP_SSL("localhost", self.tls_port, context=self.context()) as s:
                s.login(LOGIN, PASSWORD)
                refused = s.sendmail(LOGIN, ["someone@example.net"], message().as_string())
                version = s.sock.version()  # type: ignore[union-attr]
            return refused, str(version)

        def check(result: tuple[dict[str, Any], str]) -> None:
            refused, version = result
            self.assertEqual(refused, {})
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            [queue_id] = queued(self.store())
            _, env = self.store().load(queue_id)
            self.assertEqual(env.sender, LOGIN)
            self.assertIn("TLSv1.3", env.tls or "")
            # Delivery runs meanwhile and may move the message between states.
            with self.service.store.open_message(queue_id) as f:
                stored = f.read()
            self.assertIn(b"(using TLSv1.3 ", stored)
            self.assertIn(b"\r\n\r\nHello over TLS.\r\n", stored)

        return deferToThread(client).addCallback(check)

    def test_starttls_submission(self) -> Any:
        def client() -> dict[str, Any]:
            with smtplib.SMTP("localhost", self.plain_port) as s:
                s.ehlo()
                self.assertTrue(s.has_extn("starttls"))
                self.assertFalse(s.has_extn("auth"))
                s.starttls(context=self.context())
                s.ehlo()
                self.assertTrue(s.has_extn("auth"))
                s.login(LOGIN, PASSWORD)
                return s.sendmail(LOGIN, ["someone@example.net"], message().as_string())

        def check(refused: dict[str, Any]) -> None:
            self.assertEqual(refused, {})
            self.assertEqual(len(queued(self.store())), 1)

        return deferToThread(client).addCallback(check)

    def test_tls_below_1_2_refused(self) -> Any:
        def client() -> None:
            ctx = self.context()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            with self.assertRaises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
                smtplib.SMTP_SSL("localhost", self.tls_port, context=ctx, timeout=10)

        return deferToThread(client)

    def test_wrong_password_and_from_mismatch(self) -> Any:
        def client() -> None:
            with smtplib.SMTP_SSL("localhost", self.tls_port, context=self.context()) as s:
                with self.assertRaises(smtplib.SMTPAuthenticationError) as e:
                    s.login(LOGIN, "not the password")
                self.assertEqual(e.exception.smtp_code, 535)
                s.login(LOGIN, PASSWORD)
                with self.assertRaises(smtplib.SMTPDataError) as d:
                    s.sendmail(LOGIN, ["x@example.net"], message("boss@example.com").as_string())
                self.assertEqual(d.exception.smtp_code, 550)
                self.assertIn(b"matches your authenticated address", d.exception.smtp_error)

        return deferToThread(client)

    def test_starttls_injection_over_socket(self) -> Any:
        """Plaintext pipelined with STARTTLS is not executed after the handshake."""

        def client() -> bytes:
            raw = socket.create_connection(("127.0.0.1", self.plain_port), timeout=10)
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO x\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\nNOOP\r\nNOOP\r\n")
            self.assertTrue(f.readline().startswith(b"220 "))
            tls = self.context().wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"QUIT\r\n")
            rest = b""
            while chunk := tls.recv(4096):
                rest += chunk
            return rest

        def check(after_tls: bytes) -> None:
            # Only QUIT is answered; the two NOOPs were discarded.
            self.assertEqual(after_tls, b"221 2.0.0 Bye\r\n")

        return deferToThread(client).addCallback(check)

    def test_certificate_reload(self) -> Any:
        """SIGHUP swaps the certificate for new connections; old ones carry on."""
        cert_dir = os.path.join(self.dir, "spool", "selfsigned")

        def first() -> tuple[smtplib.SMTP_SSL, bytes]:
            s = smtplib.SMTP_SSL("localhost", self.tls_port, context=self.context())
            return s, s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]

        def replace_and_reload(result: tuple[smtplib.SMTP_SSL, bytes]) -> Any:
            old_conn, old_der = result
            other = os.path.join(self.dir, "other")
            new_cert, new_key = ensure_selfsigned(other, "localhost")
            shutil.copy(new_cert, os.path.join(cert_dir, "cert.pem"))
            shutil.copy(new_key, os.path.join(cert_dir, "key.pem"))
            os.kill(os.getpid(), signal.SIGHUP)

            def second() -> bytes:
                # The old connection still works on its old certificate.
                self.assertEqual(old_conn.noop()[0], 250)
                old_conn.quit()
                ctx = ssl.create_default_context(cafile=new_cert)
                with smtplib.SMTP_SSL("localhost", self.tls_port, context=ctx) as s:
                    return s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr,return-value]

            return (
                deferLater(reactor, 0.2, lambda: None)
                .addCallback(lambda _: deferToThread(second))
                .addCallback(lambda new_der: (old_der, new_der))
            )

        def check(ders: tuple[bytes, bytes]) -> None:
            old, new = (x509.load_der_x509_certificate(d) for d in ders)
            self.assertNotEqual(fingerprint(old), fingerprint(new))
            self.assertEqual(self.service.tls.info.sha256, fingerprint(new))

        return deferToThread(first).addCallback(replace_and_reload).addCallback(check)
