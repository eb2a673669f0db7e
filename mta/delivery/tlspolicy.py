"""Which TLS policy applies to a next hop: DANE, MTA-STS, or the configured level.

For mail sent to a domain's MX hosts (not through a C{[routes]} relay,
whose TLS is the operator's choice), the delivery agent asks
L{TLSPolicies.for_domain} once per attempt and L{TLSPolicies.for_hop}
for each MX host it tries.  In order:

  1. DANE (RFC 7672), with C{[delivery] dnssec = true}: for a host found
     through DNSSEC-validated answers (L{mta.delivery.mx.NextHop.secure}),
     the TLSA records of C{_25._tcp.HOST}.  A validated, non-empty
     RRset with usable records (L{mta.delivery.dane.usable}) means TLS
     is required and the chain must match them (C{tls=dane}); with only
     unusable records, TLS is still required but cannot be authenticated
     (C{tls=dane-encrypt}, RFC 7672 section 2.2; Postfix does the
     same).  A TLSA lookup that fails (SERVFAIL: also what a validating
     resolver answers for bogus records) makes the host unusable for
     now: it is skipped with a temporary C{4.7.5}, as the RFC asks
     (section 2.2: such a host must not be used without DANE).  No TLSA
     records, or records in an answer that was not validated: DANE does
     not apply to that host.
  2. MTA-STS (RFC 8461), with C{[delivery] mta_sts = true} (the default):
     the domain's policy (L{mta.delivery.mtasts}).  In C{enforce} mode an
     MX host the policy does not name is skipped (C{4.7.5}), and the
     others need TLS with a certificate from a trusted CA valid for the
     MX host name (C{tls=mta-sts}).  In C{testing} mode the same checks
     run but only log (RFC 8461 section 5); delivery goes on with the
     configured level.  DANE wins where both apply (RFC 8461 section 2:
     MTA-STS must not override a failing DANE validation), host by host.
  3. The configured level (C{[delivery] tls}, C{tls_required}):
     C{none}, C{may}, C{encrypt}, or C{verify}, which is checked like
     MTA-STS against C{[delivery] ca_file} or the system's CAs.

Every failure here is temporary: a policy problem may be repaired, and
RFC 8461 section 5.1 forbids failing a message permanently before a new
policy had a chance to be fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from mta.address import Network
from mta.batch import Runner
from mta.config import DeliveryConfig
from mta.delivery import dane, pkix
from mta.delivery.dns import DNSError, TLSARecord
from mta.delivery.mtasts import MTASTS, Policy, PolicyCache, PolicyFetcher
from mta.delivery.mx import NextHop
from mta.errors import DeliveryError, Reply
from mta.hostnames import to_ascii
from mta.interfaces import IResolver
from mta.smtp.client import ClientPolicy

log = Logger(namespace="mta.delivery")


class HopRefusedError(DeliveryError):
    """A host the policy C{label} does not let us use now (always temporary)."""

    def __init__(self, label: str, text: str) -> None:
        super().__init__(Reply(451, "4.7.5", text), "tls")
        self.label = label


@dataclass(frozen=True)
class PKIXCheck:
    """A L{mta.smtp.client.PeerCheck}: trusted CA, in date, valid for one of C{names}."""

    name: str
    enforced: bool
    trust: pkix.TrustStore
    names: tuple[str, ...]

    def problem(self, chain: Sequence[x509.Certificate]) -> str | None:
        return pkix.check(chain, self.trust, self.names)


@dataclass(frozen=True)
class DANECheck:
    """A L{mta.smtp.client.PeerCheck}: the chain matches the host's usable TLSA records."""

    name: str
    records: tuple[TLSARecord, ...]
    names: tuple[str, ...]
    enforced: bool = True

    def problem(self, chain: Sequence[x509.Certificate]) -> str | None:
        return dane.problem(self.records, chain, self.names)


@dataclass(frozen=True)
class DomainTLS:
    """What L{TLSPolicies.for_domain} found: the configured policy and any MTA-STS policy."""

    domain: str  # A-label form, "" when not a domain name (an address literal)
    base: ClientPolicy
    sts: Policy | None = None


