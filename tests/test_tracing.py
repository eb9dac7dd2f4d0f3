"""OpenTelemetry: the server span, the decision spans under it, trace context upstream,
no secrets on spans, and OTLP/HTTP export from `tether serve` when OTEL_* says so.

Each in-process test gives tether a provider of its own (`tracing.install`, undone after
the test); the OpenTelemetry global provider is never set, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionToolParam
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy import tracing
from tests.conftest import MakeStack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume", "login")
]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "go"}]
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')
SECRET = Call("login", '{"user": "ops", "password": "hunter2"}')


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


def _one(found: list[ReadableSpan]) -> ReadableSpan:
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def _by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


def _values(span: ReadableSpan) -> list[str]:
    return [str(v) for v in (span.attributes or {}).values()]


@pytest.mark.parametrize("stream", [False, True])
async def test_decision_spans_under_the_server_span(make_stack: MakeStack,
                                                    spans: InMemorySpanExporter,
                                                    stream: bool) -> None:
    s = await make_stack()
    s.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'), PROD_DELETE)))
    client = s.client()
    if stream:
        chunks = await client.chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True,
            stream_options={"include_usage": True})
        async for _ in chunks:
            pass
    else:
        await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    done = spans.get_finished_spans()
    server = _one(_by_kind(done, SpanKind.SERVER))
    upstream = _one(_by_kind(done, SpanKind.CLIENT))
    decides = [x for x in done if x.name == tracing.DECIDE_SPAN]
    assert server.context is not None and upstream.context is not None
    trace_id = server.context.trace_id
    assert upstream.parent is not None and upstream.parent.span_id == server.context.span_id
    assert [d.attributes and d.attributes["gen_ai.tool.name"] for d in decides] == [
        "get_weather", "delete_volume"]
    for d in decides:
        assert d.context is not None and d.context.trace_id == trace_id
        assert d.parent is not None and d.parent.span_id == server.context.span_id
    # the audit records name the same trace, so a record leads to its spans
    assert {r["trace_id"] for r in s.decisions()} == {format(trace_id, "032x")}
    allow, deny = (dict(d.attributes or {}) for d in decides)
    revision = s.tether.governor.engine.revision
    assert allow == {
        "gen_ai.system": "openai", "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get_weather", "gen_ai.request.model": "gpt-x",
        "gen_ai.tool.call.id": allow["gen_ai.tool.call.id"],
        "tether.decision": "allow", "tether.rule": "", "tether.policy_revision": revision,
    }
    assert deny["tether.decision"] == "deny" and deny["tether.rule"] == "no-prod-deletes"
    assert revision and deny["tether.policy_revision"] == revision
    # The request span carries the GenAI request attributes and the usage the fake reported.
    attrs = server.attributes or {}
    assert attrs["gen_ai.system"] == "openai" and attrs["gen_ai.request.model"] == "gpt-x"
    assert attrs["gen_ai.usage.input_tokens"] == 24 and attrs["gen_ai.usage.output_tokens"] == 12
    # W3C trace context went upstream: same trace, parent is the client span.
    [headers] = s.fake.headers
    version, sent_trace, parent, _flags = headers["traceparent"].split("-")
    assert version == "00" and int(sent_trace, 16) == trace_id
    assert int(parent, 16) == upstream.context.span_id


async def test_hold_and_error_decisions_are_spans_too(make_stack: MakeStack,
                                                      spans: InMemorySpanExporter) -> None:
    s = await make_stack()
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": n}} for n in ("resize_volume", "drop_database")]
    s.fake.push(Reply(calls=(Call("resize_volume", '{"size": 2}'),)))
    await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=tools)
    s.fake.push(Reply(calls=(Call("drop_database", '{"name": "prod"}'),)))
    with pytest.raises(openai.PermissionDeniedError):
        await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=tools)
    done = spans.get_finished_spans()
    decided = {str((d.attributes or {})["gen_ai.tool.name"]): dict(d.attributes or {})
               for d in done if d.name == tracing.DECIDE_SPAN}
    assert decided["resize_volume"]["tether.decision"] == "hold"
    assert decided["resize_volume"]["tether.rule"] == "writes-held"
    assert decided["drop_database"]["tether.decision"] == "deny"
    servers = _by_kind(done, SpanKind.SERVER)
    assert sorted(str((x.attributes or {}).get("http.status_code")) for x in servers) == ["200", "403"]


async def test_no_secret_on_any_span(make_stack: MakeStack, spans: InMemorySpanExporter) -> None:
    s = await make_stack()
    s.fake.push(Reply(calls=(SECRET,)))
    r = await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert (r.choices[0].message.tool_calls or [])  # the call itself went through
    done = spans.get_finished_spans()
    assert any(d.name == tracing.DECIDE_SPAN for d in done)
    for span in done:
        text = json.dumps([_values(span), [(e.name, dict(e.attributes or {})) for e in span.events]])
        assert "hunter2" not in text and "password" not in text, span.name


async def test_query_strings_stay_off_spans(make_stack: MakeStack,
                                            spans: InMemorySpanExporter) -> None:
    """Gemini's API key travels in `?key=`: no span may record a URL's query."""
    s = await make_stack()
    s.fake.push(Reply(content="hi"))
    client = s.client(default_query={"key": "AIzaSECRETKEY"})
    await client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    done = spans.get_finished_spans()
    assert _by_kind(done, SpanKind.SERVER) and _by_kind(done, SpanKind.CLIENT)
    for span in done:
        assert not any("AIzaSECRETKEY" in v for v in _values(span)), span.name


async def test_no_provider_means_no_spans_and_no_traceparent(make_stack: MakeStack) -> None:
    assert tracing.installed() is None
    s = await make_stack()
    assert s.tether.governor.tracer is None
    s.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    [headers] = s.fake.headers
    assert "traceparent" not in {k.lower() for k in headers}


def test_from_env_only_with_an_endpoint() -> None:
    assert tracing.from_env({}) is None
    assert tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                             "OTEL_SDK_DISABLED": "true"}) is None
    for var in tracing.ENDPOINT_VARS:
        provider = tracing.from_env({var: "http://127.0.0.1:9/v1/traces"})
        assert isinstance(provider, TracerProvider)
        provider.shutdown()


class Receiver:
    """A minimal OTLP/HTTP collector: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        return app

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        assert body
        self.content_types.append(request.content_type)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.requests.append(message)
        self.arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[tuple[str, bytes, bytes, dict[str, str]]]:
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        attrs = {a.key: a.value.string_value for a in sp.attributes}
                        out.append((sp.name, sp.trace_id, sp.parent_span_id, attrs))
        return out


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeOpenAI, Receiver, int, int]]:
    fake = FakeOpenAI(script=lambda body: Reply(calls=(
        Call("get_weather", '{"city": "Oslo"}'), PROD_DELETE)))
    receiver = Receiver()
    runners = []
    ports = []
    for app in (fake.app(), receiver.app()):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    yield fake, receiver, ports[0], ports[1]
    for runner in runners:
        await runner.cleanup()


