"""Host names and next-hop specifications: syntax only (no DNS, no Twisted).

Shared by the configuration (which checks C{[routes]} when it is read) and
delivery (L{mta.delivery.mx}), so that neither imports the other.
"""

from __future__ import annotations

import ipaddress
import re

import dns.exception
import dns.name

_LABEL = re.compile(rb"[a-z0-9_-]+", re.IGNORECASE)


def is_ip(text: str, family: str | None = None) -> bool:
    """Whether C{text} is an IP address (of C{family} "A" or "AAAA" when given)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return family is None or ("A" if address.version == 4 else "AAAA") == family


def to_ascii(domain: str) -> str:
    """The ASCII form of a domain: A-labels, lower-case, no trailing dot.

    UTF-8 domains (from SMTPUTF8 mail, RFC 6531 section 3.2) are converted
    with IDNA2008 and the UTS #46 mapping, as browsers and Postfix do
    (dnspython's C{IDNA_2008_Practical}).  Raises C{ValueError} for a name
    that cannot be a host name in the DNS: empty, too long (RFC 1035
    section 2.3.4), or with characters other than letters, digits,
    hyphen and underscore.
    """
    try:
        name = dns.name.from_text(domain.strip(), idna_codec=dns.name.IDNA_2008_Practical)
    except (dns.exception.DNSException, ValueError, UnicodeError) as e:
        raise ValueError(f"{domain!r} is not a valid domain name: {e}") from None
    if name == dns.name.root:
        raise ValueError(f"{domain!r} is not a valid domain name: it is empty")
    for label in name.labels[:-1]:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{domain!r} is not a valid domain name: bad characters")
    return str(name.to_text(omit_final_dot=True)).lower()


def parse_address_literal(literal: str) -> str:
    """The IP address of an RFC 5321 section 4.1.3 address literal.

    C{"[192.0.2.1]"} gives C{"192.0.2.1"}, C{"[IPv6:2001:DB8::1]"} gives
    C{"2001:db8::1"}.  Raises C{ValueError} for anything else, including
    the general address literals (C{[tag:...]}) that no one implements.
    """
    if not (literal.startswith("[") and literal.endswith("]")):
        raise ValueError(f"{literal!r} is not an address literal")
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        if ":" in inner:
            raise ValueError("only IPv4 and IPv6 address literals are supported")
        return str(ipaddress.IPv4Address(inner))
    except ValueError as e:
        raise ValueError(f"bad address literal {literal!r}: {e}") from None


def parse_relay(spec: str) -> tuple[str, int, bool]:
    """Parse a relay in Postfix's relayhost syntax; returns (host, port, mx_lookup).

    - C{"[host]:port"} or C{"[host]"}: connect to C{host} itself, no MX
      lookup (mx_lookup is False);
    - C{"host:port"} or C{"host"}: deliver to the MX hosts of C{host}
      (mx_lookup is True);
    - C{"[192.0.2.1]:2525"}, C{"[IPv6:2001:db8::1]:25"} (or
      C{"[2001:db8::1]"}): that address; a bare IPv4 address works
      too.  IPv6 addresses must be in brackets, or the port would be
      ambiguous.

    The port defaults to 25.  The host comes back in ASCII form
    (L{to_ascii}), or as the bare IP address.  Raises C{ValueError} with a
    message that says what is wrong.
    """
    text = spec.strip()
    if not text:
        raise ValueError("relay is empty")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"relay {spec!r}: missing ']'")
        inner, rest, mx_lookup = text[1:end], text[end + 1 :], False
        if not inner:
            raise ValueError(f"relay {spec!r}: empty host in brackets")
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
            if not is_ip(inner, "AAAA"):
                raise ValueError(f"relay {spec!r}: {inner!r} is not an IPv6 address")
    else:
        if text.count(":") > 1:
            raise ValueError(f"relay {spec!r}: write an IPv6 address as [IPv6:address]:port")
        inner, colon, port_text = text.partition(":")
        rest = colon + port_text
        mx_lookup = not is_ip(inner)
        if not inner:
            raise ValueError(f"relay {spec!r}: no host")
    if rest == "":
        port = 25
    elif rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii():
        port = int(rest[1:])
        if not 1 <= port <= 65535:
            raise ValueError(f"relay {spec!r}: port {port} is out of range 1-65535")
    else:
        raise ValueError(f"relay {spec!r}: expected ':port' after the host, not {rest!r}")
    if is_ip(inner):
        return str(ipaddress.ip_address(inner)), port, False
    try:
        host = to_ascii(inner)
    except ValueError as e:
        raise ValueError(f"relay {spec!r}: {e}") from None
    return host, port, mx_lookup


def check_relay(spec: str) -> str | None:
    """None if C{spec} is a valid relay, else what is wrong with it."""
    try:
        parse_relay(spec)
    except ValueError as e:
        return str(e)
    return None
