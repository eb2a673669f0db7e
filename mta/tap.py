"""The twistd/twist entry point: C{twistd -n mta --config FILE}."""

from __future__ import annotations

from twisted.python import usage

from mta import config as configmod
from mta import logs
from mta.errors import ConfigError
from mta.service import MTAService, build, fatal


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mta submission and delivery service.  Without --config the "
        "embedded default runs: spool in ./spool, a self-signed certificate, "
        "listeners on 127.0.0.1:8465 (TLS) and 127.0.0.1:8587 (STARTTLS)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (docs/configuration.md)"],
    ]

    def postOptions(self) -> None:
        """twistd's text log, written in batches (L{mta.logs}) unless the
        command line chose another logger or syslog."""
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("logger") or parent.get("syslog"):
            return
        logs.use_batched_text_log(parent.get("logfile"))
        parent["logger"] = "mta.logs.batched_text_observer"


def makeService(options: Options) -> MTAService:
    from twisted.internet import reactor  # noqa: PLC0415 - chosen by twistd first

    try:
        config = configmod.load(options["config"])
    except ConfigError as e:
        fatal(str(e))
    return build(config, reactor)
