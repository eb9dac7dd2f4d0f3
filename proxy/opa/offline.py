"""Decisions outside a running tether (`tether explain`, `tether test`): the rules and,
when the config has an `opa:` section, OPA's verdict merged by the same strictest-wins
law the proxy uses — so a policy test or an explanation never disagrees with what the
proxy would decide just because part of the policy lives in Rego.

The remote Data API must be reachable (an unreachable OPA is a deny here too, named
`tether:opa-unavailable`); `opa.embedded` needs nothing running.
"""

from __future__ import annotations

import asyncio

from ..config import Config
from ..model import Decision, Exchange, ToolCall
from ..policy.engine import PolicyEngine, merge
from ..telemetry import Metrics
from .client import OpaClient


class OfflineDecider:
    def __init__(self, config: Config) -> None:
        self.engine = PolicyEngine(config.policy)
        self._runner: asyncio.Runner | None = None
        self._opa: OpaClient | None = None
        if config.opa is not None:
            self._runner = asyncio.Runner()
            self._opa = OpaClient(config.opa, Metrics(), config.policy.effects)

    def decide(self, call: ToolCall, exchange: Exchange, *, explain: bool = False) -> Decision:
        decision = self.engine.decide(call, exchange, explain=explain)
        if self._opa is None or self._runner is None:
            return decision
        trace = self._runner.run(self._opa.judge(call, exchange, "llm"))
        return merge(decision, (trace,))

    def close(self) -> None:
        if self._opa is not None and self._runner is not None:
            self._runner.run(self._opa.close())
            self._runner.close()

    def __enter__(self) -> OfflineDecider:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
