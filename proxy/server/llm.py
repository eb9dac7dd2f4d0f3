"""The governed LLM routes: forward, read every tool call, decide, respond.

A request is checked whole before a byte goes upstream. A response is read
(non-streaming) or filtered as it arrives (streaming), and nothing carrying a
tool call reaches the agent before that call is decided.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from ..config import Config, Upstream
from ..errors import NotGoverned, RouteNotFound, TetherError, UpstreamError
from ..governor import Governor
from ..model import Decision, Exchange, OnDeny, ToolCall
from ..providers import openai_chat
from ..providers.base import Step, StreamFilter, exchange_for
from .errors import PROVIDER_KEY
from .upstream import canonical_tail, forward_headers, read_body, return_headers

log = logging.getLogger("tether.server")

# A path is governed by what it ends in, not by its exact spelling, so an upstream
# configured with a path of its own (`http://vllm:8000/v1`) cannot open a
# second, ungoverned door to the same endpoint.
CHAT = ("chat", "completions")
CHAT_PATH = "v1/chat/completions"
# Segments of endpoints that carry tool calls in a format this version does not
# read yet: refused rather than passed through ungoverned.
NOT_YET_GOVERNED = {"responses", "assistants", "threads", "realtime"}


@dataclass(slots=True)
class Context:
    config: Config
    governor: Governor
    client: aiohttp.ClientSession


class LLMRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def openai(self, request: web.Request) -> web.StreamResponse:
        request[PROVIDER_KEY] = "openai"
        upstream = self.ctx.config.upstreams.get("openai")
        if upstream is None:
            raise RouteNotFound("no 'openai' upstream is configured")
        # The raw path, not aiohttp's decoded one: `%2F` must be seen to be refused.
        tail = canonical_tail(request.rel_url.raw_path.removeprefix("/openai/"))
        segments = [s for s in tail.lower().split("/") if s]
        if NOT_YET_GOVERNED.intersection(segments):
            raise NotGoverned(f"/openai/{tail} carries tool calls that this version of tether "
                              "cannot govern yet, so it is refused rather than passed through")
        if tuple(segments[-2:]) == CHAT:
            if request.method != "POST" or tail != CHAT_PATH:
                raise RouteNotFound(f"{request.method} /openai/{tail}: the chat endpoint is "
                                    f"POST /openai/{CHAT_PATH}")
            return await self._chat(request, upstream, tail)
        return await self._pass_through(request, upstream, tail)

    def _identity(self, request: web.Request) -> tuple[str | None, str | None]:
        if not self.ctx.config.trust_identity_headers:
            return None, None
        session = request.headers.get("x-tether-session") or None
        agent = request.headers.get("x-tether-agent") or None
        return session, agent

    def _url(self, upstream: Upstream, tail: str, request: web.Request) -> str:
        url = f"{upstream.url}/{tail}"
        return f"{url}?{request.query_string}" if request.query_string else url

    async def _chat(self, request: web.Request, upstream: Upstream, tail: str) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        session, agent = self._identity(request)
        try:
            body = await read_body(request, self.ctx.config.max_body_bytes)
            parsed = openai_chat.parse_request(body)
        except TetherError as e:
            self._reject(e, rid, session, agent, tail)
            raise
        exchange = exchange_for("openai", parsed, session=session or parsed.user, agent=agent,
                                endpoint=tail)
        headers = forward_headers(request.headers, upstream)
        try:
            async with self.ctx.client.post(self._url(upstream, tail, request), data=body,
                                            headers=headers) as resp:
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if resp.status != 200:
                    return await self._upstream_error(resp, ctype, rid, exchange)
                if ctype == "text/event-stream":
                    return await self._stream(request, resp, exchange, rid)
                if ctype == "application/json":
                    return await self._whole(resp, exchange, rid)
                raise UpstreamError(f"the upstream answered 200 with {ctype or 'no content type'}"
                                    ", not JSON or an event stream")
        except TetherError as e:
            self._reject(e, rid, session, agent, tail)
            raise
        except (aiohttp.ClientError, TimeoutError) as e:
            err = UpstreamError(f"the upstream could not be reached: {type(e).__name__}")
            self._reject(err, rid, session, agent, tail)
            raise err from e

    def _reject(self, e: TetherError, rid: str, session: str | None, agent: str | None,
                endpoint: str) -> None:
        status = getattr(e, "status", 500)
        code = getattr(e, "code", "internal_error")
        self.ctx.governor.reject(provider="openai", status=status, code=code, message=str(e),
                                 request_id=rid, session=session, agent=agent, endpoint=endpoint)
        self.ctx.governor.metrics.requests.labels("openai", str(status)).inc()

    async def _upstream_error(self, resp: aiohttp.ClientResponse, ctype: str, rid: str,
                              exchange: Exchange) -> web.Response:
        body = await resp.content.read(self.ctx.config.max_response_bytes)
        if ctype != "application/json":
            raise UpstreamError(f"the upstream answered {resp.status} with "
                                f"{ctype or 'no content type'}, not a JSON error")
        self.ctx.governor.reject(provider="openai", status=resp.status, code="upstream_status",
                                 message=body[:500].decode("utf-8", "replace"), request_id=rid,
                                 session=exchange.session, agent=exchange.agent,
                                 endpoint=exchange.endpoint)
        self.ctx.governor.metrics.requests.labels("openai", str(resp.status)).inc()
        return web.Response(status=resp.status, body=body, headers=return_headers(resp.headers))

    def _decide(self, calls: Sequence[ToolCall], exchange: Exchange, rid: str) -> list[Decision]:
        return [self.ctx.governor.decide(c, exchange, request_id=rid) for c in calls]

    async def _whole(self, resp: aiohttp.ClientResponse, exchange: Exchange,
                     rid: str) -> web.Response:
        limit = self.ctx.config.max_response_bytes
        body = await resp.content.read(limit + 1)
        if len(body) > limit:
            raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
        parsed = openai_chat.parse_response(body)
        decisions = self._decide(parsed.calls, exchange, rid)
        self.ctx.governor.metrics.requests.labels("openai", "200").inc()
        if any(not d.allowed and d.on_deny is OnDeny.ERROR for d in decisions):
            message = openai_chat.denied_error(parsed.calls, decisions)
            return web.Response(status=403, body=message, content_type="application/json",
                                headers={"x-should-retry": "false"})
        out = openai_chat.render_response(parsed, decisions)
        headers = return_headers(resp.headers)
        return web.Response(status=200, body=out, headers=headers)

    async def _stream(self, request: web.Request, resp: aiohttp.ClientResponse,
                      exchange: Exchange, rid: str) -> web.StreamResponse:
        out = web.StreamResponse(status=200, headers=return_headers(resp.headers))
        out.headers["Cache-Control"] = "no-cache"
        await out.prepare(request)
        stream: StreamFilter = openai_chat.ChatStream()
        try:
            try:
                async for chunk in resp.content.iter_any():
                    await self._drive(stream, stream.feed(chunk), out, exchange, rid)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    TimeoutError) as e:
                log.warning("upstream stream broke: %s", type(e).__name__)
            await self._drive(stream, stream.close(), out, exchange, rid)
        except ConnectionResetError:
            # The agent went away. Nothing more is sent; decided calls are audited.
            log.info("client disconnected mid-stream (request %s)", rid)
            return out
        status = "200" if stream.failed is None else "200-error"
        self.ctx.governor.metrics.requests.labels("openai", status).inc()
        if stream.failed:
            self.ctx.governor.reject(provider="openai", status=200, code="stream_error",
                                     message=stream.failed, request_id=rid,
                                     session=exchange.session, agent=exchange.agent,
                                     endpoint=exchange.endpoint)
        await out.write_eof()
        return out

    async def _drive(self, stream: StreamFilter, step: Step, out: web.StreamResponse,
                     exchange: Exchange, rid: str) -> None:
        while True:
            if step.data:
                await out.write(step.data)
            if not step.pending:
                return
            step = stream.decide(self._decide(step.pending, exchange, rid))

    async def _pass_through(self, request: web.Request, upstream: Upstream,
                            tail: str) -> web.StreamResponse:
        body = await read_body(request, self.ctx.config.max_body_bytes)
        headers = forward_headers(request.headers, upstream)
        try:
            async with self.ctx.client.request(request.method, self._url(upstream, tail, request),
                                               data=body or None, headers=headers) as resp:
                out = web.StreamResponse(status=resp.status,
                                         headers=return_headers(resp.headers))
                await out.prepare(request)
                try:
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                except ConnectionResetError:
                    log.info("client disconnected during a pass-through response")
                return out
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"the upstream could not be reached: {type(e).__name__}") from e

