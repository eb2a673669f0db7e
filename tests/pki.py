"""A test PKI: a CA that issues the certificates the TLS policy tests need.

L{CA} is a root (or, from L{CA.intermediate}, an intermediate) CA
with an EC P-256 key; L{CA.issue} makes a server certificate for some
names, valid now or already expired; L{self_signed} makes one that is its
own issuer.  L{Issued.write} puts the certificate (with its chain) and the
key in PEM files for L{mta.tls.ServerTLS}, so that a real loopback server
presents them over real TLS.

    ca = CA()
    good = ca.issue(["mx.example.test"])
    expired = ca.issue(["mx.example.test"], expired=True)
    wrong = ca.issue(["other.example.test"])
    alone = self_signed(["mx.example.test"])
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    """A certificate, its key, and the CA certificates above it (not the root)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    def pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain]
        )

    def write(self, directory: str, stem: str) -> tuple[str, str]:
        """Write C{stem}.pem (leaf, then chain) and C{stem}.key; returns both paths."""
        os.makedirs(directory, exist_ok=True)
        cert_path = os.path.join(directory, f"{stem}.pem")
        key_path = os.path.join(directory, f"{stem}.key")
        with open(cert_path, "wb") as f:
            f.write(self.pem())
        with open(key_path, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return cert_path, key_path


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, *, expired: bool, days: int
) -> x509.CertificateBuilder:
    now = _now()
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _server_extensions(
    builder: x509.CertificateBuilder, names: list[str]
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )


class CA:
    """A CA for tests; its certificate is what a client is told to trust."""

    def __init__(
        self,
        name: str = "mta test CA",
        *,
        parent: CA | None = None,
        expired: bool = False,
    ) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        issuer_key = parent.key if parent is not None else self.key
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer = parent.cert.subject if parent is not None else subject
        builder = _builder(name, issuer, self.key, expired=expired, days=3650)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(_ca_usage(), critical=True)
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert = builder.sign(issuer_key, hashes.SHA256())
        # The CA certificates between an issued certificate and the root.
        self.chain: list[x509.Certificate] = (
            [self.cert, *parent.chain] if parent is not None else []
        )

    def intermediate(self, name: str = "mta test intermediate CA", **kw: bool) -> CA:
        return CA(name, parent=self, **kw)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: str) -> str:
        with open(path, "wb") as f:
            f.write(self.pem())
        return path

    def issue(self, names: list[str], *, expired: bool = False, days: int = 30) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(names[0], self.cert.subject, key, expired=expired, days=days)
        builder = _server_extensions(builder, names).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            critical=False,
        )
        return Issued(builder.sign(self.key, hashes.SHA256()), key, list(self.chain))


def self_signed(names: list[str], *, expired: bool = False) -> Issued:
    """A server certificate that is its own issuer (no CA will vouch for it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = _server_extensions(_builder(names[0], subject, key, expired=expired, days=30), names)
    return Issued(builder.sign(key, hashes.SHA256()), key)
