"""Prometheus metrics. Each server owns its own registry (tests run several).

Label values are bounded: provider and action are closed sets, and a rule label
is a rule id from the loaded config or a built-in `tether:` id. Tool, agent and
model labels come from the loaded config too (`Labels`), anything else is
`other`: a model that invents tool names cannot grow the series without end.
No session id or tool argument is ever a label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

from .policy.rule_index import glob_of as glob_of  # guard.py reads it from here

OTHER = "other"
MODEL_LABELS_CACHED = 1024


def exact_names(patterns: Iterable[re.Pattern[str]]) -> set[str]:
    """The plain names (no `*`, `?` or `[`) among compiled globs."""
    out = set()
    for p in patterns:
        g = glob_of(p)
        if g is not None and not any(c in g for c in "*?["):
            out.add(g)
    return out


FORWARD = "forward"


class _Remembered:
    """`labels(...)` remembered per tuple of values: prometheus_client checks, converts
    and locks on every call (a few per request on the hot path); the children it hands
    out are the same objects either way. Label values are bounded sets (above), so the
    memo is as bounded as prometheus_client's own table of children."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remembered: dict[tuple[object, ...], Any] = {}

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:
            return super().labels(*values, **named)  # type: ignore[misc]
        try:
            return self._remembered[values]
        except KeyError:
            child = self._remembered[values] = super().labels(*values)  # type: ignore[misc]
            return child


class Counter(_Remembered, prometheus_client.Counter):
    pass


class Gauge(_Remembered, prometheus_client.Gauge):
    pass


class Histogram(_Remembered, prometheus_client.Histogram):
    pass


