"""Tests for L{mta.config}: TOML into typed settings, errors naming file and key."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from mta import config
from mta.errors import ConfigError


class ConfigFileTestCase(SynchronousTestCase):
    """Shared by the tests that load files: a fresh directory outside the checkout, writing a
    configuration file into it, and assertConfigError (a one-line error naming the file and the
    key)."""

    def directory(self) -> str:
        """A fresh directory outside the checkout, removed after the test."""
        path = tempfile.mkdtemp(prefix="mta-test-config-")
        self.addCleanup(shutil.rmtree, path)
        return path

    def write(self, text: str) -> str:
        """Write a configuration file in a fresh directory; return its path."""
        directory = self.directory()
        path = os.path.join(directory, "mta.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def assertConfigError(self, text: str, *parts: str) -> str:
        """Loading C{text} fails with a one-line message naming the file and C{parts}."""
        path = self.write(text)
        message = str(self.assertRaises(ConfigError, config.load, path))
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertNotIn("\n", message)
        for part in parts:
            self.assertIn(part, message)
        return message


class DefaultTests(SynchronousTestCase):
    """The embedded default: runs from a checkout with no file at all."""

    def test_values(self) -> None:
        c = config.load(None)
        self.assertEqual(c.source, "<embedded default>")
        self.assertEqual(c.limits.message_size, 50 * 1024 * 1024)
        self.assertEqual(c.limits.recipients, 1000)
        self.assertEqual(c.limits.bare_newline, "normalize")
        self.assertEqual(c.delivery.recipients_per_transaction, 50)
        self.assertEqual(c.limits.received_headers, 25)
        self.assertEqual(c.limits.connections_per_ip, 10)
        self.assertEqual(c.auth.max_failures, 10)
        self.assertEqual(c.listen.submissions, ["tcp:8465:interface=127.0.0.1"])
        self.assertEqual(c.listen.submission, ["tcp:8587:interface=127.0.0.1"])
        self.assertEqual((c.tls.certificate, c.tls.key), ("", ""))
        self.assertEqual(c.server.hostname, "")

    def test_paths_relative_to_working_directory(self) -> None:
        c = config.load(None)
        cwd = os.getcwd()
        self.assertEqual(c.base_dir, cwd)
        self.assertEqual(c.server.spool, os.path.join(cwd, "spool"))
        self.assertEqual(c.server.users_file, os.path.join(cwd, "users.json"))
        self.assertEqual(c.tls.selfsigned_dir, os.path.join(cwd, "spool", "selfsigned"))

    def test_empty_paths_stay_empty(self) -> None:
        """An empty certificate means "self-signed", not the base directory."""
        c = config.load(None)
        self.assertEqual(c.tls.certificate, "")

    def test_defaults_table(self) -> None:
        defaults = config.defaults()
        self.assertEqual(
            set(defaults),
            {
                "server",
                "listen",
                "tls",
                "limits",
                "auth",
                "delivery",
                "queue",
                "spool",
                "retention",
                "metrics",
                "log",
                "dkim",
                "cluster",
                "shaping",
            },
        )
        self.assertEqual(defaults["limits"]["message_size"], 50 * 1024 * 1024)
        self.assertEqual(defaults["server"]["spool"], "spool")

    def test_default_lists_not_shared(self) -> None:
        a, b = config.load(None), config.load(None)
        self.assertEqual(a.listen.submissions, b.listen.submissions)
        self.assertIsNot(a.listen.submissions, b.listen.submissions)

    def test_hostname(self) -> None:
        """An empty hostname means this machine's fully qualified name."""
        self.assertEqual(config.load(None).hostname, socket.getfqdn())


