"""Tests for L{mta.delivery.dane} (TLSA records, RFC 7672) and L{mta.delivery.pkix}.

Pure functions on certificates made by L{tests.pki}: which TLSA records
are usable, what matches a chain, and the PKIX check (trusted CA, dates,
names) that MTA-STS and C{verify} use.  The same checks over real TLS
connections are in tests/test_tlspolicy.py.
"""

from __future__ import annotations

import hashlib
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from mta.delivery import dane, pkix
from mta.delivery.dns import TLSARecord
from mta.errors import ConfigError
from tests.pki import CA, Issued, self_signed


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TLSARecord:
    data = der(cert) if selector == 0 else spki(cert)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TLSARecord(usage, selector, mtype, data)


def chain(issued: Issued) -> list[x509.Certificate]:
    return [issued.cert, *issued.chain]


class UsableTests(SynchronousTestCase):
    """Which TLSA records can be used (RFC 7671, 7672): DANE-TA and DANE-EE with every selector and
    matching type, digest agility keeping SHA-512 over SHA-256, PKIX usages and unknown values
    unusable, a digest of the wrong length unusable, the TLSA owner name, and a short text of a
    record for the logs."""

    def setUp(self) -> None:
        self.cert = self_signed(["mx.example.test"]).cert

    def test_dane_usages_selectors_and_matching_types(self) -> None:
        records = [record(u, s, m, self.cert) for u in (2, 3) for s in (0, 1) for m in (0, 1, 2)]
        # Digest agility (RFC 7671 section 9): of 1 and 2 for the same
        # usage and selector, only 2 is kept; Full(0) is always kept.
        expected = tuple(r for r in records if r.mtype != 1)
        self.assertEqual(dane.usable(records), expected)

    def test_sha256_alone_is_kept(self) -> None:
        r = record(3, 1, 1, self.cert)
        self.assertEqual(dane.usable([r]), (r,))

    def test_pkix_usages_are_unusable(self) -> None:
        # RFC 7672 section 3.1.3
        self.assertEqual(dane.usable([record(0, 0, 1, self.cert), record(1, 1, 1, self.cert)]), ())

    def test_unknown_values_are_unusable(self) -> None:
        good = record(3, 1, 1, self.cert)
        bad = [
            TLSARecord(4, 1, 1, good.data),
            TLSARecord(3, 2, 1, good.data),
            TLSARecord(3, 1, 3, good.data),
            TLSARecord(255, 255, 255, good.data),
        ]
        self.assertEqual(dane.usable(bad), ())

    def test_digest_of_the_wrong_length_is_unusable(self) -> None:
        good = record(3, 1, 1, self.cert)
        self.assertEqual(dane.usable([TLSARecord(3, 1, 1, good.data[:-1])]), ())
        self.assertEqual(dane.usable([TLSARecord(3, 1, 2, good.data)]), ())
        self.assertEqual(dane.usable([TLSARecord(3, 1, 0, b"")]), ())

    def test_tlsa_name(self) -> None:
        self.assertEqual(dane.tlsa_name("MX.Example.test."), "_25._tcp.mx.example.test")
        self.assertEqual(dane.tlsa_name("mx.example.test", 2525), "_2525._tcp.mx.example.test")

    def test_record_text_is_short(self) -> None:
        self.assertRegex(str(record(3, 1, 1, self.cert)), r"^3 1 1 [0-9A-F]{16}\.\.\.$")


