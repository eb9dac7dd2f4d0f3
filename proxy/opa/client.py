"""The OPA client both front ends hold: one call in, one `RuleTrace` out.

    trace = await opa.judge(call, exchange, "llm", api=..., budget=...)
    decision = governor.decide(call, exchange, extra=(..., trace))

It builds the input document, answers from the cache when it can, else asks
the back end (remote Data API or embedded rego-cpp) under the configured
timeout, interprets the answer (proxy.policy.opa, shared by both back ends) and
counts it. It never raises: every failure is a deny trace with a `tether:opa-*`
rule id, so the governor audits it like any rule. Only real verdicts are cached,
keyed by the SHA-256 of the canonical input document.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Protocol

from cachetools import TTLCache

from ..model import Effect, Exchange, RuleTrace, ToolCall
from ..policy.engine import effect_of
from ..policy.names import normalize
from ..policy.opa import BudgetView, Failed, Reply, Source, Verdict, budget_view, input_for, interpret
from ..sessions.guard import Admission, SessionGuard
from ..telemetry import Metrics
from .settings import OpaSettings

log = logging.getLogger("tether.opa")


class Backend(Protocol):
    async def query(self, document: str) -> Reply: ...


class OpaClient:
    def __init__(self, settings: OpaSettings, metrics: Metrics,
                 effects: Mapping[str, Effect] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.effects = effects or {}
        self.backend: Backend
        if settings.url is not None:
            from .remote import RemoteOpa

            env = os.environ if env is None else env
            token = env.get(settings.token_env) if settings.token_env else None
            self.backend = self._remote = RemoteOpa(settings.url, settings.path, token)
        else:
            from .embedded import EmbeddedOpa

            self.backend = self._embedded = EmbeddedOpa(settings.modules, settings.data,
                                                        settings.path)
        self.cache: TTLCache[str, Verdict] | None = (
            TTLCache(settings.cache_size, settings.cache_ttl_s) if settings.cache_ttl_s > 0
            else None)

    async def budget(self, guard: SessionGuard, admission: Admission | None) -> BudgetView | None:
        """The session's budget state, when the config limits sessions (else None: there is
        nothing in the store to report). A store that cannot be read gives None too; the
        guard has already failed the request closed unless budgets fail open."""
        limit = guard.budgets.session
        if admission is None or limit is None:
            return None
        try:
            spent = await guard.store.read(admission.bucket)
        except Exception:  # noqa: BLE001 - the budget is context, not a verdict
            log.warning("could not read the session's budget for OPA", exc_info=True)
            return None
        return budget_view(spent, limit.dims, shadow=limit.shadow)

    async def judge(self, call: ToolCall, exchange: Exchange, source: Source, *,
                    api: str | None = None, effect: Effect | None = None,
                    budget: BudgetView | None = None) -> RuleTrace:
        effect = effect or effect_of(normalize(call.name), self.effects)
        doc = input_for(call, exchange, source=source, effect=effect, api=api, budget=budget)
        text = doc.canonical()
        key = hashlib.sha256(text.encode()).hexdigest()
        verdict = self.cache.get(key) if self.cache is not None else None
        if verdict is not None:
            self.metrics.opa_cache_hits.inc()
        else:
            started = time.perf_counter()
            verdict = interpret(await self._ask(text), self.settings.path)
            self.metrics.opa_seconds.observe(time.perf_counter() - started)
            if verdict.error is not None:
                self.metrics.opa_errors.labels(verdict.error).inc()
                log.warning("OPA gave no verdict (%s): %s", verdict.error, verdict.trace.reason)
            elif self.cache is not None:
                self.cache[key] = verdict
        self.metrics.opa_decisions.labels(verdict.result).inc()
        return verdict.trace

    async def _ask(self, document: str) -> Reply:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await self.backend.query(document)
        except TimeoutError:
            return Failed("timeout", f"no answer within {self.settings.timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - any failure is a deny, never a crash
            log.exception("querying OPA failed")
            return Failed("internal", type(e).__name__)

    async def close(self) -> None:
        if self.settings.url is not None:
            await self._remote.close()
        else:
            self._embedded.close()
