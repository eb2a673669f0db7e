"""End to end: DANE and MTA-STS in a real twistd process, everything on loopback.

Around the daemon: the DNS server (tests/dnsserver.py) plays a validating
resolver (the AD bit on the names marked secure) and publishes MX, TXT
and TLSA records; the HTTPS policy server (tests/policyserver.py) serves
the MTA-STS policies with a certificate from a test CA that the daemon
trusts through C{[delivery] ca_file}; four sinks (tests/e2e/sink.py) on
127.0.0.2-5, one port, offer STARTTLS with a good, an expired and two
self-signed certificates.

    sts.test      MTA-STS enforce, mx.sts.test (good certificate)     -> sent, tls=mta-sts
    stsbad.test   MTA-STS enforce, mx.stsbad.test (expired)           -> deferred 4.7.5
    dane.test     DNSSEC, TLSA 3 1 1 of mx.dane.test's certificate    -> sent, tls=dane
    danebad.test  DNSSEC, TLSA that matches nothing                   -> deferred 4.7.5
    plain.test    nothing published                                   -> sent, tls=may
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.daemon import Daemon, Helper, wait_for
from tests.pki import CA, self_signed

pytestmark = pytest.mark.e2e

LOGIN = "app@example.com"
PASSWORD = "tls-policy-test-password"
POLICY = "version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"

# name -> (loopback address, certificate kind)
SINKS = {
    "mx.sts.test": ("127.0.0.2", "good"),
    "mx.stsbad.test": ("127.0.0.3", "expired"),
    "mx.dane.test": ("127.0.0.4", "self-signed"),
    "mx.danebad.test": ("127.0.0.5", "self-signed"),
    "mx.plain.test": ("127.0.0.6", "self-signed"),
}


def spki_sha256(cert: Any) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class TLSPolicyEndToEnd(SynchronousTestCase):
    """DANE and MTA-STS in a real daemon: an enforced MTA-STS policy delivers with tls=mta-sts and
    defers on an expired certificate, TLSA records that match deliver with tls=dane and defer
    when they match nothing, no policy stays opportunistic, and the policy cache survives a
    restart while the policy host answers 404."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="mta-tlspolicy-")
        certs = os.path.join(cls.tmp, "certs")
        ca = CA()
        ca_file = ca.write(os.path.join(cls.tmp, "ca.pem"))
        issued = {}
        cls.sinks: dict[str, Helper] = {}
        cls.out: dict[str, str] = {}
        port = 0
        for name, (address, kind) in SINKS.items():
            if kind == "good":
                cert = ca.issue([name])
            elif kind == "expired":
                cert = ca.issue([name], expired=True)
            else:
                cert = self_signed([name])
            issued[name] = cert
            cert_path, key_path = cert.write(certs, name)
            cls.out[name] = os.path.join(cls.tmp, "sink-" + name)
            sink = Helper(
                ["tests/e2e/sink.py", cls.out[name], "--host", address, "--port", str(port),
                 "--tls-cert", cert_path, "--tls-key", key_path],
                os.path.join(cls.tmp, f"sink-{name}.log"),
            )  # fmt: skip
            cls.sinks[name] = sink
            port = sink.port  # every MX host listens on the same port
        cls.sink_port = port

        policy_cert, policy_key = ca.issue(["mta-sts.sts.test", "mta-sts.stsbad.test"]).write(
            certs, "policy"
        )
        cls.policies_file = os.path.join(cls.tmp, "policies.json")
        cls.write_policies(
            {
                "mta-sts.sts.test": {"body": POLICY.format(mx="mx.sts.test")},
                "mta-sts.stsbad.test": {"body": POLICY.format(mx="*.stsbad.test")},
            }
        )
        cls.policy = Helper(
            [
                "tests/policyserver.py",
                cls.policies_file,
                "--cert",
                policy_cert,
                "--key",
                policy_key,
            ],
            os.path.join(cls.tmp, "policy.log"),
        )

        zone: dict[str, Any] = {}
        for name, (address, _) in SINKS.items():
            domain = name.removeprefix("mx.")
            zone[domain] = {"MX": [[10, name]]}
            zone[name] = {"A": [address]}
        for domain in ("sts.test", "stsbad.test"):
            zone[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=20260101"]}
            zone[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
        for domain in ("dane.test", "danebad.test"):
            zone[domain]["secure"] = zone[f"mx.{domain}"]["secure"] = True
        dane_cert = issued["mx.dane.test"].cert
        zone[f"_{port}._tcp.mx.dane.test"] = {
            "TLSA": [[3, 1, 1, spki_sha256(dane_cert)]],
            "secure": True,
        }
        zone[f"_{port}._tcp.mx.danebad.test"] = {
            "TLSA": [[3, 1, 1, spki_sha256(dane_cert)]],  # not danebad's certificate
            "secure": True,
        }
        zone_file = os.path.join(cls.tmp, "zone.json")
        with open(zone_file, "w", encoding="utf-8") as f:
            json.dump(zone, f)
        cls.dns = Helper(["tests/dnsserver.py", zone_file], os.path.join(cls.tmp, "dns.log"))

        cls.daemon = Daemon(
            os.path.join(cls.tmp, "mta"),
            {
                "delivery": {
                    "dns_servers": ["127.0.0.1"],
                    "dns_port": cls.dns.port,
                    "port": port,
                    "ip_versions": ["ipv4"],
                    "refuse_networks": [],  # the MX hosts are on loopback
                    "dnssec": True,
                    "mta_sts_port": cls.policy.port,
                    "mta_sts_timeout": 5,
                    "ca_file": ca_file,
                },
                "routes": None,
            },
        )
        cls.daemon.add_user(LOGIN, PASSWORD)
        cls.daemon.start()

    @classmethod
    def write_policies(cls, table: dict[str, Any]) -> None:
        with open(cls.policies_file, "w", encoding="utf-8") as f:
            json.dump(table, f)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()
        for helper in [*cls.sinks.values(), cls.policy, cls.dns]:
            helper.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def send(self, rcpt: str) -> str:
        message = (
            f"From: App <{LOGIN}>\r\nTo: {rcpt}\r\nSubject: TLS policy\r\n"
            "Message-ID: <tls-policy@example.com>\r\n\r\nHello.\r\n"
        )
        return self.daemon.submit(LOGIN, PASSWORD, message, [rcpt])

    def line(self, queue_id: str, rcpt: str) -> str:
        found: str = wait_for(
            lambda: next(
                (ln for ln in self.daemon.log().splitlines() if f"{queue_id}: to=<{rcpt}>" in ln),
                None,
            ),
            30,
            f"the delivery line of {queue_id}",
        )
        return found

    def received(self, name: str) -> int:
        return len([n for n in os.listdir(self.out[name]) if n.endswith(".eml")])

    def test_mta_sts_enforced(self) -> None:
        line = self.line(self.send("bob@sts.test"), "bob@sts.test")
        self.assertIn("relay=mx.sts.test[127.0.0.2]", line)
        self.assertRegex(line, r"status=sent \(250 [^)]*\), tls=mta-sts$")
        self.assertGreaterEqual(self.received("mx.sts.test"), 1)

    def test_mta_sts_expired_certificate_defers(self) -> None:
        line = self.line(self.send("bob@stsbad.test"), "bob@stsbad.test")
        self.assertIn("dsn=4.7.5, status=deferred", line)
        self.assertIn("TLS authentication failed (MTA-STS policy of stsbad.test)", line)
        self.assertIn("certificate has expired", line)
        self.assertTrue(line.endswith(", tls=mta-sts"), line)
        self.assertEqual(self.received("mx.stsbad.test"), 0)

    def test_dane(self) -> None:
        line = self.line(self.send("bob@dane.test"), "bob@dane.test")
        self.assertRegex(line, r"status=sent \(250 [^)]*\), tls=dane$")
        self.assertGreaterEqual(self.received("mx.dane.test"), 1)

    def test_dane_mismatch_defers(self) -> None:
        line = self.line(self.send("bob@danebad.test"), "bob@danebad.test")
        self.assertIn("dsn=4.7.5, status=deferred", line)
        self.assertIn("no TLSA record matches the certificate chain", line)
        self.assertTrue(line.endswith(", tls=dane"), line)
        self.assertEqual(self.received("mx.danebad.test"), 0)

    def test_no_policy_is_opportunistic(self) -> None:
        line = self.line(self.send("bob@plain.test"), "bob@plain.test")
        self.assertRegex(line, r"status=sent \(250 [^)]*\), tls=may$")

    def test_policy_cache_survives_a_restart(self) -> None:
        first = self.send("carol@sts.test")
        self.assertIn("tls=mta-sts", self.line(first, "carol@sts.test"))
        cache = os.path.join(self.daemon.spool, "state", "mta-sts", "sts.test.json")
        with open(cache, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["id"], "20260101")
        # The policy host now answers 404; only the cached policy can apply.
        self.write_policies({})
        self.policy.process.send_signal(signal.SIGHUP)
        self.daemon.stop()
        self.daemon.start()
        fetched_before = len(re.findall(r"MTA-STS: policy of sts.test", self.daemon.log()))
        second = self.send("dave@sts.test")
        line = self.line(second, "dave@sts.test")
        self.assertRegex(line, r"status=sent \(250 [^)]*\), tls=mta-sts$")
        self.assertEqual(
            len(re.findall(r"MTA-STS: policy of sts.test", self.daemon.log())), fetched_before
        )
