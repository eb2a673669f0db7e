"""DKIM signing (RFC 6376, RFC 8463) with dkimpy: the built-in C{dkim} plugin.

Where signing happens: at delivery, on the exact bytes sent (the
C{on_outbound} hook), not at submission.  The outbound client converts an
8-bit body to quoted-printable for a next hop without 8BITMIME, which
would break a signature made earlier; signing what is sent also covers
every header change made after submission.  The cost is one signature
per delivery transaction, done in the plugin's thread pool.

Keys: C{KEYS_DIR/DOMAIN/SELECTOR.key} ({[dkim] keys_dir}), written by
C{mtactl dkim keygen} (L{keygen}).  A PEM file is an RSA key
(rsa-sha256); a file holding 44 characters of base64 is an Ed25519 seed
(ed25519-sha256, the form dkimpy uses).  The signing domain is the domain
of the C{From:} address (what DMARC aligns with); a message is signed
once with each key of that domain (so an RSA and an Ed25519 key together
give the dual signature RFC 8463 recommends), and goes out unsigned,
logged, when the domain has no key.  Canonicalization is relaxed/relaxed.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mta.address import valid_domain
from mta.checks import PluginContext
from mta.envelope import Envelope
from mta.errors import ConfigError
from mta.interfaces import IOutboundHook

log = Logger(namespace="mta.checks.dkim")

SIGNED = [
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding", "sender",
    "list-unsubscribe", "list-unsubscribe-post",
]  # fmt: skip
OVERSIGNED = ["from", "subject", "to", "cc", "date", "reply-to"]
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_FIELD = re.compile(rb"^([!-9;-~]+):", re.M)


@dataclass(frozen=True)
class Options:
    headers: list[str] = field(default_factory=lambda: list(SIGNED))
    oversign: list[str] = field(default_factory=lambda: list(OVERSIGNED))


@dataclass(frozen=True)
class Key:
    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # as dkimpy takes it


def valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.match(selector)) and len(selector) <= 63


def domain_dir(keys_dir: str, domain: str) -> str:
    return os.path.join(keys_dir, domain.lower().rstrip("."))


def read_key(path: str) -> Key:
    """One key file; ValueError if it is neither an RSA PEM nor an Ed25519 seed."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    selector = os.path.basename(path).removesuffix(".key")
    if data.lstrip().startswith(b"-----BEGIN"):
        return Key(selector, b"rsa-sha256", data)
    text = data.strip()
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ValueError(f"{path}: neither a PEM RSA key nor a base64 Ed25519 seed")
    return Key(selector, b"ed25519-sha256", text)


def signing_domain(domain: str) -> str | None:
    """C{domain} as a key directory name and C{d=} value: lower-case ASCII
    (A-labels for an internationalized name), or None when it is not a
    host name (nothing that could name a path outside C{keys_dir})."""
    domain = domain.strip().lower().rstrip(".")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return None
    if domain.startswith("[") or not valid_domain(domain, utf8=False):
        return None
    if "/" in domain or "\\" in domain or domain in (".", ".."):  # implied; stated
        return None
    return domain


def domain_keys(keys_dir: str, domain: str) -> list[Key]:
    """Every key of a domain, by selector; [] when it has none."""
    directory = domain_dir(keys_dir, domain)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
    except FileNotFoundError:
        return []
    return [read_key(os.path.join(directory, n)) for n in names]


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) C{From:} address in the header section."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    value: bytes | None = None
    for m in _FIELD.finditer(head):
        if m.group(1).lower() == b"from":
            rest = head[m.end() :]
            stop = re.search(rb"\r\n(?![ \t])", rest)
            value = rest[: stop.start() if stop else len(rest)]
            break
    if value is None:
        return None
    text = value.decode("utf-8", "replace").replace("\r\n", "")
    for _, address in email.utils.getaddresses([text]):
        if "@" in address:
            return address.rpartition("@")[2].lower().rstrip(">").strip() or None
    return None


