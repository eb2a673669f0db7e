"""DKIM keys and signing: mtactl dkim keygen, the signer, verification with dkimpy.

Verification here looks keys up in the records mtactl printed; the
end-to-end test (tests/e2e/test_plugins.py) serves them from a real DNS
server instead.
"""

from __future__ import annotations

import io
import os
import re
import stat
from contextlib import redirect_stderr
from typing import Any

import dkim
from twisted.trial.unittest import SynchronousTestCase

from mta import cli
from mta.checks import dkim as dkimmod
from mta.envelope import Envelope
from mta.testing import run_inline

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
ENVELOPE = Envelope(queue_id="Q1", sender="alice@example.com", recipients=[], arrival=0.0)


def zone_strings(record: str) -> tuple[str, list[str]]:
    """The owner name and the character-strings of a printed TXT record."""
    m = re.fullmatch(r"(\S+)\. IN TXT \( (.*) \)", record.strip())
    assert m, record
    return m.group(1), re.findall(r'"([^"]*)"', m.group(2))


def dnsfunc_for(records: dict[str, list[str]]) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return "".join(records.get(name.decode().rstrip("."), [])).encode()

    return lookup


def verify_all(message: bytes, records: dict[str, list[str]]) -> list[bool]:
    d = dkim.DKIM(message)
    count = len(re.findall(rb"^DKIM-Signature:", message, re.M | re.I))
    results = []
    for i in range(count):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc_for(records))))
        except dkim.ValidationError:  # e.g. "body hash mismatch"
            results.append(False)
    return results


def keygen(config: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["--config", config, "dkim", "keygen", *args], out)
    return code, out.getvalue(), err.getvalue()


