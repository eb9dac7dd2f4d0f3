"""Where an agent's credential is read: the headers its SDK already sends.

An agent sets its SDK's `api_key` to its tether key or JWT; the SDKs send it as
`Authorization: Bearer` (OpenAI, Bedrock's `AWS_BEARER_TOKEN_BEDROCK`),
`x-api-key` (Anthropic), `api-key` (Azure), `x-goog-api-key` (Gemini), or
Gemini's `?key=`. A SigV4 or Basic `Authorization` is not a credential tether
reads. Through the forward proxy it is `Proxy-Authorization: Bearer TOKEN` or
Basic with the token as the password. Sans-IO.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from ..errors import Unauthorized

HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
QUERY_PARAM = "key"
MAX_CREDENTIAL = 16 * 1024


@dataclass(frozen=True, slots=True)
class Credential:
    """The presented token and every place it was presented (all of them are
    dropped before the request goes upstream once tether has consumed it)."""

    token: str
    headers: tuple[str, ...] = ()
    query_param: str | None = None


def _bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return rest.strip() or None


def _token(name: str, value: str) -> str | None:
    if name == "authorization":
        return _bearer(value)
    return value.strip() or None


def find(headers: Mapping[str, str], raw_query: str = "") -> Credential | None:
    """The first credential in header order; the query's `key` only when no header has one."""
    token: str | None = None
    for name in HEADERS:
        value = headers.get(name)
        token = _token(name, value) if value else None
        if token:
            break
    if token:
        if len(token) > MAX_CREDENTIAL:
            raise Unauthorized("tether: the credential is too long", "malformed")
        same = tuple(n for n in HEADERS if (v := headers.get(n)) and _token(n, v) == token)
        return Credential(token, same)
    values = [unquote_plus(v) for k, _, v in (p.partition("=") for p in raw_query.split("&") if p)
              if unquote_plus(k) == QUERY_PARAM]
    if len(values) > 1:
        raise Unauthorized("tether: the query names `key` more than once", "malformed")
    if values and values[0]:
        return Credential(values[0], (), QUERY_PARAM)
    return None


def strip_query(raw_query: str, param: str | None) -> str:
    """The query without the consumed credential parameter (names compared decoded,
    as Google decodes `%6Bey` to `key`)."""
    if not param or not raw_query:
        return raw_query
    return "&".join(p for p in raw_query.split("&")
                    if p and unquote_plus(p.partition("=")[0]) != param)


def from_proxy_authorization(value: str | None) -> Credential | None:
    """`Proxy-Authorization: Bearer TOKEN`, or `Basic` with the token as the password
    (what HTTP_PROXY=http://agent:TOKEN@host:port makes clients send)."""
    if not value:
        return None
    token = _bearer(value)
    if token is None:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        token = decoded.partition(":")[2] or None
    if token and len(token) > MAX_CREDENTIAL:
        raise Unauthorized("tether: the credential is too long", "malformed")
    return Credential(token, ("proxy-authorization",)) if token else None
