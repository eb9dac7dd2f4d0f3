"""The two aiohttp applications: the proxy port (agents) and the admin port (people).

They never share routes: the admin port holds what an agent must not reach.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .. import tracing
from ..approvals.holds import Holds
from ..approvals.redis_queue import make_approvals
from ..approvals.slack.notifier import SlackNotifier
from ..audit import AuditLog
from ..audit.heads import HeadTimer
from ..audit.shipper import Shipper
from ..auth.jwks_fetch import make_authenticator
from ..config import Config
from ..governor import Governor
from ..linked_calls import LinkedCalls
from ..opa.client import OpaClient
from ..policy.engine import PolicyEngine
from ..sessions.guard import SessionGuard
from ..sessions.ledger import Ledger, MemoryLedger, RedisLedger
from ..sessions.redis_store import RedisStore
from ..sessions.rewrites import rewrites_for
from ..sessions.store import MemoryStore, Store
from ..telemetry import Metrics
from ..workers import Worker
from .admin import build_admin
from .connections import GuardedRunner, Port, guard_middleware
from .context import Context
from .errors import error_middleware
from .flows import make_flows
from .lifecycle import InFlight, UpstreamReads, caller_middleware
from .reload import Reloader
from .routes import CONTEXT, add_routes
from .traced import client_trace_config, server_middleware

__all__ = ["CONTEXT", "Tether", "bound_port", "build", "start"]

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tether.server")


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
    linked: LinkedCalls | None = None  # shared with the forward proxy's Egress
    shipper: Shipper | None = None  # ships the audit log to `audit.sinks`
    reloader: Reloader | None = None  # swaps in a changed config (server/reload.py)

    async def close(self) -> None:
        """Requests waiting on this process end denied (nothing is approved by a stop); with
        Redis, approvals themselves stay for other replicas and expire on their timeout.
        The audit spool is drained last, after the log's final record, within
        `audit.spool.drain_timeout` (what is left ships at the next start)."""
        if self.reloader is not None:
            await self.reloader.stop()
        await self.holds.close()
        if self.opa is not None:
            await self.opa.close()
        await self.guard.store.close()
        self.governor.audit.close()
        if self.shipper is not None:
            await self.shipper.drain()


    @property
    def inflight(self) -> InFlight:
        """The proxy port's requests in flight (server/lifecycle.py drains them)."""
        return self.proxy[INFLIGHT]

    async def cut_upstreams(self) -> None:
        """Close every upstream connection under a request still running (the end of the
        SIGTERM drain): each ends with an error in its provider's shape."""
        cut = self.proxy[UPSTREAM_READS].cut()   # bodies being read: failed, so they end
        log.info("shutdown: %d upstream answer(s) cut", cut)
        ctx = self.proxy.get(CONTEXT)
        if ctx is not None and ctx.client.connector is not None:
            await ctx.client.connector.close()   # those still waiting for headers


INFLIGHT = web.AppKey("tether.inflight", InFlight)
UPSTREAM_READS = web.AppKey("tether.upstream_reads", UpstreamReads)


def make_store(url: str) -> Store:
    if url == "memory":
        return MemoryStore()
    return RedisStore(url)


