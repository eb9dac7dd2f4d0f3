"""Label lookups for Google Cloud calls: the labels a write's resource carries, fetched by tether.

`disks.delete` names a disk (`.../zones/z/disks/d`), not its labels, yet "production
disks are never deleted" is a rule about labels. With `cloud.lookups.gcp.labels`
on, before a write is judged tether GETs the resource it acts on and puts its
labels into the call's arguments as `Tags` (the name every cloud's lookup uses;
see lookups.py), one object per resource:

  GCE      disks (zonal, regional), instances, snapshots, images: `labels`
  GKE      clusters, for any write on a cluster or its node pools: `resourceLabels`
  Storage  buckets, for any write on a bucket or its objects: `labels`; a rewrite
           or copy to another bucket names both, source first

Reads (`disks.get`, polling `zoneOperations.get` and `wait`) and the creation of a
labelled resource itself (`disks.insert`: nothing to ask about yet) are judged as
they are. The GET goes to the endpoint of tether's configuration for the API
(`cloud.lookups.gcp.endpoints`), never to the host the agent called, at the
address the forward proxy's SSRF checks passed, over TLS with
`forward.upstream_ca` (else certifi). It is made with tether's own identity:
google-auth's Application Default Credentials (a workload identity / external
account, a service-account key file in GOOGLE_APPLICATION_CREDENTIALS, the
metadata server), scope `cloud-platform.read-only`, refreshed by the library in a
worker thread when it expires. google-auth (with requests) is the optional
extra `tether[gcp]`, imported on the first lookup, off the loop (about 35 ms in a
running tether, measured; 0.2-0.3 s in a bare interpreter).

Fail closed: no credentials, a token that cannot be had, a timeout, an answer
other than 200, one that is not JSON, is about another resource, or whose labels
are not a mapping of strings raise `LookupFailed`: the call is denied
(`tether:lookup-failed`). No cache of labels: a relabel counts at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import aiohttp
import certifi

from ..model import Effect, HttpRequest
from ..policy.cloud import CloudOperation
from ..strict_json import loads
from .lookup_settings_gcp import GcpLookupSettings
from .lookups import LookupFailed, pinned_session, read_limited, with_tags

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

READ_ONLY = "https://www.googleapis.com/auth/cloud-platform.read-only"
MAX_LABELS = 1000  # GCP allows 64 a resource; more is not an answer from GCP
MAX_NAME = 255
# collection -> (the path's argument naming it, the scopes it may sit in; None: global)
COMPUTE = {"disks": ("disk", ("zone", "region")), "instances": ("instance", ("zone",)),
           "snapshots": ("snapshot", None), "images": ("image", None)}
LABEL_FIELD = {"compute": "labels", "storage": "labels", "container": "resourceLabels"}


@dataclass(frozen=True, slots=True)
class GcpResource:
    path: str   # under the API's endpoint, each segment percent-encoded
    name: str   # the `name` its answer must carry


def resources(found: CloudOperation) -> list[GcpResource]:
    """The labelled resources a write names, in order, once each (none: judge it as it is)."""
    if found.cloud != "gcp" or found.effect is not Effect.WRITE:
        return []
    args = found.arguments
    collection = found.operation.split(".")[1] if found.operation.count(".") >= 2 else ""
    named: list[GcpResource] = []
    if found.service == "compute" and collection in COMPUTE:
        arg, scopes = COMPUTE[collection]
        if args.get(arg) is None:
            return []
        project, name = _segment(args.get("project"), "project"), _segment(args.get(arg), arg)
        if scopes is None:
            named.append(GcpResource(f"compute/v1/projects/{project}/global/{collection}/{name}",
                                     str(args[arg])))
        else:
            scope = next((s for s in scopes if args.get(s) is not None), None)
            if scope is None:
                raise LookupFailed(f"the call names a {arg} without its {' or '.join(scopes)}")
            where = _segment(args.get(scope), scope)
            named.append(GcpResource(f"compute/v1/projects/{project}/{scope}s/{where}/"
                                     f"{collection}/{name}", str(args[arg])))
    elif found.service == "storage" and args.get("bucket") is not None:
        destination = args.get("destination")
        buckets = [args.get("bucket")]
        if isinstance(destination, Mapping) and destination.get("bucket") is not None:
            buckets.append(destination.get("bucket"))
        for bucket in buckets:
            named.append(GcpResource(f"storage/v1/b/{_segment(bucket, 'bucket')}", str(bucket)))
    elif found.service == "container" and args.get("cluster") is not None:
        location = args.get("location") if args.get("location") is not None else args.get("zone")
        project = _segment(args.get("project"), "project")
        path = (f"v1/projects/{project}/locations/{_segment(location, 'location')}/clusters/"
                f"{_segment(args.get('cluster'), 'cluster')}")
        named.append(GcpResource(path, str(args.get("cluster"))))
    return list({r.path: r for r in named}.values())


def _segment(value: object, what: str) -> str:
    """One path segment of tether's GET: a plain name, percent-encoded, or the lookup fails."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or value in (".", "..")
            or "/" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
        raise LookupFailed(f"the {what} {value!r:.80} is not a resource name")
    return quote(value, safe="")


