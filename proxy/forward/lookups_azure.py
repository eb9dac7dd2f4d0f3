"""Azure lookups (`cloud.lookups.azure.tags`): the tags of the ARM resource a write names.

An ARM write names its resource by id (`DELETE .../providers/Microsoft.Compute/
disks/d1`; a POST action the resource before the action; any provider, resource
groups and subscriptions included). Before such a call is judged, tether asks
ARM's generic Tags API for that scope, which answers for any resource id, a
resource group or a subscription:

  GET {endpoint}{scope}/providers/Microsoft.Resources/tags/default?api-version=2021-04-01
  -> {"properties": {"tags": {"env": "production"}}, ...}

The permission is `Microsoft.Resources/tags/read` (in the built-in Reader role).
Rules see the resource's tags as `args.Tags`, and, where `scopes` asks, its
resource group's as `args.ResourceGroupTags` and its subscription's as
`args.SubscriptionTags`.

Reads (GET, HEAD, and so the SDKs' polling of `Azure-AsyncOperation` and
`Location` URLs) are never looked up; nor is a write the config's
`cloud.effects` made a read, nor one outside `apis` (globs, default every ARM
write: narrow it to leave out resource types the Tags API cannot answer for,
whose writes would otherwise be denied). A PUT on a resource that does not exist yet (a
create: ARM answers 404) sees `Tags: {}`; a 404 for any other call denies.

The lookup goes to `endpoint` from tether's configuration (whose host must be
the one the call goes to: tags from another cloud would not be this resource's),
at the address the forward proxy resolved and checked, over TLS with
`forward.upstream_ca` (else certifi). tether's identity comes from azure-identity
(the optional extra `azure`): the chain of a client secret or certificate in the
environment (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET` or
`AZURE_CLIENT_CERTIFICATE_PATH`), workload identity (`AZURE_FEDERATED_TOKEN_FILE`)
and managed identity, or one of them; token scope `https://{endpoint host}/.default`.
The credential is kept (its token cache: one token request an hour, not one per
call) and closed at shutdown. Tags themselves are never cached.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import certifi
from yarl import URL

from ..model import Effect, HttpRequest
from ..policy.cloud import CloudOperation
from ..policy.names import normalize
from .lookup_settings import AzureLookupSettings
from .lookups import TAGS, LookupFailed, pinned_session, read_limited, without

TAGS_API_VERSION = "2021-04-01"
TAGS_SUFFIX = "/providers/Microsoft.Resources/tags/default"
NAMES = {"resource": TAGS, "resource_group": "ResourceGroupTags",
         "subscription": "SubscriptionTags"}


def scopes(found: CloudOperation, wanted: Sequence[str]) -> list[tuple[str, str]]:
    """(argument name, ARM scope) for each scope `wanted` that `found` has, in order."""
    args = found.arguments
    resource, sub, group = (args.get(k) for k in ("resourceId", "subscriptionId",
                                                   "resourceGroupName"))
    out: list[tuple[str, str]] = []
    for kind in wanted:
        if kind == "resource" and isinstance(resource, str):
            out.append((NAMES[kind], resource))
        elif kind == "resource_group" and isinstance(sub, str) and isinstance(group, str):
            out.append((NAMES[kind], f"/subscriptions/{sub}/resourceGroups/{group}"))
        elif kind == "subscription" and isinstance(sub, str):
            out.append((NAMES[kind], f"/subscriptions/{sub}"))
    return out


def tags_path(scope: str) -> str:
    """The Tags API's path for `scope` (a decoded ARM id), each segment percent-encoded."""
    segments = [quote(s, safe="") for s in scope.strip("/").split("/")]
    return "/" + "/".join(segments) + TAGS_SUFFIX


