"""DANE for SMTP (RFC 7672): which TLSA records count, and whether a chain matches them.

Only TLSA records from a DNSSEC-validated answer for an MX host that was
itself found securely are looked at (L{mta.delivery.tlspolicy} decides
that); this module is the pure part, on records and certificates:

  - L{usable}: of the published records, those an SMTP client may use
    (RFC 7672 section 3.1): DANE-EE(3) and DANE-TA(2), selector Cert(0)
    or SPKI(1), matching type Full(0), SHA2-256(1) or SHA2-512(2), with
    data of the right length.  PKIX-TA(0) and PKIX-EE(1) are unusable
    for SMTP (section 3.1.3), as are unknown values (RFC 6698 section
    4.1).  Of digest records for the same usage and selector, only the
    strongest matching type present is kept (RFC 7671 section 9), so a
    weak digest cannot stand in for a strong one.
  - L{problem}: None when the server's chain matches, else why not.
    DANE-EE(3) matches the server's own certificate or key and ignores
    its names and dates (RFC 7672 section 3.1.1: the DNS is the
    authority).  DANE-TA(2) matches a CA certificate in the chain the
    server sent; the chain from the server certificate to it must verify
    (signatures and dates), and the server certificate must name the
    TLSA base domain (the MX host) or the next-hop domain (sections 3.1.2
    and 3.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from mta.delivery.dns import TLSARecord
from mta.delivery.pkix import name_problem

# Certificate usages (RFC 7218 names)
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
# Selectors
CERT, SPKI = 0, 1
# Matching types
FULL, SHA2_256, SHA2_512 = 0, 1, 2

_DIGEST_SIZES = {SHA2_256: 32, SHA2_512: 64}


def tlsa_name(host: str, port: int = 25) -> str:
    """The owner name of a server's TLSA records, C{_25._tcp.mx.example.com} (RFC 6698 3)."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


def usable(records: Sequence[TLSARecord]) -> tuple[TLSARecord, ...]:
    """The records an SMTP client may use, in their order (see the module docstring)."""
    candidates = [r for r in records if _well_formed(r)]
    strongest: dict[tuple[int, int], int] = {}
    for r in candidates:
        if r.mtype != FULL:
            key = (r.usage, r.selector)
            strongest[key] = max(strongest.get(key, 0), r.mtype)
    return tuple(
        r for r in candidates if r.mtype == FULL or r.mtype == strongest[(r.usage, r.selector)]
    )


def _well_formed(record: TLSARecord) -> bool:
    """A DANE usage, a known selector, and data that fits the matching type."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in (CERT, SPKI):
        return False
    if record.mtype == FULL:
        return bool(record.data)
    return _DIGEST_SIZES.get(record.mtype) == len(record.data)


def _selected(certificate: x509.Certificate, selector: int) -> bytes:
    if selector == CERT:
        return certificate.public_bytes(serialization.Encoding.DER)
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def matches(record: TLSARecord, certificate: x509.Certificate) -> bool:
    """Whether C{record}'s association data is this certificate's (RFC 6698 section 2.1)."""
    data = _selected(certificate, record.selector)
    if record.mtype == SHA2_256:
        data = hashlib.sha256(data).digest()
    elif record.mtype == SHA2_512:
        data = hashlib.sha512(data).digest()
    return data == record.data


def problem(
    records: Sequence[TLSARecord], chain: Sequence[x509.Certificate], names: Sequence[str]
) -> str | None:
    """None if C{chain} (the server's, leaf first) is authenticated by C{records}.

    C{records} are usable ones (L{usable}); C{names} the reference
    identifiers for DANE-TA(2): the TLSA base domain first, then the
    next-hop domain.
    """
    if not chain:
        return "the server sent no certificate"
    leaf = chain[0]
    if any(r.usage == DANE_EE and matches(r, leaf) for r in records):
        return None
    anchors = [r for r in records if r.usage == DANE_TA]
    failures = []
    for depth in range(1, len(chain)):
        if not any(matches(r, chain[depth]) for r in anchors):
            continue
        why = _chain_problem(chain, depth)
        if why is None:
            return name_problem(leaf, names)
        failures.append(why)
    if failures:
        return f"the chain to the DANE-TA(2) trust anchor does not verify: {failures[0]}"
    shown = ", ".join(str(r) for r in records[:4]) + (", ..." if len(records) > 4 else "")
    return f"no TLSA record matches the certificate chain (TLSA {shown})"


def _chain_problem(chain: Sequence[x509.Certificate], depth: int) -> str | None:
    """Whether the leaf chains up to C{chain[depth]}, taken as the only trust anchor.

    C{PARTIAL_CHAIN} lets an intermediate CA be the anchor, which is what
    a DANE-TA(2) record for an issuing CA means.  Dates are checked here
    (unlike DANE-EE).
    """
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(chain[depth]))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    leaf = crypto.X509.from_cryptography(chain[0])
    between = [crypto.X509.from_cryptography(c) for c in chain[1:depth]]
    try:
        crypto.X509StoreContext(store, leaf, between).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return None
