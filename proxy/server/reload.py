"""Reloading the running policy: on a file change (polled), on SIGHUP and on
`POST /v1/reload` (admin port, admin token).

One reload at a time. The next config is loaded and checked in a worker thread (the
same `config.load` as `tether check`), planned against the running one
(proxy/reload.py), audited (`kind: reload`), then swapped in by plain assignments
with no await between them, so no coroutine (proxy route, /apis/, MCP, the forward
proxy's hooks) sees half of it. A decision reads the governor's engine once, so it is
judged and recorded under one revision; a request already past a step keeps what that
step decided, and its next decision reads the new policy.

Any failure leaves the running policy in force: the error (with file and line) is
logged, counted (`tether_config_reload_total{result}`), audited and shown on /readyz,
which stays ready.

Held calls. A call held under the old policy is judged again under the new one:
at the reload, for every call this process waits on (new verdict deny: the approval
ends denied by `tether` with the reason, which the approver sees; allow: it ends
approved by `tether`, "revision R no longer holds it", and the call goes at once;
hold: it keeps waiting for a person); and again when a person's approval releases it
(`Holds.rejudge`), which closes the race with a click during the reload. Verdicts
from outside the rules (OPA, OpenAPI, loop and budget checks) are carried as they
were when the call was held, not asked again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from .. import config as config_mod
from ..approvals.holds import TETHER
from ..approvals.queue import Approval, Mode, binding_of
from ..audit import AuditWriteError
from ..errors import ConfigError, StoreUnavailable
from ..governor import Held
from ..model import Action, Decision
from ..opa.client import OpaClient
from ..policy.engine import PolicyEngine, merge
from ..reload import Plan, Refused, fingerprint, plan, watched
from ..telemetry import Metrics
from .flows import make_flows
from .routes import CONTEXT

if TYPE_CHECKING:
    from ..forward.master import ForwardProxy
    from .app import Tether

log = logging.getLogger("tether.reload")

POLL_S = 0.5  # a change is loaded after it has held still for one poll: ~0.5-1 s
OPA_GRACE_S = 60.0  # a replaced OPA client is closed once calls already asking it are done
REJUDGED = "tether:policy-reloaded"


@dataclass(frozen=True, slots=True)
class Result:
    """How one reload ended: `ok` (the new policy runs), `unchanged`, `error` (it did
    not load or check) or `refused` (it would open the gate); the last two keep the
    running policy."""

    result: str
    trigger: str
    at: float
    revision: str                       # the revision running after it
    old_revision: str | None = None
    error: str | None = None
    plan: Plan | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"result": self.result, "trigger": self.trigger,
                                  "at": self.at, "revision": self.revision}
        if self.old_revision is not None:
            out["old_revision"] = self.old_revision
        if self.error is not None:
            out["error"] = self.error
        if self.plan is not None:
            out["rules"] = self.plan.rules.as_json()
            out["changed"] = list(self.plan.changed)
            out["needs_restart"] = list(self.plan.needs_restart)
        return out


class ReloadMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.reloads = Counter("tether_config_reload", "Config reloads, by result "
                               "(ok, unchanged, error, refused)", ["result"], registry=registry)
        self.revision = Gauge("tether_policy_revision", "The policy revision this process "
                              "decides by (value 1)", ["revision"], registry=registry)
        self.last_ok = Gauge("tether_config_last_reload_success_timestamp_seconds",
                             "When a reload last changed the running config", registry=registry)
        self.restart_needed = Gauge("tether_config_restart_needed", "1 when a reloaded config "
                                    "changed settings that wait for a restart",
                                    registry=registry)
        for result in ("ok", "unchanged", "error", "refused"):
            self.reloads.labels(result)  # every series exists from the start

    def running(self, old: str | None, new: str) -> None:
        if old is not None and old != new:
            self.revision.remove(old)
        self.revision.labels(new).set(1)


class Reloader:
    """Owned by the built Tether (app.py); `attach` gives it the running pieces."""

    def __init__(self, config: config_mod.Config, metrics: Metrics) -> None:
        self.running = config
        self.metrics = ReloadMetrics(metrics)
        self.metrics.running(None, config.policy.revision)
        self.tether: Tether | None = None
        self.forward: ForwardProxy | None = None  # set by `tether serve` when it runs one
        self.last: Result | None = None
        self.last_error: Result | None = None
        self.needs_restart: tuple[str, ...] = ()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._baseline = fingerprint(watched(config))

    def attach(self, tether: Tether) -> None:
        self.tether = tether
        tether.holds.rejudge = self._on_release

    # -- triggers ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request(self, trigger: str) -> None:
        """From a signal handler: reload soon, on the loop."""
        self._spawn(self.reload(trigger), f"reload-{trigger}")

    def start_watching(self, interval_s: float = POLL_S) -> None:
        if self.running.source is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(interval_s), name="config-watch")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._watcher] if self._watcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = None

    async def _watch(self, interval_s: float) -> None:
        """Stat the watched files every `interval_s`; load once a change holds still."""
        moving = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                now = fingerprint(watched(self.running))
                if now == self._baseline:
                    moving = None
                    continue
                if now != moving:  # still being written (or just swapped): look again
                    moving = now
                    continue
                moving = None
                await self.reload("watch")
            except Exception:  # noqa: BLE001 - the watcher must outlive any one reload
                log.exception("config watch: a reload failed unexpectedly")
                await asyncio.sleep(interval_s)

    async def handle(self, request: web.Request) -> web.Response:
        """POST /v1/reload: 200 when the new config runs (or nothing changed), 422 when
        it was refused or did not load (the running policy stays)."""
        result = await self.reload("api")
        return web.json_response(result.as_json(),
                                 status=200 if result.result in ("ok", "unchanged") else 422)

    def details(self) -> dict[str, object]:
        """For /readyz: what this process runs and how its last reloads went (a failed
        reload is not a readiness failure: the old policy still decides)."""
        return {"policy_revision": self.running.policy.revision,
                "reload": {"last": self.last.as_json() if self.last else None,
                           "last_error": self.last_error.as_json() if self.last_error else None,
                           "needs_restart": list(self.needs_restart),
                           "watching": list(watched(self.running))}}

    # -- the reload --------------------------------------------------------------------

    async def reload(self, trigger: str) -> Result:
        async with self._lock:
            result = await self._reload(trigger)
        self.last = result
        self.metrics.reloads.labels(result.result).inc()
        if result.result in ("error", "refused"):
            self.last_error = result
            log.error("config reload (%s) kept revision %s: %s", trigger, result.revision,
                      result.error)
        elif result.result == "ok":
            self.metrics.last_ok.set(result.at)
            assert result.plan is not None
            log.warning("config reloaded (%s): revision %s -> %s; rules %s%s", trigger,
                        result.old_revision, result.revision, result.plan.rules.as_json(),
                        f"; needs a restart: {', '.join(result.plan.needs_restart)}"
                        if result.plan.needs_restart else "")
        return result

    async def _reload(self, trigger: str) -> Result:
        running = self.running
        source = running.source
        revision = running.policy.revision
        if source is None:
            return Result("error", trigger, time.time(), revision,
                          error="this tether was not started from a config file")
        before = fingerprint(watched(running))
        try:
            new = await asyncio.to_thread(config_mod.load, source)
            if fingerprint(watched(running)) != before:
                raise ConfigError("the files changed while they were read; not loaded "
                                  "(the next poll or reload reads them again)", file=source)
            the_plan = plan(running, new)
        except (ConfigError, Refused) as e:
            self._baseline = before
            refused = isinstance(e, Refused)
            return self._audited(Result("refused" if refused else "error", trigger, time.time(),
                                        revision, error=str(e)))
        except Exception as e:  # noqa: BLE001 - a bug in loading must not stop tether
            log.exception("config reload failed")
            self._baseline = before
            return self._audited(Result("error", trigger, time.time(), revision,
                                        error=f"internal error: {type(e).__name__}: {e}"))
        self._baseline = fingerprint(watched(new))
        if the_plan.empty:
            return Result("unchanged", trigger, time.time(), revision)
        result = Result("ok", trigger, time.time(), the_plan.config.policy.revision,
                        old_revision=revision, plan=the_plan)
        assert self.tether is not None
        try:
            self.tether.governor.audit.write({"kind": "reload", **result.as_json(),
                                              "files": list(new.files)})
        except AuditWriteError:
            return Result("error", trigger, result.at, revision,
                          error="the audit log cannot be written; the reload is not applied")
        # From here to the end of apply(): no await. The audit record above is the last
        # one of the old revision; the next decision is the new one's.
        self._apply(the_plan.config)
        self.needs_restart = tuple(dict.fromkeys((*self.needs_restart,
                                                  *the_plan.needs_restart)))
        self.metrics.restart_needed.set(1 if self.needs_restart else 0)
        self.metrics.running(revision, result.revision)
        if result.revision != revision:
            self._spawn(self._rejudge_waiting(result.revision), "reload-rejudge-holds")
        return result

    def _audited(self, result: Result) -> Result:
        if self.tether is not None:
            try:
                self.tether.governor.audit.write({"kind": "reload", **result.as_json()})
            except AuditWriteError:
                log.exception("audit write failed for a failed reload")
        return result

    def _apply(self, new: config_mod.Config) -> None:
        """Swap `new` into every component that reads the policy. Synchronous."""
        t = self.tether
        assert t is not None
        old, self.running = self.running, new
        t.config = new
        t.governor.use(PolicyEngine(new.policy))
        guard = t.guard
        guard.budgets = new.budgets
        guard.fail_open = new.on_store_error is Action.ALLOW
        guard.metrics.labels.agents |= set(new.budgets.agents)
        t.holds.revision = new.policy.revision
        t.holds.settings = new.approvals
        if t.linked is not None:
            t.linked.tools = new.tool_apis
        opa = t.opa
        if new.opa != old.opa or new.policy.effects != old.policy.effects:
            opa = OpaClient(new.opa, t.governor.metrics, new.policy.effects) if new.opa else None
            if t.opa is not None:
                self._spawn(_close_later(t.opa), "reload-close-opa")
            t.opa = opa
        ctx = t.proxy.get(CONTEXT)
        if ctx is not None:
            ctx.config = new
            ctx.opa = opa
            ctx.flows = make_flows(new, t.governor, guard.store)
        if self.forward is not None:
            addon = self.forward.addon
            egress = replace(addon.egress, apis=new.apis, catalog=new.cloud, opa=opa,
                             linked=t.linked)
            addon.egress = egress
            addon.judge.egress = egress

    # -- held calls --------------------------------------------------------------------

    def _judge_again(self, held: Held) -> Decision:
        assert self.tether is not None
        engine = self.tether.governor.engine
        try:
            return merge(engine.decide(held.call, held.exchange, api=held.api,
                                       effect=held.effect), held.extra)
        except Exception as e:  # noqa: BLE001 - fail closed
            log.exception("judging a held call again failed")
            return Decision(Action.DENY, (REJUDGED,), f"it could not be judged again under "
                            f"revision {engine.revision}: {type(e).__name__}")

    def _on_release(self, held_decision: Decision, approval: Approval) -> Decision | None:
        """A person approved a call held under another revision: the current one decides
        whether it still goes (deny wins; hold or allow: the approval counts)."""
        assert self.tether is not None
        revision = self.tether.governor.engine.revision
        if approval.policy_revision == revision:
            return None
        held = self.tether.governor.held.get(held_decision.decision_id)
        if held is None:
            again = Decision(Action.DENY, (REJUDGED,), "the policy changed while it waited "
                             "and the call could no longer be judged again")
        else:
            again = self._judge_again(held)
        if again.action is not Action.DENY:
            return None
        return Decision(Action.DENY, held_decision.rules + again.rules,
                        f"approved by {approval.decided_by} (approval {approval.id}), but policy "
                        f"revision {revision} denies it: {again.message}",
                        held_decision.on_deny, held_decision.effect)

    async def _rejudge_waiting(self, revision: str) -> None:
        """The calls this process waits on, judged by the new revision (module doc)."""
        t = self.tether
        assert t is not None
        queue = t.holds.queue
        by_binding = {binding_of(h.call, h.exchange, h.revision): h
                      for h in list(t.governor.held.values()) if h.revision != revision}
        try:
            waiting = await queue.orphans()
        except StoreUnavailable as e:
            log.error("reload: could not list held calls to judge again: %s", e.message)
            return
        for approval in waiting:
            held = by_binding.get(approval.binding)
            if approval.mode is not Mode.WAIT or held is None:
                continue
            again = self._judge_again(held)
            if again.action is Action.HOLD:
                continue
            rules = f" [{', '.join(again.rules)}]" if again.rules else ""
            reason = (f"policy revision {revision} denies it: {again.message}{rules}"
                      if again.action is Action.DENY else
                      f"policy revision {revision} no longer holds it")
            try:
                await queue.decide(approval.id, approve=again.action is Action.ALLOW,
                                   by=TETHER, reason=reason)
            except StoreUnavailable as e:
                log.error("reload: could not end approval %s: %s", approval.id, e.message)


async def _close_later(opa: OpaClient) -> None:
    try:
        await asyncio.sleep(OPA_GRACE_S)
    finally:
        await opa.close()
