"""What a message needs from the next hop, and the 8-bit to 7-bit downgrade.

RFC 6152 section 3: a message with 8-bit content may only be relayed to a
server that offers 8BITMIME, unless it is converted to 7 bit first.  The
conversion re-encodes each 8-bit MIME leaf part as quoted-printable (text)
or base64 (anything else) and leaves the rest of the message as it was.
Raw 8-bit header fields cannot be converted without changing their
meaning, so such a message is refused for a 7-bit server (RFC 6531
section 3.2 treats the SMTPUTF8 case the same way).
"""

from __future__ import annotations

import email.encoders
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from io import BytesIO
from typing import IO

CHUNK = 1 << 20


class DowngradeError(Exception):
    """The message cannot be made 7-bit without changing its meaning."""


def is_8bit_file(f: IO[bytes]) -> bool:
    """Whether any octet of the file is above 127."""
    while chunk := f.read(CHUNK):
        if not chunk.isascii():
            return True
    return False


def header_section(message: bytes) -> bytes:
    """The header section of a message, up to and including its last CRLF.

    RFC 5322 section 2.1: the header ends at the first empty line.  A
    message without one is all header.
    """
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def read_header_section(f: IO[bytes], limit: int = 1 << 20) -> bytes:
    """The header section of a stored message (L{header_section}), reading at most C{limit}."""
    head = b""
    while len(head) < limit:
        chunk = f.read(65536)
        if not chunk:
            break
        head += chunk
        if head.startswith(b"\r\n") or b"\r\n\r\n" in head:
            break
    return header_section(head[:limit])


def needs_smtputf8(sender: str, recipients: list[str], header: bytes) -> bool:
    """RFC 6531: UTF-8 in an envelope address or in the header section."""
    return not (sender.isascii() and all(r.isascii() for r in recipients) and header.isascii())


_POLICY = policy.compat32.clone(linesep="\r\n", max_line_length=0)


def downgrade_8bit(data: bytes) -> bytes:
    """A 7-bit form of a message with 8-bit body content (RFC 6152, RFC 2045)."""
    head_end = data.find(b"\r\n\r\n")
    head = data if head_end < 0 else data[:head_end]
    if not head.isascii():
        raise DowngradeError("the header section has 8-bit characters")
    msg = BytesParser(policy=_POLICY).parsebytes(data)
    if msg.get_content_maintype() == "multipart" or msg.get("Content-Type"):
        for part in msg.walk():
            if not part.is_multipart():
                _encode_part(part)
    else:
        # Not MIME: an 8-bit text body in an unknown charset (RFC 1428).
        del msg["MIME-Version"]
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = "text/plain; charset=unknown-8bit"
        _encode_part(msg)
    out = BytesIO()
    BytesGenerator(out, policy=_POLICY, mangle_from_=False).flatten(msg)
    result = out.getvalue()
    if not result.isascii():
        raise DowngradeError("conversion left 8-bit characters")
    return result


def _encode_part(part: Message) -> None:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes) or payload.isascii():
        return
    del part["Content-Transfer-Encoding"]
    part.set_payload(payload)
    if part.get_content_maintype() == "text":
        email.encoders.encode_quopri(part)
    else:
        email.encoders.encode_base64(part)
