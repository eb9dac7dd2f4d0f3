"""The governed LLM routes: forward, read every tool call, decide, respond.

One handler serves every provider. A request is checked whole before a byte
goes upstream. A response is read (non-streaming) or filtered as it arrives
(streaming), and nothing carrying a tool call reaches the agent before that
call is decided.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from yarl import URL

from .. import surrogates, tracing
from ..approvals.holds import Holds, KeepAlive
from ..audit.log import AuditWriteError
from ..auth.authenticator import ANONYMOUS, Authenticator, Identity
from ..config import Config, Upstream
from ..errors import BadRequest, NotGoverned, RequestError, RouteNotFound, TetherError, UpstreamError
from ..governor import Governor
from ..model import Action, Decision, Exchange, OnDeny, RuleTrace, ToolCall
from ..opa.client import OpaClient
from ..paths import canonical_path
from ..policy.openapi_arguments import arguments_trace
from ..providers import sse
from ..providers.base import (
    ParsedRequest,
    Provider,
    RestrictsTools,
    Route,
    RouteKind,
    Step,
    StreamFilter,
    WireFormat,
    exchange_for,
)
from ..providers.held import over_limit
from ..sessions.guard import Admission, SessionGuard
from ..sessions.identity import session_of
from .batches import BatchGate
from .errors import PROVIDER_KEY, reply, status_and_code
from .upstream import (
    forward_headers,
    forward_query,
    read_at_most,
    read_body,
    relay,
    return_headers,
    sign_request,
)

log = logging.getLogger("tether.server")
_CONTEXTS: dict[str, ssl.SSLContext] = {}

STREAM_TYPES = {"text/event-stream", "application/vnd.amazon.eventstream"}


def refuse_lone_surrogates(body: bytes) -> None:
    """A JSON string may escape half of a UTF-16 pair (`"\\ud800"`), or carry its three
    UTF-8 bytes (ED A0 80, which json.loads reads with `surrogatepass`); either is a
    str that is not text, which tether would judge one way and the upstream read
    another. Such a body is refused 400 up front. Only bodies that could hold one pay
    for the second look (proxy/surrogates.py)."""
    if not surrogates.may_hold(body):
        return
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: the format's own parser refuses it with its own message
    where = surrogates.find(value)
    if where is not None:
        raise BadRequest(f"the request body holds an unpaired UTF-16 surrogate (\\ud800-"
                         f"\\udfff) at {where}, which is not text; it was not forwarded")


@runtime_checkable
class ReportsUsage(Protocol):
    """A format that can make a stream report its usage when the client did not ask."""

    def stream_with_usage(self, body: bytes, request: ParsedRequest, *,
                          max_arguments: int = ...) -> tuple[bytes, StreamFilter]: ...


@dataclass(slots=True)
class Context:
    config: Config
    governor: Governor
    guard: SessionGuard
    holds: Holds
    client: aiohttp.ClientSession
    auth: Authenticator
    opa: OpaClient | None = None  # None: no `opa:` section


@dataclass(slots=True)
class Call:
    """One governed request in flight."""

    provider: Provider
    route: Route
    upstream: Upstream
    rid: str
    session: str | None
    agent: str | None
    admission: Admission | None = None
    started: float = field(default_factory=time.perf_counter)
    waited: float = 0.0  # upstream and human time, which is not tether's overhead
    who: Identity = ANONYMOUS  # the verified identity; its consumed credential is not forwarded
    inference: tracing.Span = tracing.NO_SPAN  # the call upstream, in the GenAI conventions

    def overhead(self) -> float:
        return time.perf_counter() - self.started - self.waited


class LLMRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request, provider: Provider) -> web.StreamResponse:
        request[PROVIDER_KEY] = provider
        upstream = self.ctx.config.upstreams.get(provider.name)
        if upstream is None:
            raise RouteNotFound(f"no {provider.name!r} upstream is configured")
        raw_path, prefix = request.rel_url.raw_path, f"/{provider.name}/"
        raw = raw_path.removeprefix(prefix)
        try:
            # The raw path, not aiohttp's decoded one: `%2F` must be seen to be refused.
            if not raw_path.startswith(prefix):
                raise BadRequest("the request path is ambiguous: the route prefix is "
                                 "percent-encoded; it was not forwarded")
            path = canonical_path(raw, escapes=provider.path_escapes, ascii_only=True).raw
            route = provider.route(request.method, path, request.query)
            if route.kind is RouteKind.REFUSE:
                refusal = {501: NotGoverned, 400: BadRequest}.get(route.status, RouteNotFound)
                raise refusal(route.message)
            # Before anything is read or forwarded, pass-through routes too.
            who = await self.ctx.auth.identify(request.headers, request.rel_url.raw_query_string)
        except RequestError as e:
            self.ctx.governor.reject(provider=provider.name, status=e.status, code=e.code,
                                     message=e.message, request_id=uuid.uuid4().hex,
                                     endpoint=raw[:200])
            self.ctx.governor.metrics.requests.labels(provider.name, str(e.status)).inc()
            raise
        if route.kind is RouteKind.PASS:
            return await self._pass_through(request, upstream, route, who)
        if route.kind is RouteKind.BATCH:
            return await BatchGate(self.ctx).handle(
                request, provider, upstream, route, who, self._ssl(upstream),
                lambda body: self._pass_through(request, upstream, route, who, body))
        trust = self.ctx.config.trust_identity_headers
        session = request.headers.get("x-tether-session") if trust else None
        call = Call(provider, route, upstream, uuid.uuid4().hex, session or None, who.agent,
                    who=who)
        return await self._govern(request, call)

    @staticmethod
    def _ssl(upstream: Upstream) -> ssl.SSLContext | bool:
        """The TLS context for an upstream: the system's trust store, plus `ca_file`."""
        if upstream.ca_file is None:
            return True
        found = _CONTEXTS.get(upstream.ca_file)
        if found is None:
            found = ssl.create_default_context(cafile=upstream.ca_file)
            _CONTEXTS[upstream.ca_file] = found
        return found

    def _url(self, upstream: Upstream, route: Route, request: web.Request,
             who: Identity = ANONYMOUS) -> URL:
        """The upstream URL with the path bytes exactly as judged (no re-encoding)."""
        url = f"{upstream.url}/{route.upstream_path}"
        query = forward_query(who.query(request.rel_url.raw_query_string), upstream)
        return URL(f"{url}?{query}" if query else url, encoded=True)

    async def _govern(self, request: web.Request, call: Call) -> web.StreamResponse:
        fmt = call.route.format
        assert fmt is not None
        try:
            body = await read_body(request, self.ctx.config.max_body_bytes)
            refuse_lone_surrogates(body)
            parsed = fmt.parse_request(body, call.route)
            call.session = session_of(request.headers, parsed, call.agent,
                                      self.ctx.config.trust_identity_headers)
            body, parsed = self._restrict(fmt, body, parsed, call)
            call.admission = await self.ctx.guard.admit(
                agent=call.agent, session=call.session, model=parsed.model,
                body_bytes=len(body), max_output=parsed.max_output_tokens)
        except TetherError as e:
            self._reject(call, e)
            raise
        exchange = exchange_for(call.provider.name, parsed, session=call.session,
                                agent=call.agent, endpoint=call.route.upstream_path,
                                claims=call.who.claims)
        stream: StreamFilter | None = None
        if parsed.stream and isinstance(fmt, ReportsUsage):
            body, stream = fmt.stream_with_usage(
                body, parsed, max_arguments=self.ctx.config.max_arguments_bytes)
        url = self._url(call.upstream, call.route, request, call.who)
        call.inference = tracing.start_inference(
            self.ctx.governor.tracer, exchange, fmt.name, server=(url.host, url.port),
            max_tokens=parsed.max_output_tokens,
            legacy=self.ctx.config.telemetry.legacy_gen_ai_system)
        try:
            headers = sign_request(call.upstream, "POST", str(url),
                                   forward_headers(request.headers, call.upstream,
                                                   drop=call.who.drop_headers), body)
            sent = time.perf_counter()
            with tracing.current(call.inference):  # the HTTP client span is its child
                resp = await self.ctx.client.post(url, data=body, headers=headers,
                                                  ssl=self._ssl(call.upstream))
            async with resp:
                call.waited += time.perf_counter() - sent
                self.ctx.governor.metrics.upstream_seconds.labels(call.provider.name).observe(
                    call.waited)
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if resp.status != 200:
                    tracing.failed(call.inference, str(resp.status))
                    await self.ctx.guard.release(call.admission)
                    return await self._upstream_error(resp, ctype, call, exchange)
                if ctype in STREAM_TYPES or (call.route.stream and ctype == "application/json"):
                    return await self._stream(request, resp, call, exchange,
                                              stream or fmt.stream(
                                                  call.route, max_arguments=(
                                                      self.ctx.config.max_arguments_bytes)))
                if ctype == "application/json":
                    return await self._whole(resp, call, exchange)
                raise UpstreamError(f"the upstream answered 200 with {ctype or 'no content type'}"
                                    ", not JSON or an event stream")
        except TetherError as e:
            tracing.failed(call.inference, type(e).__name__)
            await self.ctx.guard.release(call.admission)
            self._reject(call, e)
            raise
        except (aiohttp.ClientError, TimeoutError) as e:
            tracing.failed(call.inference, type(e).__name__)
            await self.ctx.guard.release(call.admission)
            err = UpstreamError(f"the upstream could not be reached: {type(e).__name__}")
            self._reject(call, err)
            raise err from e
        finally:
            tracing.finish(call.inference)

    def _restrict(self, fmt: WireFormat, body: bytes, parsed: ParsedRequest,
                  call: Call) -> tuple[bytes, ParsedRequest]:
        """The agent's declared tools cut to its scope (`filter_tools`), so the model never
        sees a tool the agent may not call; the filtered body is parsed again so the
        exchange (and the undeclared-tool check) sees what the model saw."""
        governor = self.ctx.governor
        permits = governor.engine.tool_filter(call.agent)
        if permits is None or not isinstance(fmt, RestrictsTools):
            return body, parsed
        cut = fmt.restrict_tools(body, permits)
        if cut is None:
            return body, parsed
        governor.metrics.tools_filtered.labels(
            call.provider.name, governor.metrics.labels.agent(call.agent)).inc(len(cut.removed))
        try:  # the filtering is the safe side: a lost record is logged, not fatal
            governor.audit.write({
                "kind": "tools_filtered", "request_id": call.rid, "provider": call.provider.name,
                "endpoint": call.route.upstream_path, "session": call.session, "agent": call.agent,
                "removed": list(cut.removed), "policy_revision": governor.engine.revision})
        except AuditWriteError:
            log.exception("audit write failed for filtered tools")
            governor.metrics.audit_write_errors.inc()
        return cut.body, fmt.parse_request(cut.body, call.route)

    def _reject(self, call: Call, e: TetherError) -> None:
        status, code = status_and_code(e)
        self.ctx.governor.reject(provider=call.provider.name, status=status, code=code,
                                 message=str(e), request_id=call.rid, session=call.session,
                                 agent=call.agent, endpoint=call.route.upstream_path)
        self.ctx.governor.metrics.requests.labels(call.provider.name, str(status)).inc()

    async def _upstream_error(self, resp: aiohttp.ClientResponse, ctype: str, call: Call,
                              exchange: Exchange) -> web.Response:
        body = await read_at_most(resp, self.ctx.config.max_response_bytes)
        if ctype != "application/json":
            raise UpstreamError(f"the upstream answered {resp.status} with "
                                f"{ctype or 'no content type'}, not a JSON error")
        self.ctx.governor.reject(provider=call.provider.name, status=resp.status,
                                 code="upstream_status",
                                 message=body[:500].decode("utf-8", "replace"),
                                 request_id=call.rid, session=exchange.session,
                                 agent=exchange.agent, endpoint=exchange.endpoint)
        self.ctx.governor.metrics.requests.labels(call.provider.name, str(resp.status)).inc()
        return web.Response(status=resp.status, body=body, headers=return_headers(resp.headers))

    async def _decide(self, calls: Sequence[ToolCall], exchange: Exchange, call: Call,
                      out: web.StreamResponse | None = None) -> list[Decision]:
        decisions = []
        opa = self.ctx.opa
        budget = await opa.budget(self.ctx.guard, call.admission) if opa and calls else None
        # A call whose arguments are over the limit is judged (and audited, held) without
        # them: a stream filter already cut it; a whole answer's is cut here.
        limit = self.ctx.config.max_arguments_bytes
        calls = [over_limit(c, limit) or c for c in calls]
        for c in calls:
            trace = await self.ctx.guard.check_call(call.admission, c)
            # A tool linked to an OpenAPI operation: its arguments must fit the operation.
            op = self.ctx.config.apis.for_tool(c.name)
            extra: tuple[RuleTrace | None, ...] = (trace, arguments_trace(op, c) if op else None)
            if opa is not None:  # OPA's verdict joins the rules': the strictest wins
                extra += (await opa.judge(c, exchange, "llm", api=op.name if op else None,
                                          budget=budget),)
            decisions.append(self.ctx.governor.decide(
                c, exchange, request_id=call.rid, extra=tuple(t for t in extra if t),
                api=op.name if op else None))
        if any(d.action is Action.HOLD for d in decisions):
            held = time.perf_counter()
            decisions = await self.ctx.holds.resolve(calls, decisions, exchange,
                                                     self._keepalive(out))
            call.waited += time.perf_counter() - held
        return decisions

    @staticmethod
    def _keepalive(out: web.StreamResponse | None) -> KeepAlive | None:
        """SSE comments while a stream waits for a human; other framings (the binary
        event stream, Gemini's JSON array) have no comment, so they wait silently."""
        if out is None or not out.headers.get("content-type", "").startswith("text/event-stream"):
            return None

        async def send(text: str) -> None:
            await out.write(sse.comment(text))

        return send

    async def _whole(self, resp: aiohttp.ClientResponse, call: Call,
                     exchange: Exchange) -> web.Response:
        fmt = call.route.format
        assert fmt is not None
        limit = self.ctx.config.max_response_bytes
        reading = time.perf_counter()
        body = await read_at_most(resp, limit + 1)
        call.waited += time.perf_counter() - reading
        if len(body) > limit:
            raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
        parsed = fmt.parse_response(body)
        tracing.note_answer(call.inference, fmt.name, body, parsed.usage)
        tracing.finish(call.inference)  # the answer is in: deciding (and holds) are not in it
        await self.ctx.guard.settle(call.admission, parsed.usage)
        decisions = await self._decide(parsed.calls, exchange, call)
        refused = any(not d.allowed and d.on_deny is OnDeny.ERROR for d in decisions)
        metrics = self.ctx.governor.metrics
        metrics.requests.labels(call.provider.name, "403" if refused else "200").inc()
        metrics.overhead_seconds.labels(call.provider.name, "whole").observe(call.overhead())
        if refused:
            return reply(fmt.denied_error(parsed.calls, decisions), retry=False,
                         code="tool_call_denied")
        out = fmt.render_response(parsed, decisions)
        return web.Response(status=200, body=out, headers=return_headers(resp.headers))

    async def _stream(self, request: web.Request, resp: aiohttp.ClientResponse, call: Call,
                      exchange: Exchange, stream: StreamFilter) -> web.StreamResponse:
        out = web.StreamResponse(status=200, headers=return_headers(resp.headers))
        out.headers["Cache-Control"] = "no-cache"
        try:
            await out.prepare(request)
            # Time to first byte: the agent's response headers, less the upstream's.
            self.ctx.governor.metrics.overhead_seconds.labels(call.provider.name, "stream").observe(
                call.overhead())
            try:
                async for chunk in resp.content.iter_any():
                    await self._drive(stream, stream.feed(chunk), out, exchange, call)
                    if stream.failed is not None:
                        # The filter ended the stream (a cut, a denial, a broken upstream):
                        # nothing more goes to the client, so stop reading and close the
                        # upstream, which stops its generation.
                        resp.close()
                        break
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    TimeoutError) as e:
                log.warning("upstream stream broke: %s", type(e).__name__)
            await self._drive(stream, stream.close(), out, exchange, call)
        except ConnectionResetError:
            # The agent went away: stop reading upstream (which stops its generation),
            # charge what was used so far. Decided calls are already audited.
            log.info("client disconnected mid-stream (request %s)", call.rid)
            return out
        finally:
            await self._settle_stream(call, stream)
        status = "200" if stream.failed is None else "200-error"
        self.ctx.governor.metrics.requests.labels(call.provider.name, status).inc()
        if stream.failed:
            self.ctx.governor.reject(provider=call.provider.name, status=200,
                                     code="stream_error", message=stream.failed,
                                     request_id=call.rid, session=exchange.session,
                                     agent=exchange.agent, endpoint=exchange.endpoint)
        await out.write_eof()
        return out

    async def _settle_stream(self, call: Call, stream: StreamFilter) -> None:
        tracing.note_usage(call.inference, stream.usage)
        if stream.failed:
            tracing.failed(call.inference, "stream_error")
        tracing.finish(call.inference)
        units = getattr(stream, "output_units", None)
        await self.ctx.guard.settle(call.admission, stream.usage,
                                    units if isinstance(units, int) else None)

    async def _drive(self, stream: StreamFilter, step: Step, out: web.StreamResponse,
                     exchange: Exchange, call: Call) -> None:
        while True:
            if step.data:
                await out.write(step.data)
            if not step.pending:
                return
            step = stream.decide(await self._decide(step.pending, exchange, call, out))

    async def _pass_through(self, request: web.Request, upstream: Upstream, route: Route,
                            who: Identity = ANONYMOUS, body: bytes | None = None
                            ) -> web.StreamResponse:
        """`body`: the request body when it was already read (and judged)."""
        if body is None:
            body = await read_body(request, self.ctx.config.max_body_bytes)
        return await relay(self.ctx.client, request, self._url(upstream, route, request, who),
                           body, forward_headers(request.headers, upstream,
                                                 drop=who.drop_headers),
                           what="the upstream", ssl=self._ssl(upstream))
