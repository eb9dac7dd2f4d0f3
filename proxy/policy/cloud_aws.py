"""AWS requests to operations: the Query, JSON and REST protocols.

The Query protocol (EC2, IAM, STS, SNS, classic SQS) names the operation in an
`Action` parameter, which AWS reads from the query string or a form body; both
are read, and an `Action` (or any parameter) given twice with different values,
or spelled in two cases, refuses. Flattened parameters are folded back into
the shapes botocore serialised: `VolumeId.1` -> list, `Filter.1.Name` -> list of
objects, `Tags.member.1.Key` -> list, `Attributes.entry.1.key/value` -> map.
Argument names are the wire names (EC2: `VolumeId`, `Filter`), since the
service model that maps them back to boto3's (`VolumeIds`, `Filters`) is not
loaded at decision time. A flattened map (`Attribute.1.Name`) stays a list of
Name/Value objects: without the model it cannot be told from a list.

The JSON protocol (DynamoDB, KMS, Logs, ...) names it in `X-Amz-Target:
Prefix.Operation`; the arguments are the body, strict JSON. A request with both
an `X-Amz-Target` and an `Action` refuses.

REST services (S3, Lambda, ...) are matched on method + path + query markers
from the catalog's tables; the most specific operation wins, a tie refuses, and
a query marker the chosen operation does not use (`?delete&tagging`) refuses.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from urllib.parse import quote

from ..model import HttpRequest
from .cloud_catalog import CloudCatalog, RestOp, RestService
from .cloud_common import (
    FORM,
    CannotClassify,
    Draft,
    Refuse,
    decode_segment,
    decoded_body,
    form_pairs,
    header_values,
    json_object,
    media_type,
    one_header,
    path_segments,
    put_new,
    strict_json,
    unique_params,
)
from .cloud_hosts import CloudHost

_OPERATION = re.compile(r"[A-Z][A-Za-z0-9]{0,127}")
_TARGET = re.compile(r"([A-Za-z0-9_.-]+)\.([A-Za-z0-9]+)")
AUTH_PARAMS = frozenset({
    "x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires", "x-amz-signedheaders",
    "x-amz-signature", "x-amz-security-token", "x-amz-user-agent", "awsaccesskeyid", "signature",
    "signatureversion", "signaturemethod", "securitytoken", "timestamp", "x-id",
})
_UNREAD_HEADERS = frozenset({
    "x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "x-amz-target", "x-amz-user-agent",
    "x-amz-decoded-content-length", "x-amz-trailer", "x-amz-sdk-checksum-algorithm",
})


def classify_aws(request: HttpRequest, host: CloudHost, catalog: CloudCatalog, method: str) -> Draft:
    """`method` is the one to judge REST requests by (the real one, or an override)."""
    service = host.service or ""
    table = catalog.aws_rest.get(service)
    if table is not None:
        return _rest(request, host, service, table, method)
    target = one_header(request, "x-amz-target")
    query = form_pairs(request.query, "query string")
    if target is not None:
        return _json(request, host, service, target, query, method)
    if (one_header(request, "smithy-protocol") or "").lower() == "rpc-v2-cbor":
        raise CannotClassify("Smithy RPC v2 CBOR bodies are not read by tether", service)
    return _query(request, host, service, query, method)


def _draft(host: CloudHost, service: str, operation: str, method: str,
           arguments: Mapping[str, object]) -> Draft:
    return Draft("aws", service, operation, f"aws.{service}.{operation}", operation, method, arguments,
                 host.region)


def _operation(name: str, where: str) -> str:
    if not _OPERATION.fullmatch(name):
        raise Refuse(f"{where} {name!r} is not an AWS operation name")
    return name


# ---------------------------------------------------------------- Query protocol

def _query(request: HttpRequest, host: CloudHost, service: str, query: list[tuple[str, str]],
           method: str) -> Draft:
    pairs = list(query)
    body = decoded_body(request) if request.body else b""
    if body.strip():
        if media_type(request) not in (FORM, ""):
            raise Refuse("a body that is neither a form nor X-Amz-Target JSON")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refuse("the form body is not UTF-8") from e
        pairs += form_pairs(text, "form body")
    if not any(k.casefold() == "action" for k, _ in pairs):
        raise CannotClassify("no Action parameter and no X-Amz-Target header", service)
    params = unique_params(pairs)
    action = next(v for k, v in params.items() if k.casefold() == "action")
    operation = _operation(action, "Action")
    rest = {k: v for k, v in params.items() if k.casefold() != "action" and k.casefold() not in AUTH_PARAMS}
    return _draft(host, service, operation, method, unflatten(rest))


def unflatten(flat: Mapping[str, str]) -> dict[str, object]:
    """Fold `A.1.B`-style names back into lists and objects, as botocore flattened them."""
    tree: dict[str, object] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if any(not p for p in parts):
            raise Refuse(f"parameter {key!r} has an empty name part")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise Refuse(f"parameter {key!r} is both a value and a structure")
            node = child
        if parts[-1] in node:
            raise Refuse(f"parameter {key!r} is both a value and a structure")
        node[parts[-1]] = value
    folded = _fold(tree, "")
    assert isinstance(folded, dict)
    return folded


def _fold(node: object, where: str) -> object:
    if not isinstance(node, dict):
        return node
    if set(node) == {"member"} and isinstance(node["member"], dict) and _indexed(node["member"]):
        return _fold(node["member"], where + ".member")
    if set(node) == {"entry"} and isinstance(node["entry"], dict) and _indexed(node["entry"]):
        entries = _fold(node["entry"], where + ".entry")
        assert isinstance(entries, list)
        if all(isinstance(e, dict) and set(e) == {"key", "value"} for e in entries):
            out: dict[str, object] = {}
            for e in entries:
                assert isinstance(e, dict)
                if not isinstance(e["key"], str) or e["key"] in out:
                    raise Refuse(f"map {where[1:]!r} repeats a key or has a structured key")
                out[e["key"]] = e["value"]
            return out
        return entries
    digits = [k for k in node if k.isdigit()]
    if digits and len(digits) != len(node):
        raise Refuse(f"parameter {where[1:]!r} mixes list indexes and names")
    if digits:
        if sorted(int(k) for k in digits) != list(range(1, len(digits) + 1)) or any(
                k.startswith("0") for k in digits):
            raise Refuse(f"list {where[1:]!r} is not numbered 1..n")
        return [_fold(node[str(i)], f"{where}.{i}") for i in range(1, len(digits) + 1)]
    return {k: _fold(v, f"{where}.{k}") for k, v in node.items()}


def _indexed(node: dict[str, object]) -> bool:
    return bool(node) and all(k.isdigit() for k in node)


# ---------------------------------------------------------------- JSON protocol

def _json(request: HttpRequest, host: CloudHost, service: str, target: str,
          query: list[tuple[str, str]], method: str) -> Draft:
    if any(k.casefold() == "action" for k, _ in query):
        raise Refuse("the request names its operation twice: X-Amz-Target and Action")
    if media_type(request) == FORM:
        raise Refuse("an X-Amz-Target request with a form body")
    m = _TARGET.fullmatch(target)
    if m is None:
        raise Refuse(f"X-Amz-Target {target!r} is not Prefix.Operation")
    operation = _operation(m.group(2), "X-Amz-Target operation")
    arguments = json_object(decoded_body(request), "JSON request body")
    return _draft(host, service, operation, method, arguments)


# ---------------------------------------------------------------- REST protocols

def _rest(request: HttpRequest, host: CloudHost, service: str, table: RestService, method: str) -> Draft:
    segments = path_segments(request.path)
    if host.bucket is not None:
        segments = [quote(host.bucket, safe=""), *([] if segments == [""] else segments)]
    params = unique_params(form_pairs(request.query, "query string"))
    folded_markers = {m.casefold(): m for m in table.markers}
    for key in params:
        if key not in table.markers and key.casefold() in folded_markers:
            raise Refuse(f"query marker {key!r} is a case variant of {folded_markers[key.casefold()]!r}")
    found: list[tuple[RestOp, dict[str, str]]] = []
    for op in table.ops:
        if op.method != method:
            continue
        bound = _bind(op.path, segments)
        if bound is None or not _markers_hold(op, params) or not op.required_query <= params.keys():
            continue
        if all(header_values(request, h) for h in op.required_headers):
            found.append((op, bound))
    if not found:
        raise CannotClassify(f"no {service} operation matches {method} {request.path}", service)
    best = max(op.specificity for op, _ in found)
    top = [(op, b) for op, b in found if op.specificity == best]
    if len(top) > 1:
        raise Refuse(f"{method} {request.path} could be {' or '.join(op.name for op, _ in top)}")
    op, bound = top[0]
    stray = sorted((params.keys() & table.markers) - op.markers.keys())
    if stray:
        raise Refuse(f"query marker(s) {', '.join(stray)} do not belong to {op.name}")
    if params.get("x-id", op.name) != op.name:
        raise Refuse(f"x-id={params['x-id']} contradicts the request, which is {op.name}")
    arguments: dict[str, object] = dict(bound)
    for key, value in params.items():
        if key not in table.markers and key.casefold() not in AUTH_PARAMS:
            put_new(arguments, key, value)
    for name, _ in request.headers:
        low = name.lower()
        if low.startswith("x-amz-") and low not in _UNREAD_HEADERS and not low.startswith("x-amz-checksum-"):
            put_new(arguments, low, one_header(request, low))
    _rest_body(request, table, op, arguments)
    return _draft(host, service, op.name, method, arguments)


def _bind(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    bound: dict[str, str] = {}
    for i, part in enumerate(template):
        if part.endswith("+}"):
            rest = "/".join(segments[i:])
            if not rest:
                return None
            bound[part[1:-2]] = decode_segment(rest)
            return bound
        if i >= len(segments) or not segments[i]:
            return None
        value = decode_segment(segments[i])
        if part.startswith("{"):
            bound[part[1:-1]] = value
        elif value != part:
            return None
    extra = segments[len(template):]
    return bound if extra in ([], [""]) else None


def _markers_hold(op: RestOp, params: Mapping[str, str]) -> bool:
    return all(k in params and (v is None or params[k] == v) for k, v in op.markers.items())


def _rest_body(request: HttpRequest, table: RestService, op: RestOp, arguments: dict[str, object]) -> None:
    if not request.body:
        return
    if table.protocol == "rest-json":
        body = decoded_body(request)
        if op.payload is None:
            for key, value in json_object(body, "JSON request body").items():
                put_new(arguments, key, value)
        elif body.strip() and media_type(request) in ("application/json", ""):
            put_new(arguments, op.payload, strict_json(body, f"{op.payload} payload"))
    elif op.name == "DeleteObjects":
        put_new(arguments, "Delete", _delete_objects(decoded_body(request)))


def _delete_objects(body: bytes) -> dict[str, object]:
    """S3 DeleteObjects' XML body as botocore's input shape: {Objects: [{Key, VersionId}], Quiet}."""
    if b"<!" in body:
        raise Refuse("the DeleteObjects body holds a DOCTYPE or entity declaration")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise Refuse(f"the DeleteObjects body is not valid XML ({e})") from e
    if _local(root.tag) != "Delete":
        raise Refuse("the DeleteObjects body is not a <Delete> document")
    objects: list[object] = []
    out: dict[str, object] = {"Objects": objects}
    for child in root:
        tag = _local(child.tag)
        if tag == "Object":
            fields: dict[str, object] = {}
            for f in child:
                put_new(fields, _local(f.tag), f.text or "")
            objects.append(fields)
        elif tag == "Quiet":
            out["Quiet"] = (child.text or "").strip().lower() == "true"
        else:
            raise Refuse(f"the DeleteObjects body has an unexpected <{tag}>")
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