def include_headers(message: bytes, headers: list[str], oversign: list[str]) -> list[bytes]:
    """The h= list: each configured field as often as it occurs, plus one more
    for the oversigned ones (an absent field signed is one that cannot be added)."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    present = [m.group(1).lower() for m in _FIELD.finditer(head)]
    wanted = {h.lower().encode() for h in headers}
    out = [name for name in present if name in wanted]
    out += [h.lower().encode() for h in oversign]
    if b"from" not in out:
        out.append(b"from")
    return out


def sign(message: bytes, domain: str, keys: list[Key], headers: list[bytes]) -> bytes:
    """The DKIM-Signature fields for C{message}, one per key, CRLF-terminated."""
    out = b""
    for key in keys:
        out += dkim.sign(
            message,
            key.selector.encode(),
            domain.encode(),
            key.private,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm,
            include_headers=headers,
            linesep=b"\r\n",
        )
    return out


@implementer(IOutboundHook)
class DKIMSigner:
    name = "dkim"

    def __init__(self, options: Options, keys_dir: str, runner: Any) -> None:
        self.options = options
        self.keys_dir = keys_dir
        self.runner = runner

    def _sign(self, envelope: Envelope, data: bytes) -> bytes:
        domain = from_domain(data)
        if domain is None:
            log.info("{qid}: not DKIM-signed: no From: domain", qid=envelope.queue_id)
            return b""
        checked = signing_domain(domain)
        if checked is None:
            log.info(
                "{qid}: not DKIM-signed: From: domain {domain!r} is not a valid domain name",
                qid=envelope.queue_id,
                domain=domain,
            )
            return b""
        domain = checked
        keys = domain_keys(self.keys_dir, domain)
        if not keys:
            log.info(
                "{qid}: not DKIM-signed: no key for {domain} in {dir}",
                qid=envelope.queue_id,
                domain=domain,
                dir=self.keys_dir,
            )
            return b""
        headers = include_headers(data, self.options.headers, self.options.oversign)
        return sign(data, domain, keys, headers)

    def on_outbound(self, envelope: Envelope, data: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = self.runner(lambda: self._sign(envelope, data))
        return d


def make(options: Options, context: PluginContext) -> DKIMSigner:
    where = f"{context.source}: [plugins.dkim.options]"
    forbidden = {h.decode() for h in dkim.DKIM.SHOULD_NOT}
    for key in ("headers", "oversign"):
        for name in getattr(options, key):
            if not re.fullmatch(r"[!-9;-~]+", name):
                raise ConfigError(f"{where} {key}: {name!r} is not a header field name")
            if name.lower() in forbidden:
                raise ConfigError(f"{where} {key}: {name!r} should not be signed (RFC 6376 5.4)")
    if "from" not in {h.lower() for h in options.headers}:
        raise ConfigError(f"{where} headers: From must be signed (RFC 6376 section 5.4)")
    return DKIMSigner(options, context.dkim_keys_dir, context.runner)


# -- key generation (mtactl dkim keygen) --------------------------------------


def txt_record(selector: str, domain: str, algorithm: str, public: bytes) -> str:
    """The DNS TXT record in zone-file form, split in strings of at most 255."""
    value = f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode()}"
    parts = [value[i : i + 255] for i in range(0, len(value), 255)]
    strings = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def keygen(keys_dir: str, domain: str, selector: str, kind: str) -> tuple[str, str]:
    """Write a new key (0600) and return its path and its DNS TXT record.

    Refuses to overwrite an existing key (FileExistsError).
    """
    directory = domain_dir(keys_dir, domain)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{selector}.key")
    if kind == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        seed = ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = base64.b64encode(seed) + b"\n"
        public = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    install_key(path, private)
    return path, txt_record(selector, domain, kind, public)


def install_key(path: str, private: bytes) -> None:
    """Put C{private} at C{path} whole or not at all, never replacing a file.

    The daemon reads keys at each signing, so the key is written to a
    temporary file (0600, not named C{*.key}) in the same directory,
    synced, then hard-linked into place: the link fails with
    FileExistsError if a key is there, and the key appears complete.
    """
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keygen-", suffix=".tmp")
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