class TLSPolicies:
    """Decides the TLS policy per MX host (see the module docstring).

    @param trust: the CAs for MTA-STS and C{verify}.
    @param dnssec: use DANE; the resolver must then have been made with
        C{dnssec=True}, or no answer is ever secure.
    @param mta_sts: where MTA-STS policies come from; None: no MTA-STS.
    """

    def __init__(
        self,
        resolver: IResolver,
        trust: pkix.TrustStore,
        *,
        dnssec: bool = False,
        mta_sts: MTASTS | None = None,
    ) -> None:
        self.resolver = resolver
        self.trust = trust
        self.dnssec = dnssec
        self.mta_sts = mta_sts

    async def for_domain(self, domain: str, base: ClientPolicy) -> DomainTLS:
        """The MTA-STS policy of C{domain}, if any, with the configured policy."""
        if domain.startswith("["):
            return DomainTLS("", base)
        try:
            name = to_ascii(domain)
        except ValueError:
            return DomainTLS("", base)
        if self.mta_sts is None:
            return DomainTLS(name, base)
        policy = await self.mta_sts.policy(name)
        if policy is not None and policy.mode == "none":
            policy = None  # RFC 8461 section 5: as if there were no policy
        return DomainTLS(name, base, policy)

    async def for_hop(self, found: DomainTLS, hop: NextHop) -> ClientPolicy:
        """The policy to connect to C{hop} with; DeliveryError to skip the host."""
        base = found.base
        if self.dnssec and hop.secure:
            policy = await self._dane(found, hop)
            if policy is not None:
                return policy
        sts = found.sts
        if sts is not None:
            name = f"MTA-STS policy of {found.domain}"
            matched = sts.matches(hop.host)
            if sts.mode == "enforce":
                if not matched:
                    raise HopRefusedError(
                        "mta-sts",
                        f"MX host {hop.host} is not one the {name} names ({', '.join(sts.mx)})",
                    )
                check = PKIXCheck(name, True, self.trust, (hop.host,))
                return replace(base, tls="encrypt", check=check, label="mta-sts")
            if not matched:
                log.warn(
                    "MX host {host} is not one the {name} (testing) names; delivering anyway",
                    host=hop.host, name=name,
                )  # fmt: skip
            if base.tls in ("may", "encrypt"):
                return replace(base, check=PKIXCheck(name, False, self.trust, (hop.host,)))
            if base.tls == "none":
                return base
        if base.tls == "verify":
            check = PKIXCheck("[delivery] tls = verify", True, self.trust, (hop.host,))
            return replace(base, tls="encrypt", check=check, label="verify")
        return base

    async def _dane(self, found: DomainTLS, hop: NextHop) -> ClientPolicy | None:
        """The DANE policy of a secure host, None when DANE does not apply to it."""
        owner = dane.tlsa_name(hop.host, hop.port)
        try:
            answer = await self.resolver.lookup_tlsa(owner)
        except DNSError as e:
            if not e.temporary:
                return None  # no TLSA records: DANE does not apply
            raise HopRefusedError(
                "dane", f"TLSA lookup for {owner} failed, not using {hop.host}: {e}"
            ) from None
        if not answer.secure:
            log.info("ignoring TLSA records of {owner}: not DNSSEC-validated", owner=owner)
            return None
        records = dane.usable(answer.records)
        names = (hop.host,) + ((found.domain,) if found.domain and hop.mx else ())
        if not records:
            log.info(
                "{owner}: no usable TLSA record ({records}); TLS required without authentication",
                owner=owner, records=", ".join(str(r) for r in answer.records),
            )  # fmt: skip
            return replace(found.base, tls="encrypt", check=None, label="dane-encrypt")
        check = DANECheck(f"DANE TLSA records of {owner}", records, names)
        return replace(found.base, tls="encrypt", check=check, label="dane")


def from_config(
    delivery: DeliveryConfig,
    reactor: Any,
    resolver: IResolver,
    *,
    cache_dir: str,
    runner: Runner[Any],
    families: tuple[str, ...],
    refuse_networks: tuple[Network, ...],
) -> TLSPolicies:
    """The policies as C{[delivery]} configures them; MTA-STS policies cached in C{cache_dir}.

    @raise ConfigError: when C{ca_file} cannot be read.
    """
    trust = pkix.TrustStore(delivery.ca_file or None)
    sts = None
    if delivery.mta_sts:
        fetcher = PolicyFetcher(
            reactor,
            resolver,
            trust.trust_root(),
            port=delivery.mta_sts_port,
            timeout=delivery.mta_sts_timeout,
            families=families,
            refuse_networks=refuse_networks,
        )
        sts = MTASTS(resolver, fetcher.fetch, PolicyCache(cache_dir, runner, reactor), reactor)
    return TLSPolicies(resolver, trust, dnssec=delivery.dnssec, mta_sts=sts)
