"""Running several instances as one service (SPEC section 9, docs/operations.md).

The instances share what a user or a receiver sees as one service, through
L{mta.interfaces.ISharedState}: L{local} keeps it in this process (one
instance, as always), L{redisstate} in Redis.  L{client} is the Twisted
Redis client both the state and L{users} use; L{resp} is the wire format
(RESP2) for it and for the blocking client of C{mtactl} (L{blocking}).
The PROXY protocol on the listeners, which lets the limits see the real
client behind a load balancer, is L{mta.proxyproto}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FailureCounts:
    """Wrong passwords of one client key within the throttle's window."""

    distinct: int  # distinct (username, password, stored hash) digests
    attempts: int  # every failure, repeats included


NO_FAILURES = FailureCounts(0, 0)


@dataclass(frozen=True)
class SharedLimits:
    """The cluster's traffic-shaping state (L{mta.interfaces.ISharedState.destination_limits})."""

    instances: int  # alive within the window, the asking one included
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)  # by destination
