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

import anthropic
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import types as genai_types
from openai.types.chat import ChatCompletionToolParam
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy import tracing
from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_gemini import Call as GeminiCall
from proxy.demo.fake_gemini import FakeGemini
from proxy.demo.fake_gemini import Reply as GeminiReply
from tests.conftest import MakeStack
from tests.fakes import Call, FakeOpenAI, RawReply, Reply
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


def _named(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    return _one([s for s in spans if s.name == name])


def _decides(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if s.name.split(" ")[0] == tracing.DECIDE_SPAN]


def _no_legacy_attributes(spans: tuple[ReadableSpan, ...]) -> None:
    """Nothing says `gen_ai.system` (deprecated), nothing claims a tool was executed."""
    for span in spans:
        attrs = span.attributes or {}
        assert "gen_ai.system" not in attrs, span.name
        assert attrs.get("gen_ai.operation.name") != "execute_tool", span.name


@pytest.mark.parametrize("stream", [False, True])
async def test_spans_follow_the_genai_conventions(make_stack: MakeStack,
                                                  spans: InMemorySpanExporter,
                                                  stream: bool) -> None:
    s = await make_stack()
    s.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'), PROD_DELETE)))
    client = s.client()
    if stream:
        chunks = await client.chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True, max_tokens=64,
            stream_options={"include_usage": True})
        async for _ in chunks:
            pass
    else:
        await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                             max_tokens=64)
    done = spans.get_finished_spans()
    _no_legacy_attributes(done)
    server = _one(_by_kind(done, SpanKind.SERVER))
    inference = _named(done, "chat gpt-x")
    http = _named(done, "POST")
    assert inference.kind is SpanKind.CLIENT and http.kind is SpanKind.CLIENT
    decides = _decides(done)
    assert server.context is not None and inference.context is not None
    assert http.context is not None
    trace_id = server.context.trace_id
    # server -> inference -> the HTTP request; the decisions hang off the server span.
    assert inference.parent is not None and inference.parent.span_id == server.context.span_id
    assert http.parent is not None and http.parent.span_id == inference.context.span_id
    assert [d.name for d in decides] == ["tether.decide get_weather",
                                         "tether.decide delete_volume"]
    for d in decides:
        assert d.kind is SpanKind.INTERNAL
        assert d.context is not None and d.context.trace_id == trace_id
        assert d.parent is not None and d.parent.span_id == server.context.span_id
    # the audit records name the same trace and the same decisions
    records = s.decisions()
    assert {r["trace_id"] for r in records} == {format(trace_id, "032x")}
    allow, deny = (dict(d.attributes or {}) for d in decides)
    revision = s.tether.governor.engine.revision
    assert allow == {
        "gen_ai.tool.name": "get_weather", "gen_ai.tool.call.id": allow["gen_ai.tool.call.id"],
        "tether.decision.id": records[0]["decision_id"], "tether.decision.action": "allow",
        "tether.decision.rule_ids": (), "tether.policy.revision": revision,
    }
    assert deny["tether.decision.action"] == "deny"
    assert deny["tether.decision.rule_ids"] == ("no-prod-deletes",)
    assert deny["tether.decision.id"] == records[1]["decision_id"]
    # The inference span: what the conventions ask of a chat call, and the answer's usage.
    attrs = dict(inference.attributes or {})
    port = int(s.tether.config.upstreams["openai"].url.rsplit(":", 1)[1])  # the fake's
    expected: dict[str, object] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-x", "gen_ai.request.max_tokens": 64,
        "openai.api.type": "chat_completions", "server.address": "127.0.0.1",
        "server.port": port, "gen_ai.usage.input_tokens": 24, "gen_ai.usage.output_tokens": 12,
    }
    if stream:
        expected["gen_ai.request.stream"] = True
    else:  # read from the whole answer
        expected |= {"gen_ai.response.model": "gpt-x",
                     "gen_ai.response.id": attrs["gen_ai.response.id"],
                     "gen_ai.response.finish_reasons": ("tool_calls",)}
        assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    assert attrs == expected
    assert inference.status.status_code is StatusCode.UNSET
    # The server span is an HTTP span; GenAI attributes are the inference span's.
    assert not any(k.startswith("gen_ai.") for k in (server.attributes or {}))
    # W3C trace context went upstream: same trace, parent is the HTTP client span.
    [headers] = s.fake.headers
    version, sent_trace, parent, _flags = headers["traceparent"].split("-")
    assert version == "00" and int(sent_trace, 16) == trace_id
    assert int(parent, 16) == http.context.span_id