class DANEEETests(SynchronousTestCase):
    """DANE-EE(3): the server's own certificate or key; names and dates do not matter."""

    def setUp(self) -> None:
        self.ca = CA()

    def test_every_selector_and_matching_type_matches(self) -> None:
        server = self.ca.issue(["mx.example.test"])
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                r = record(3, selector, mtype, server.cert)
                self.assertTrue(dane.matches(r, server.cert), str(r))
                self.assertIsNone(dane.problem([r], chain(server), ["mx.example.test"]))

    def test_another_certificate_does_not_match(self) -> None:
        published = self.ca.issue(["mx.example.test"])
        presented = self.ca.issue(["mx.example.test"])
        problem = dane.problem(
            [record(3, 1, 1, published.cert)], chain(presented), ["mx.example.test"]
        )
        self.assertIsNotNone(problem)
        assert problem is not None
        self.assertIn("no TLSA record matches", problem)
        self.assertIn("3 1 1 ", problem)

    def test_spki_survives_a_new_certificate_for_the_same_key(self) -> None:
        first = self.ca.issue(["mx.example.test"])
        renewed = x509.CertificateBuilder(
            issuer_name=first.cert.issuer,
            subject_name=first.cert.subject,
            public_key=first.key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=first.cert.not_valid_before_utc,
            not_valid_after=first.cert.not_valid_after_utc,
        ).sign(self.ca.key, first.cert.signature_hash_algorithm)  # type: ignore[arg-type]
        self.assertIsNone(dane.problem([record(3, 1, 1, first.cert)], [renewed], ["x"]))
        self.assertIsNotNone(dane.problem([record(3, 0, 1, first.cert)], [renewed], ["x"]))

    def test_expired_wrong_name_self_signed_all_pass(self) -> None:
        # RFC 7672 section 3.1.1: with DANE-EE the DNS is the authority.
        for issued in (
            self.ca.issue(["mx.example.test"], expired=True),
            self.ca.issue(["elsewhere.test"]),
            self_signed(["anything.test"], expired=True),
        ):
            self.assertIsNone(
                dane.problem([record(3, 1, 1, issued.cert)], chain(issued), ["mx.example.test"])
            )

    def test_no_certificate(self) -> None:
        r = record(3, 1, 1, self.ca.cert)
        self.assertEqual(dane.problem([r], [], ["mx"]), "the server sent no certificate")