def labels_from(body: bytes, service: str, resource: GcpResource) -> dict[str, str]:
    """The labels in GCP's JSON answer for `resource` ({} when it has none)."""
    try:
        doc = loads(body)
    except (ValueError, RecursionError) as e:
        raise LookupFailed(f"the answer for {resource.name!r:.80} is not JSON ({e!s:.100})") from None
    if not isinstance(doc, dict):
        raise LookupFailed(f"the answer for {resource.name!r:.80} is not a JSON object")
    if doc.get("name") != resource.name:
        raise LookupFailed(f"the answer for {resource.name!r:.80} is about {doc.get('name')!r:.80}")
    field = LABEL_FIELD.get(service, "labels")
    labels = doc.get(field)
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise LookupFailed(f"the {field} of {resource.name!r:.80} are not a mapping")
    if len(labels) > MAX_LABELS or not all(isinstance(v, str) for v in labels.values()):
        raise LookupFailed(f"the {field} of {resource.name!r:.80} are not up to "
                           f"{MAX_LABELS} names with text values")
    return {str(k): v for k, v in labels.items()}


def _why(body: bytes) -> str:
    """GCP's own reason for an error answer (`{"error": {"status", "message"}}`), short."""
    try:
        error = loads(body)
    except (ValueError, RecursionError):
        return ""
    error = error.get("error") if isinstance(error, dict) else None
    if not isinstance(error, dict):
        return ""
    said = [str(error.get(k)) for k in ("status", "message") if isinstance(error.get(k), str)]
    return f" ({': '.join(said)!s:.200})" if said else ""


class GoogleIdentity:
    """tether's own Google identity: found once by google-auth's ADC chain, its token
    refreshed by the library when it is no longer valid, in a worker thread (the chain
    reads files and may ask the metadata server; both block)."""

    def __init__(self, upstream_ca: str | None, timeout_s: float) -> None:
        self.upstream_ca = upstream_ca
        self.timeout_s = timeout_s
        self._credentials: Credentials | None = None
        self._lock = threading.Lock()

    async def headers(self) -> dict[str, str]:
        credentials = self._credentials
        if credentials is not None and credentials.valid:
            return _applied(credentials)
        return await asyncio.to_thread(self._refreshed)

    def _refreshed(self) -> dict[str, str]:
        # One refresh at a time; a lookup that cannot have the lock within its own timeout
        # gives up rather than keep a worker thread waiting behind a slow token endpoint.
        if not self._lock.acquire(timeout=self.timeout_s):
            raise LookupFailed("tether's Google token is still being fetched by another lookup")
        try:
            return self._refresh()
        finally:
            self._lock.release()

    def _refresh(self) -> dict[str, str]:
        try:
            import google.auth
            import requests
            from google.auth import exceptions
            from google.auth.transport.requests import Request
        except ImportError as e:
            raise LookupFailed(f"GCP label lookups need google-auth with requests "
                               f"(pip install 'tether[gcp]'): {e}") from None
        cap = self.timeout_s

        class Capped(Request):
            """No token or metadata request outlives the lookup's own timeout."""

            def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                         headers: Mapping[str, str] | None = None, timeout: float | None = None,
                         **kwargs: object) -> object:
                return super().__call__(  # type: ignore[no-untyped-call]
                    url, method, body, headers, timeout=min(timeout or cap, cap), **kwargs)

        with requests.Session() as session:
            session.trust_env = False  # tether's own HTTPS_PROXY is not for its identity
            session.verify = self.upstream_ca or certifi.where()
            request = Capped(session)
            try:
                if self._credentials is None:
                    self._credentials, _ = google.auth.default(scopes=[READ_ONLY],
                                                               request=request)
                if not self._credentials.valid:
                    self._credentials.refresh(request)  # type: ignore[no-untyped-call]
            except exceptions.DefaultCredentialsError as e:
                raise LookupFailed(
                    f"tether has no usable Google credentials to look labels up with "
                    f"({e!s:.200}; set GOOGLE_APPLICATION_CREDENTIALS, a workload identity, "
                    f"or run where the metadata server answers)") from None
            except Exception as e:  # a bad key, a refused grant, a network error: all deny
                raise LookupFailed(f"tether's Google token could not be had: "
                                   f"{type(e).__name__}: {e!s:.200}") from None
        return _applied(self._credentials)


