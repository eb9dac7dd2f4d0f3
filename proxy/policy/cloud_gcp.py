"""Google Cloud REST requests to operations, named like their IAM permissions.

`DELETE compute.googleapis.com/compute/v1/projects/p/zones/z/disks/d` is
`compute.disks.delete`: the API, the last collection of the resource path, and
a verb. Standard verbs come from the method and the path's shape: a resource
(collection/id pairs) gets get (GET, HEAD), update (PUT, PATCH) or delete; a
collection gets list (GET) or create (POST). Custom methods come from the
`:verb` suffix (`.../secrets/s/versions/latest:access` ->
`secretmanager.versions.access`), or, in the Compute API, from a segment after
a named resource (`.../instances/i/stop` -> `compute.instances.stop`).

An encoded `%3A` in the last segment refuses (is it a verb or part of the
id?), as does a batch request (`/batch/...`), whose body holds other requests.
Collections the catalog aliases (GCS's `b` and `o`) get their full names.
Arguments: one per collection/id pair (`project`, `zone`, `disk`), `name` (the
relative resource name), `query` (without API keys or tokens) and `body` (JSON).
"""

from __future__ import annotations

import re

from ..model import HttpRequest
from .cloud_catalog import CloudCatalog
from .cloud_common import (
    CannotClassify,
    Draft,
    Refuse,
    decode_segment,
    decoded_body,
    form_pairs,
    media_type,
    path_segments,
    put_new,
    strict_json,
)
from .cloud_hosts import CloudHost

VERSION = re.compile(r"v\d+(p\d+)?((alpha|beta)\d*)?|alpha|beta")
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_SERVICE = re.compile(r"[a-z][a-z0-9-]*")
_SECRET_PARAMS = frozenset({"key", "access_token", "oauth_token", "_method"})
COMPUTE_SCOPES = frozenset({"zones", "regions"})
COMPUTE_MARKERS = frozenset({"global", "aggregated"})
_RESOURCE_VERBS = {"GET": "get", "HEAD": "get", "DELETE": "delete", "PUT": "update", "PATCH": "update"}


def classify_gcp(request: HttpRequest, host: CloudHost, catalog: CloudCatalog, method: str) -> Draft:
    raw = path_segments(request.path)
    if raw and raw[-1] == "":
        raw = raw[:-1]
    if raw and decode_segment(raw[0]).casefold() == "batch":
        raise Refuse("Google batch requests carry other requests in their body; send them one by one")
    if raw and raw[0] in ("upload", "download"):
        raw = raw[1:]
    path_service = None
    if len(raw) >= 2 and VERSION.fullmatch(raw[1]) and not VERSION.fullmatch(raw[0]):
        path_service, raw = raw[0], raw[2:]
    elif raw and VERSION.fullmatch(raw[0]):
        raw = raw[1:]
    else:
        raise CannotClassify("the path does not start with an API version", host.service)
    service = host.service or path_service
    if service is not None and not _SERVICE.fullmatch(service):
        raise CannotClassify(f"{service!r} is not a Google API name")
    if service is None or not raw:
        raise CannotClassify("no API or resource in the path", service)

    verb = None
    last = raw[-1]
    if re.search("%3a", last, re.IGNORECASE):
        raise Refuse("the last path segment holds an encoded ':'")
    if ":" in last:
        last, _, verb = last.rpartition(":")
        if not _IDENT.fullmatch(verb):
            raise Refuse(f"custom method {verb!r} is not a method name")
        raw = raw[:-1] + ([last] if last else [])
    segments = [decode_segment(s) for s in raw]
    if any(not s for s in segments):
        raise Refuse("the path has an empty segment")

    pairs, trailing, path_verb, rest = _walk(service, segments, catalog)
    if path_verb is not None:
        if verb is not None:
            raise Refuse(f"two custom methods in one path: {path_verb} and {verb}")
        verb = path_verb
    if verb is not None:
        if trailing is None and not pairs:
            raise CannotClassify("a custom method without a resource", service)
        collection = trailing if trailing is not None else pairs[-1][0]
    elif trailing is not None:
        collection, verb = trailing, {"GET": "list", "HEAD": "list", "POST": "create"}.get(method)
    else:
        collection = pairs[-1][0]
        verb = _RESOURCE_VERBS.get(method)
    if verb is None:
        raise CannotClassify(f"{method} on {'/'.join(segments)} is not a standard method", service)
    aliases = catalog.gcp_aliases.get(service, {})
    collection = aliases.get(collection, collection)
    operation = f"{service}.{collection}.{verb}"

    arguments: dict[str, object] = {}
    for coll, ident in pairs:
        put_new(arguments, _singular(aliases.get(coll, coll)), ident)
    if pairs:
        put_new(arguments, "name", "/".join(f"{c}/{i}" for c, i in pairs))
    if rest:
        dest_pairs, dest_trailing, _, _ = _walk(service, rest, catalog)
        if dest_trailing is not None:
            raise CannotClassify(f"the destination of {verb} is not a resource path", service)
        arguments["destination"] = {_singular(aliases.get(c, c)): i for c, i in dest_pairs}
    query: dict[str, object] = {}
    for key, value in form_pairs(request.query, "query string"):
        if key.casefold() not in _SECRET_PARAMS:
            query[key] = value if key not in query else _more(query[key], value)
    if query:
        arguments["query"] = query
    body = decoded_body(request)
    if body.strip() and media_type(request) in ("application/json", ""):
        arguments["body"] = strict_json(body, "request body")
    region = next((i for c, i in reversed(pairs) if c in ("regions", "locations", "zones")), host.region)
    return Draft("gcp", service, operation, f"gcp.{operation}", verb, method, arguments, region)


def _walk(service: str, segments: list[str],
          catalog: CloudCatalog) -> tuple[list[tuple[str, str]], str | None, str | None, list[str]]:
    """(collection, id) pairs, a trailing collection, a path verb and what follows it."""
    pairs: list[tuple[str, str]] = []
    path_verbs = catalog.gcp_path_verbs.get(service, frozenset())
    marker = False
    i = 0
    while i < len(segments):
        word = segments[i]
        if service == "compute" and word in COMPUTE_MARKERS and pairs:
            marker, i = True, i + 1
            continue
        if pairs and word in path_verbs:
            return pairs, None, word, segments[i + 1:]
        if not _IDENT.fullmatch(word):
            raise CannotClassify(f"{word!r} is not a collection name; the path shape is not understood",
                                 service)
        if i + 1 == len(segments):
            if service == "compute" and pairs and not marker and _compute_verb(pairs[-1][0], word):
                return pairs, None, word, []
            return pairs, word, None, []
        pairs.append((word, segments[i + 1]))
        marker, i = False, i + 2
    return pairs, None, None, []


def _compute_verb(parent: str, word: str) -> bool:
    """Compute's custom methods follow a resource; zones, regions and projects hold collections."""
    if parent in COMPUTE_SCOPES:
        return False
    if parent == "projects":
        return word not in COMPUTE_SCOPES
    return True


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 3:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _more(existing: object, value: str) -> list[object]:
    return [*existing, value] if isinstance(existing, list) else [existing, value]
