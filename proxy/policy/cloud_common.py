"""What every cloud classifier shares: its results, and how a request is read.

Three outcomes, kept apart on purpose because the caller treats them apart:

  CloudOperation   the request names one operation; its effect is known
  Unclassified     a cloud API host, but no operation can be named (an API or a
                   path shape the catalog does not cover): the caller decides,
                   and tether counts it as an unknown write
  Refused          the request can be read more than one way, or is malformed:
                   deny it, never guess which reading the cloud will pick

Reading is strict for the same reason: a parameter given twice with different
values, a header spelled two ways, a method override that contradicts another,
a body tether cannot decode: each is a way to show the policy one request and
the cloud another, so each refuses.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_plus

from ..model import Effect, HttpRequest
from ..strict_json import DuplicateKey, NotText, loads

FORM = "application/x-www-form-urlencoded"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
# Headers whose meaning a classifier relies on: a near-miss spelling (underscore,
# padding) is refused, since some servers and proxies fold it into the real one.
GUARDED_HEADERS = frozenset(OVERRIDE_HEADERS + ("x-amz-target", "content-type", "content-encoding",
                                               "x-amz-copy-source", "smithy-protocol"))
MAX_DECODED_BODY = 16 * 1024 * 1024
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class CloudOperation:
    """One cloud API operation, as the policy judges it.

    `api` is what rules match (`aws.ec2.DeleteVolume`,
    `azure.Microsoft.Compute/disks/delete`, `gcp.compute.disks.delete`);
    `effect_reason` says which catalog entry or verb decided the effect.
    """

    cloud: str
    service: str
    operation: str
    effect: Effect
    api: str
    arguments: Mapping[str, object] = field(default_factory=dict)
    region: str | None = None
    effect_reason: str = ""


@dataclass(frozen=True, slots=True)
class Unclassified:
    """A cloud API host whose operation tether cannot name. Count it as a write."""

    cloud: str
    service: str | None
    region: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Ambiguous or malformed: deny, with the reason in the 4xx and the audit."""

    cloud: str
    reason: str


Classification = CloudOperation | Unclassified | Refused


class Refuse(Exception):
    """Raised inside a classifier; `classify` turns it into `Refused`."""

    def __init__(self, reason: str, cloud: str | None = None) -> None:
        self.reason = reason
        self.cloud = cloud
        super().__init__(reason)


class CannotClassify(Exception):
    """Raised inside a classifier; `classify` turns it into `Unclassified`."""

    def __init__(self, reason: str, service: str | None = None, cloud: str | None = None) -> None:
        self.reason = reason
        self.service = service
        self.cloud = cloud
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Draft:
    """An operation named but not yet judged: the catalog adds the effect."""

    cloud: str
    service: str
    operation: str
    api: str
    verb: str | None  # the word whose prefix decides the effect; None: judge by method
    method: str
    arguments: Mapping[str, object]
    region: str | None


def header_values(request: HttpRequest, name: str) -> list[str]:
    low = name.lower()
    return [v.strip() for k, v in request.headers if k.lower() == low]


def one_header(request: HttpRequest, name: str) -> str | None:
    """The header's value; repeats must agree, or the request is ambiguous."""
    values = set(header_values(request, name))
    if len(values) > 1:
        raise Refuse(f"header {name} is given more than once with different values")
    return values.pop() if values else None


def check_header_names(request: HttpRequest) -> None:
    for raw, _ in request.headers:
        folded = raw.strip().lower().replace("_", "-")
        if folded in GUARDED_HEADERS and raw.lower() != folded:
            raise Refuse(f"header name {raw!r} is a look-alike of {folded}")


def media_type(request: HttpRequest) -> str:
    value = one_header(request, "content-type")
    return value.split(";", 1)[0].strip().lower() if value else ""


def decode_segment(raw: str) -> str:
    if _BAD_PERCENT.search(raw):
        raise Refuse("a path segment holds a malformed percent escape")
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError as e:
        raise Refuse("a path segment is not UTF-8 once decoded") from e


def path_segments(path: str) -> list[str]:
    """Raw segments after the leading slash; `/` and `` give []."""
    if not path or path == "/":
        return []
    if not path.startswith("/"):
        raise Refuse("the request path does not start with /")
    return path[1:].split("/")


