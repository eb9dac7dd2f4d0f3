"""The reverse route for tool APIs: `/apis/{name}/PATH` goes to the API's URL + PATH.

For agents that can set a base URL. A request is judged whole before a byte
goes upstream: the path must be canonical (`proxy.paths`: ambiguous encodings,
control, invisible and whitespace characters are refused, 400); it is judged
as the method it asks to be (override headers and `_method`); it must be an
operation of the API's OpenAPI spec (an allow-list: anything else is denied)
whose parameters and body fit the spec; then the rules decide, matching
`api: jira.createIssue` or `effect: write`. A hold waits on the same approvals
as the LLM side (approve over the admin API, the CLI, Slack or the page). An
allowed request is forwarded unchanged but for credentials (tether's own, from
`api_key_env`, as `Authorization: Bearer`) and its response streamed back;
redirects are returned, not followed. Budgets do not apply: tool APIs cost no
tokens. Everything is audited under provider `api:<name>`.

Refusals and denials are JSON: `{"error": {"message", "rule", "rules", "code"}}`.
"""

from __future__ import annotations

import logging

from aiohttp import web
from yarl import URL

from ..approvals.holds import KeepAlive
from ..auth.authenticator import ANONYMOUS, Identity
from ..config import Upstream
from ..egress import AMBIGUOUS, Verdict, Who, judge_api
from ..egress import deciding_rule as deciding_rule  # re-exported: the MCP route uses it
from ..errors import BadRequest, RequestError, RouteNotFound, TetherError, Unauthorized
from ..ids import new_id
from ..model import HttpRequest
from ..paths import canonical_path
from ..policy.apis_config import ToolApi
from .context import Context
from .errors import status_and_code
from .upstream import forward_headers, read_body, relay

log = logging.getLogger("tether.apis")


class AmbiguousRequest(BadRequest):
    code = AMBIGUOUS

def error_reply(status: int, message: str, code: str, rule: str | None = None,
                rules: tuple[str, ...] = ()) -> web.Response:
    body = Verdict(False, status, code, message, rule, rules).body()
    return web.json_response(body, status=status,
                             headers={"x-tether-error": code, "x-should-retry": "false"})


class ApiRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = new_id()
        name = request.match_info["name"]
        api = self.ctx.config.apis.get(name)
        # An unconfigured name is the agent's text: it never becomes a metric label.
        provider = api.provider if api else "api"
        raw_path = request.rel_url.raw_path
        try:
            if api is None:
                raise RouteNotFound(f"no tool API named {name!r} is configured")
            prefix = f"/apis/{name}/"
            if not raw_path.startswith(prefix):
                raise AmbiguousRequest("the request path is ambiguous (the API name is "
                                       "percent-encoded); it was not forwarded")
            try:
                path = "/" + canonical_path(raw_path[len(prefix):]).raw
            except BadRequest as e:
                raise AmbiguousRequest(e.message) from e
            body = await read_body(request, self.ctx.config.max_body_bytes)
        except RequestError as e:
            return self._refuse(provider, e.status, e.code, e.message, rid, raw_path[:200])
        try:
            return await self._govern(request, api, path, body, rid)
        except TetherError as e:
            status, code = status_and_code(e)
            reply = self._refuse(provider, status, code, str(e), rid, path)
            if isinstance(e, Unauthorized):
                reply.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
            return reply
        except Exception:  # noqa: BLE001 - a failure while judging must not forward
            log.exception("judging a tool API request failed")
            self.ctx.governor.metrics.fail_closed.labels("apis").inc()
            return self._refuse(provider, 500, "internal_error", "tether hit an internal error; "
                                "the request was not forwarded", rid, path)

    def _refuse(self, provider: str, status: int, code: str, message: str, rid: str,
                endpoint: str) -> web.Response:
        self.ctx.governor.reject(provider=provider, status=status, code=code, message=message,
                                 request_id=rid, endpoint=endpoint)
        self.ctx.governor.metrics.requests.labels(provider, str(status)).inc()
        return error_reply(status, message, code)

    async def _govern(self, request: web.Request, api: ToolApi, path: str, body: bytes,
                      rid: str) -> web.StreamResponse:
        target = URL(api.url)
        who = await self.ctx.auth.identify(request.headers, request.rel_url.raw_query_string)
        # The credential that named the agent is tether's: neither judged nor forwarded.
        dropped = {h.lower() for h in who.drop_headers}
        http = HttpRequest(method=request.method, scheme=target.scheme, host=target.host or "",
                           port=target.port or 0, path=path,
                           query=who.query(request.rel_url.raw_query_string),
                           headers=tuple((k, v) for k, v in request.headers.items()
                                         if k.lower() not in dropped), body=body)
        trust = self.ctx.config.trust_identity_headers
        session = (request.headers.get("x-tether-session") if trust else None) or None
        verdict = await judge_api(self.ctx.governor, self.ctx.holds, api, http,
                                  Who(rid, session, who.agent, path, claims=who.claims),
                                  self._alive(request), opa=self.ctx.opa,
                                  linked=self.ctx.linked)
        if not verdict.allowed:
            if verdict.status != 499:
                self.ctx.governor.metrics.requests.labels(api.provider, str(verdict.status)).inc()
            return error_reply(verdict.status, verdict.message, verdict.code, verdict.rule,
                               verdict.rules)
        return await self._forward(request, api, path, body, who)

    @staticmethod
    def _alive(request: web.Request) -> KeepAlive:
        """Checked while a request waits for a human: a plain HTTP response has no
        keep-alive to send, but an agent that has gone must not have its request run."""

        async def check(_: str) -> None:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the agent's connection closed")

        return check

    async def _forward(self, request: web.Request, api: ToolApi, path: str,
                       body: bytes, who: Identity = ANONYMOUS) -> web.StreamResponse:
        query = who.query(request.rel_url.raw_query_string)
        # The path and query bytes exactly as judged: no re-encoding on the way out.
        url = URL(f"{api.url}{path}" + (f"?{query}" if query else ""), encoded=True)
        # A tool API's own token is the agent's business unless tether holds one
        # (`api_key_env`): agent credentials pass there, as before.
        headers = forward_headers(request.headers, Upstream(api.provider, api.url,
                                                            api.api_key_env,
                                                            pass_agent_credentials=True),
                                  drop=who.drop_headers)
        requests = self.ctx.governor.metrics.requests
        return await relay(self.ctx.client, request, url, body, headers,
                           what=f"the {api.name} API", allow_redirects=False,
                           counted=lambda status: requests.labels(api.provider, str(status)).inc())
