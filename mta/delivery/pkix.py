"""Checking a next hop's certificate chain the PKIX way: trusted CA, validity, name.

MTA-STS (RFC 8461 section 4.2) and C{tls = "verify"} want what a browser
wants: a chain from the server's certificate to a CA the sender trusts,
every certificate within its validity period, and a C{subjectAltName}
DNS-ID that matches the MX host name by the rules of RFC 6125 (a
wildcard only as the whole left-most label).

The check runs after the TLS handshake, on the chain the server sent
(L{mta.smtp.client.OutboundConnection} waits for the handshake and asks a
L{mta.smtp.client.PeerCheck} before it says anything else), rather than
inside OpenSSL's handshake.  That way a failure gets a reply that says
what was wrong ("certificate has expired") instead of a bare handshake
alert, and a policy in C{testing} mode can run the same check and only
log it.  OpenSSL still does the chain building and the signature and
date checks (C{X509StoreContext}); L{service_identity} does the name.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

from mta.errors import ConfigError


class TrustStore:
    """The CA certificates a next hop's chain must lead to.

    @param ca_file: a PEM file of CA certificates (one or many); None for
        the system's (OpenSSL's default file and directory, which on
        Debian are C{/etc/ssl/certs/ca-certificates.crt} and
        C{/etc/ssl/certs}).
    @raise ConfigError: when C{ca_file} cannot be read or holds no
        certificate.
    """

    def __init__(self, ca_file: str | None = None) -> None:
        self.ca_file = ca_file
        store = crypto.X509Store()
        if ca_file:
            try:
                with open(ca_file, "rb") as f:
                    pem = f.read()
            except OSError as e:
                raise ConfigError(
                    f"[delivery] ca_file: cannot read {ca_file}: {e.strerror}"
                ) from None
            try:
                certificates = x509.load_pem_x509_certificates(pem)
            except ValueError:
                raise ConfigError(
                    f"[delivery] ca_file: {ca_file} holds no PEM certificate"
                ) from None
            for certificate in certificates:
                store.add_cert(crypto.X509.from_cryptography(certificate))
            self.certificates: tuple[x509.Certificate, ...] = tuple(certificates)
        else:
            paths = ssl.get_default_verify_paths()
            cafile = paths.cafile if paths.cafile and os.path.isfile(paths.cafile) else None
            capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
            if cafile or capath:
                store.load_locations(cafile, capath)
            self.certificates = ()
        self._store = store

    def trust_root(self) -> Any:
        """The same CAs for Twisted's TLS (the HTTPS fetch of MTA-STS policies)."""
        if self.certificates:
            return trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(c)) for c in self.certificates]
            )
        return platformTrust()

    def problem(self, chain: Sequence[x509.Certificate]) -> str | None:
        """None if C{chain} (leaf first) leads to a trusted CA and is in date, else why not."""
        if not chain:
            return "the server sent no certificate"
        leaf, *rest = (crypto.X509.from_cryptography(c) for c in chain)
        try:
            crypto.X509StoreContext(self._store, leaf, rest).verify_certificate()
        except crypto.X509StoreContextError as e:
            depth = e.errors[1] if len(e.errors) > 1 else 0
            where = "" if depth == 0 else f" (certificate {depth} of the chain)"
            return f"certificate not trusted: {e}{where}"
        return None


def name_problem(certificate: x509.Certificate, names: Sequence[str]) -> str | None:
    """None if C{certificate} has a DNS-ID for one of C{names} (RFC 6125), else why not.

    Only the C{subjectAltName} counts, as RFC 8461 section 4.2 says for
    MTA-STS ("The certificate MUST have a subject alternative name (SAN)
    with a DNS-ID matching the hostname"); the CN is never looked at.
    """
    for name in names:
        try:
            verify_certificate_hostname(certificate, name)
        except (VerificationError, CertificateError):
            continue
        return None
    wanted = " or ".join(names)
    return f"the certificate is not valid for {wanted} (its names: {_names(certificate)})"


def _names(certificate: x509.Certificate) -> str:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = san.value.get_values_for_type(x509.DNSName)
    if not names:
        return "no DNS name"
    shown = ", ".join(names[:5])
    return shown + (", ..." if len(names) > 5 else "")


def check(chain: Sequence[x509.Certificate], trust: TrustStore, names: Sequence[str]) -> str | None:
    """The PKIX check in one call: trusted chain, then the leaf's name."""
    problem = trust.problem(chain)
    if problem is not None:
        return problem
    return name_problem(chain[0], names)
