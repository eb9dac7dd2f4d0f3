"""How a request leaves for the upstream: URL, headers, credentials, body limits."""

from __future__ import annotations

import logging
import ssl as ssl_
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..errors import PayloadTooLarge, UpstreamError
from ..upstream_auth.keys import required_key, upstream_key
from ..upstreams import Upstream

log = logging.getLogger("tether.server")

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
}
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
NOT_RETURNED = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie"}
TETHER_HEADERS = ("x-tether-",)
AUTH_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")
# The agent's own credentials; Proxy-Authorization is hop-by-hop and never forwarded.
# How each upstream takes the key tether holds for it (`api_key_env` / `api_key_file`).
AUTH_STYLE = {
    "openai": ("Authorization", "Bearer {}"),
    "azure": ("api-key", "{}"),
    "anthropic": ("x-api-key", "{}"),
    "gemini": ("x-goog-api-key", "{}"),
}


def sign_request(upstream: Upstream, method: str, url: str, headers: CIMultiDict[str],
                 body: bytes) -> CIMultiDict[str]:
    """Upstreams that authenticate by signing the request (Bedrock: SigV4) sign here,
    with tether's own credentials, after every header is final."""
    if upstream.name != "bedrock":
        return headers
    from ..upstream_auth.sigv4 import sign  # botocore is only imported when Bedrock is used

    return sign(upstream, method, url, headers, body)


# Query parameters that carry a credential, per upstream. Google decodes `%6Bey` to
# `key`, so names are compared decoded.
CREDENTIAL_PARAMS = {"gemini": frozenset({"key", "access_token"})}


def forward_query(raw_query: str, upstream: Upstream, env: Mapping[str, str] | None = None) -> str:
    """The agent's query without its credentials, unless the upstream passes them
    (`agent_credentials: pass`) and tether holds no key of its own."""
    drop = CREDENTIAL_PARAMS.get(upstream.name, frozenset())
    if not (raw_query and drop):
        return raw_query
    if upstream.pass_agent_credentials and upstream_key(upstream, env) is None:
        return raw_query
    return "&".join(p for p in raw_query.split("&")
                    if unquote_plus(p.partition("=")[0]) not in drop)


def forward_headers(headers: Mapping[str, str], upstream: Upstream,
                    env: Mapping[str, str] | None = None, *,
                    drop: Collection[str] = ()) -> CIMultiDict[str]:
    """The headers that go upstream. The agent's own credentials are dropped unless
    the upstream is set to `agent_credentials: pass` and tether has no key for it;
    `drop` names headers that never go, whatever the mode (the one the agent
    authenticated to tether with). Raises CredentialsUnavailable (503) when tether
    is configured to hold a key and has none: nothing is sent."""
    connection_tokens = {
        t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()
    }
    dropped = {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if (low in NOT_FORWARDED or low in connection_tokens or low.startswith(TETHER_HEADERS)
                or low in dropped):
            continue
        out.add(name, value)
    key = required_key(upstream, env)
    if key is not None or not upstream.pass_agent_credentials:
        for name in AUTH_HEADERS:
            out.popall(name, None)
    if key is not None:
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


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer whole, or its first `limit` bytes. One `read(n)` returns only what has
    arrived so far, which for a large answer is a piece of it."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


class StreamedAnswer(web.StreamResponse):
    """An answer streamed from an upstream's: `prepare` keeps the headers back, and
    `start` sends them with the first bytes when the upstream's first bytes came with
    its headers (one write, not two), else at once, as the upstream sent its own (a
    model may think a while before its first token)."""

    _send_headers_immediately = False  # aiohttp's switch: headers go with the first write

    async def start(self, request: web.Request, upstream: aiohttp.StreamReader) -> None:
        await self.prepare(request)
        if upstream.total_bytes == 0 and not upstream.is_eof():
            await self.write(b"")  # the headers alone (aiohttp writes no empty chunk)


async def first_event_apart(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, with the first one cut after its first event (`\\n\\n`) when more
    follows: a burst's first event is filtered and written before the rest of the burst
    is (an upstream that sends its whole answer at once, or a proxy in front of it that
    buffers). Every stream filter takes bytes split anywhere (tests/streaming.py)."""
    first = True
    async for chunk in chunks:
        if first:
            first = False
            cut = chunk.find(b"\n\n") + 2
            if 1 < cut < len(chunk):
                yield chunk[:cut]
                chunk = chunk[cut:]
        yield chunk


async def relay(client: aiohttp.ClientSession, request: web.Request, url: URL | str,
                body: bytes, headers: CIMultiDict[str], *, what: str,
                allow_redirects: bool = True, ssl: ssl_.SSLContext | bool = True,
                counted: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Send the request on unchanged and stream the answer back as it comes.

    Used where nothing in the answer is governed (pass-through paths, allowed tool
    API and MCP requests). `what` names the upstream in errors and logs; `counted`
    is told the upstream's status."""
    try:
        async with client.request(request.method, url, data=body or None, headers=headers,
                                  allow_redirects=allow_redirects, ssl=ssl) as resp:
            out = StreamedAnswer(status=resp.status, headers=return_headers(resp.headers))
            await out.start(request, resp.content)
            if counted is not None:
                counted(resp.status)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            except ConnectionResetError:
                log.info("client disconnected during a response from %s", what)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("the response from %s broke: %s", what, type(e).__name__)
            return out
    except (aiohttp.ClientError, TimeoutError) as e:
        raise UpstreamError(f"{what} could not be reached: {type(e).__name__}") from e