class LoadTests(ConfigFileTestCase):
    """load() on real files: values read, an integer for a float, a string or an empty list for a
    list of endpoints, relative paths resolved against the file's directory (also when the file
    is named by a relative path), absolute paths kept, ~ expanded, and Config.resolve."""

    def test_values_read(self) -> None:
        path = self.write(
            "[server]\n"
            'hostname = "mail.example.com"\n'
            "[listen]\n"
            'submissions = ["tcp:10465", "tcp6:10465:interface=\\\\:\\\\:1"]\n'
            "[limits]\n"
            "recipients = 500\n"
            "idle_timeout = 2\n"
            "[auth]\n"
            "failure_window = 60.5\n"
        )
        c = config.load(path)
        self.assertEqual(c.source, path)
        self.assertEqual(c.hostname, "mail.example.com")
        self.assertEqual(c.listen.submissions, ["tcp:10465", "tcp6:10465:interface=\\:\\:1"])
        self.assertEqual(c.limits.recipients, 500)
        self.assertEqual(c.limits.message_size, 50 * 1024 * 1024)
        self.assertEqual(c.auth.failure_window, 60.5)

    def test_integer_for_float(self) -> None:
        c = config.load(self.write("[limits]\nidle_timeout = 2\n"))
        self.assertEqual(c.limits.idle_timeout, 2.0)
        self.assertIsInstance(c.limits.idle_timeout, float)

    def test_string_for_list_of_endpoints(self) -> None:
        c = config.load(self.write('[listen]\nsubmission = "tcp:10587"\n'))
        self.assertEqual(c.listen.submission, ["tcp:10587"])

    def test_empty_list_of_endpoints(self) -> None:
        c = config.load(self.write("[listen]\nsubmission = []\n"))
        self.assertEqual(c.listen.submission, [])

    def test_relative_paths_against_file_directory(self) -> None:
        path = self.write(
            "[server]\n"
            'spool = "queue"\n'
            'users_file = "../etc/users.json"\n'
            "[tls]\n"
            'certificate = "tls/cert.pem"\n'
            'key = "tls/key.pem"\n'
        )
        base = os.path.dirname(os.path.abspath(path))
        c = config.load(path)
        self.assertEqual(c.base_dir, base)
        self.assertEqual(c.server.spool, os.path.join(base, "queue"))
        self.assertEqual(
            c.server.users_file, os.path.join(os.path.dirname(base), "etc", "users.json")
        )
        self.assertEqual(c.tls.certificate, os.path.join(base, "tls", "cert.pem"))
        self.assertEqual(c.tls.key, os.path.join(base, "tls", "key.pem"))
        self.assertEqual(c.tls.selfsigned_dir, os.path.join(base, "spool", "selfsigned"))

    def test_relative_to_file_not_working_directory(self) -> None:
        """Loading by a relative path still resolves against the file's directory."""
        path = self.write('[server]\nspool = "queue"\n')
        relative = os.path.relpath(path)
        self.assertNotEqual(os.path.dirname(relative), "")
        c = config.load(relative)
        self.assertEqual(
            c.server.spool, os.path.join(os.path.dirname(os.path.abspath(path)), "queue")
        )

    def test_absolute_path_kept(self) -> None:
        absolute = os.path.join(self.directory(), "spool")
        c = config.load(self.write(f'[server]\nspool = "{absolute}"\n'))
        self.assertEqual(c.server.spool, absolute)

    def test_home_expanded(self) -> None:
        c = config.load(self.write('[server]\nspool = "~/mta-spool"\n'))
        self.assertEqual(c.server.spool, os.path.join(os.path.expanduser("~"), "mta-spool"))

    def test_resolve(self) -> None:
        c = config.load(self.write(""))
        self.assertEqual(c.resolve("a/../b"), os.path.join(c.base_dir, "b"))


