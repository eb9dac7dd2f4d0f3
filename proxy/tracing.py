"""OpenTelemetry traces, spelled as the current GenAI semantic conventions ask.

Three spans per governed LLM request, one trace:
  server     SERVER, the agent's HTTP request (server/traced.py, HTTP conventions)
  inference  CLIENT, `{gen_ai.operation.name} {gen_ai.request.model}` (`chat gpt-4o`):
             tether's call to the LLM API, with `gen_ai.provider.name`, the request
             and response model, usage and finish reasons, `error.type` when it
             failed; the HTTP client span of the upstream request is its child
  decision   INTERNAL, `tether.decide {tool}`, one per tool call, a child of the
             server span: `tether.decision.*` with `gen_ai.tool.name` and
             `gen_ai.tool.call.id`. It is no `execute_tool` span: tether decides,
             the agent executes (or not). `tether.decision.id` is the audit
             record's id, so a held call's outcome (a later audit record) joins it.
The deprecated `gen_ai.system` is set only under `telemetry.legacy_gen_ai_system`.

Off unless asked: `tether serve` installs a provider only when the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set. Without one
no middleware or client hook is added and the governor gets no tracer, so the
cost is a `None` check. The provider is tether's own (`install`), never the
process-wide OpenTelemetry global: tests install an in-memory exporter per test
and nothing leaks between them.

No tool argument or message text is put on a span: only names, ids, rule ids
and counts. The server span's URL is recorded without its query (Gemini carries
its API key there) and so is the client span's. The aiohttp hooks are in
server/traced.py (this module stays free of aiohttp: the governor imports it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from opentelemetry import trace

from .model import Decision, Exchange, Usage
from .providers.response_meta import read_meta
from .surrogates import scrub

if TYPE_CHECKING:  # the SDK is imported only when tracing is switched on
    from opentelemetry.sdk.trace import TracerProvider

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DECIDE_SPAN = "tether.decide"
NAME_LIMIT = 64   # a tool or model name longer than this is cut in a span name

# tether's provider names as the GenAI conventions spell `gen_ai.provider.name`, and as
# they spelled the deprecated `gen_ai.system` (`telemetry.legacy_gen_ai_system`).
PROVIDER_NAMES = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
}
LEGACY_SYSTEMS = {**PROVIDER_NAMES, "azure": "az.ai.openai"}
# Wire format -> `gen_ai.operation.name`; every other format is a chat.
OPERATIONS = {"gemini.generate": "generate_content"}
OPENAI_API_TYPES = {"openai.chat": "chat_completions", "openai.responses": "responses"}

Span = trace.Span
NO_SPAN: Span = trace.INVALID_SPAN  # what tether records on when tracing is off

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


def _short(text: str, limit: int = NAME_LIMIT) -> str:
    text = scrub(text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def start_inference(tracer: trace.Tracer | None, exchange: Exchange, fmt: str, *,
                    server: tuple[str | None, int | None] = (None, None),
                    max_tokens: int | None = None, legacy: bool = False) -> Span:
    """The CLIENT span of tether's call to the LLM API (`chat gpt-4o`), not yet current
    and not ended (`current`, `finish`). `fmt`: the wire format's name."""
    if tracer is None:
        return NO_SPAN
    operation = OPERATIONS.get(fmt, "chat")
    provider = PROVIDER_NAMES.get(exchange.provider, exchange.provider)
    attrs: dict[str, str | int | bool] = {"gen_ai.operation.name": operation,
                                          "gen_ai.provider.name": provider}
    if exchange.model:
        attrs["gen_ai.request.model"] = _short(exchange.model, 256)
    if exchange.stream:
        attrs["gen_ai.request.stream"] = True
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    if provider == "openai" and fmt in OPENAI_API_TYPES:
        attrs["openai.api.type"] = OPENAI_API_TYPES[fmt]
    host, port = server
    if host:
        attrs["server.address"] = host
        if port is not None:
            attrs["server.port"] = port
    if legacy:
        attrs["gen_ai.system"] = LEGACY_SYSTEMS.get(exchange.provider, exchange.provider)
    name = f"{operation} {_short(exchange.model)}" if exchange.model else operation
    return tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attrs)


def current(span: Span) -> AbstractContextManager[Span]:
    """`span` as the current span (the upstream HTTP span becomes its child), left open;
    nothing at all when tracing is off."""
    if not span.is_recording():
        return nullcontext(span)
    return trace.use_span(span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False)


def note_usage(span: Span, usage: Usage | None) -> None:
    if usage is None or not span.is_recording():
        return
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)


def note_answer(span: Span, fmt: str, body: bytes, usage: Usage | None) -> None:
    """What a whole answer says about itself: `gen_ai.response.*` and usage."""
    if not span.is_recording():
        return
    note_usage(span, usage)
    meta = read_meta(fmt, body)
    if meta.id:
        span.set_attribute("gen_ai.response.id", scrub(meta.id))
    if meta.model:
        span.set_attribute("gen_ai.response.model", scrub(meta.model))
    if meta.finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons",
                           [scrub(r) for r in meta.finish_reasons])


def failed(span: Span, error_type: str) -> None:
    """The call ended in an error: an HTTP status (`429`), an exception's name."""
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(trace.Status(trace.StatusCode.ERROR))


def finish(span: Span) -> None:
    """End `span` once (the whole answer is read, the stream is over, or it failed)."""
    if span.is_recording():
        span.end()


def decide_span_name(tool: str, declared: tuple[str, ...]) -> str:
    """`tether.decide {tool}` for a tool the request declared; a name the model made
    up stays out of span names (it is in `gen_ai.tool.name`), which are meant to be
    few."""
    return f"{DECIDE_SPAN} {_short(tool)}" if tool in declared else DECIDE_SPAN


def decision_attributes(tool: str, call_id: str | None, decision: Decision, revision: str
                        ) -> dict[str, str | list[str]]:
    """The attributes of a decision span; deliberately no arguments. The action is the
    policy's verdict: how a hold ended is in the audit log under `tether.decision.id`."""
    attrs: dict[str, str | list[str]] = {
        "gen_ai.tool.name": scrub(tool),
        "tether.decision.id": decision.decision_id,
        "tether.decision.action": decision.action.value,
        "tether.decision.rule_ids": list(decision.rules),
        "tether.policy.revision": revision,
    }
    if call_id:
        attrs["gen_ai.tool.call.id"] = scrub(call_id)
    if decision.shadow:
        attrs["tether.decision.shadow_rule_ids"] = list(decision.shadow)
    return attrs
