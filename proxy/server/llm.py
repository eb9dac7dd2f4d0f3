"""The governed LLM routes: forward, read every tool call, decide, respond.

One handler serves every provider. A request is checked whole before a byte
goes upstream. A response is read (non-streaming) or filtered as it arrives
(streaming), and nothing carrying a tool call reaches the agent before that
call is decided (llm_answers.py).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from yarl import URL

from .. import surrogates, tracing
from ..audit.log import AuditWriteError
from ..auth.authenticator import ANONYMOUS, Identity
from ..config import Upstream
from ..errors import BadRequest, NotGoverned, RequestError, RouteNotFound, TetherError, UpstreamError
from ..ids import new_id
from ..model import Exchange
from ..paths import canonical_path
from ..providers.base import (
    ParsedRequest,
    Provider,
    RestrictsTools,
    Route,
    RouteKind,
    StreamFilter,
    WireFormat,
    exchange_for,
)
from ..sessions.identity import session_of
from . import approvals_continue, continuation, provider_gate, responses_turns, retrieval
from .approvals_continue import Send
from .batches import BatchGate
from .context import Context
from .errors import PROVIDER_KEY, status_and_code
from .flows import FlowState
from .llm_answers import Answers, Call
from .upstream import (
    forward_headers,
    forward_query,
    read_body,
    relay,
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


def refuse_non_utf8(body: bytes) -> None:
    """JSON between systems is UTF-8 (RFC 8259, 8.1), but `json.loads` also reads UTF-16
    and UTF-32, sniffing the first bytes: tether would judge what it read and pass bytes a
    provider reads otherwise, or not at all; a UTF-8 byte order mark, which JSON must not
    carry, likewise. Such a body is refused 400 up front, by the parser's own sniffing
    (invalid UTF-8 bytes are the parser's to refuse)."""
    if json.detect_encoding(body) != "utf-8":
        raise BadRequest("the request body is not UTF-8 without a byte order mark (it reads "
                         "as UTF-16, UTF-32 or starts with a BOM); JSON between systems must "
                         "be UTF-8, so it was not forwarded")


@runtime_checkable
class ReportsUsage(Protocol):
    """A format that can make a stream report its usage when the client did not ask."""

    def stream_with_usage(self, body: bytes, request: ParsedRequest, *,
                          max_arguments: int = ...) -> tuple[bytes, StreamFilter]: ...


class LLMRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.answers = Answers(ctx)

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
                                     message=e.message, request_id=new_id(),
                                     endpoint=raw[:200])
            self.ctx.governor.metrics.requests.labels(provider.name, str(e.status)).inc()
            raise
        if route.kind is RouteKind.PASS:
            return await self._pass_through(request, upstream, route, who)
        if route.kind is RouteKind.RETRIEVE:  # a stored answer, as tether rewrote it
            return await retrieval.retrieve(
                self.ctx.client, self.ctx.rewrites, self._url(upstream, route, request, who),
                forward_headers(request.headers, upstream, drop=who.drop_headers),
                self._ssl(upstream), self.ctx.config.max_response_bytes, who.agent,
                route.params)
        if route.kind is RouteKind.BATCH:
            return await BatchGate(self.ctx).handle(
                request, provider, upstream, route, who, self._ssl(upstream),
                lambda body: self._pass_through(request, upstream, route, who, body))
        trust = self.ctx.config.trust_identity_headers
        session = request.headers.get("x-tether-session") if trust else None
        call = Call(provider, route, upstream, new_id(), session or None, who.agent,
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
            refuse_non_utf8(body)
            if fmt.name == "openai.responses":  # fit what tether changed earlier (rewrites)
                body, call.turn = await responses_turns.before(self.ctx.rewrites, call.agent,
                                                               body)
            parsed = fmt.parse_request(body, call.route)
            call.session = session_of(request.headers, parsed, call.agent,
                                      self.ctx.config.trust_identity_headers)
            if self.ctx.flows is not None:  # the session history's part (flows.py)
                call.flow = FlowState(call.agent, call.session, call.rid,
                                      responses_turns.results(body, call.turn))
            body, parsed = self._restrict(fmt, body, parsed, call)

            def exchange_of(request: ParsedRequest) -> Exchange:
                return exchange_for(call.provider.name, request, session=call.session,
                                    agent=call.agent, endpoint=call.route.upstream_path,
                                    claims=call.who.claims)

            exchange = exchange_of(parsed)
            body, gated, call.agent_approves = provider_gate.apply(  # provider-run tools
                self.ctx.governor, self.ctx.config.provider_tools, fmt, body, parsed, call.route,
                exchange, call.rid)
            if gated is not parsed:  # narrowed: the exchange is what the model will be sent
                parsed, exchange = gated, exchange_of(gated)
            call.admission = await self.ctx.guard.admit(
                agent=call.agent, session=call.session, model=parsed.model,
                body_bytes=len(body), max_output=parsed.max_output_tokens)
        except TetherError as e:
            self._reject(call, e)
            raise
        stream: StreamFilter | None = None
        if parsed.stream and isinstance(fmt, ReportsUsage):
            body, stream = fmt.stream_with_usage(
                body, parsed, max_arguments=self.ctx.config.max_arguments_bytes)
        if parsed.stream and fmt.name == "openai.responses" and (
                call.agent_approves or continuation.enabled(self.ctx)):
            # MCP servers declared, or denials to continue: tether may answer upstream.
            stream = approvals_continue.approving(
                fmt, call, self.ctx.config.max_arguments_bytes,
                self.ctx.governor.engine.policy.max_continuations
                if continuation.enabled(self.ctx) else 0)
        elif parsed.stream:  # the answer may go on after a denial (server/continuation.py)
            stream = continuation.continuing(
                self.ctx, fmt, stream or fmt.stream(
                    call.route, max_arguments=self.ctx.config.max_arguments_bytes),
                self._remake(fmt, body, parsed, call), body)
        url = self._url(call.upstream, call.route, request, call.who)
        call.sent, call.send, call.parsed = body, self._sender(request, call, url), parsed
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
                    return await self.answers.upstream_error(resp, ctype, call, exchange)
                if ctype in STREAM_TYPES or (call.route.stream and ctype == "application/json"):
                    return await self.answers.stream(request, resp, call, exchange,
                                                     stream or fmt.stream(
                                                         call.route, max_arguments=(
                                                             self.ctx.config.max_arguments_bytes)))
                if ctype == "application/json":
                    return await self.answers.whole(resp, call, exchange)
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

    def _remake(self, fmt: WireFormat, body: bytes, parsed: ParsedRequest, call: Call
                ) -> Callable[[], StreamFilter]:
        """A fresh stream filter like the first, for each continuation's stream."""
        limit = self.ctx.config.max_arguments_bytes
        if isinstance(fmt, ReportsUsage):
            return lambda: fmt.stream_with_usage(body, parsed, max_arguments=limit)[1]
        return lambda: fmt.stream(call.route, max_arguments=limit)

    def _sender(self, request: web.Request, call: Call, url: URL) -> Send:
        """Another request to the same upstream URL with the agent's headers (signed anew),
        for a continuation tether makes on the agent's behalf."""
        async def send(body: bytes) -> aiohttp.ClientResponse:
            headers = sign_request(call.upstream, "POST", str(url),
                                   forward_headers(request.headers, call.upstream,
                                                   drop=call.who.drop_headers), body)
            return await self.ctx.client.post(url, data=body, headers=headers,
                                              ssl=self._ssl(call.upstream))
        return send

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
