"""Server TLS: certificate loading, a self-signed default, reload on SIGHUP.

L{ServerTLS} is what both listeners hand to Twisted's TLS layer.  It holds
one OpenSSL context; L{ServerTLS.reload} builds a new one from the files and
swaps it in, so new connections get the new certificate while established
ones keep theirs (a renewed certificate needs no restart and drops nothing).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from mta.errors import ConfigError

log = Logger(namespace="mta.tls")


@dataclass(frozen=True)
class CertificateInfo:
    path: str
    subject: str
    not_after: datetime.datetime
    sha256: str  # colon-separated upper-case hex, as browsers show it


def fingerprint(cert: x509.Certificate) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _read_pem_chain(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"[tls] certificate: cannot read {path}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"[tls] certificate: {path} holds no PEM certificate") from None
    return chain


def _read_key(path: str) -> PrivateKeyTypes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"[tls] key: cannot read {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"[tls] key: {path} holds no unencrypted PEM private key") from None
    return key


def build_context(cert_path: str, key_path: str) -> tuple[SSL.Context, CertificateInfo]:
    """An OpenSSL server context for TLS 1.2+ with Twisted's modern ciphers."""
    chain = _read_pem_chain(cert_path)
    key = _read_key(key_path)
    leaf, *intermediates = chain
    try:
        # pyOpenSSL takes cryptography's objects directly; Twisted's
        # annotations still name the older pyOpenSSL types.
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=leaf,  # type: ignore[arg-type]
            extraCertChain=intermediates,  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        context = options.getContext()
    except (SSL.Error, ValueError) as e:
        raise ConfigError(f"[tls] the key {key_path} does not fit {cert_path}: {e}") from None
    info = CertificateInfo(
        path=cert_path,
        subject=chain[0].subject.rfc4514_string(),
        not_after=chain[0].not_valid_after_utc,
        sha256=fingerprint(chain[0]),
    )
    return context, info


def ensure_selfsigned(directory: str, hostname: str) -> tuple[str, str]:
    """Create (once) a self-signed certificate for C{hostname} and loopback.

    The certificate is its own CA (basicConstraints CA:TRUE), so clients can
    trust it by passing the same file as their CA file.  Returns the
    certificate and key paths.
    """
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_tmp, cert_tmp = key_path + ".tmp", cert_path + ".tmp"
    fd = os.open(key_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_tmp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.rename(key_tmp, key_path)
    os.rename(cert_tmp, cert_path)
    log.info(
        "generated a self-signed certificate {path} for {host} (SHA-256 {fp})",
        path=cert_path,
        host=hostname,
        fp=fingerprint(cert),
    )
    return cert_path, key_path


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side of TLS for every listener, reloadable in place."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.context, self.info = build_context(cert_path, key_path)

    def reload(self) -> CertificateInfo:
        """Re-read the files; on error keep the old context and raise ConfigError."""
        self.context, self.info = build_context(self.cert_path, self.key_path)
        return self.info

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def describe_connection(connection: object) -> str | None:
    """C{"TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"} for an established TLS handle."""
    if not isinstance(connection, SSL.Connection):
        return None
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    bits = connection.get_cipher_bits()
    if cipher is None:
        return None
    return f"{version} {cipher} ({bits} bits)"