class ErrorTests(ConfigFileTestCase):
    """Every error is a ConfigError whose one line names file, section and key."""

    def test_cluster_options(self) -> None:
        self.assertConfigError(
            '[listen]\nproxy_submissions = ["tcp:10465"]\n', "[listen] proxy_from", "load balancers"
        )
        self.assertConfigError(
            '[listen]\nproxy_from = ["balancer"]\n', "[listen] proxy_from", "'balancer'"
        )
        self.assertConfigError('[cluster]\nusers = "redis"\n', "[cluster]", "needs [cluster] redis")
        self.assertConfigError('[cluster]\nusers = "ldap"\n', "[cluster] users", "file, redis")
        self.assertConfigError(
            '[cluster]\npassword_file = "pw"\n', "[cluster] password_file", "needs [cluster] redis"
        )
        self.assertConfigError(
            '[cluster]\nredis = "tcp:host=r:port=6379"\nprefix = "a b"\n', "[cluster] prefix"
        )

    def test_redis_password_file(self) -> None:
        directory = self.directory()
        with open(os.path.join(directory, "pw"), "w") as f:
            f.write("s3cret\n")
        path = os.path.join(directory, "mta.toml")
        with open(path, "w") as f:
            f.write('[cluster]\nredis = "tcp:host=r:port=6379"\npassword_file = "pw"\n')
        c = config.load(path)
        self.assertEqual(c.cluster.password(c.source), "s3cret")
        os.unlink(os.path.join(directory, "pw"))
        message = str(self.assertRaises(ConfigError, c.cluster.password, c.source))
        self.assertIn("[cluster] password_file: cannot read", message)

    def test_missing_file(self) -> None:
        path = os.path.join(self.directory(), "absent.toml")
        message = str(self.assertRaises(ConfigError, config.load, path))
        self.assertEqual(message, f"{path}: no such file")

    def test_unreadable_file(self) -> None:
        """A directory where the file should be."""
        path = self.directory()
        message = str(self.assertRaises(ConfigError, config.load, path))
        self.assertTrue(message.startswith(path + ": cannot read"), message)

    def test_invalid_toml(self) -> None:
        self.assertConfigError("[limits\nrecipients = 5\n", "not valid TOML")
        self.assertConfigError("[limits]\nrecipients = \n", "not valid TOML", "line 2")

    def test_unknown_section(self) -> None:
        self.assertConfigError("[smtpd]\nport = 25\n", "'smtpd'")

    def test_top_level_key(self) -> None:
        self.assertConfigError('hostname = "x"\n', "'hostname'")

    def test_section_not_a_table(self) -> None:
        self.assertConfigError("limits = 5\n", "[limits]", "table")

    def test_unknown_key(self) -> None:
        self.assertConfigError("[limits]\nrecipient = 5\n", "[limits]", "'recipient'")

    def test_wrong_type(self) -> None:
        cases = [
            ('[limits]\nrecipients = "5"\n', "[limits] recipients", "an integer"),
            ("[limits]\nrecipients = 5.0\n", "[limits] recipients", "an integer"),
            ("[limits]\nidle_timeout = true\n", "[limits] idle_timeout", "a number"),
            ('[limits]\nidle_timeout = "300s"\n', "[limits] idle_timeout", "a number"),
            ("[server]\nhostname = 5\n", "[server] hostname", "a string"),
            ("[server]\nspool = []\n", "[server] spool", "a string"),
            ("[listen]\nsubmission = 587\n", "[listen] submission", "a list"),
            ("[listen]\nsubmission = [587]\n", "[listen] submission[0]", "a string"),
            ("[limits]\nrecipients = {a = 1}\n", "[limits] recipients", "an integer"),
        ]
        for text, where, kind in cases:
            with self.subTest(text=text):
                self.assertConfigError(text, where, kind)

    def test_bool_for_int(self) -> None:
        """TOML true is a Python int subclass; it must not pass as 1."""
        self.assertConfigError("[limits]\nrecipients = true\n", "[limits] recipients", "integer")

    def test_below_minimum(self) -> None:
        cases = [
            ("[limits]\nrecipients = 0\n", "[limits] recipients", "at least 100"),
            ("[limits]\nrecipients = 99\n", "[limits] recipients", "RFC 5321 section 4.5.3.1.8"),
            ("[limits]\nmessage_size = 1023\n", "[limits] message_size", "at least 1024"),
            ("[limits]\nidle_timeout = 0.05\n", "[limits] idle_timeout", "at least 0.1"),
            ("[auth]\nfailure_delay = -1\n", "[auth] failure_delay", "at least 0"),
            ("[auth]\nmax_failures = -5\n", "[auth] max_failures", "at least 1"),
        ]
        for text, where, rule in cases:
            with self.subTest(text=text):
                self.assertConfigError(text, where, rule)

    def test_at_minimum(self) -> None:
        c = config.load(self.write("[limits]\nrecipients = 100\nmessage_size = 1024\n"))
        self.assertEqual((c.limits.recipients, c.limits.message_size), (100, 1024))

    def test_bare_newline_choices(self) -> None:
        c = config.load(self.write('[limits]\nbare_newline = "reject"\n'))
        self.assertEqual(c.limits.bare_newline, "reject")
        self.assertConfigError(
            '[limits]\nbare_newline = "strip"\n', "[limits] bare_newline", "normalize, reject"
        )

    def test_spool_barrier_choices(self) -> None:
        self.assertEqual(config.load(self.write("")).spool.barrier, "syncfs")
        c = config.load(self.write('[spool]\nbarrier = "fsync"\n'))
        self.assertEqual(c.spool.barrier, "fsync")
        self.assertConfigError('[spool]\nbarrier = "none"\n', "[spool] barrier", "syncfs, fsync")

    def test_nan(self) -> None:
        self.assertConfigError("[limits]\nidle_timeout = nan\n", "[limits] idle_timeout")

    def test_certificate_without_key(self) -> None:
        self.assertConfigError('[tls]\ncertificate = "cert.pem"\n', "[tls]", "certificate", "key")

    def test_key_without_certificate(self) -> None:
        self.assertConfigError('[tls]\nkey = "key.pem"\n', "[tls]", "certificate", "key")

    def test_delay_max_below_delay(self) -> None:
        self.assertConfigError(
            "[auth]\nfailure_delay = 4\nfailure_delay_max = 2\n", "[auth]", "failure_delay_max"
        )

    def test_long_value_shortened(self) -> None:
        message = self.assertConfigError(f'[limits]\nrecipients = "{"x" * 500}"\n', "recipients")
        self.assertLess(len(message), 300)