def _applied(credentials: Credentials) -> dict[str, str]:
    headers: dict[str, str] = {}
    credentials.apply(headers)  # type: ignore[no-untyped-call]
    return headers


class GcpLabelLookup:
    def __init__(self, settings: GcpLookupSettings, upstream_ca: str | None) -> None:
        self.settings = settings
        self.upstream_ca = upstream_ca
        self.identity = GoogleIdentity(upstream_ca, settings.timeout_s)

    def wanted(self, found: CloudOperation) -> list[str]:
        """The resources to look up for `found`, as paths on tether's endpoint for its API."""
        if not self.settings.labels or self.settings.endpoint(found.service) is None:
            return []
        return [r.path for r in resources(found)]

    def where(self, found: CloudOperation, http: HttpRequest) -> tuple[str, int]:
        """The host and port of the endpoint tether's configuration names for `found`'s API."""
        parts = urlsplit(self.settings.endpoint(found.service) or "")
        if parts.hostname is None:
            raise LookupFailed(f"no lookup endpoint is configured for {found.service}")
        return parts.hostname, parts.port or 443

    async def tags(self, found: CloudOperation, http: HttpRequest, refs: Sequence[str],
                   address: str) -> dict[str, object]:
        """`found`'s arguments with the labels of `refs` as `Tags`, asked at `address`."""
        endpoint = self.settings.endpoint(found.service)
        named = {r.path: r for r in resources(found)}
        if endpoint is None or any(ref not in named for ref in refs):
            raise LookupFailed(f"{found.api} names no resource tether looks labels up for")
        timeout = self.settings.timeout_s
        labels: dict[str, dict[str, str]] = {}
        try:
            async with asyncio.timeout(timeout):
                headers = await self.identity.headers()
                headers.update({"Accept": "application/json", "Accept-Encoding": "identity"})
                async with pinned_session(address, self.upstream_ca) as session:
                    for ref in refs:
                        labels[ref] = await self._labels(session, endpoint, found.service,
                                                         named[ref], headers)
        except TimeoutError:
            raise LookupFailed(f"the label lookup timed out after {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise LookupFailed(f"the label lookup failed: {type(e).__name__}: {e}") from None
        return with_tags(found.arguments, refs, labels)

    async def _labels(self, session: aiohttp.ClientSession, endpoint: str, service: str,
                      resource: GcpResource, headers: Mapping[str, str]) -> dict[str, str]:
        async with session.get(f"{endpoint}/{resource.path}", headers=headers,
                               allow_redirects=False) as resp:
            body = await read_limited(resp, "label lookup")
            if resp.status != 200:
                raise LookupFailed(f"GET {resource.path} answered HTTP {resp.status}{_why(body)}")
        return labels_from(body, service, resource)