# google-genai subclasses aiohttp.ClientSession, which aiohttp warns about; not ours to fix.
@pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning")
async def test_anthropic_and_gemini_spans(make_stack: MakeStack,
                                          spans: InMemorySpanExporter) -> None:
    claude_fake, gemini_fake = FakeAnthropic(), FakeGemini()
    s = await make_stack(upstreams={"anthropic": claude_fake, "gemini": gemini_fake})
    claude_fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    claude = anthropic.AsyncAnthropic(base_url=s.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    try:
        await claude.messages.create(
            model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "go"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    finally:
        await claude.close()
    gemini_fake.push(GeminiReply(calls=(GeminiCall("get_weather", '{"city": "Oslo"}'),)))
    gemini = genai.Client(api_key="k", http_options=genai_types.HttpOptions(
        base_url=s.proxy_url + "/gemini", retry_options=genai_types.HttpRetryOptions(attempts=1)))
    try:
        await gemini.aio.models.generate_content(
            model="gemini-2.5-flash", contents="go", config=genai_types.GenerateContentConfig(
                tools=[genai_types.Tool(function_declarations=[genai_types.FunctionDeclaration(
                    name="get_weather", parameters_json_schema={"type": "object"})])],
                automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(
                    disable=True)))
    finally:
        await gemini.aio.aclose()
    done = spans.get_finished_spans()
    _no_legacy_attributes(done)
    messages = dict(_named(done, "chat claude-test").attributes or {})
    assert (messages["gen_ai.operation.name"], messages["gen_ai.provider.name"]) == (
        "chat", "anthropic")
    assert messages["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert str(messages["gen_ai.response.model"]).startswith("claude-test")
    assert "openai.api.type" not in messages
    generate = dict(_named(done, "generate_content gemini-2.5-flash").attributes or {})
    assert (generate["gen_ai.operation.name"], generate["gen_ai.provider.name"]) == (
        "generate_content", "gcp.gemini")
    assert generate["gen_ai.response.finish_reasons"] == ("STOP",)
    assert len([d for d in _decides(done) if d.name == "tether.decide get_weather"]) == 2


async def test_legacy_gen_ai_system_only_when_asked(make_stack: MakeStack,
                                                    spans: InMemorySpanExporter) -> None:
    s = await make_stack(extra="telemetry: {legacy_gen_ai_system: true}")
    s.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    done = spans.get_finished_spans()
    inference = dict(_named(done, "chat gpt-x").attributes or {})
    assert inference["gen_ai.system"] == "openai"            # the old spelling, as asked
    assert inference["gen_ai.provider.name"] == "openai"     # and the current one
    [decide] = _decides(done)
    assert "gen_ai.system" not in (decide.attributes or {})  # decisions are tether's own


async def test_a_failed_upstream_call_is_an_error_span(make_stack: MakeStack,
                                                       spans: InMemorySpanExporter) -> None:
    s = await make_stack()
    s.fake.push(RawReply(status=500, chunks=(b'{"error": {"message": "boom"}}',)))
    with pytest.raises(openai.InternalServerError):
        await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    inference = _named(spans.get_finished_spans(), "chat gpt-x")
    assert (inference.attributes or {})["error.type"] == "500"
    assert inference.status.status_code is StatusCode.ERROR
    assert not _decides(spans.get_finished_spans())  # nothing to decide: nothing decided


async def test_model_invented_tool_names_stay_out_of_span_names(
        make_stack: MakeStack, spans: InMemorySpanExporter) -> None:
    s = await make_stack()
    invented = "x" * 5000 + "\u202e"
    s.fake.push(Reply(calls=(Call(invented, "{}"),)))
    await s.client().chat.completions.create(model="m" * 300, messages=MESSAGES, tools=TOOLS)
    done = spans.get_finished_spans()
    [decide] = _decides(done)
    assert decide.name == tracing.DECIDE_SPAN   # undeclared: not in the name
    assert (decide.attributes or {})["gen_ai.tool.name"] == invented
    assert (decide.attributes or {})["tether.decision.rule_ids"] == ("tether:undeclared-tool",)
    # The agent's call and tether's continuation after the denial (on_deny: continue).
    inferences = [x for x in done if x.name.startswith("chat ")]
    assert len(inferences) == 2
    assert [(x.attributes or {}).get("tether.continuation.round") for x in inferences] \
        in ([None, 1], [1, None])
    assert all(len(x.name) <= len("chat ") + tracing.NAME_LIMIT for x in inferences)


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
               for d in _decides(done)}
    assert decided["resize_volume"]["tether.decision.action"] == "hold"
    assert decided["resize_volume"]["tether.decision.rule_ids"] == ("writes-held",)
    assert decided["drop_database"]["tether.decision.action"] == "deny"
    # The hold's outcome (it timed out) is in the audit, under the span's decision id.
    [held] = [r for r in s.audit() if r["kind"] == "hold"]
    assert held["decision_id"] == decided["resize_volume"]["tether.decision.id"]
    assert held["outcome"] == "expired"
    servers = _by_kind(done, SpanKind.SERVER)
    assert sorted(str((x.attributes or {}).get("http.status_code")) for x in servers) == ["200", "403"]


async def test_no_secret_on_any_span(make_stack: MakeStack, spans: InMemorySpanExporter) -> None:
    s = await make_stack()
    s.fake.push(Reply(calls=(SECRET,)))
    r = await s.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert (r.choices[0].message.tool_calls or [])  # the call itself went through
    done = spans.get_finished_spans()
    assert [d.name for d in _decides(done)] == ["tether.decide login"]
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


def _otlp_value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_otlp_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


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

    def spans(self) -> list[tuple[str, bytes, bytes, dict[str, object]]]:
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        attrs = {a.key: _otlp_value(a.value) for a in sp.attributes}
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
            while not any(n.startswith("tether.decide ") for n, *_ in receiver.spans()) or not any(
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
    decides = [x for x in got if x[0].startswith("tether.decide ")]
    assert [d[3]["tether.decision.action"] for d in decides] == ["allow", "deny"]
    rules = decides[1][3]["tether.decision.rule_ids"]
    assert isinstance(rules, list) and "no-prod-deletes" in rules  # an array
    [inference] = [x for x in got if x[0] == "chat gpt-x"]
    assert inference[3]["gen_ai.provider.name"] == "openai" and "gen_ai.system" not in inference[3]
    trace_ids = {x[1] for x in got}
    assert len(trace_ids) == 1  # server, client and decision spans: one trace
    [sent] = fake.headers
    assert bytes.fromhex(sent["traceparent"].split("-")[1]) in trace_ids
