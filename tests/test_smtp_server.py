"""The submission session's rules, on a StringTransport with a Clock."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mta.errors import StorageError
from mta.smtp.server import SubmissionFactory
from tests.support import LOGIN, OTHER, PASSWORD, Harness, b64, make_config, plain

MESSAGE = (
    f"From: Alice <{LOGIN}>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Bcc: secret@example.net\r\n"
    "Subject: hello\r\n"
    "\r\n"
    "Hello Bob.\r\n"
    ".a line that started with a dot\r\n"
)


def data(message: str = MESSAGE) -> str:
    """A message as a client sends it after 354: dot-stuffed, terminated."""
    stuffed = "".join(
        "." + line if line.startswith(".") else line for line in message.splitlines(True)
    )
    return stuffed + ".\r\n"


class SessionTestCase(SynchronousTestCase):
    """Shared by the session tests: a Harness per test, and submit (MAIL, RCPT, DATA and the
    message, returning the final reply)."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp())

    def submit(self, client, sender=LOGIN, rcpts=("bob@example.net",), message=MESSAGE):
        """MAIL, RCPT..., DATA and the message; returns the final reply."""
        assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
        for rcpt in rcpts:
            assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(data(message))
        replies = client.replies()
        self.assertEqual(len(replies), 1, replies)
        return replies[0]


class GreetingAndEhloTests(SessionTestCase):
    """The greeting and EHLO: the extensions on 465 (AUTH at once, no STARTTLS) and on 587 before
    TLS (STARTTLS, no AUTH), EHLO needing an argument, parameters refused after HELO, unknown
    commands, an HTTP request closing the connection, NOOP, RSET and QUIT."""

    def test_greeting(self) -> None:
        c = self.h.connect()
        self.assertEqual(c.replies(), [(220, "mx.test ESMTP mta")])

    def test_ehlo_implicit_tls(self) -> None:
        """On 465 AUTH is offered at once and STARTTLS is not (RFC 8314)."""
        c = self.h.connect()
        c.replies()
        code, text = c.command("EHLO client.test")
        self.assertEqual(code, 250)
        lines = text.split("\n")
        self.assertEqual(lines[0], "mx.test")
        for ext in (
            "PIPELINING",
            "SIZE 52428800",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
            "AUTH PLAIN LOGIN",
        ):
            self.assertIn(ext, lines)
        self.assertNotIn("STARTTLS", lines)

    def test_ehlo_before_starttls(self) -> None:
        """On 587 before TLS: STARTTLS offered, AUTH not (RFC 4954 section 4)."""
        c = self.h.connect(implicit_tls=False)
        c.replies()
        lines = c.command("EHLO client.test")[1].split("\n")
        self.assertIn("STARTTLS", lines)
        self.assertIn("CHUNKING", lines)
        self.assertFalse(any(line.startswith("AUTH") for line in lines))

    def test_ehlo_needs_argument(self) -> None:
        c = self.h.connect()
        c.replies()
        self.assertEqual(c.command("EHLO")[0], 501)

    def test_helo_then_params_refused(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command("HELO client.test"), (250, "mx.test"))
        code, _ = c.command(f"MAIL FROM:<{LOGIN}> BODY=8BITMIME")
        self.assertEqual(code, 555)

    def test_unknown_command(self) -> None:
        c = self.h.connect()
        c.replies()
        self.assertEqual(c.command("FROB"), (500, "5.5.2 Command not recognized"))

    def test_http_request_closes(self) -> None:
        c = self.h.connect()
        c.replies()
        c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(c.codes(), [421])
        self.assertTrue(c.closed)

    def test_noop_rset_quit(self) -> None:
        c = self.h.connect()
        c.replies()
        self.assertEqual(c.command("NOOP")[0], 250)
        self.assertEqual(c.command("RSET")[0], 250)
        self.assertEqual(c.command("VRFY someone")[0], 252)
        self.assertEqual(c.command("QUIT")[0], 221)
        self.assertTrue(c.closed)


