"""Fetching an issuer's JWKS: the only I/O of authentication.

From `jwks_file` (a key set fetched offline, e.g. `kubectl get --raw
/openid/v1/jwks`, re-read when a refetch is due so a mounted ConfigMap can
rotate it), from `jwks_url`, or from the `jwks_uri` of the issuer's OIDC
discovery document. `ca_file` adds a CA for the fetch; `token_file` is read at
each fetch (projected tokens rotate) and sent as a bearer token, which the
Kubernetes API server's `/openid/v1/jwks` needs. Redirects are not followed, so
that token goes nowhere else. Every failure is `JwksUnavailable`.
"""

from __future__ import annotations

import json
import ssl

import aiohttp

from ..config import Config
from ..small_file import read_small_file
from ..telemetry import Metrics
from .authenticator import Authenticator, JwksUnavailable
from .settings import JwtIssuer, fetch_url_ok

MAX_DOCUMENT = 1024 * 1024
MAX_TOKEN_FILE = 64 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=10)


class JwksFetcher:
    """`client`: the proxy's shared session (trust_env off: no environment proxy)."""

    def __init__(self, client: aiohttp.ClientSession) -> None:
        self.client = client
        self.discovered: dict[str, str] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}

    async def __call__(self, issuer: JwtIssuer) -> object:
        if issuer.jwks_file is not None:
            try:
                return json.loads(read_small_file(issuer.jwks_file, MAX_DOCUMENT))
            except (OSError, ValueError, RecursionError) as e:
                raise JwksUnavailable(f"cannot read {issuer.jwks_file}: {e}") from None
        url = issuer.jwks_url or await self._discover(issuer)
        return await self._get_json(issuer, url)

    async def _discover(self, issuer: JwtIssuer) -> str:
        known = self.discovered.get(issuer.issuer)
        if known:
            return known
        doc = await self._get_json(issuer, issuer.discovery_url)
        if not isinstance(doc, dict) or doc.get("issuer") != issuer.issuer:
            raise JwksUnavailable("the discovery document does not name this issuer")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not fetch_url_ok(uri):
            raise JwksUnavailable("the discovery document has no usable https jwks_uri")
        self.discovered[issuer.issuer] = uri
        return uri

    def _ssl(self, issuer: JwtIssuer) -> ssl.SSLContext | bool:
        if issuer.ca_file is None:
            return True
        found = self.contexts.get(issuer.ca_file)
        if found is None:
            found = ssl.create_default_context()
            found.load_verify_locations(cafile=issuer.ca_file)
            self.contexts[issuer.ca_file] = found
        return found

    async def _get_json(self, issuer: JwtIssuer, url: str) -> object:
        headers = {"Accept": "application/json"}
        if issuer.token_file is not None:
            try:
                token = read_small_file(issuer.token_file, MAX_TOKEN_FILE).decode().strip()
            except (OSError, ValueError) as e:
                raise JwksUnavailable(f"cannot read token_file: {e}") from None
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self.client.get(url, headers=headers, ssl=self._ssl(issuer),
                                       allow_redirects=False, timeout=TIMEOUT) as resp:
                if resp.status != 200:
                    raise JwksUnavailable(f"{url} answered {resp.status}")
                # Whole, up to the bound: one read() returns only what has arrived so far.
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        break
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as e:
            raise JwksUnavailable(f"{url} could not be reached: {type(e).__name__}") from None
        if len(body) > MAX_DOCUMENT:
            raise JwksUnavailable(f"{url} sent more than {MAX_DOCUMENT} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise JwksUnavailable(f"{url} did not send JSON") from None


def make_authenticator(config: Config, client: aiohttp.ClientSession,
                       metrics: Metrics | None) -> Authenticator:
    """The proxy's authenticator, fetching key sets over the proxy's client session."""
    return Authenticator(config.auth, config.agent_keys,
                         trust_headers=config.trust_identity_headers,
                         fetch=JwksFetcher(client), metrics=metrics)