def form_pairs(raw: str, where: str) -> list[tuple[str, str]]:
    """`a=1&b=2` as (name, value) pairs, repeats kept, `+` read as space."""
    if ";" in raw:
        raise Refuse(f"the {where} uses ';', which servers disagree on as a separator")
    if _BAD_PERCENT.search(raw):
        raise Refuse(f"the {where} holds a malformed percent escape")
    pairs: list[tuple[str, str]] = []
    for piece in raw.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        try:
            name, text = unquote_plus(key, errors="strict"), unquote_plus(value, errors="strict")
        except UnicodeDecodeError as e:
            raise Refuse(f"the {where} is not UTF-8 once decoded") from e
        if not name:
            raise Refuse(f"the {where} has a parameter without a name")
        pairs.append((name, text))
    return pairs


def unique_params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """One value per parameter: repeats must agree and be spelled alike."""
    out: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for key, value in pairs:
        folded = key.casefold()
        if spelled.setdefault(folded, key) != key:
            raise Refuse(f"parameter {key!r} is also given as {spelled[folded]!r}")
        if out.setdefault(key, value) != value:
            raise Refuse(f"parameter {key!r} is given twice with different values")
    return out


def method_override(request: HttpRequest) -> str | None:
    """The method an override header or `_method` asks for, if any.

    `_method` counts in the query string, a form body and a JSON body's top
    level (multipart bodies are not read). Two overrides that
    disagree refuse, and so does one that asks for a method tether does not know.
    What to make of an override (servers differ on whether they honour it) is
    decided by `classify`.
    """
    asked: set[str] = set()
    for name in OVERRIDE_HEADERS:
        asked.update(v.upper() for v in header_values(request, name))
    params = form_pairs(request.query, "query string")
    kind = media_type(request)
    if request.body and kind == FORM:
        try:
            params += form_pairs(decoded_body(request).decode("utf-8"), "form body")
        except UnicodeDecodeError as e:
            raise Refuse("the form body is not UTF-8") from e
    elif request.body and (kind in ("", "application/json") or "json" in kind):
        try:
            value = strict_json(decoded_body(request), "body")
        except Refuse:
            value = None  # not JSON: whoever reads the body as JSON refuses it there
        if isinstance(value, dict) and "_method" in value:
            params.append(("_method", str(value["_method"])))
    asked.update(v.strip().upper() for k, v in params if k.casefold() == "_method")
    if len(asked) > 1:
        raise Refuse(f"method overrides disagree: {', '.join(sorted(asked))}")
    if not asked:
        return None
    method = asked.pop()
    if method not in METHODS:
        raise Refuse(f"method override {method!r} is not a method tether classifies")
    return method


def decoded_body(request: HttpRequest) -> bytes:
    """The body as the server will read it; gzip is undone, other codings refused."""
    coding = (one_header(request, "content-encoding") or "identity").lower()
    codings = [c.strip() for c in coding.split(",") if c.strip()]
    if codings in ([], ["identity"]):
        return request.body
    if codings not in (["gzip"], ["x-gzip"]):
        raise Refuse(f"request body content-encoding {coding!r} is not read by tether")
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(request.body, MAX_DECODED_BODY)
    except zlib.error as e:
        raise Refuse("the gzip request body is corrupt") from e
    if inflater.unconsumed_tail or not inflater.eof:
        raise Refuse("the gzip request body is cut off or too large once decompressed")
    return out


def strict_json(body: bytes, what: str) -> object:
    """Strict JSON: UTF-8, no duplicate keys (parsers disagree on which wins), no NaN, no
    lone surrogate (not text: readers disagree on it too)."""
    try:
        text = body.decode("utf-8")
        return loads(text)
    except DuplicateKey as e:
        raise Refuse(f"the {what} holds a {e}") from e
    except NotText as e:
        raise Refuse(f"the {what} holds {e}") from e
    except RecursionError as e:
        raise Refuse(f"the {what} is nested too deeply") from e
    except ValueError as e:  # includes UnicodeDecodeError
        raise Refuse(f"the {what} is not valid JSON ({e})") from e


def json_object(body: bytes, what: str) -> dict[str, object]:
    if not body.strip():
        return {}
    value = strict_json(body, what)
    if not isinstance(value, dict):
        raise Refuse(f"the {what} must be a JSON object, not {type(value).__name__}")
    return value


def put_new(target: dict[str, object], key: str, value: object) -> None:
    """Add an argument; the same name from two places is ambiguous."""
    folded = key.casefold()
    for existing in target:
        if existing.casefold() == folded:
            if target[existing] != value:
                raise Refuse(f"argument {key!r} comes from two places with different values")
            return
    target[key] = value
