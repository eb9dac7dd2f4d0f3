"""The reverse route for MCP servers: `/mcp/{name}` is the server's Streamable HTTP endpoint.

Every POST is read whole and judged before a byte goes upstream. Each
`tools/call` in it is decided by the same rules as a model's tool call (tool =
`params.name`, arguments = `params.arguments`); a hold waits on the same
approvals. If every call is allowed, the body is forwarded unchanged and the
answer (JSON or an SSE stream) streamed back unchanged. A denied call gets a
tool result with `isError: true` and the denial text (rule and message), which the
model reads, the rules in `result._meta.tether` (HTTP 200); with the server's
`deny_as: error`, a JSON-RPC error (code -32003, `data.rule`/`data.rules`). Either
way it is never forwarded; a batch with any denied call is refused whole: the
denied ones answered so, every other request in it gets a JSON-RPC error. Other methods (initialize,
tools/list, notifications, resources/*, prompts/*), GET (the server-to-client
stream) and DELETE (end of session) pass through unchanged; so do
`Mcp-Session-Id` and `MCP-Protocol-Version`. Every method is authenticated
first (`auth:`; under `mode: required` no identity is 401 with a JSON-RPC
error), and the credential that named the agent is never forwarded. A body that is not JSON-RPC tether
can read unambiguously gets HTTP 400 with a JSON-RPC parse error (-32700) or
invalid request (-32600/-32602), is audited, and is not forwarded.

MCP has no per-request tool declaration: the called name counts as declared
(agent tool scopes and rules still apply). Budgets and repeat detection do not
apply: MCP calls cost no tokens. Everything is audited as provider `mcp:<name>`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from aiohttp import web
from yarl import URL

from ..auth.authenticator import Identity
from ..config import Upstream
from ..errors import BadRequest, RequestError, TetherError
from ..ids import new_id
from ..model import Action, Decision, Exchange, PastCall, RuleTrace, ToolCall
from ..paths import canonical_path
from ..policy.mcp import (
    INVALID_REQUEST,
    McpServer,
    Message,
    RpcRefused,
    denied_object,
    error_object,
    parse_body,
    render,
)
from ..policy.openapi_arguments import arguments_trace
from .apis import ApiRoutes, deciding_rule
from .context import Context
from .errors import status_and_code
from .flows import FlowState
from .upstream import forward_headers, read_body, relay

log = logging.getLogger("tether.mcp")

METHODS = {"POST", "GET", "DELETE"}
RPC_CODES = {-32700: "parse_error", -32600: "invalid_request", -32602: "invalid_params"}


def rpc_reply(body: bytes, status: int = 200, code: str = "") -> web.Response:
    headers = {"x-tether-error": code, "x-should-retry": "false"} if code else {}
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)


class McpRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = new_id()
        name = request.match_info["name"]
        server = self.ctx.config.mcp.get(name)
        # An unconfigured name is the agent's text: it never becomes a metric label.
        provider = server.provider if server else "mcp"
        raw_path = request.rel_url.raw_path
        try:
            if server is None:
                return self._refuse(provider, 404, INVALID_REQUEST, "route_not_found",
                                    f"no MCP server named {name!r} is configured", rid, raw_path)
            prefix = f"/mcp/{name}"
            if not raw_path.startswith(prefix) or raw_path[len(prefix):len(prefix) + 1] not in \
                    ("", "/"):
                raise BadRequest("the request path is ambiguous (the server name is "
                                 "percent-encoded); it was not forwarded")
            tail = canonical_path(raw_path[len(prefix) + 1:]).raw
            if request.method not in METHODS:
                return self._refuse(provider, 405, INVALID_REQUEST, "method_not_allowed",
                                    f"{request.method} is not part of MCP's Streamable HTTP "
                                    "transport (POST, GET, DELETE)", rid, raw_path)
            body = await read_body(request, self.ctx.config.max_body_bytes)
        except RequestError as e:
            return self._refuse(provider, e.status, INVALID_REQUEST, e.code, e.message, rid,
                                raw_path[:200])
        url = server.url + (f"/{tail}" if tail else "")
        try:
            who = await self.ctx.auth.identify(request.headers, request.rel_url.raw_query_string)
            query = who.query(request.rel_url.raw_query_string)
            target = URL(url + (f"?{query}" if query else ""), encoded=True)
            if request.method == "POST":
                return await self._govern(request, server, target, body, rid, who)
            return await self._forward(request, server, target, body, who)
        except TetherError as e:
            status, code = status_and_code(e)
            reply = self._refuse(provider, status, INVALID_REQUEST, code, str(e), rid, url)
            if status == 401:
                reply.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
            return reply
        except Exception:  # noqa: BLE001 - a failure while judging must not forward
            log.exception("judging an MCP request failed")
            self.ctx.governor.metrics.fail_closed.labels("mcp").inc()
            return self._refuse(provider, 500, -32603, "internal_error", "tether hit an "
                                "internal error; the request was not forwarded", rid, url)

    def _refuse(self, provider: str, status: int, rpc_code: int, code: str, message: str,
                rid: str, endpoint: str, session: str | None = None,
                agent: str | None = None) -> web.Response:
        self.ctx.governor.reject(provider=provider, status=status, code=code, message=message,
                                 request_id=rid, endpoint=endpoint, session=session, agent=agent)
        self.ctx.governor.metrics.requests.labels(provider, str(status)).inc()
        return rpc_reply(render([error_object(None, rpc_code, f"[tether] {message}")], False),
                         status, code)

    async def _govern(self, request: web.Request, server: McpServer, target: URL, body: bytes,
                      rid: str, who: Identity) -> web.StreamResponse:
        trust = self.ctx.config.trust_identity_headers
        agent = who.agent
        session = (request.headers.get("x-tether-session") if trust else None) or None
        try:
            envelope = parse_body(body, request.headers.get("mcp-protocol-version"))
        except RpcRefused as e:
            return self._refuse(server.provider, 400, e.code, RPC_CODES.get(e.code, "invalid"),
                                e.message, rid, "POST", session, agent)
        judged = [m for m in envelope.messages if m.call is not None]
        if not judged:
            return await self._forward(request, server, target, body, who)
        try:
            decisions = await self._decide(request, server, [m.call for m in judged if m.call],
                                           session, who, rid)
        except ConnectionResetError:
            # The agent went away: its approval has ended denied; nothing is forwarded.
            log.info("agent disconnected while its MCP tool call was held (%s)", rid)
            return rpc_reply(b"", 499, "client_gone")
        if all(d.allowed for d in decisions):
            return await self._forward(request, server, target, body, who)
        denied = {id(m): d for m, d in zip(judged, decisions, strict=True) if not d.allowed}
        self.ctx.governor.metrics.requests.labels(server.provider, "200-denied").inc()
        return rpc_reply(render([self._answer(m, denied.get(id(m)), server)
                                 for m in envelope.messages if m.rpc_id is not None],
                                envelope.batch), code="tool_call_denied")

    @staticmethod
    def _answer(message: Message, decision: Decision | None,
                server: McpServer) -> dict[str, object]:
        if decision is not None:
            return denied_object(message, decision, deciding_rule(decision),
                                 as_result=server.deny_as == "result")
        return error_object(message.rpc_id, INVALID_REQUEST, "[tether] not forwarded: another "
                            "tool call in the same batch was denied")

    async def _decide(self, request: web.Request, server: McpServer, calls: list[ToolCall],
                      session: str | None, who: Identity, rid: str) -> list[Decision]:
        decisions = []
        flows, flow = self.ctx.flows, FlowState(who.agent, session, rid)
        past: tuple[PastCall, ...] = ()
        broken: RuleTrace | None = None
        if flows is not None:  # flow rules read the session's history (server/flows.py)
            past, broken = await flows.load(who.agent, session)
        for call in calls:
            exchange = replace(self._exchange(server, call, session, who), history=past)
            op = self.ctx.config.apis.for_tool(call.name)
            trace = arguments_trace(op, call) if op else None
            extra: tuple[RuleTrace, ...] = tuple(t for t in (trace, broken) if t)
            if self.ctx.opa is not None:  # OPA's verdict joins the rules': the strictest wins
                extra += (await self.ctx.opa.judge(call, exchange, "mcp",
                                                   api=op.name if op else None),)
            decisions.append(self.ctx.governor.decide(
                call, exchange, request_id=rid, extra=extra,
                api=op.name if op else None))
        held = [i for i, d in enumerate(decisions) if d.action is Action.HOLD]
        if held:
            # One exchange per call (each declares its own name); holds are waited on together.
            exchange = Exchange(provider=server.provider, model="",
                                declared_tools=tuple(c.name for c in calls), session=session,
                                agent=who.agent, endpoint="tools/call", claims=who.claims)
            decisions = await self.ctx.holds.resolve(calls, decisions, exchange,
                                                     ApiRoutes._alive(request))
        if flows is not None:  # before anything is forwarded
            decisions = await flows.after(calls, decisions, flow)
        return decisions

    @staticmethod
    def _exchange(server: McpServer, call: ToolCall, session: str | None,
                  who: Identity) -> Exchange:
        return Exchange(provider=server.provider, model="", declared_tools=(call.name,),
                        session=session, agent=who.agent, endpoint="tools/call",
                        claims=who.claims)

    async def _forward(self, request: web.Request, server: McpServer, target: URL,
                       body: bytes, who: Identity) -> web.StreamResponse:
        # As for tool APIs: the agent's own token passes unless tether holds one; the
        # credential that authenticated the agent to tether never does.
        headers = forward_headers(request.headers, Upstream(server.provider, server.url,
                                                            server.api_key_env,
                                                            pass_agent_credentials=True),
                                  drop=who.drop_headers)
        requests = self.ctx.governor.metrics.requests
        return await relay(self.ctx.client, request, target, body, headers,
                           what=f"the MCP server {server.name}", allow_redirects=False,
                           counted=lambda status: requests.labels(server.provider,
                                                                  str(status)).inc())