class StartTLSTests(SessionTestCase):
    """STARTTLS: commands pipelined with it discarded (CVE-2011-0411), the session state reset after
    TLS (RFC 3207 section 4.2), not offered on implicit TLS, and needing EHLO first."""

    def test_starttls_discards_pipelined_commands(self) -> None:
        """CVE-2011-0411: a command sent with STARTTLS must not run after TLS."""
        c = self.h.connect(implicit_tls=False)
        c.replies()
        c.command("EHLO client.test")
        c.send(f"STARTTLS\r\nMAIL FROM:<{LOGIN}>\r\n")
        self.assertEqual(c.replies(), [(220, "2.0.0 Ready to start TLS")])
        self.assertIs(c.transport.tls_started_with, self.h.settings.tls)
        # Nothing more was answered: the MAIL line was discarded.
        self.assertEqual(c.replies(), [])

    def test_state_reset_after_starttls(self) -> None:
        """RFC 3207 section 4.2: the client must EHLO again after TLS."""
        c = self.h.connect(implicit_tls=False)
        c.replies()
        c.command("EHLO client.test")
        c.command("STARTTLS")
        self.assertEqual(c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")[0], 503)
        lines = c.command("EHLO client.test")[1].split("\n")
        self.assertIn("AUTH PLAIN LOGIN", lines)
        self.assertNotIn("STARTTLS", lines)
        self.assertEqual(c.command("STARTTLS")[0], 503)

    def test_no_starttls_on_implicit_tls(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command("STARTTLS")[0], 502)

    def test_starttls_needs_ehlo(self) -> None:
        c = self.h.connect(implicit_tls=False)
        c.replies()
        self.assertEqual(c.command("STARTTLS")[0], 503)


class AuthTests(SessionTestCase):
    """AUTH in a session: refused before TLS (538), PLAIN with an initial response or after a
    challenge, LOGIN with and without the username up front, logins in any case, a wrong password
    answered 535 only after the delay, an unknown user, * to cancel, bad base64, an unknown
    mechanism, AUTH twice, the brute-force block of one address, and AUTH lines longer than 512
    octets."""

    def test_auth_before_tls_refused(self) -> None:
        c = self.h.connect(implicit_tls=False)
        c.replies()
        c.command("EHLO client.test")
        code, text = c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")
        self.assertEqual(code, 538)
        self.assertTrue(text.startswith("5.7.11"))

    def test_plain_initial_response(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(
            c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}"),
            (235, "2.7.0 Authentication successful"),
        )
        self.assertEqual(c.session.login, LOGIN)

    def test_plain_with_challenge(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command("AUTH PLAIN"), (334, ""))
        self.assertEqual(c.command(plain(LOGIN, PASSWORD))[0], 235)

    def test_login_mechanism(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command("AUTH LOGIN"), (334, "VXNlcm5hbWU6"))
        self.assertEqual(c.command(b64(LOGIN)), (334, "UGFzc3dvcmQ6"))
        self.assertEqual(c.command(b64(PASSWORD))[0], 235)

    def test_login_with_initial_username(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command(f"AUTH LOGIN {b64(LOGIN)}"), (334, "UGFzc3dvcmQ6"))
        self.assertEqual(c.command(b64(PASSWORD))[0], 235)

    def test_login_is_case_insensitive(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command(f"AUTH PLAIN {plain(LOGIN.upper(), PASSWORD)}")[0], 235)

    def test_wrong_password_is_delayed_then_535(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        c.send(f"AUTH PLAIN {plain(LOGIN, 'wrong password')}\r\n")
        self.assertEqual(c.replies(), [], "the reply must wait for the failure delay")
        self.h.clock.advance(1.0)
        [(code, text)] = c.replies()
        self.assertEqual(code, 535)
        self.assertTrue(text.startswith("5.7.8"))
        self.assertIn("full email address", text)
        self.assertIsNone(c.session.login)

    def test_unknown_user_535(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        c.send(f"AUTH PLAIN {plain('nobody@example.com', PASSWORD)}\r\n")
        self.h.clock.advance(10)
        self.assertEqual(c.codes(), [535])

    def test_cancel(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        c.command("AUTH LOGIN")
        self.assertEqual(c.command("*")[0], 501)
        self.assertEqual(c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")[0], 235)

    def test_bad_base64(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(
            c.command("AUTH PLAIN !!!notbase64"), (501, "5.5.2 Cannot decode the AUTH response")
        )

    def test_unknown_mechanism(self) -> None:
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(c.command("AUTH CRAM-MD5")[0], 504)

    def test_already_authenticated(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")[0], 503)

    def test_brute_force_blocks_address_not_others(self) -> None:
        """After 10 distinct wrong passwords an address gets 454 4.7.0."""
        c = self.h.connect(peer="198.51.100.7")
        c.replies()
        c.command("EHLO client.test")
        for i in range(10):
            c.send(f"AUTH PLAIN {plain(LOGIN, f'guess {i}')}\r\n")
            self.h.clock.advance(60)
        self.assertEqual(c.codes(), [535] * 10)
        code, text = c.command(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")
        self.assertEqual(code, 454)
        self.assertTrue(text.startswith("4.7.0"))
        other = self.h.connect(peer="203.0.113.9")
        other.login()
        self.assertEqual(other.session.login, LOGIN)

    def test_auth_line_may_exceed_512(self) -> None:
        """RFC 4954: AUTH lines may be up to 12288 octets."""
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        c.send("AUTH PLAIN " + b64("\0" + LOGIN + "\0" + "x" * 600) + "\r\n")
        self.h.clock.advance(10)
        self.assertEqual(c.codes(), [535])


class MailTransactionTests(SessionTestCase):
    """Mail transactions: MAIL needing AUTH, TLS and EHLO, a message queued (and a second on the
    same connection), DSN parameters stored or refused, the sender and From: aligned with the
    login (aliases, domains, +tags), a missing From:, the null sender refused, nested MAIL and
    bad sequences, RSET and a disconnect aborting, the recipient limit (default and configured),
    a duplicate recipient kept once, bad addresses, and SMTPUTF8."""

    def test_mail_needs_auth(self) -> None:
        """No relay without AUTH (SPEC section 2)."""
        c = self.h.connect()
        c.replies()
        c.command("EHLO client.test")
        for sender in (LOGIN, "someone@elsewhere.example", "a%b@example.com", '"x@y"@example.com'):
            code, text = c.command(f"MAIL FROM:<{sender}>")
            self.assertEqual(code, 530)
            self.assertTrue(text.startswith("5.7.0"))
        self.assertEqual(c.command("RCPT TO:<victim@example.net>")[0], 503)
        self.assertEqual(c.command("DATA")[0], 503)
        self.assertEqual(self.h.spool.messages, {})

    def test_mail_before_starttls(self) -> None:
        c = self.h.connect(implicit_tls=False)
        c.replies()
        c.command("EHLO client.test")
        self.assertEqual(
            c.command(f"MAIL FROM:<{LOGIN}>"), (530, "5.7.0 Must issue a STARTTLS command first")
        )

    def test_mail_needs_ehlo(self) -> None:
        c = self.h.connect()
        c.replies()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 503)

    def test_submission_is_queued(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = self.submit(c, rcpts=("bob@example.net", "carol@example.org"))
        self.assertEqual(code, 250)
        queue_id = text.rpartition(" ")[2]
        self.assertEqual(text, f"2.0.0 Ok: queued as {queue_id}")
        state, envelope, stored = self.h.spool.messages[queue_id]
        self.assertEqual(state, "incoming")
        self.assertEqual(envelope.sender, LOGIN)
        self.assertEqual(
            [r.address for r in envelope.recipients], ["bob@example.net", "carol@example.org"]
        )
        self.assertEqual(envelope.auth_user, LOGIN)
        self.assertEqual(envelope.client_address, "192.0.2.10")
        self.assertEqual(envelope.client_helo, "client.test")
        self.assertEqual(envelope.size, len(stored))
        self.assertTrue(stored.startswith(b"Received: from client.test ([192.0.2.10])\r\n"))
        self.assertIn(f"with ESMTPSA id {queue_id}".encode(), stored)
        self.assertNotIn(b"Bcc:", stored)
        self.assertNotIn(b"secret@example.net", stored)
        self.assertIn(f"Message-ID: <{queue_id}@mx.test>\r\n".encode(), stored)
        self.assertIn(b"\r\nDate: ", stored)
        self.assertTrue(
            stored.endswith(b"\r\n\r\nHello Bob.\r\n.a line that started with a dot\r\n")
        )
        self.assertIn(
            f"From: Alice <{LOGIN}>\r\nTo: Bob <bob@example.net>\r\nSubject: hello\r\n".encode(),
            stored,
        )

    def test_second_message_on_same_connection(self) -> None:
        c = self.h.connect()
        c.login()
        first = self.submit(c)
        second = self.submit(c)
        self.assertEqual((first[0], second[0]), (250, 250))
        self.assertNotEqual(first[1], second[1])
        self.assertEqual(len(self.h.spool.messages), 2)

    def test_dsn_parameters_are_stored(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(
            c.command(f"MAIL FROM:<{LOGIN}> RET=HDRS ENVID=QQ+2B123 BODY=8BITMIME SIZE=1000")[0],
            250,
        )
        self.assertEqual(
            c.command(
                "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@example.net"
            )[0],
            250,
        )
        self.assertEqual(c.command("RCPT TO:<carol@example.net> NOTIFY=NEVER")[0], 250)
        c.command("DATA")
        c.send(data())
        [(code, text)] = c.replies()
        self.assertEqual(code, 250)
        _, env, _ = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertEqual((env.ret, env.envid, env.body), ("HDRS", "QQ+123", "8BITMIME"))
        self.assertEqual(env.recipients[0].notify, ("FAILURE", "SUCCESS"))
        self.assertEqual(env.recipients[0].orcpt, "rfc822;bob+x@example.net")
        self.assertEqual(env.recipients[1].notify, ("NEVER",))

    def test_bad_dsn_parameters(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}> RET=SOME")[0], 501)
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}> FROB=1")[0], 555)
        c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(c.command("RCPT TO:<bob@example.net> NOTIFY=NEVER,SUCCESS")[0], 501)
        self.assertEqual(c.command("RCPT TO:<bob@example.net> ORCPT=bob")[0], 501)

    def test_sender_must_match_login(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = c.command("MAIL FROM:<mallory@example.com>")
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.7.1"))
        self.assertIn("<mallory@example.com>", text)
        self.assertIn("matches your authenticated address", text)

    def test_sender_aliases_domains_and_tags(self) -> None:
        c = self.h.connect()
        c.login()
        for sender in (
            "alice+news@example.com",
            "sales@example.com",
            "anyone@alice.example",
            "ALICE@EXAMPLE.COM",
        ):
            self.assertEqual(c.command(f"MAIL FROM:<{sender}>")[0], 250, sender)
            c.command("RSET")

    def test_from_header_must_match(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = self.submit(c, message=MESSAGE.replace(f"<{LOGIN}>", f"<{OTHER}>"))
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.7.1"))
        self.assertIn(OTHER, text)
        self.assertEqual(self.h.spool.messages, {})
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        # The session is still usable.
        self.assertEqual(self.submit(c)[0], 250)

    def test_from_header_missing(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = self.submit(c, message="Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(code, 550)
        self.assertIn("no From: header", text)

    def test_null_sender_refused(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command("MAIL FROM:<>")[0], 550)

    def test_nested_mail_and_sequence(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command("RCPT TO:<bob@example.net>")[0], 503)
        c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 503)
        self.assertEqual(c.command("DATA")[0], 554)

    def test_rset_aborts_transaction(self) -> None:
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RSET")
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        self.assertEqual(c.command("RCPT TO:<bob@example.net>")[0], 503)

    def test_disconnect_aborts_transaction(self) -> None:
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        c.send("From: x\r\n")
        c.protocol.connectionLost(None)
        self.assertTrue(self.h.spool.transactions[-1].aborted)
        self.assertEqual(self.h.spool.messages, {})

    def test_recipient_limit(self) -> None:
        """1,000 recipients by default (Postfix's smtpd_recipient_limit), then 452 4.5.3."""
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.send("".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(1001)))
        replies = c.replies()
        self.assertEqual([code for code, _ in replies], [250] * 1000 + [452])
        self.assertEqual(replies[-1][1], "4.5.3 Too many recipients (at most 1000 per message)")
        c.command("DATA")
        c.send(data())
        [(code, text)] = c.replies()
        self.assertEqual(code, 250)
        _, env, _ = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertEqual(len(env.recipients), 1000)
        self.assertEqual(env.recipients[-1].address, "r999@example.net")

    def test_recipient_limit_configured(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"recipients": 100}))
        c = h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.send("".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(102)))
        self.assertEqual(c.codes(), [250] * 100 + [452, 452])

    def test_duplicate_recipient_kept_once(self) -> None:
        c = self.h.connect()
        c.login()
        _, text = self.submit(c, rcpts=("bob@example.net", "Bob@Example.NET"))
        _, env, _ = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertEqual(len(env.recipients), 1)

    def test_bad_addresses(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:{LOGIN}")[0], 501)
        self.assertEqual(c.command(f"MAIL FROM:<@relay.example:{LOGIN}>")[0], 553)
        c.command(f"MAIL FROM:<{LOGIN}>")
        self.assertEqual(c.command("RCPT TO:<no-at-sign>")[0], 501)
        self.assertEqual(c.command("RCPT TO:<x@-bad-.example>")[0], 501)
        self.assertEqual(c.command("RCPT TO:<jørn@example.no>")[0], 553)

    def test_smtputf8(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}> SMTPUTF8")[0], 250)
        self.assertEqual(c.command("RCPT TO:<jørn@eksempel.no>")[0], 250)
        c.command("DATA")
        c.send(data())
        [(code, text)] = c.replies()
        self.assertEqual(code, 250)
        _, env, stored = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertTrue(env.smtputf8)
        self.assertEqual(env.recipients[0].address, "jørn@eksempel.no")
        self.assertIn(b"with UTF8SMTPSA id", stored)


class LimitTests(SessionTestCase):
    """Session limits: SIZE and message size, bare LF normalized by default or refused, bare CR,
    long data lines (998 characters accepted), long and bare-LF command lines, the Received: loop
    limit, the idle timeout, too many errors, and connections per client address."""

    def test_size_parameter_over_limit(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = c.command(f"MAIL FROM:<{LOGIN}> SIZE=52428801")
        self.assertEqual(code, 552)
        self.assertTrue(text.startswith("5.3.4"))

    def test_message_over_limit(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"message_size": 2048}))
        c = h.connect()
        c.login()
        code, text = self.submit(c, message=MESSAGE + ("x" * 70 + "\r\n") * 40)
        self.assertEqual(code, 552)
        self.assertTrue(text.startswith("5.3.4"))
        self.assertEqual(h.spool.messages, {})
        self.assertTrue(h.spool.transactions[-1].aborted)

    def test_bare_lf_in_data_refused_when_configured(self) -> None:
        h = Harness(self.mktemp(), make_config(limits={"bare_newline": "reject"}))
        c = h.connect()
        c.login()
        code, text = self.submit(c, message=MESSAGE + "smuggled\n.\nMAIL FROM:<x@y>\r\n")
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.6.11"))
        self.assertEqual(h.spool.messages, {})
        self.assertEqual(self.submit(c)[0], 250)

    def test_bare_lf_in_data_normalized_by_default(self) -> None:
        """Postfix 3.9's normalize: LF lines stored with CRLF; the LF form of an
        end of data is a line of the message, not the end."""
        c = self.h.connect()
        c.login()
        lf_message = MESSAGE.replace("\r\n", "\n")
        code, text = self.submit(c, message=lf_message + "smuggled\n.\nMAIL FROM:<x@y>\r\n")
        self.assertEqual(code, 250, text)
        _, _, stored = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertNotIn(b"\n", stored.replace(b"\r\n", b""))
        self.assertTrue(
            stored.endswith(
                b"\r\n\r\nHello Bob.\r\n.a line that started with a dot\r\n"
                b"smuggled\r\n.\r\nMAIL FROM:<x@y>\r\n"
            ),
            stored,
        )
        self.assertIn(f"From: Alice <{LOGIN}>\r\nTo: Bob".encode(), stored)
        self.assertNotIn(b"Bcc:", stored)

    def test_bare_cr_in_data_refused(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = self.submit(c, message=MESSAGE + "smuggled\r.\rMAIL FROM:<x@y>\r\n")
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.6.11 Message contains a bare CR"), text)
        self.assertEqual(self.h.spool.messages, {})

    def test_long_data_line_refused(self) -> None:
        c = self.h.connect()
        c.login()
        code, _ = self.submit(c, message=MESSAGE + "y" * 999 + "\r\n")
        self.assertEqual(code, 550)

    def test_998_character_line_accepted(self) -> None:
        c = self.h.connect()
        c.login()
        self.assertEqual(self.submit(c, message=MESSAGE + "y" * 998 + "\r\n")[0], 250)

    def test_long_command_line(self) -> None:
        c = self.h.connect()
        c.login()
        code, _ = c.command(f"MAIL FROM:<{LOGIN}> " + "X" * 600)
        self.assertEqual(code, 500)
        c.send("NOOP " + "x" * 20000 + "\r\nNOOP\r\n")
        self.assertEqual(c.codes(), [500, 250])

    def test_bare_lf_command(self) -> None:
        c = self.h.connect()
        c.replies()
        c.send("NOOP\n")
        self.assertEqual(c.codes(), [500])

    def test_mail_loop(self) -> None:
        c = self.h.connect()
        c.login()
        code, text = self.submit(c, message="Received: from x by y; now\r\n" * 26 + MESSAGE)
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith("5.4.6"))

    def test_idle_timeout(self) -> None:
        c = self.h.connect()
        c.replies()
        self.h.clock.advance(299)
        self.assertFalse(c.closed)
        c.command("NOOP")
        self.h.clock.advance(299)
        self.assertFalse(c.closed)
        self.h.clock.advance(1)
        self.assertEqual(c.codes(), [421])
        self.assertTrue(c.closed)

    def test_too_many_errors(self) -> None:
        c = self.h.connect()
        c.replies()
        for _ in range(19):
            c.send("FROB\r\n")
        self.assertFalse(c.closed)
        c.send("FROB\r\n")
        self.assertEqual(c.codes()[-1], 421)
        self.assertTrue(c.closed)

    def test_connections_per_ip(self) -> None:
        factory = SubmissionFactory(self.h.settings, implicit_tls=True)
        addr = IPv4Address("TCP", "192.0.2.50", 1)
        sessions = [factory.buildProtocol(addr) for _ in range(10)]
        refused = factory.buildProtocol(addr)
        t = StringTransport()
        refused.makeConnection(t)
        self.assertTrue(t.value().startswith(b"421 4.7.0 "))
        other = factory.buildProtocol(IPv4Address("TCP", "192.0.2.51", 1))
        self.assertTrue(hasattr(other, "login"))
        # A closed session frees its slot.
        for s in sessions[:1]:
            s.makeConnection(StringTransport(peerAddress=addr))
            s.connectionLost(None)
        self.assertTrue(hasattr(factory.buildProtocol(addr), "login"))


class PipeliningTests(SessionTestCase):
    """PIPELINING (RFC 2920): replies in order, input after the end of data waiting for the commit,
    and DATA split into many packets."""

    def test_replies_in_order(self) -> None:
        c = self.h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<bad>\r\nDATA\r\n")
        self.assertEqual(c.codes(), [250, 250, 501, 354])
        c.send(data() + "QUIT\r\n")
        self.assertEqual(c.codes(), [250, 221])

    def test_commands_wait_for_commit(self) -> None:
        """Input after the end of data waits until the message is stored."""
        self.h.spool.hold_commits = True
        c = self.h.connect()
        c.login()
        c.send(f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        self.assertEqual(c.codes(), [250, 250, 354])
        c.send(data() + "NOOP\r\nQUIT\r\n")
        self.assertEqual(c.codes(), [], "no 250 before the commit completes")
        self.h.spool.release_held()
        self.assertEqual(c.codes(), [250, 250, 221])

    def test_data_split_in_many_packets(self) -> None:
        c = self.h.connect()
        c.login()
        c.command(f"MAIL FROM:<{LOGIN}>")
        c.command("RCPT TO:<bob@example.net>")
        c.command("DATA")
        for byte in data().encode():
            c.send(bytes([byte]))
        [(code, text)] = c.replies()
        self.assertEqual(code, 250)
        _, _, stored = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertTrue(stored.endswith(b"Hello Bob.\r\n.a line that started with a dot\r\n"))


class StorageFailureTests(SessionTestCase):
    """Spool failures: 451 when a transaction cannot begin, a write or the commit fails, 452 4.3.1
    for a full disk at the commit, and an account deleted since login unable to send."""

    def test_begin_failure_451(self) -> None:
        self.h.spool.fail_begin = StorageError("mkdir failed")
        c = self.h.connect()
        c.login()
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 451)

    def test_write_failure_451(self) -> None:
        self.h.spool.fail_write = StorageError("EIO")
        c = self.h.connect()
        c.login()
        code, text = self.submit(c)
        self.assertEqual((code, text[:5]), (451, "4.3.0"))

    def test_commit_disk_full_452(self) -> None:
        self.h.spool.fail_commit = StorageError("ENOSPC", disk_full=True)
        c = self.h.connect()
        c.login()
        code, text = self.submit(c)
        self.assertEqual((code, text[:5]), (452, "4.3.1"))
        self.assertEqual(self.h.spool.messages, {})

    def test_commit_failure_451(self) -> None:
        self.h.spool.fail_commit = StorageError("EIO")
        c = self.h.connect()
        c.login()
        self.assertEqual(self.submit(c)[0], 451)

    def test_deleted_user_cannot_send(self) -> None:
        c = self.h.connect()
        c.login()
        with self.h.users.editing() as users:
            del users[LOGIN]
        self.assertEqual(c.command(f"MAIL FROM:<{LOGIN}>")[0], 535)


class TrustedNetworkTests(SessionTestCase):
    """[auth] trusted_networks: a trusted client submits without TLS or AUTH, an untrusted one still
    needs both, and a trusted client that logs in is held to its login's addresses."""

    def setUp(self) -> None:
        self.h = Harness(self.mktemp(), make_config(auth={"trusted_networks": ["192.0.2.0/24"]}))

    def test_trusted_client_submits_without_tls_or_auth(self) -> None:
        c = self.h.connect(implicit_tls=False, peer="192.0.2.77")
        c.replies()
        c.command("EHLO app.local")
        code, text = self.submit(c, sender="cron@anything.example")
        self.assertEqual(code, 250)
        _, env, stored = self.h.spool.messages[text.rpartition(" ")[2]]
        self.assertIsNone(env.auth_user)
        self.assertIn(b"with ESMTP id", stored)

    def test_untrusted_client_still_needs_tls_and_auth(self) -> None:
        c = self.h.connect(implicit_tls=False, peer="198.51.100.1")
        c.replies()
        c.command("EHLO app.local")
        self.assertEqual(c.command("MAIL FROM:<cron@anything.example>")[0], 530)

    def test_trusted_client_that_logs_in_is_aligned(self) -> None:
        c = self.h.connect(peer="192.0.2.77")
        c.login()
        self.assertEqual(c.command("MAIL FROM:<cron@anything.example>")[0], 550)
