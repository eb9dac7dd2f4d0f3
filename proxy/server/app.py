"""The two aiohttp applications: the proxy port (agents) and the admin port (people).

They never share routes: the admin port holds what an agent must not reach.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .. import tracing
from ..approvals.holds import Holds
from ..approvals.redis_queue import make_approvals
from ..approvals.slack.notifier import SlackNotifier
from ..audit import AuditLog
from ..auth.jwks_fetch import make_authenticator
from ..config import Config
from ..errors import RouteNotFound
from ..governor import Governor
from ..opa.client import OpaClient
from ..policy.engine import PolicyEngine
from ..providers import PROVIDERS
from ..providers.base import Provider
from ..sessions.guard import SessionGuard
from ..sessions.redis_store import RedisStore
from ..sessions.store import MemoryStore, Store
from ..telemetry import Metrics
from .admin import build_admin
from .apis import ApiRoutes
from .errors import error_middleware
from .llm import Context, LLMRoutes
from .mcp import McpRoutes
from .traced import client_trace_config, server_middleware

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tether.server")

CONTEXT = web.AppKey("context", Context)


@dataclass(slots=True)
class Tether:
    """A built tether: its two apps and the governor and guard they share."""

    config: Config
    governor: Governor
    guard: SessionGuard
    holds: Holds
    proxy: web.Application
    admin: web.Application
    opa: OpaClient | None = None  # shared with the forward proxy's Egress

    async def close(self) -> None:
        """Requests waiting on this process end denied (nothing is approved by a stop); with
        Redis, approvals themselves stay for other replicas and expire on their timeout."""
        await self.holds.stop()
        if self.opa is not None:
            await self.opa.close()
        await self.guard.store.close()
        self.governor.audit.close()


def make_store(url: str) -> Store:
    if url == "memory":
        return MemoryStore()
    return RedisStore(url)


async def _not_found(request: web.Request) -> web.StreamResponse:
    known = ", ".join(f"/{p.name}/" for p in PROVIDERS)
    raise RouteNotFound(f"no route for {request.path}; known prefixes: {known}")


async def _apis(request: web.Request) -> web.StreamResponse:
    return await ApiRoutes(request.app[CONTEXT]).handle(request)


async def _mcp(request: web.Request) -> web.StreamResponse:
    return await McpRoutes(request.app[CONTEXT]).handle(request)


def _handler(provider: Provider) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await LLMRoutes(request.app[CONTEXT]).handle(request, provider)

    return handle


def build(config: Config, tracer_provider: TracerProvider | None = None) -> Tether:
    """`tracer_provider`: where spans go; None takes `tracing.installed()` (None: no tracing)."""
    metrics = Metrics()
    audit = AuditLog(config.audit_path, config.audit, metrics)
    spans = tracer_provider or tracing.installed()
    governor = Governor(PolicyEngine(config.policy), audit, metrics, tracing.tracer_of(spans))
    guard = SessionGuard(config.budgets, make_store(config.store_url), metrics, audit,
                         config.on_store_error)
    opa = OpaClient(config.opa, metrics, config.policy.effects) if config.opa else None
    settings = config.approvals
    queue = make_approvals(config.store_url, settings)
    holds = Holds(queue, settings, audit, metrics, config.policy.revision)
    # The server span is outermost, so it sees the status the error middleware renders.
    middlewares = [server_middleware(spans)] if spans is not None else []
    proxy = web.Application(middlewares=[*middlewares, error_middleware],
                            client_max_size=config.max_body_bytes)
    slack: SlackNotifier | None = None
    if config.slack is not None:
        slack = notifier = SlackNotifier(config.slack, queue, audit=audit, metrics=metrics,
                                         ticket_validity_s=settings.ticket_validity_s)
        # Closed after the proxy's held requests have ended, so their outcomes reach Slack.
        proxy.on_cleanup.append(lambda _app: notifier.close())
    holder: dict[str, Context] = {}

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=config.upstream_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        traces = [client_trace_config(spans)] if spans is not None else []
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         auto_decompress=True, trust_env=False,
                                         trace_configs=traces) as client:
            ctx = Context(config, governor, guard, holds, client,
                          auth=make_authenticator(config, client, metrics))
            ctx.opa = opa
            holder["ctx"] = ctx
            app[CONTEXT] = ctx
            yield

    proxy.cleanup_ctx.append(client_ctx)

    for provider in PROVIDERS:
        proxy.router.add_route("*", f"/{provider.name}/{{tail:.*}}", _handler(provider))
    proxy.router.add_route("*", "/apis/{name}/{tail:.*}", _apis)
    proxy.router.add_route("*", "/mcp/{name}", _mcp)
    proxy.router.add_route("*", "/mcp/{name}/{tail:.*}", _mcp)
    proxy.router.add_route("*", "/{tail:.*}", _not_found)

    admin = build_admin(config, metrics, guard, holds, lambda: "ctx" in holder,
                        slack=slack.interactions.handle if slack is not None else None)
    return Tether(config, governor, guard, holds, proxy, admin, opa=opa)


async def start(tether: Tether, *, host: str, port: int, admin_port: int) -> list[web.AppRunner]:
    """Start both apps; returns the runners (stop them with `runner.cleanup()`)."""
    runners: list[web.AppRunner] = []
    for app, p in ((tether.proxy, port), (tether.admin, admin_port)):
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, p).start()
        runners.append(runner)
    return runners


def bound_port(runner: web.AppRunner) -> int:
    addresses = runner.addresses
    return int(addresses[0][1])
