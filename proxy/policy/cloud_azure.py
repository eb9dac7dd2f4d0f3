"""Azure Resource Manager requests to operations, named as ARM's RBAC names them.

`DELETE /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{d}`
is `Microsoft.Compute/disks/delete`: the namespace after the last `providers`,
the resource types of the path, then `read` (GET, HEAD), `write` (PUT, PATCH),
`delete` (DELETE) or `{action}/action` (POST to `.../{name}/{action}`).
Everything before the first provider is `Microsoft.Resources`
(`Microsoft.Resources/subscriptions/resourceGroups/delete`), and a nested
`providers/` makes an extension resource (a lock on a disk is
`Microsoft.Authorization/locks/write`, with `scope` the disk).

ARM paths are case-insensitive, so fixed words and the catalog's known
namespaces and types are put in their canonical spelling; names are kept as
sent. `api-version` is required, as ARM requires it: without it the request
refuses. ARM batch requests (`/batch`) carry other requests in their body and
refuse: send them one by one. The effect is judged by method: every POST is a
write, including `listKeys` and other `list*` actions, because they return
secrets.
"""

from __future__ import annotations

from ..model import HttpRequest
from .cloud_catalog import CloudCatalog
from .cloud_common import (
    CannotClassify,
    Draft,
    Refuse,
    decode_segment,
    decoded_body,
    form_pairs,
    path_segments,
    strict_json,
)

ROOTS = frozenset({"subscriptions", "providers", "tenants"})
_RESOURCE_VERBS = {"GET": "read", "HEAD": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}


def classify_azure(request: HttpRequest, catalog: CloudCatalog, method: str) -> Draft:
    raw = path_segments(request.path)
    if raw and raw[-1] == "":
        raw = raw[:-1]
    segments = [decode_segment(s) for s in raw]
    if any(not s for s in segments):
        raise Refuse("the ARM path has an empty segment")
    if segments and segments[0].casefold().lstrip("$") == "batch":
        raise Refuse("ARM batch requests carry other requests in their body; send them one by one")
    if not segments or segments[0].casefold() not in ROOTS:
        raise CannotClassify("not an ARM resource path", "arm")
    params = form_pairs(request.query, "query string")
    versions = {v for k, v in params if k.casefold() == "api-version"}
    if len(versions) > 1:
        raise Refuse("api-version is given twice with different values")
    if not versions or not next(iter(versions)).strip():
        raise Refuse("ARM requests need an api-version")

    def spell(word: str) -> str:
        return catalog.azure_spellings.get(word.casefold(), word)

    namespace, scope = "Microsoft.Resources", ""
    chain: list[str] = []      # the path since the last namespace: type, name, type, name ...
    canonical: list[str] = []  # the whole path, fixed words and known types respelled
    i = 0
    while i < len(segments):
        word = segments[i]
        if len(chain) % 2 == 0 and word.casefold() == "providers" and i + 2 < len(segments):
            if "providers" in canonical:  # a nested provider: what came before is the scope
                scope = "/" + "/".join(canonical)
            namespace, chain = spell(segments[i + 1]), []
            canonical += ["providers", namespace]
            i += 2
            continue
        word = spell(word) if len(chain) % 2 == 0 else word
        chain.append(word)
        canonical.append(word)
        i += 1

    types, n = chain[0::2], len(chain)
    resource_id: str | None = "/" + "/".join(canonical)
    if n % 2 == 0:
        verb = _RESOURCE_VERBS.get(method)
        if verb is None:
            raise CannotClassify(f"{method} on an ARM resource without an action", namespace)
        operation = "/".join([namespace, *types, verb])
    elif method in ("GET", "HEAD"):
        operation, resource_id = "/".join([namespace, *types, "read"]), None
    elif method == "POST":
        action = spell(chain[-1]) if n > 1 else None
        kinds = chain[0:n - 1:2] if n > 1 else types
        operation = "/".join([namespace, *kinds, *([action] if action else []), "action"])
        resource_id = "/" + "/".join(canonical[:-1]) if n > 1 else None
    else:
        raise CannotClassify(f"{method} on an ARM collection", namespace)

    arguments: dict[str, object] = {"apiVersion": next(iter(versions)).strip()}
    if segments[0].casefold() == "subscriptions" and len(segments) > 1:
        arguments["subscriptionId"] = segments[1]
        if len(segments) > 3 and segments[2].casefold() == "resourcegroups":
            arguments["resourceGroupName"] = segments[3]
    if resource_id is not None:
        arguments["resourceId"] = resource_id
        arguments["resourceName"] = resource_id.rsplit("/", 1)[-1]
    if scope:
        arguments["scope"] = scope
    query: dict[str, object] = {}
    for key, value in params:
        if key.casefold() not in ("api-version", "_method"):
            query[key] = value if key not in query else _more(query[key], value)
    if query:
        arguments["query"] = query
    body = decoded_body(request)
    region = None
    if body.strip():
        parsed = strict_json(body, "ARM request body")
        arguments["body"] = parsed
        if isinstance(parsed, dict) and isinstance(parsed.get("location"), str):
            region = parsed["location"]
    return Draft("azure", namespace, operation, f"azure.{operation}", None, method, arguments, region)


def _more(existing: object, value: str) -> list[object]:
    return [*existing, value] if isinstance(existing, list) else [existing, value]
