"""How a request leaves for the upstream: URL, headers, credentials, body limits."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from ..config import Upstream
from ..errors import BadRequest, PayloadTooLarge

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
}
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
NOT_RETURNED = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie"}
TETHER_HEADERS = ("x-tether-",)
AUTH_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")
# How each upstream takes the key tether holds for it (`api_key_env`).
AUTH_STYLE = {
    "openai": ("Authorization", "Bearer {}"),
    "azure": ("api-key", "{}"),
    "anthropic": ("x-api-key", "{}"),
    "gemini": ("x-goog-api-key", "{}"),
}
_AMBIGUOUS = re.compile(r"%2e|%2f|%5c|%00|\\|\x00|;|/\.\.?(/|$)|^\.\.?(/|$)", re.IGNORECASE)


def canonical_tail(raw_tail: str) -> str:
    """The path after the route prefix, refused if it could mean two things.

    Upstreams disagree on `%2F`, `..`, `;params` and doubled slashes; tether
    does not guess which one they will see, it refuses them.
    """
    if _AMBIGUOUS.search(raw_tail) or "//" in raw_tail:
        raise BadRequest("the request path is ambiguous (encoded or dot segments, "
                         "doubled slashes, ';' or backslashes); it was not forwarded")
    return unquote(raw_tail)


def forward_headers(headers: Mapping[str, str], upstream: Upstream,
                    env: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    env = os.environ if env is None else env
    connection_tokens = {
        t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in NOT_FORWARDED or low in connection_tokens or low.startswith(TETHER_HEADERS):
            continue
        out.add(name, value)
    key = env.get(upstream.api_key_env) if upstream.api_key_env else None
    if key:
        for name in AUTH_HEADERS:
            out.popall(name, None)
        header, template = AUTH_STYLE.get(upstream.name, ("Authorization", "Bearer {}"))
        out[header] = template.format(key)
    out["Accept-Encoding"] = "gzip, deflate"
    return out


def return_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in NOT_RETURNED:
            out.add(name, value)
    return out


async def read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
    return bytes(body)
