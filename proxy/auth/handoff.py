"""Handing an identity from the forward proxy to tether's own reverse route.

The forward proxy sends LLM requests on to tether's reverse port on loopback
(`/openai/...`), where the provider's governance runs. The agent proved who it
is to the forward proxy (Proxy-Authorization on the CONNECT, or the pod
itself under `forward.transparent_agent`), not in the request the reverse
route sees, so the forward proxy leaves a ticket: a random one-time name in
`X-Tether-Handoff` for what it knew, kept here in memory. Both sides run in
one process and share one Authenticator, so nothing is signed and nothing
about the identity travels in the request; a ticket can be used once, within
TTL seconds, and a forged or replayed one is refused (never ignored). Any
`x-tether-*` header is stripped before a request goes upstream, this one too.

What is handed over is either an `Identity` already established (the pod's
configured agent, a plain-HTTP request verified at the proxy) or the
`Credential` of the tunnel, verified again by the reverse route, so that a
token that expired during a long-lived tunnel is refused there, 401 in the
provider's own error shape. Sans-IO: the clock is given.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .credentials import Credential

if TYPE_CHECKING:
    from .authenticator import Identity

HEADER = "x-tether-handoff"
TTL_S = 60.0
MAX_OPEN = 10_000


@dataclass(frozen=True, slots=True)
class Ticket:
    what: Identity | Credential
    expires: float


class Handoffs:
    def __init__(self, monotonic: Callable[[], float], ttl_s: float = TTL_S,
                 max_open: int = MAX_OPEN) -> None:
        self.monotonic = monotonic
        self.ttl_s = ttl_s
        self.max_open = max_open
        self.open: dict[str, Ticket] = {}   # by SHA-256 of the ticket's name

    def issue(self, what: Identity | Credential) -> str:
        """A ticket name for `what`; the oldest open tickets go when too many are open
        (a request that never reached the reverse route leaves one behind)."""
        now = self.monotonic()
        if len(self.open) >= self.max_open:
            self._expire(now)
            while len(self.open) >= self.max_open:
                del self.open[next(iter(self.open))]
        name = secrets.token_urlsafe(32)
        self.open[_key(name)] = Ticket(what, now + self.ttl_s)
        return name

    def redeem(self, name: str) -> Identity | Credential | None:
        """What the ticket was issued for, once; None when unknown, used or expired."""
        ticket = self.open.pop(_key(name.strip()), None)
        if ticket is None or self.monotonic() > ticket.expires:
            return None
        return ticket.what

    def _expire(self, now: float) -> None:
        for key in [k for k, t in self.open.items() if now > t.expires]:
            del self.open[key]


def _key(name: str) -> str:
    # Looked up by digest, so how long the lookup takes says nothing about open names.
    return hashlib.sha256(name.encode()).hexdigest()
