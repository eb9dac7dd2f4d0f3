"""Cloud lookups: the facts a call does not carry, fetched by tether before it is judged.

`DeleteVolume` names a volume, `disks.begin_delete` a disk id, `disks.delete` a
disk name; none carries the tags, yet "production disks are never deleted" is a
rule about tags. With `cloud.lookups.<cloud>` on, the forward proxy asks the
cloud itself, with tether's own read-only identity, and puts the answer into the
call's arguments under one name for every cloud:

  one resource   `Tags: {env: production, owner: ops}`
  several        `Tags: [{...}, {...}]`, one object per resource, in call order

(GCP labels too; Azure adds `ResourceGroupTags` and `SubscriptionTags` where
configured). `args: {Tags.env: {in: [production]}}` reads both shapes (dotted
paths fan out over lists; a condition holds when any reached value satisfies
it). Looked-up names replace any argument the agent sent under them (any case).

Each cloud's lookup lives in its own module (lookups_aws.py, lookups_azure.py,
lookups_gcp.py) and has the same two steps: `wanted(found)` names what to look
up (nothing: judge the call as it is) and `tags(found, http, refs, address)`
returns the arguments with the facts, asked of the host `where(found, http)`
names at `address` (which the forward proxy resolved and put through its SSRF
checks). `Lookups` picks the lookup by `found.cloud`.

Fail closed: a lookup that cannot be made or answered raises `LookupFailed`, and
the call is denied with `tether:lookup-failed`. No cache: a tag changed a second
ago must count.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol

import aiohttp
import certifi
from aiohttp.abc import AbstractResolver, ResolveResult

from ..model import HttpRequest
from ..policy.cloud import CloudOperation
from ..policy.names import normalize

TAGS = "Tags"
MAX_ANSWER_BYTES = 1024 * 1024


class LookupFailed(Exception):
    """The lookup could not be made or answered; the call is denied."""


class CloudLookup(Protocol):
    def wanted(self, found: CloudOperation) -> list[str]: ...

    async def tags(self, found: CloudOperation, http: HttpRequest, refs: Sequence[str],
                   address: str) -> dict[str, object]: ...


def without(arguments: Mapping[str, object], names: Sequence[str]) -> dict[str, object]:
    """`arguments` less any key that is one of `names` in normal form (what the agent
    sent under a name tether fills itself)."""
    drop = {normalize(n) for n in names}
    return {k: v for k, v in arguments.items() if normalize(k) not in drop}


def with_tags(arguments: Mapping[str, object], ids: Sequence[str],
              tags: Mapping[str, Mapping[str, str]]) -> dict[str, object]:
    """The call's arguments with the looked-up `Tags` (see the module docstring)."""
    merged = without(arguments, [TAGS])
    per = [dict(tags.get(rid, {})) for rid in ids]
    merged[TAGS] = per[0] if len(per) == 1 else per
    return merged


class Pinned(AbstractResolver):
    """Connect to the address the forward proxy's SSRF checks passed, not a fresh DNS answer."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [ResolveResult(hostname=host, host=self.address, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


def tls_context(upstream_ca: str | None) -> ssl.SSLContext:
    # As mitmproxy does for upstreams: the configured CA file instead of certifi's.
    return ssl.create_default_context(cafile=upstream_ca or certifi.where())


def pinned_session(address: str, upstream_ca: str | None) -> aiohttp.ClientSession:
    """One short-lived session for one lookup: TLS with tether's upstream trust, to
    `address` only, no proxy from the environment, bodies as sent."""
    connector = aiohttp.TCPConnector(ssl=tls_context(upstream_ca), resolver=Pinned(address),
                                     use_dns_cache=False, force_close=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)


async def read_limited(resp: aiohttp.ClientResponse, what: str) -> bytes:
    data = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            raise LookupFailed(f"the {what} answer is too large")
    return bytes(data)


class Lookups:
    """Every configured cloud's lookup, picked by the operation's cloud (the list is
    built in judge.py `cloud_lookups`)."""

    def __init__(self, by_cloud: Mapping[str, CloudLookup]) -> None:
        self.by_cloud = dict(by_cloud)

    def wanted(self, found: CloudOperation) -> list[str]:
        """What to look up for `found` (nothing: judge it as it is)."""
        lookup = self.by_cloud.get(found.cloud)
        return lookup.wanted(found) if lookup is not None else []

    def where(self, found: CloudOperation, http: HttpRequest) -> tuple[str, int]:
        """The host and port the lookup asks: the call's own (AWS) or the endpoint of
        tether's configuration (Azure, GCP), never one the agent chose there."""
        where = getattr(self.by_cloud.get(found.cloud), "where", None)
        if where is None:
            return http.host, http.port
        host, port = where(found, http)
        return str(host), int(port)

    async def tags(self, found: CloudOperation, http: HttpRequest, refs: Sequence[str],
                   address: str) -> dict[str, object]:
        lookup = self.by_cloud.get(found.cloud)
        if lookup is None:
            raise LookupFailed(f"no lookup is configured for {found.cloud}")
        return await lookup.tags(found, http, refs, address)

    async def close(self) -> None:
        """At shutdown: a lookup that keeps a credential (its token cache) closes it."""
        for lookup in self.by_cloud.values():
            close = getattr(lookup, "close", None)
            if close is not None:
                await close()
