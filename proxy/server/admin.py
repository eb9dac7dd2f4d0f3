"""The admin port: health, metrics, and the state people act on.

A separate port from the proxy's, so nothing an agent sends through the proxy is
served here. That is not isolation: a sidecar's agent shares the pod's loopback
and can connect to this port (the transparent redirect can refuse it that,
`TETHER_ADMIN_PORT` of deploy/transparent/tether-redirect). What guards the port
is the token: `Authorization: Bearer <token>`, read from the environment variable
the config names (`admin.token_env`, default TETHER_ADMIN_TOKEN), on every route
but these, which answer anyone:
  GET/HEAD /healthz, /readyz, /metrics   what probes and Prometheus read (they send no token)
  GET/HEAD /ui, /ui/                     the approvals page: a fixed file holding no data; a
                                         browser cannot send a bearer header when it navigates
  POST /slack/interactions               Slack signs each request instead (interactions.py
                                         checks the signature before anything else); only
                                         when `slack:` is configured
With no token configured the other routes answer 503: fail closed rather than open.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..approvals.holds import Holds
from ..approvals.queue import CALLER_GONE, State
from ..approvals.shown import listed
from ..approvals.slack.interactions import INTERACTIONS_PATH
from ..approvals.ui import OPEN_PATHS as UI_PATHS
from ..approvals.ui import ui_routes
from ..config import Config
from ..errors import StoreUnavailable
from ..sessions.guard import SessionGuard
from ..telemetry import Metrics

# GET or HEAD only. The approvals page is static (it holds no data); it calls the API
# with the token.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", *UI_PATHS})
OPEN_METHODS = frozenset({"GET", "HEAD"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def token_middleware(token_env: str, *, slack: bool) -> Middleware:
    """`slack`: whether POST /slack/interactions is served (and checks Slack's signature)."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS and request.method in OPEN_METHODS:
            return await handler(request)
        if slack and request.path == INTERACTIONS_PATH and request.method == "POST":
            return await handler(request)  # Slack cannot send our token; it signs instead
        token = os.environ.get(token_env, "")
        if not token:
            return _problem(503, f"the admin API is disabled: set {token_env}")
        # aiohttp keeps bytes that are not UTF-8 as lone surrogates: compared as the bytes sent.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {token}".encode("utf-8", "surrogateescape")):
            return _problem(401, "a valid admin bearer token is required")
        return await handler(request)

    return check


def build_admin(config: Config, metrics: Metrics, guard: SessionGuard, holds: Holds,
                ready: Callable[[], bool], slack: Handler | None = None,
                details: Callable[[], Mapping[str, object]] | None = None) -> web.Application:
    """`details`: what /readyz adds (the running policy revision, the last reloads)."""
    app = web.Application(middlewares=[token_middleware(config.admin_token_env,
                                                        slack=slack is not None)])
    audit = guard.audit
    queue = holds.queue

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = [] if ready() else ["starting or stopping"]
        try:
            await guard.store.ping()
        except StoreUnavailable as e:
            problems.append(e.message)
        if not audit.healthy:
            problems.append(audit.last_error or "the audit log cannot be written")
        if audit.spool is not None and (refused := audit.spool.refusal()) is not None:
            problems.append(refused[1])  # shipping lags: records (so calls) are refused
        return web.json_response({"status": "ready" if not problems else "not ready",
                                  "problems": problems,
                                  **(details() if details is not None else
                                     {"policy_revision": config.policy.revision})},
                                 status=200 if not problems else 503)

    async def metrics_route(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def session(request: web.Request) -> web.Response:
        agent = request.query.get("agent") or None
        try:
            status = await guard.status(agent, request.match_info["id"])
        except StoreUnavailable as e:
            return _problem(503, e.message)
        return web.json_response(status)

    async def reset(request: web.Request) -> web.Response:
        agent = request.query.get("agent") or None
        try:
            await guard.reset(agent, request.match_info["id"])
        except StoreUnavailable as e:
            return _problem(503, e.message)
        return web.json_response({"reset": request.match_info["id"], "agent": agent})

    async def approvals(request: web.Request) -> web.Response:
        try:
            pending, recent = await queue.pending(), await queue.recent()
        except StoreUnavailable as e:
            return _problem(503, e.message)
        # `shown`: each one's context as a person reads it (approvals/shown.py)
        return web.json_response({"pending": [listed(a) for a in pending],
                                  "recent": [listed(a) for a in recent]})

    async def approval(request: web.Request) -> web.Response:
        try:
            found = await queue.get(request.match_info["id"])
        except StoreUnavailable as e:
            return _problem(503, e.message)
        if found is None:
            return _problem(404, "no such approval")
        return web.json_response(listed(found))

    async def decide(request: web.Request) -> web.Response:
        approve = request.match_info["verb"] == "approve"
        body: dict[str, object] = {}
        if request.can_read_body:
            try:
                parsed = await request.json()
            except ValueError:
                return _problem(400, "the body must be JSON: {\"by\": NAME, \"reason\": TEXT}")
            if not isinstance(parsed, dict):
                return _problem(400, "the body must be a JSON object")
            body = parsed
        by, reason = body.get("by", "admin-api"), body.get("reason")
        if not isinstance(by, str) or not by or not (reason is None or isinstance(reason, str)):
            return _problem(400, "'by' must be a name and 'reason' text")
        try:
            current = await queue.get(request.match_info["id"])
            if current is None:
                return _problem(404, "no such approval")
            if approve and current.approvers and by not in current.approvers:
                return _problem(403, f"{by} may not approve this call (approvers: "
                                     f"{', '.join(current.approvers)})")
            decided, changed = await queue.decide(
                current.id, approve=approve, by=by, reason=reason,
                ticket_validity_s=config.approvals.ticket_validity_s)
        except StoreUnavailable as e:
            return _problem(503, e.message)
        if decided is None:  # gone between the read and the decision (its TTL ran out)
            return _problem(404, "no such approval")
        if not changed:
            message = f"approval {decided.id} is already {decided.state.value}"
            if decided.state is State.ABANDONED:  # the caller left, tether or its replica stopped
                message = (f"approval {decided.id} was abandoned: {CALLER_GONE}"
                           + (f" ({decided.reason})" if decided.reason else ""))
            return web.json_response({"error": {"message": message, "code": decided.state.value},
                                      "approval": decided.as_json()}, status=409)
        return web.json_response(decided.as_json())

    app.router.add_get("/v1/approvals", approvals)
    app.router.add_get("/v1/approvals/{id}", approval)
    app.router.add_post("/v1/approvals/{id}/{verb:approve|deny}", decide)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/v1/sessions/{id}", session)
    app.router.add_post("/v1/sessions/{id}/reset", reset)
    app.router.add_routes(ui_routes())
    if slack is not None:
        app.router.add_post(INTERACTIONS_PATH, slack)
    return app
