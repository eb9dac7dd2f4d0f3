"""OpenTelemetry traces: the server span, the upstream client span, a span per decision.

Off unless asked: `tether serve` installs a provider only when the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set. Without one
no middleware or client hook is added and the governor gets no tracer, so the
cost is a `None` check. The provider is tether's own (`install`), never the
process-wide OpenTelemetry global: tests install an in-memory exporter per test
and nothing leaks between them.

No tool argument is put on a span: only names, ids, rule ids and counts. The
server span's URL is recorded without its query (Gemini carries its API key
there) and so is the client span's. The aiohttp hooks are in server/traced.py
(this module stays free of aiohttp: the governor imports it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace

from .model import Decision, Exchange, Usage

if TYPE_CHECKING:  # the SDK is imported only when tracing is switched on
    from opentelemetry.sdk.trace import TracerProvider

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DECIDE_SPAN = "tether.decide"

# tether's provider names as the GenAI semantic conventions spell `gen_ai.system`.
SYSTEMS = {
    "openai": "openai",
    "azure": "az.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
}

_installed: TracerProvider | None = None


def install(provider: TracerProvider | None) -> None:
    """Make `provider` the one tether builds with (None: tracing off)."""
    global _installed
    _installed = provider


def installed() -> TracerProvider | None:
    return _installed


def from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP in batches when an OTLP endpoint is set, else
    None. The exporter reads the other `OTEL_EXPORTER_OTLP_*` settings (headers, timeout)
    itself; `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service."""
    env = os.environ if env is None else env
    if not any(env.get(v) for v in ENDPOINT_VARS) or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "tether"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_of(provider: TracerProvider | None) -> trace.Tracer | None:
    return provider.get_tracer("tether") if provider is not None else None


def note_request(exchange: Exchange) -> None:
    """GenAI attributes on the request's (server) span, when one is recording."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.system", SYSTEMS.get(exchange.provider, exchange.provider))
    if exchange.model:
        span.set_attribute("gen_ai.request.model", exchange.model)


def note_usage(usage: Usage | None) -> None:
    span = trace.get_current_span()
    if usage is None or not span.is_recording():
        return
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)


def decision_attributes(exchange: Exchange, tool: str, call_id: str | None, decision: Decision,
                        revision: str) -> dict[str, str]:
    """The attributes of a `tether.decide` span; deliberately no arguments."""
    attrs = {
        "gen_ai.system": SYSTEMS.get(exchange.provider, exchange.provider),
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool,
        "tether.decision": decision.action.value,
        "tether.rule": ",".join(decision.rules),
        "tether.policy_revision": revision,
    }
    if exchange.model:
        attrs["gen_ai.request.model"] = exchange.model
    if call_id:
        attrs["gen_ai.tool.call.id"] = call_id
    if decision.shadow:
        attrs["tether.shadow_rule"] = ",".join(decision.shadow)
    return attrs
