"""An outgoing request read the way the upstream will read it, or refused as ambiguous.

What tether judges must be what the upstream acts on. So the query and a form
body are decoded strictly (a `;` separator, a bad escape, non-UTF-8 text or a
NUL is refused rather than guessed at), a JSON body is parsed strictly
(duplicate keys and NaN refused; a lone UTF-16 surrogate, which upstreams read
each their own way, makes the request ambiguous), and the method is the one the
request asks to be: `X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`, or a
`_method` query, form or JSON field, since many frameworks honour those.
Overrides that disagree, an override on anything but POST, and a `_method`
inside a multipart body (not parsed here) cannot be judged. Sans-IO: bytes and
headers in, values or reasons out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .. import strict_json
from ..model import HttpRequest
from .openapi_model import FORM, is_json

OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_FIELD = "_method"
ABSENT = object()
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_MULTIPART_METHOD = re.compile(rb'name\s*=\s*"?_method"?', re.IGNORECASE)


class Ambiguous(ValueError):
    """The request could be read two ways; it is refused, not guessed."""


@dataclass(frozen=True, slots=True)
class Payload:
    """A request body as read: `value` is parsed JSON, form fields (name -> texts), or
    ABSENT (no body, or a media type not parsed here); `problem`: JSON that failed."""

    media: str | None = None
    value: object = ABSENT
    problem: str | None = None
    empty: bool = True


def decode(text: str, *, plus: bool = True) -> str:
    if _BAD_ESCAPE.search(text):
        raise Ambiguous("a malformed percent escape")
    if plus:
        text = text.replace("+", " ")
    try:
        out = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise Ambiguous("percent escapes that are not UTF-8 text") from None
    if "\x00" in out:
        raise Ambiguous("a NUL character")
    return out


def parse_query(raw: str) -> list[tuple[str, str]]:
    """`a=1&b=2` into decoded pairs; `;` is refused (some servers split on it)."""
    if ";" in raw:
        raise Ambiguous("';' in the query, which some servers read as a separator")
    pairs = []
    for part in raw.split("&"):
        if part:
            key, _, value = part.partition("=")
            pairs.append((decode(key), decode(value)))
    return pairs


def read_payload(request: HttpRequest) -> Payload:
    """The body as the upstream reads it; raises Ambiguous for a form that is not ASCII."""
    if not request.body:
        return Payload(media=_media(request))
    media = _media(request)
    if media is not None and is_json(media):
        try:
            return Payload(media, strict_json.loads(request.body.decode("utf-8")), empty=False)
        except strict_json.NotText as e:
            raise Ambiguous(f"the JSON body holds {e}") from None
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            return Payload(media, problem=f"the body is not valid JSON ({why})", empty=False)
    if media == FORM:
        try:
            text = request.body.decode("ascii")
        except UnicodeDecodeError:
            raise Ambiguous("a form body that is not ASCII") from None
        fields: dict[str, list[str]] = {}
        for key, value in parse_query(text):
            fields.setdefault(key, []).append(value)
        return Payload(media, fields, empty=False)
    return Payload(media, empty=False)


def _media(request: HttpRequest) -> str | None:
    ctype = request.header("content-type")
    return ctype.split(";")[0].strip().lower() or None if ctype else None


def requested_method(request: HttpRequest, method: str, query: list[tuple[str, str]],
                     payload: Payload) -> tuple[str, str | None]:
    """The method the request asks to be judged as, or why that cannot be told."""
    sources = [(k, v) for k, v in request.headers if k.lower() in OVERRIDE_HEADERS]
    sources += [(f"query {OVERRIDE_FIELD}", v) for k, v in query if k == OVERRIDE_FIELD]
    if isinstance(payload.value, dict):
        if payload.media == FORM:
            sources += [(f"form {OVERRIDE_FIELD}", v)
                        for v in payload.value.get(OVERRIDE_FIELD, [])]
        elif OVERRIDE_FIELD in payload.value:
            sources.append((f"JSON body {OVERRIDE_FIELD}", str(payload.value[OVERRIDE_FIELD])))
    if payload.media and payload.media.startswith("multipart/") \
            and _MULTIPART_METHOD.search(request.body):
        return method, f"a {OVERRIDE_FIELD} field in a multipart body is not judged; refused"
    if not sources:
        return method, None
    asked = {v.strip().upper() for _, v in sources}
    listed = ", ".join(f"{k}: {v.strip()}" for k, v in sources)
    if len(asked) > 1:
        return method, f"method overrides disagree ({listed})"
    value = asked.pop()
    if not re.fullmatch(r"[A-Z]{1,20}", value):
        return method, f"{value!r} is not an HTTP method ({listed})"
    if value != method and method != "POST":
        return value, (f"a {method} request asks to be {value} ({listed}); method overrides "
                       "are judged only on POST")
    return value, None