class KeygenTests(SynchronousTestCase):
    """mtactl dkim keygen: the private key written (mode 0600) and the TXT record printed, the
    default selector from the key type and month, never overwriting a key, no temporary file or
    key left after a failed write, and bad input refused."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.keys = os.path.join(self.dir, "keys")
        self.config = os.path.join(self.dir, "mta.toml")
        with open(self.config, "w") as f:
            f.write('[dkim]\nkeys_dir = "keys"\n')

    def test_writes_a_private_key_and_prints_the_record(self) -> None:
        for kind, selector in (("rsa", "s1"), ("ed25519", "s2")):
            code, out, _ = keygen(
                self.config, "Example.COM", "--selector", selector, "--type", kind
            )
            self.assertEqual(code, 0)
            path = os.path.join(self.keys, "example.com", f"{selector}.key")
            self.assertIn(f"; private key written to {path}", out)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            name, strings = zone_strings(out.splitlines()[-1])
            self.assertEqual(name, f"{selector}._domainkey.example.com")
            self.assertTrue(all(len(s) <= 255 for s in strings))
            self.assertTrue("".join(strings).startswith(f"v=DKIM1; k={kind}; p="))
        rsa = dkimmod.read_key(os.path.join(self.keys, "example.com", "s1.key"))
        ed = dkimmod.read_key(os.path.join(self.keys, "example.com", "s2.key"))
        self.assertEqual((rsa.algorithm, ed.algorithm), (b"rsa-sha256", b"ed25519-sha256"))

    def test_default_selector_names_type_and_month(self) -> None:
        code, out, _ = keygen(self.config, "example.com", "--type", "ed25519")
        self.assertEqual(code, 0)
        self.assertRegex(out, r"ed25519-\d{6}\._domainkey\.example\.com\. IN TXT")

    def test_never_overwrites(self) -> None:
        self.assertEqual(keygen(self.config, "example.com", "--selector", "s1")[0], 0)
        code, _, err = keygen(self.config, "example.com", "--selector", "s1")
        self.assertEqual(code, 1)
        self.assertIn("exists already", err)

    def test_never_overwrites_and_leaves_no_temporary_file(self) -> None:
        directory = os.path.join(self.keys, "example.com")
        path = dkimmod.keygen(self.keys, "example.com", "s1", "ed25519")[0]
        with open(path, "rb") as f:
            first = f.read()
        self.assertRaises(FileExistsError, dkimmod.keygen, self.keys, "example.com", "s1", "rsa")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), first)
        self.assertEqual(os.listdir(directory), ["s1.key"])

    def test_a_failed_write_leaves_no_key(self) -> None:
        # The daemon reads keys at each signing: a key is there whole or not
        # at all (a half-written one would fail every delivery from the domain).
        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        self.patch(os, "fsync", full)
        self.assertRaises(OSError, dkimmod.keygen, self.keys, "example.com", "s1", "ed25519")
        self.assertEqual(os.listdir(os.path.join(self.keys, "example.com")), [])
        self.assertEqual(dkimmod.domain_keys(self.keys, "example.com"), [])

    def test_bad_input(self) -> None:
        code, _, err = keygen(self.config, "not a domain")
        self.assertEqual(code, 2)
        self.assertIn("is not a valid ASCII domain name", err)
        code, _, err = keygen(self.config, "example.com", "--selector", "bad_selector!")
        self.assertEqual(code, 2)
        self.assertIn("is not a valid selector", err)


class SigningTests(SynchronousTestCase):
    """DKIM signing at delivery: RSA and Ed25519 signatures that dkimpy verifies, a changed body or
    an added From: that no longer verifies, the signed header list with oversigning, no key for
    the From: domain, a From: domain that is not a domain name, an internationalized domain
    signed with its A-labels, and finding the From: domain."""

    def setUp(self) -> None:
        self.keys = os.path.abspath(self.mktemp())
        self.records: dict[str, list[str]] = {}
        for kind, selector in (("rsa", "r1"), ("ed25519", "e1")):
            _, record = dkimmod.keygen(self.keys, "example.com", selector, kind)
            name, strings = zone_strings(record)
            self.records[name] = strings
        self.signer = dkimmod.DKIMSigner(dkimmod.Options(), self.keys, run_inline)

    def sign(self, message: bytes) -> bytes:
        result: list[bytes] = []
        self.signer.on_outbound(ENVELOPE, message).addCallback(result.append)
        return result[0] + message

    def test_rsa_and_ed25519_signatures_verify(self) -> None:
        signed = self.sign(MESSAGE)
        self.assertEqual(signed.count(b"DKIM-Signature:"), 2)
        self.assertIn(b"a=rsa-sha256", signed)
        self.assertIn(b"a=ed25519-sha256", signed)
        self.assertIn(b"c=relaxed/relaxed", signed)
        self.assertEqual(verify_all(signed, self.records), [True, True])

    def test_a_changed_body_or_added_from_does_not_verify(self) -> None:
        signed = self.sign(MESSAGE)
        self.assertEqual(verify_all(signed.replace(b"Hello Bob", b"Hello Eve"), self.records),
                         [False, False])  # fmt: skip
        added = signed.replace(b"\r\n\r\n", b"\r\nFrom: mallory@example.org\r\n\r\n", 1)
        self.assertEqual(verify_all(added, self.records), [False, False])

    def test_signed_header_list(self) -> None:
        signed = self.sign(MESSAGE)
        h = re.search(rb"h=([^;]+);", signed.replace(b"\r\n", b"").replace(b" ", b""))
        assert h is not None
        names = h.group(1).split(b":")
        self.assertNotIn(b"x-mailer", names)
        self.assertEqual(names.count(b"from"), 2)  # oversigned
        self.assertIn(b"message-id", names)

    def test_no_key_for_the_from_domain(self) -> None:
        other = MESSAGE.replace(b"alice@example.com", b"alice@example.org")
        self.assertEqual(self.sign(other), other)

    def test_a_from_domain_that_is_not_a_domain_name_is_not_signed(self) -> None:
        # The domain names a directory of keys_dir: ".." must not reach out.
        base = os.path.dirname(self.keys)
        with open(os.path.join(self.keys, "example.com", "r1.key"), "rb") as f:
            key = f.read()
        with open(os.path.join(base, "stolen.key"), "wb") as f:
            f.write(key)
        os.makedirs(os.path.join(base, "other"))
        with open(os.path.join(base, "other", "junk.key"), "wb") as f:
            f.write(b"not a key\n")
        for sender in (
            b"x@..",
            b"<x@../other>",
            b"x@.",
            b"<x@example.com/../..>",
            b"<x@[127.0.0.1]>",
        ):
            message = MESSAGE.replace(b"alice@example.com", sender, 1)
            self.assertNotEqual(message, MESSAGE)
            self.assertEqual(self.sign(message), message, sender)

    def test_an_internationalized_from_domain_uses_its_a_labels(self) -> None:
        _, record = dkimmod.keygen(self.keys, "xn--bcher-kva.example", "r1", "ed25519")
        message = MESSAGE.replace(b"alice@example.com", "alice@B\u00fccher.example".encode(), 1)
        signed = self.sign(message)
        self.assertIn(b"d=xn--bcher-kva.example;", signed.replace(b"\r\n", b"").replace(b" ", b""))
        name, strings = zone_strings(record)
        self.assertEqual(verify_all(signed, {name: strings}), [True])

    def test_from_domain(self) -> None:
        cases = {
            b"From: a@Example.COM\r\n\r\n": "example.com",
            b'Subject: x\r\nfrom: "B, C" <b@x.example>\r\n\r\n': "x.example",
            b"From: Folded\r\n <f@folded.example>\r\n\r\n": "folded.example",
            b"Subject: none\r\n\r\nFrom: body@not.header\r\n": None,
        }
        for message, domain in cases.items():
            self.assertEqual(dkimmod.from_domain(message), domain, message)