def parse_tags(body: bytes) -> dict[str, str]:
    """The tags of a Tags API answer (`properties.tags`; none there: no tags)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise LookupFailed("the Tags API answer is not JSON") from None
    props = doc.get("properties") if isinstance(doc, dict) else None
    if not isinstance(props, dict):
        raise LookupFailed("the Tags API answer has no properties")
    tags = props.get("tags")
    tags = {} if tags is None else tags
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in tags.items()):
        raise LookupFailed("the Tags API answer's tags are not a map of strings")
    return dict(tags)


def arm_error(body: bytes) -> str:
    """ARM's `{"error": {"code", "message"}}`, as text for the denial's message."""
    try:
        error = json.loads(body).get("error")
        return f": {error['code']}: {str(error['message'])[:300]}"
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        return ""


class AzureTagLookup:
    def __init__(self, settings: AzureLookupSettings, upstream_ca: str | None) -> None:
        self.settings = settings
        self.upstream_ca = upstream_ca
        parts = urlsplit(settings.endpoint)
        self.host = (parts.hostname or "").lower()
        self.port = parts.port or 443
        self.token_scope = f"https://{self.host}/.default"
        self._credential: Any = None
        self._apis = tuple(re.compile(fnmatch.translate(normalize(a))) for a in settings.apis)

    def wanted(self, found: CloudOperation) -> list[str]:
        """The ARM scopes whose tags `found` needs (none for reads)."""
        if not self.settings.tags or found.cloud != "azure" or found.effect is Effect.READ:
            return []
        if not any(p.fullmatch(normalize(found.api)) for p in self._apis):
            return []
        return [scope for _, scope in scopes(found, self.settings.scopes)]

    def where(self, found: CloudOperation, http: HttpRequest) -> tuple[str, int]:
        if http.host.lower() != self.host:
            raise LookupFailed(f"the call goes to {http.host}, and tether looks Azure tags up "
                               f"at {self.settings.endpoint} (cloud.lookups.azure.endpoint)")
        return self.host, self.port

    async def tags(self, found: CloudOperation, http: HttpRequest, refs: Sequence[str],
                   address: str) -> dict[str, object]:
        """`found`'s arguments with the tags of its scopes, asked of the endpoint at `address`."""
        timeout = self.settings.timeout_s
        try:
            async with asyncio.timeout(timeout):
                token = await self._token()
                got: dict[str, object] = {}
                async with pinned_session(address, self.upstream_ca) as session:
                    for name, scope in scopes(found, self.settings.scopes):
                        got[name] = await self._get(session, token, scope,
                                                    create=http.method.upper() == "PUT"
                                                    and name == TAGS)
        except TimeoutError:
            raise LookupFailed(f"the Tags API timed out after {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise LookupFailed(f"the Tags API failed: {type(e).__name__}: {e}") from None
        merged = without(found.arguments, list(NAMES.values()))
        merged.update(got)
        return merged

    async def _get(self, session: aiohttp.ClientSession, token: str, scope: str,
                   create: bool) -> dict[str, str]:
        netloc = self.host if self.port == 443 else f"{self.host}:{self.port}"
        url = URL(f"https://{netloc}{tags_path(scope)}?api-version={TAGS_API_VERSION}",
                  encoded=True)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            body = await read_limited(resp, "Tags API")
            if resp.status == 404 and create:
                return {}  # a PUT that creates the resource: it has no tags yet
            if resp.status != 200:
                raise LookupFailed(f"the Tags API answered HTTP {resp.status} for {scope}"
                                   f"{arm_error(body)}")
        return parse_tags(body)

    async def _token(self) -> str:
        """A token for tether's own identity (the credential caches it until near expiry)."""
        if self._credential is None:
            self._credential = _credential(self.settings.credential, self.upstream_ca)
        try:
            from azure.core.exceptions import AzureError
        except ImportError:  # _credential said so already; kept for the type checker
            raise LookupFailed("azure-identity is not installed") from None
        try:
            token = await self._credential.get_token(self.token_scope)
        except AzureError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LookupFailed(f"tether has no Azure token ({type(e).__name__}: "
                               f"{first[:300]})") from None
        except ValueError as e:  # a credential set up wrong (a bad tenant id, a bad file)
            raise LookupFailed(f"tether's Azure credential is not usable ({e})") from None
        return str(token.token)

    async def close(self) -> None:
        if self._credential is not None:
            credential, self._credential = self._credential, None
            await credential.close()


def _credential(kind: str, upstream_ca: str | None) -> Any:
    """tether's own Azure identity: no developer or interactive sign-in, no proxy from
    the environment, TLS trust as for the lookups."""
    try:
        from azure.identity.aio import (
            DefaultAzureCredential,
            EnvironmentCredential,
            ManagedIdentityCredential,
            WorkloadIdentityCredential,
        )
    except ImportError:
        raise LookupFailed("azure-identity is not installed: install tether[azure] to look "
                           "Azure tags up") from None
    transport: dict[str, Any] = {"use_env_settings": False,
                                 "connection_verify": upstream_ca or certifi.where()}
    try:
        if kind == "environment":
            return EnvironmentCredential(**transport)
        if kind == "workload_identity":
            return WorkloadIdentityCredential(**transport)
        if kind == "managed_identity":
            return ManagedIdentityCredential(**transport)
        return DefaultAzureCredential(
            exclude_cli_credential=True, exclude_developer_cli_credential=True,
            exclude_powershell_credential=True, exclude_visual_studio_code_credential=True,
            exclude_shared_token_cache_credential=True, **transport)
    except ValueError as e:  # workload identity without its environment
        raise LookupFailed(f"tether's Azure credential ({kind}) is not configured: {e}") from None
