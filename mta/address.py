"""Envelope address and ESMTP parameter syntax (RFC 5321 section 4.1.2).

Everything here is pure: strings in, values or L{SMTPReplyError} out.  The
reply codes follow RFC 3463/5321 so a client can tell which part of its
command was wrong.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from mta.errors import Reply, SMTPReplyError

MAX_LOCAL_PART = 64  # RFC 5321 section 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 section 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 section 4.5.3.1.3
MAX_ENVID = 100  # RFC 3461 section 4.4

# atext of RFC 5322 section 3.2.3; RFC 6531 adds every non-ASCII character.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_ATEXT_UTF8 = re.compile(r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LDH_UTF8 = r"(?:[A-Za-z0-9]|[^\x00-\x7f])"
_ULABEL = re.compile(rf"{_LDH_UTF8}(?:(?:{_LDH_UTF8}|-)*{_LDH_UTF8})?")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def _syntax(enhanced: str, text: str, code: int = 501) -> SMTPReplyError:
    return SMTPReplyError(Reply(code, enhanced, text))


@dataclass(frozen=True)
class Mailbox:
    """A parsed mailbox: the local part exactly as given, the domain as given."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def ascii(self) -> bool:
        return str(self).isascii()


def _is_dot_string(local: str, utf8: bool) -> bool:
    atom = _ATEXT_UTF8 if utf8 else _ATEXT
    return all(atom.fullmatch(part) for part in local.split("."))


def _is_quoted_string(local: str, utf8: bool) -> bool:
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    i, inner = 0, local[1:-1]
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            if i + 1 >= len(inner) or not (32 <= ord(inner[i + 1]) <= 126):
                return False
            i += 2
            continue
        if ch == '"' or (ord(ch) < 32 or ord(ch) == 127) or (not utf8 and ord(ch) > 126):
            return False
        i += 1
    return True


def valid_domain(domain: str, *, utf8: bool = False) -> bool:
    """True for an RFC 5321 C{Domain} or address literal (U-labels with SMTPUTF8)."""
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _valid_address_literal(domain)
    label = _ULABEL if utf8 else _LABEL
    labels = domain.split(".")
    return all(label.fullmatch(lbl) and len(lbl.encode("utf-8")) <= 63 for lbl in labels)