class TLSPolicyOptionTests(ConfigFileTestCase):
    """[delivery] dnssec, mta_sts, mta_sts_port, mta_sts_timeout and ca_file."""

    def test_defaults(self) -> None:
        d = config.load(None).delivery
        self.assertEqual(
            (d.dnssec, d.mta_sts, d.mta_sts_port, d.mta_sts_timeout, d.ca_file),
            (False, True, 443, 30.0, ""),
        )

    def test_values_and_ca_file_relative_to_the_file(self) -> None:
        path = self.write(
            "[delivery]\ndnssec = true\nmta_sts = false\nmta_sts_port = 8443\n"
            'mta_sts_timeout = 5\nca_file = "tls/ca.pem"\n'
        )
        d = config.load(path).delivery
        self.assertEqual((d.dnssec, d.mta_sts, d.mta_sts_port, d.mta_sts_timeout),
                         (True, False, 8443, 5.0))  # fmt: skip
        self.assertEqual(d.ca_file, os.path.join(os.path.dirname(path), "tls", "ca.pem"))

    def test_errors(self) -> None:
        self.assertConfigError('[delivery]\ndnssec = "yes"\n', "[delivery] dnssec", "true or false")
        self.assertConfigError("[delivery]\nmta_sts = 1\n", "[delivery] mta_sts", "true or false")
        self.assertConfigError("[delivery]\nmta_sts_port = 0\n", "[delivery] mta_sts_port")
        self.assertConfigError("[delivery]\nmta_sts_timeout = 0\n", "[delivery] mta_sts_timeout")
