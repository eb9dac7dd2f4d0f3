"""Prometheus metrics. Each server owns its own registry (tests run several).

Label values are bounded: provider and action are closed sets, and a rule label
is a rule id from the loaded config or a built-in `tether:` id. No session id
or tool argument is ever a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "tether_tool_decisions",
            "Tool-call decisions, by provider, action and matching rule",
            ["provider", "action", "rule"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tether_requests",
            "Requests on the proxy port, by provider and the status returned",
            ["provider", "status"],
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
        self.audit_write_errors = Counter(
            "tether_audit_write_errors",
            "Audit records that could not be written (the call or event is denied)",
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
        self.decision_seconds = Histogram(
            "tether_decision_seconds",
            "Time to decide one tool call",
            registry=self.registry,
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