def _valid_address_literal(literal: str) -> bool:
    if not literal.endswith("]"):
        return False
    inner = literal[1:-1]
    if "%" in inner:  # a zone index means nothing to another host
        return False
    try:
        if inner.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_mailbox(text: str, *, utf8: bool) -> Mailbox:
    """Parse C{Local-part "@" Domain}; raise L{SMTPReplyError} (501/553) if bad.

    C{utf8} allows RFC 6531 internationalised addresses (the client sent the
    SMTPUTF8 parameter).
    """
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1:
        raise _syntax("5.1.3", "Address must be of the form local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _syntax("5.1.3", "Local part of address is longer than 64 octets")
    if not text.isascii() and not utf8:
        raise SMTPReplyError(
            Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
        )
    if not (_is_dot_string(local, utf8) or _is_quoted_string(local, utf8)):
        raise _syntax("5.1.3", "Bad local part syntax in address")
    if not valid_domain(domain, utf8=utf8):
        raise _syntax("5.1.3", "Bad domain syntax in address")
    return Mailbox(local, domain)


def split_path(args: str, prefix: str) -> tuple[str, str]:
    """Split C{"FROM:<path> params"} into the path (without brackets) and params.

    A space between the colon and the bracket is tolerated, as most servers
    do; the angle brackets themselves are required (RFC 5321 section 4.1.2).
    A C{>} inside a quoted local part does not end the path.
    """
    if not args[: len(prefix)].upper() == prefix:
        raise _syntax("5.5.4", f"Syntax: {prefix}<address>")
    rest = args[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        raise _syntax("5.5.4", f"Syntax: {prefix}<address> (angle brackets are required)")
    quoted = False
    i = 1
    while i < len(rest):
        ch = rest[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise _syntax("5.5.4", "Missing closing angle bracket")
    path, params = rest[1:i], rest[i + 1 :]
    if params and not params.startswith(" "):
        raise _syntax("5.5.4", "Parameters must be separated from the address by a space")
    if len(path.encode("utf-8")) + 2 > MAX_PATH:  # the brackets count too
        raise _syntax("5.1.3", "Address is longer than 256 octets")
    if path.startswith("@"):
        # An RFC 5321 source route (A-d-l).  We never relay on a route's say.
        raise SMTPReplyError(Reply(553, "5.1.3", "Source routes are not accepted"))
    return path, params.strip(" ")


def parse_params(text: str, *, utf8: bool = False) -> dict[str, str | None]:
    """Parse ESMTP parameters into an upper-cased keyword → value mapping.

    A repeated keyword is a syntax error (RFC 5321 section 4.1.2 makes them
    unique by implication; RFC 3461 explicitly).
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise _syntax("5.5.4", f"Bad parameter syntax: {item[:40]}")
        if eq and (not value or any(c == "=" or ord(c) < 33 or ord(c) == 127 for c in value)):
            raise _syntax("5.5.4", f"Bad value for parameter {key.upper()}")
        if eq and not value.isascii() and not utf8:
            raise _syntax("5.5.4", f"Non-ASCII value for parameter {key.upper()}")
        key = key.upper()
        if key in params:
            raise _syntax("5.5.4", f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 section 4 xtext (C{+XX} hex escapes of octets).

    The octets are read as UTF-8, so a value L{xtext_encode} made from any
    string comes back unchanged.
    """
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hexpart = value[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in "0123456789ABCDEFabcdef" for c in hexpart):
                raise _syntax("5.5.4", "Bad xtext encoding")
            out.append(int(hexpart, 16))
            i += 3
            continue
        if not (33 <= ord(ch) <= 126) or ch == "=":
            raise _syntax("5.5.4", "Bad xtext encoding")
        out.append(ord(ch))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _syntax("5.5.4", "xtext does not decode to UTF-8") from None


def xtext_encode(value: str) -> str:
    """Encode a string as RFC 3461 xtext (non-ASCII as escaped UTF-8 octets)."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in b"+=" else f"+{b:02X}" for b in value.encode("utf-8")
    )


NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_notify(value: str | None) -> tuple[str, ...]:
    """Parse RFC 3461 section 4.1 NOTIFY: C{NEVER} or a list of conditions."""
    if not value:
        raise _syntax("5.5.4", "NOTIFY needs a value")
    items = [v.upper() for v in value.split(",")]
    if items == ["NEVER"]:
        return ("NEVER",)
    if len(set(items)) != len(items) or not set(items) <= NOTIFY_VALUES:
        raise _syntax("5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return tuple(sorted(items))


def parse_orcpt(value: str | None) -> str:
    """Parse RFC 3461 section 4.2 ORCPT into C{"type;address"} (xtext decoded)."""
    if not value or ";" not in value:
        raise _syntax("5.5.4", "ORCPT must be addr-type;address")
    addr_type, _, xtext = value.partition(";")
    if not _ATEXT.fullmatch(addr_type) or not xtext:
        raise _syntax("5.5.4", "ORCPT must be addr-type;address")
    decoded = xtext_decode(xtext)
    if len(decoded) > 500:
        raise _syntax("5.5.4", "ORCPT too long")
    return f"{addr_type.lower()};{decoded}"


def parse_envid(value: str | None) -> str:
    """Parse RFC 3461 section 4.4 ENVID (xtext, at most 100 characters)."""
    if not value:
        raise _syntax("5.5.4", "ENVID needs a value")
    decoded = xtext_decode(value)
    if len(decoded) > MAX_ENVID:
        raise _syntax("5.5.4", "ENVID is longer than 100 characters")
    if not decoded.isprintable() or not decoded.isascii():
        raise _syntax("5.5.4", "ENVID must be printable ASCII")
    return decoded


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only.

    C{str.lower} folds some non-ASCII letters into ASCII ones (KELVIN SIGN
    U+212A becomes "k"), which would let a look-alike address match a real
    one; non-ASCII characters must match exactly.
    """
    return text.translate(_ASCII_LOWER)


def normalize_for_alignment(address: str) -> str:
    """The form in which addresses are compared for sender alignment.

    ASCII case-insensitive (mailbox names are case-insensitive in practice
    at every provider this serves); nothing else is changed.
    """
    return ascii_lower(address)


def domain_of(address: str) -> str:
    """The domain part of an address, ASCII lower-cased (no IDNA conversion)."""
    return ascii_lower(address.rpartition("@")[2])


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: list[str]) -> tuple[Network, ...]:
    """Networks from configuration text ("127.0.0.1/32", "2001:db8::/64", "::1")."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


@functools.lru_cache(maxsize=4096)  # once per connection: the same few clients
def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address parsed, an IPv4-mapped IPv6 one as IPv4; None if it is none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether an IP address (IPv4-mapped IPv6 counts as IPv4) is in any network."""
    ip = client_ip(address)
    return ip is not None and any(ip in net for net in networks)