async def test_serve_exports_over_otlp_http(tmp_path: Path,
                                            servers: tuple[FakeOpenAI, Receiver, int, int]) -> None:
    fake, receiver, upstream_port, otlp_port = servers
    port, admin = free_port(), free_port()
    config = tmp_path / "tether.yaml"
    config.write_text(f"include: [{ROOT / 'rules/janitor.yaml'}]\n"
                      f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n")
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream_port}",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
           "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "tether-test"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        "--admin-port", str(admin), env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        banner = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert f"proxy on http://127.0.0.1:{port}" in banner.decode()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1",
                                    api_key="sk-x", max_retries=0)
        await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        await client.close()
        # The batch processor exports within its schedule delay (200 ms here); bounded wait.
        async with asyncio.timeout(20):
            while len({n for n, *_ in receiver.spans()} & {"tether.decide"}) == 0 or not any(
                    n.startswith("POST") for n, *_ in receiver.spans()):
                await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert receiver.content_types and set(receiver.content_types) == {"application/x-protobuf"}
    resources = {a.value.string_value for r in receiver.requests for rs in r.resource_spans
                 for a in rs.resource.attributes if a.key == "service.name"}
    assert resources == {"tether-test"}
    got = receiver.spans()
    decides = [x for x in got if x[0] == "tether.decide"]
    assert [d[3]["tether.decision"] for d in decides] == ["allow", "deny"]
    assert "no-prod-deletes" in decides[1][3]["tether.rule"].split(",")
    trace_ids = {x[1] for x in got}
    assert len(trace_ids) == 1  # server, client and decision spans: one trace
    [sent] = fake.headers
    assert bytes.fromhex(sent["traceparent"].split("-")[1]) in trace_ids