@dataclass(slots=True)
class Labels:
    """The label values the config allows; filled in at load (governor: tools and
    agents from the policy; session guard: agents with budgets, price-table globs)."""

    tools: set[str] = field(default_factory=set)      # normalised tool names
    agents: set[str] = field(default_factory=set)
    models: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    _model_labels: dict[str, str] = field(default_factory=dict, repr=False)
    _labelled_by: object = field(default=None, repr=False)

    def tool(self, normalised: str) -> str:
        return normalised if normalised in self.tools else OTHER

    def agent(self, name: str | None) -> str:
        return name if name is not None and name in self.agents else OTHER

    def model(self, name: str) -> str:
        if self._labelled_by is not self.models:  # a new price table (guard.py, a reload)
            self._model_labels, self._labelled_by = {}, self.models
        label = self._model_labels.get(name)
        if label is None:
            lowered = name.lower()
            label = next((label for p, label in self.models if p.fullmatch(lowered)), OTHER)
            if len(self._model_labels) < MODEL_LABELS_CACHED:  # names come from agents
                self._model_labels[name] = label
        return label

    @staticmethod
    def provider(name: str) -> str:
        """A provider label: the forward proxy names each cloud host it judged
        (`forward:mybucket.s3.amazonaws.com`, one per S3 bucket), which the audit keeps;
        the metric gets `forward`. Providers and `api:NAME` are fixed by the config."""
        return FORWARD if name.startswith(FORWARD + ":") else name


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.labels = Labels()
        self.decisions = Counter(
            "tether_tool_decisions",
            "Tool-call decisions, by provider, tool (configured names, else other), action and rule",
            ["provider", "tool", "action", "rule"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tether_requests",
            "Requests on the proxy port, by provider and the status returned",
            ["provider", "status"],
            registry=self.registry,
        )
        self.continuations = Counter(
            "tether_continuations",
            "Upstream calls tether made to continue an answer whose calls it denied "
            "(outcome: sent, bound, budget, failed, unsupported)",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.provider_tool_violations = Counter(
            "tether_provider_tool_violations",
            "Answers reporting a provider-run tool call the policy does not allow",
            ["provider"],
            registry=self.registry,
        )
        self.fail_closed = Counter(
            "tether_fail_closed",
            "Decisions turned into deny because deciding failed",
            ["reason"],
            registry=self.registry,
        )
        self.fail_open = Counter(
            "tether_fail_open",
            "Decisions turned into allow because deciding failed and on_error is allow",
            ["reason"],
            registry=self.registry,
        )
        self.budget_trips = Counter(
            "tether_budget_trips",
            "Requests refused (enforce) or that would have been (shadow) by a budget",
            ["scope", "budget", "mode"],
            registry=self.registry,
        )
        self.loop_trips = Counter(
            "tether_loop_trips",
            "Tool calls that tripped a loop breaker",
            ["rule", "mode"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "tether_session_store_errors",
            "Session store operations that failed",
            ["operation"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "tether_auth_failures",
            "Requests refused 401 because the agent's identity was missing or did not verify,"
            " by reason (a closed set: proxy.auth.verify.Reason)",
            ["reason"],
            registry=self.registry,
        )
        self.audit_write_errors = Counter(
            "tether_audit_write_errors",
            "Audit records that could not be written (the call or event is denied)",
            registry=self.registry,
        )
        # Shipping (audit/shipper.py); `sink` is a configured sink name, a bounded set.
        self.audit_spooled = Counter(
            "tether_audit_records_spooled",
            "Audit records written to the local log, which is the spool the sinks ship from",
            registry=self.registry,
        )
        self.audit_shipped = Counter(
            "tether_audit_records_shipped",
            "Audit records a sink acknowledged, by sink",
            ["sink"],
            registry=self.registry,
        )
        self.audit_failed = Counter(
            "tether_audit_records_failed",
            "Audit records in batches a sink failed to deliver (each is retried), by sink",
            ["sink"],
            registry=self.registry,
        )
        self.audit_spool_bytes = Gauge(
            "tether_audit_spool_bytes",
            "Bytes of the local audit files a sink has not acknowledged yet, by sink",
            ["sink"],
            registry=self.registry,
        )
        self.audit_oldest_unshipped = Gauge(
            "tether_audit_oldest_unshipped_seconds",
            "Age of the oldest audit record a sink has read but not had acknowledged, by sink",
            ["sink"],
            registry=self.registry,
        )
        self.audit_sink_up = Gauge(
            "tether_audit_sink_up",
            "1 when the sink's last delivery succeeded, 0 while it is failing, by sink",
            ["sink"],
            registry=self.registry,
        )
        self.audit_refused = Counter(
            "tether_audit_refused",
            "Audit records refused because shipping lags (the call is denied), by cause"
            " (spool_full, sink_down)",
            ["cause"],
            registry=self.registry,
        )
        self.audit_chain_heads = Counter(
            "tether_audit_chain_heads",
            "Signed chain heads written to the audit log, by result (written, failed)",
            ["result"],
            registry=self.registry,
        )
        self.shadow_matches = Counter(
            "tether_shadow_matches",
            "Tool calls a `mode: shadow` rule matched (recorded, not enforced), by rule",
            ["rule"],
            registry=self.registry,
        )
        self.tools_filtered = Counter(
            "tether_tools_filtered",
            "Declared tools taken out of requests because they are outside the agent's scope",
            ["provider", "agent"],
            registry=self.registry,
        )
        self.approvals_pending = Gauge(
            "tether_approvals_pending",
            "Held tool calls waiting for a human",
            registry=self.registry,
        )
        self.approvals_decided = Counter(
            "tether_approvals_decided",
            "Approvals that ended, by outcome (approved, denied, expired, limited)",
            ["outcome"],
            registry=self.registry,
        )
        self.approval_wait_seconds = Histogram(
            "tether_approval_wait_seconds",
            "Time from a hold to its decision",
            registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.holds_abandoned = Counter(
            "tether_holds_abandoned",
            "Held calls ended abandoned, by why: caller_gone (it disconnected), shutdown "
            "(tether stopped), replica_gone (the replica waiting on it died), request_ended",
            ["reason"],
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "tether_connections_open",
            "Client connections open, by port (proxy, admin, forward)",
            ["port"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "tether_connections_refused",
            "Client connections refused at once because server.max_connections were open",
            ["port"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "tether_connections_timed_out",
            "Client connections tether closed, by timeout: header (server.header_timeout), "
            "idle (server.idle_timeout), body (server.body_timeout)",
            ["port", "timeout"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "tether_decision_seconds",
            "Time to decide one tool call",
            registry=self.registry,
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
        )

        self.tokens = Counter(
            "tether_llm_tokens",
            "LLM tokens charged (reported usage, else estimated), by agent, model (price-table"
            " glob) and kind (input, output)",
            ["agent", "model", "kind"],
            registry=self.registry,
        )
        self.cost = Counter(
            "tether_llm_cost_usd",
            "LLM spend in USD at the configured prices, by agent and model (price-table glob)",
            ["agent", "model"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "tether_upstream_seconds",
            "Time from sending a governed request upstream to the upstream's response headers",
            ["provider"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.overhead_seconds = Histogram(
            "tether_overhead_seconds",
            "Time tether adds to a governed request: whole responses, handler time minus upstream"
            " and human waits; streams, time to the agent's response headers minus the upstream's",
            ["provider", "mode"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.opa_decisions = Counter(
            "tether_opa_decisions",
            "OPA verdicts on tool calls and egress requests, by result (allow, deny, hold, error)",
            ["result"],
            registry=self.registry,
        )
        self.opa_errors = Counter(
            "tether_opa_errors",
            "OPA queries that gave no verdict (each one denied), by reason (a closed set:"
            " proxy.policy.opa.ERROR_REASONS)",
            ["reason"],
            registry=self.registry,
        )
        self.opa_cache_hits = Counter(
            "tether_opa_cache_hits",
            "OPA verdicts answered from tether's cache",
            registry=self.registry,
        )
        self.opa_seconds = Histogram(
            "tether_opa_seconds",
            "Time to get an answer from OPA (remote or embedded), cache misses only",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1),
        )

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # `tether serve --workers N` (workers.py): every worker's numbers, summed.
            from prometheus_client.multiprocess import MultiProcessCollector

            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