def build(config: Config, tracer_provider: TracerProvider | None = None,
          worker: Worker | None = None) -> Tether:
    """`tracer_provider`: where spans go; None takes `tracing.installed()` (None: no tracing).
    `worker`: one of `tether serve --workers N`, which writes its own audit chain."""
    metrics = Metrics()
    audit_path = worker.audit_path(config.audit_path) if worker else config.audit_path
    audit = AuditLog(audit_path, worker.audit_settings(config.audit) if worker else config.audit,
                     metrics)
    shipper = (Shipper(audit_path, config.audit_shipping, metrics)
               if audit_path and config.audit_shipping.sinks else None)
    audit.spool = shipper  # the log refuses records while shipping lags too far
    spans = tracer_provider or tracing.installed()
    governor = Governor(PolicyEngine(config.policy), audit, metrics, tracing.tracer_of(spans))
    guard = SessionGuard(config.budgets, make_store(config.store_url), metrics, audit,
                         config.on_store_error)
    opa = OpaClient(config.opa, metrics, config.policy.effects) if config.opa else None
    # The ledger of decided calls lives in the session store (its Redis connection).
    ledger: Ledger = (RedisLedger(guard.store.client) if isinstance(guard.store, RedisStore)
                      else MemoryLedger())
    linked = LinkedCalls(config.tool_apis, ledger, metrics)
    settings = config.approvals
    queue = make_approvals(config.store_url, settings)
    holds = Holds(queue, settings, audit, metrics, config.policy.revision)
    # The server span is outermost, so it sees the status the error middleware renders.
    middlewares = [server_middleware(spans)] if spans is not None else []
    inflight = InFlight()
    # Innermost: a hold sees whether its caller is still there (server/lifecycle.py).
    proxy = web.Application(middlewares=[*middlewares, error_middleware,
                                         caller_middleware(inflight)],
                            client_max_size=config.max_body_bytes)
    proxy[INFLIGHT] = inflight
    proxy[UPSTREAM_READS] = UpstreamReads()

    async def start_holds(_app: web.Application) -> None:
        await holds.start()  # Redis: this replica's lease, and the sweep of dead ones'

    proxy.on_startup.append(start_holds)
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
        # No trace config unless spans are exported: with one, aiohttp makes and awaits a
        # signal for every step of every request (connection reused, headers sent, chunk).
        traces = [client_trace_config(spans)] if spans is not None else []
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         auto_decompress=True, trust_env=False,
                                         trace_configs=traces,
                                         # what a stop cuts (lifecycle.py)
                                         response_class=app[UPSTREAM_READS].response_class
                                         ) as client:
            ctx = Context(config, governor, guard, holds, client,
                          auth=make_authenticator(config, client, metrics))
            ctx.opa = opa
            ctx.flows = make_flows(config, governor, guard.store)  # flow rules' history
            ctx.rewrites = rewrites_for(guard.store)  # Responses answers tether rewrote
            ctx.linked = linked
            holder["ctx"] = ctx
            app[CONTEXT] = ctx
            yield

    proxy.cleanup_ctx.append(client_ctx)
    heads = HeadTimer(audit)  # periodic signed chain heads; the last one is audit.close()'s

    async def heads_ctx(_app: web.Application) -> AsyncIterator[None]:
        heads.start()
        yield
        await heads.stop()

    proxy.cleanup_ctx.append(heads_ctx)
    if shipper is not None:
        async def ship(_app: web.Application) -> None:
            shipper.start()  # stopped by Tether.close, after the log's last record is shipped

        proxy.on_startup.append(ship)

    add_routes(proxy)

    reloader = Reloader(config, metrics)
    admin = build_admin(config, metrics, guard, holds,
                        lambda: "ctx" in holder and not inflight.draining,
                        slack=slack.interactions.handle if slack is not None else None,
                        details=reloader.details)
    admin.router.add_post("/v1/reload", reloader.handle)
    tether = Tether(config, governor, guard, holds, proxy, admin, opa=opa, linked=linked,
                    shipper=shipper, reloader=reloader)
    reloader.attach(tether)
    return tether


async def start(tether: Tether, *, host: str, port: int, admin_port: int,
                reuse_port: bool = False) -> list[web.AppRunner]:
    """Start both apps; returns the runners (stop them with `runner.cleanup()`, or
    server/lifecycle.py's `shutdown`). Each port's connections are bounded by
    `server:` (server/connections.py). `reuse_port`: the ports are shared with the
    other workers of `tether serve --workers N` (SO_REUSEPORT, workers.py)."""
    runners: list[web.AppRunner] = []
    limits = tether.config.connections
    for app, p, name in ((tether.proxy, port, "proxy"), (tether.admin, admin_port, "admin")):
        guarded = Port(name, limits, tether.governor.metrics)
        app.middlewares.insert(0, guard_middleware(guarded))  # outermost: sees each start
        # What is still running once a stop has answered the holds and drained (or cut)
        # the rest is cancelled after `shutdown_timeout`.
        runner = GuardedRunner(app, guarded, access_log=None, handle_signals=False,
                               shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, host, p, reuse_port=reuse_port or None).start()
        runners.append(runner)
    return runners


def bound_port(runner: web.AppRunner) -> int:
    addresses = runner.addresses
    return int(addresses[0][1])