class DANETATests(SynchronousTestCase):
    """DANE-TA(2): a CA in the chain sent; the path to it verifies; the name is checked."""

    def setUp(self) -> None:
        self.root = CA("root")
        self.inter = self.root.intermediate()

    def test_intermediate_as_anchor(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        for selector in (0, 1):
            r = record(2, selector, 1, self.inter.cert)
            self.assertIsNone(dane.problem([r], chain(server), ["mx.example.test"]), str(r))

    def test_root_in_the_chain_as_anchor(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        sent = [*chain(server), self.root.cert]
        self.assertIsNone(
            dane.problem([record(2, 0, 2, self.root.cert)], sent, ["mx.example.test"])
        )

    def test_anchor_not_in_the_chain_is_no_match(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        # The root's record, but the server sends only leaf and intermediate.
        problem = dane.problem(
            [record(2, 0, 1, self.root.cert)], chain(server), ["mx.example.test"]
        )
        assert problem is not None
        self.assertIn("no TLSA record matches", problem)

    def test_leaf_itself_is_not_an_anchor(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        problem = dane.problem([record(2, 0, 1, server.cert)], chain(server), ["mx.example.test"])
        self.assertIsNotNone(problem)

    def test_wrong_name(self) -> None:
        server = self.inter.issue(["other.example.test"])
        problem = dane.problem(
            [record(2, 1, 1, self.inter.cert)], chain(server), ["mx.example.test", "example.test"]
        )
        assert problem is not None
        self.assertIn("not valid for mx.example.test or example.test", problem)
        self.assertIn("other.example.test", problem)

    def test_next_hop_domain_is_a_reference_identifier(self) -> None:
        server = self.inter.issue(["example.test"])
        r = record(2, 1, 1, self.inter.cert)
        self.assertIsNone(dane.problem([r], chain(server), ["mx.example.test", "example.test"]))

    def test_wildcard_in_the_left_label(self) -> None:
        server = self.inter.issue(["*.example.test"])
        r = record(2, 1, 1, self.inter.cert)
        self.assertIsNone(dane.problem([r], chain(server), ["mx.example.test"]))
        self.assertIsNotNone(dane.problem([r], chain(server), ["a.mx.example.test"]))

    def test_expired_leaf(self) -> None:
        # Unlike DANE-EE, DANE-TA checks dates.
        server = self.inter.issue(["mx.example.test"], expired=True)
        problem = dane.problem(
            [record(2, 1, 1, self.inter.cert)], chain(server), ["mx.example.test"]
        )
        assert problem is not None
        self.assertIn("does not verify", problem)
        self.assertIn("expired", problem)

    def test_chain_not_signed_by_the_anchor(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        stranger = CA("stranger")
        # The server claims the stranger as its issuer's issuer.
        problem = dane.problem(
            [record(2, 0, 1, stranger.cert)], [server.cert, stranger.cert], ["mx.example.test"]
        )
        assert problem is not None
        self.assertIn("does not verify", problem)

    def test_ee_record_matching_wins_over_ta_failure(self) -> None:
        server = self.inter.issue(["other.test"], expired=True)
        records = [record(2, 1, 1, self.inter.cert), record(3, 1, 1, server.cert)]
        self.assertIsNone(dane.problem(records, chain(server), ["mx.example.test"]))


class PKIXTests(SynchronousTestCase):
    """pkix.check against a test CA: a good chain, a missing intermediate, an expired certificate or
    intermediate, self-signed, another CA, the wrong name, no certificate, the system store not
    trusting the test CA, a CA file of several CAs, and an unreadable CA file or one without
    certificates."""

    def setUp(self) -> None:
        self.root = CA("root")
        self.inter = self.root.intermediate()
        directory = self.mktemp()
        os.makedirs(directory)
        self.ca_file = self.root.write(os.path.join(directory, "ca.pem"))
        self.trust = pkix.TrustStore(self.ca_file)

    def test_good_chain(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        self.assertIsNone(pkix.check(chain(server), self.trust, ["mx.example.test"]))

    def test_missing_intermediate(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        problem = pkix.check([server.cert], self.trust, ["mx.example.test"])
        assert problem is not None
        self.assertIn("certificate not trusted: unable to get local issuer certificate", problem)

    def test_expired(self) -> None:
        server = self.inter.issue(["mx.example.test"], expired=True)
        problem = pkix.check(chain(server), self.trust, ["mx.example.test"])
        self.assertEqual(problem, "certificate not trusted: certificate has expired")

    def test_expired_intermediate(self) -> None:
        old = self.root.intermediate("old intermediate", expired=True)
        server = old.issue(["mx.example.test"])
        problem = pkix.check(chain(server), self.trust, ["mx.example.test"])
        assert problem is not None
        self.assertIn("certificate has expired (certificate 1 of the chain)", problem)

    def test_self_signed(self) -> None:
        server = self_signed(["mx.example.test"])
        problem = pkix.check(chain(server), self.trust, ["mx.example.test"])
        self.assertEqual(problem, "certificate not trusted: self-signed certificate")

    def test_other_ca(self) -> None:
        server = CA("elsewhere").issue(["mx.example.test"])
        problem = pkix.check(chain(server), self.trust, ["mx.example.test"])
        assert problem is not None
        self.assertIn("unable to get local issuer certificate", problem)

    def test_wrong_name(self) -> None:
        server = self.inter.issue(["mx2.example.test", "mail.example.test"])
        problem = pkix.check(chain(server), self.trust, ["mx.example.test"])
        self.assertEqual(
            problem,
            "the certificate is not valid for mx.example.test "
            "(its names: mx2.example.test, mail.example.test)",
        )

    def test_no_certificate(self) -> None:
        self.assertEqual(
            pkix.check([], self.trust, ["mx.example.test"]), "the server sent no certificate"
        )

    def test_system_store_does_not_trust_the_test_ca(self) -> None:
        server = self.inter.issue(["mx.example.test"])
        self.assertIsNotNone(pkix.check(chain(server), pkix.TrustStore(), ["mx.example.test"]))

    def test_bundle_of_several_cas(self) -> None:
        other = CA("second")
        bundle = os.path.join(os.path.dirname(self.ca_file), "bundle.pem")
        with open(bundle, "wb") as f:
            f.write(other.pem() + self.root.pem())
        trust = pkix.TrustStore(bundle)
        for issuer in (other, self.inter):
            server = issuer.issue(["mx.example.test"])
            self.assertIsNone(pkix.check(chain(server), trust, ["mx.example.test"]))

    def test_unreadable_ca_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            pkix.TrustStore(os.path.join(os.path.dirname(self.ca_file), "missing.pem"))
        self.assertIn("[delivery] ca_file: cannot read", str(caught.exception))

    def test_ca_file_without_certificates(self) -> None:
        path = os.path.join(os.path.dirname(self.ca_file), "empty.pem")
        with open(path, "w") as f:
            f.write("not a certificate\n")
        with self.assertRaises(ConfigError) as caught:
            pkix.TrustStore(path)
        self.assertIn("holds no PEM certificate", str(caught.exception))
