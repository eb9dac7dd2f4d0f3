"""Who is calling: the one place every front end asks, before anything is forwarded.

A JWT from a configured issuer names the agent by a claim; a static key names
it by its SHA-256 (`agents.NAME.key_sha256`); with neither, `auth.mode:
optional` lets the request on anonymous (named by `X-Tether-Agent` where the
config trusts that header) and `required` refuses it 401. Under `required` the
header never names an agent. A credential that verified is consumed: the front
end drops it before the request goes upstream. Refusals are counted here (every
front end shares them); the front end audits them, as it knows the provider.
The forward proxy hands what it established to the reverse route with a
one-time ticket (`hand_off`, handoff.py), read here before anything else.

The key set fetch is the only I/O, behind `Fetch` (jwks_fetch.py does it with
aiohttp), so this module stays free of the web framework.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from ..errors import Unauthorized
from ..telemetry import Metrics
from .credentials import Credential, find, strip_query
from .handoff import HEADER as HANDOFF_HEADER
from .handoff import Handoffs
from .jwks import KeyCache, KeySet, KeySetError, parse_jwks
from .settings import AuthSettings, JwtIssuer
from .verify import Reason, identity, peek, refuse, verify

log = logging.getLogger("tether.auth")


class JwksUnavailable(Exception):
    """The key set could not be fetched or read (the message never holds a token)."""


Fetch = Callable[[JwtIssuer], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Identity:
    agent: str | None
    claims: Mapping[str, object] = field(default_factory=dict)
    method: str = "anonymous"           # jwt | key | header | anonymous | transparent
    consumed: Credential | None = None  # what must not go upstream

    @property
    def drop_headers(self) -> tuple[str, ...]:
        return self.consumed.headers if self.consumed else ()

    def query(self, raw_query: str) -> str:
        return strip_query(raw_query, self.consumed.query_param if self.consumed else None)


ANONYMOUS = Identity(None)


class Authenticator:
    def __init__(self, settings: AuthSettings, agent_keys: Mapping[str, str], *,
                 trust_headers: bool, fetch: Fetch, metrics: Metrics | None = None,
                 wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.agent_keys = dict(agent_keys)
        self.trust_headers = trust_headers and not settings.required
        self.fetch = fetch
        self.metrics = metrics
        self.wall, self.monotonic = wall, monotonic
        self.issuers = {i.issuer: i for i in settings.issuers}
        self.caches = {i.issuer: KeyCache(i.cache_ttl_s, i.refetch_interval_s)
                       for i in settings.issuers}
        self.locks = {i.issuer: asyncio.Lock() for i in settings.issuers}
        self.handoffs = Handoffs(monotonic)

    def hand_off(self, what: Identity | Credential) -> tuple[str, str]:
        """The header that carries `what` from the forward proxy to the reverse route
        (handoff.py): an identity already established, or a credential to verify there."""
        return HANDOFF_HEADER, self.handoffs.issue(what)

    async def identify(self, headers: Mapping[str, str], raw_query: str = "",
                       credential: Credential | None = None) -> Identity:
        """`credential`: one the front end found itself (the forward proxy's
        Proxy-Authorization); else it is looked for in the headers and query."""
        try:
            return await self._identify(headers, raw_query, credential)
        except Unauthorized as e:
            if self.metrics is not None:
                self.metrics.auth_failures.labels(e.reason).inc()
            raise

    async def _identify(self, headers: Mapping[str, str], raw_query: str,
                        credential: Credential | None) -> Identity:
        ticket = None if credential else headers.get(HANDOFF_HEADER)
        if ticket is not None:
            return await self._handed(ticket, headers, raw_query)
        cred = credential or find(headers, raw_query)
        if cred is None:
            if self.settings.required:
                raise refuse(Reason.MISSING, "authentication is required: send your tether "
                             "key or token as the SDK's API key (Authorization: Bearer)")
            return self._anonymous(headers)
        peeked = peek(cred.token) if self.issuers else None
        if peeked is not None:
            issuer = self.issuers.get(peeked.iss or "")
            if issuer is not None:
                keys = await self._keys(issuer, peeked.kid)
                payload = verify(cred.token, peeked, issuer, keys, self.wall())
                agent, claims = identity(payload, issuer)
                return Identity(agent, claims, "jwt", cred)
            if self.settings.required:
                raise refuse(Reason.ISSUER, "the token's issuer is not configured")
        named = self._static(cred.token)
        if named is not None:
            return Identity(named, {}, "key", cred)
        if self.settings.required:
            raise refuse(Reason.UNKNOWN_KEY, "the key presented names no agent")
        # Optional mode: an unknown key is the agent's own upstream key; it goes on.
        return self._anonymous(headers)

    async def _handed(self, ticket: str, headers: Mapping[str, str], raw_query: str) -> Identity:
        """A request the forward proxy sent on: who it established, or its tunnel's
        credential verified now. A ticket that is not open is a forgery or a replay."""
        what = self.handoffs.redeem(ticket)
        if what is None:
            raise refuse(Reason.MALFORMED, "the forward proxy's identity ticket is unknown, "
                         "used or expired")
        found = await self._identify({}, "", what) if isinstance(what, Credential) else what
        token = found.consumed.token if found.consumed else ""
        try:
            inline = find(headers, raw_query) if token else None
        except Unauthorized:
            inline = None
        same = inline is not None and inline.token == token
        # The same token sent again in the request itself is consumed with it.
        return replace(found, consumed=Credential(
            token, (HANDOFF_HEADER, *(inline.headers if same and inline else ())),
            inline.query_param if same and inline else None))

    def _anonymous(self, headers: Mapping[str, str]) -> Identity:
        named = headers.get("x-tether-agent") if self.trust_headers else None
        return Identity(named, {}, "header") if named else ANONYMOUS

    def _static(self, token: str) -> str | None:
        # Looked up by digest: only digests are stored, and whatever the lookup's
        # timing says is about a SHA-256 of the guess, which teaches nothing of a key.
        # A header that is not UTF-8 arrives holding surrogates, which strict UTF-8
        # cannot encode: such a token names no agent, but it must not be a crash.
        raw = token.encode("utf-8", "surrogatepass")
        return self.agent_keys.get(hashlib.sha256(raw).hexdigest())

    async def _keys(self, issuer: JwtIssuer, kid: str | None) -> KeySet:
        cache = self.caches[issuer.issuer]
        if cache.should_fetch(kid, self.monotonic()):
            async with self.locks[issuer.issuer]:
                # Another request may have fetched while this one waited for the lock.
                if cache.should_fetch(kid, self.monotonic()):
                    await self._refresh(issuer, cache)
        if cache.keys is None:
            raise refuse(Reason.JWKS_UNAVAILABLE, "the issuer's signing keys could not be "
                         "fetched; the token cannot be verified (tether fails closed)")
        return cache.keys

    async def _refresh(self, issuer: JwtIssuer, cache: KeyCache) -> None:
        try:
            keys = parse_jwks(await self.fetch(issuer))
        except (JwksUnavailable, KeySetError) as e:
            cache.failed(self.monotonic())
            log.warning("JWKS of %s unavailable (%d in a row): %s", issuer.issuer,
                        cache.failures, e)
            return
        cache.fetched(keys, self.monotonic())
        log.info("JWKS of %s: %d keys", issuer.issuer, len(keys.keys))
