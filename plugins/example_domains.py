"""An example site plugin: refuse recipients in some domains.

Copy it, rename it, change it.  Configure it with

    [[plugins]]
    name = "blocked-domains"
    path = "plugins/example_domains.py"
    [plugins.options]
    domains = ["example.invalid"]
    text = "We do not send mail to that domain"

It shows the three parts every plugin has: an C{Options} dataclass (checked
at start like the rest of the configuration: a wrong type or an unknown
key stops start-up with a line naming the file and the key), a class that
declares the hook interfaces it provides, and C{make(options, context)}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import implementer

from mta.checks import CONTINUE, PluginContext, SessionInfo, Verdict, reject
from mta.interfaces import IRcptHook


@dataclass(frozen=True)
class Options:
    domains: list[str] = field(default_factory=list)
    text: str = "Mail to this domain is not accepted here"


@implementer(IRcptHook)
class BlockedDomains:
    name = "blocked-domains"

    def __init__(self, domains: list[str], text: str) -> None:
        self.domains = {d.lower().rstrip(".") for d in domains}
        self.text = text

    def on_rcpt(
        self, session: SessionInfo, sender: str, accepted: list[str], recipient: str
    ) -> Verdict:
        domain = recipient.rpartition("@")[2].lower()
        if domain in self.domains:
            return reject(f"{self.text}: <{recipient}>", 550, "5.7.1")
        return CONTINUE


def make(options: Options, context: PluginContext) -> BlockedDomains:
    return BlockedDomains(options.domains, options.text)
