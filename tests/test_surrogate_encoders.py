"""Every encoder on the audit and decision path takes any str a parser yields.

A lone surrogate (from a JSON escape, from bytes decoded with `surrogatepass`, from
a header aiohttp decoded with `surrogateescape`) must not crash the decision, the
redaction, the approvals (memory and Redis), Slack's message, the spans' export,
the metrics page, OPA's input, the providers' error bodies, the MCP and cloud
refusals, or the CLI's printing. Each is fed the same hostile strings here; the
audit chain itself is tests/test_surrogates.py, the front ends
tests/test_hostile_encodings.py.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy import surrogates, tracing
from proxy.approvals.queue import ApprovalQueue, Mode, binding_of, canonical_arguments
from proxy.approvals.redis_queue import RedisApprovals
from proxy.approvals.slack.messages import decided_message, pending_message
from proxy.audit.log import AuditLog
from proxy.audit.redact import MASK, redact
from proxy.cli import _show
from proxy.cli import main as cli_main
from proxy.forward.cloud_errors import cloud_error
from proxy.governor import Governor
from proxy.model import Action, Exchange, HttpRequest, ToolCall
from proxy.policy.engine import MALFORMED, Policy, PolicyEngine
from proxy.policy.mcp import error_object, render
from proxy.policy.opa import input_for
from proxy.providers import PROVIDERS
from proxy.providers.base import ParsedRequest
from proxy.replay import read_records, render_text, replay
from proxy.sessions import budgets, loops
from proxy.sessions.identity import session_of
from proxy.telemetry import Metrics
from tests.conftest import MakeStack
from tests.fakes import Call, Reply
from tests.redis_server import RedisServer

HOSTILE = ["\ud800", "x\udfffy", "s-\udcc0\udcaf", "\ude00\ud83d", "\ud83d\ude00"]
NAME = "delete_volume\ud800"


def hostile_call(text: str) -> ToolCall:
    return ToolCall("c\udc80", NAME, json.dumps({"v": text}, ensure_ascii=False),
                    {"v": text, f"k{text}": [text, 1]})


def exchange(text: str = "\ud800") -> Exchange:
    return Exchange(provider="openai", model=f"m{text}", session=f"s{text}", agent=f"a{text}",
                    endpoint="chat/completions", declared_tools=(NAME,))


@pytest.mark.parametrize("text", HOSTILE)
def test_redaction_masks_and_keeps_hostile_text(text: str) -> None:
    value = {"password": text, "note": f"Bearer abc{text}", f"token_{text}": "x",
             "plain": text, "list": [text, {"api_key": text}]}
    out = redact(value, (("plain",),))
    assert out.value == {"password": MASK, "note": f"Bearer {MASK}", f"token_{text}": MASK,
                         "plain": MASK, "list": [text, {"api_key": MASK}]}
    assert surrogates.json_bytes(out.value)  # and it can be written


@pytest.mark.parametrize("text", HOSTILE)
def test_a_decision_on_hostile_text_is_audited_and_counted(tmp_path: Path, text: str) -> None:
    """The governor: a deny (the name is not text), one audit record, the metrics page
    (whose labels come from the config, never from the call) still renders."""
    metrics = Metrics()
    governor = Governor(PolicyEngine(Policy()), AuditLog(str(tmp_path / "a.jsonl")), metrics)
    decision = governor.decide(hostile_call(text), exchange(text), request_id=f"r{text}")
    assert decision.action is Action.DENY and decision.rules == (MALFORMED,)
    governor.reject(provider="openai", status=400, code="x", message=f"m{text}",
                    request_id="r", session=f"s{text}", agent=f"a{text}", endpoint=f"e{text}")
    governor.audit.close()
    [decided, rejected] = [json.loads(line) for line in
                           (tmp_path / "a.jsonl").read_bytes().splitlines()]
    assert decided["tool"] == NAME and rejected["message"] == surrogates.joined(f"m{text}")
    assert metrics.audit_write_errors._value.get() == 0
    metrics.render().decode("utf-8")


@pytest.mark.parametrize("text", HOSTILE)
def test_session_and_loop_keys_hash_hostile_text(text: str) -> None:
    call = hostile_call(text)
    assert loops.signature(call) != loops.signature(hostile_call(text + "!"))
    assert budgets.digest(f"a|{text}") != budgets.digest("a|")
    request = ParsedRequest(model="m", stream=False, declared_tools=(), fingerprint=text)
    assert session_of({}, request, f"a{text}", False).startswith("fp-")
    assert session_of({"x-tether-session": text}, request, None, True) == text
    # Ordinary text hashes as it always did (sessions and approvals persist across versions).
    plain = ToolCall("c", "resize", '{"n":1}', {"n": 1})
    assert binding_of(plain, exchange(""), "r") == binding_of(plain, exchange(""), "r")
    assert canonical_arguments(plain) == '{"n":1}'


async def approvals_with(queue: Any, text: str) -> None:
    call = hostile_call(text)
    made = await queue.create(call, exchange(text), mode=Mode.WAIT, rules=("r",),
                              message=f"why {text}", revision="rev", approvers=(),
                              timeout_s=30)
    assert made.binding == binding_of(call, exchange(text), "rev")
    got = await queue.get(made.id)
    assert got is not None and (got.tool, got.session, got.message) == (
        NAME, f"s{text}", f"why {text}")
    assert json.loads(got.arguments) == json.loads(canonical_arguments(call))
    for message in (pending_message(got), decided_message(got, "U1")):
        surrogates.json_bytes(message, replace=True).decode("utf-8")  # what Slack is sent
    assert "\\ud800" in json.dumps(pending_message(got)) or "\ud800" not in text
    assert _show(got.as_json()).encode("utf-8")  # `tether approvals list` prints it


@pytest.mark.parametrize("text", HOSTILE)
async def test_memory_approvals_hold_hostile_text(text: str) -> None:
    await approvals_with(ApprovalQueue(), text)


async def test_redis_approvals_hold_hostile_text(own_redis: RedisServer) -> None:
    queue = RedisApprovals(own_redis.url, poll_s=30)
    try:
        for text in HOSTILE:
            await approvals_with(queue, text)
    finally:
        await queue.close()


@pytest.mark.parametrize("text", HOSTILE)
def test_error_bodies_of_every_provider_mcp_and_the_clouds(text: str) -> None:
    for provider in PROVIDERS:
        body = provider.error(400, f"no {text}", "invalid_request").body
        body.decode("utf-8")
    rpc = render([error_object(None, -32602, f"[tether] {text}", {"tool": text})], False)
    assert json.loads(rpc)["error"]["data"]["tool"] == surrogates.joined(text)
    for cloud, host in (("aws", "ec2.us-east-1.amazonaws.com"), ("aws", "s3.amazonaws.com"),
                        ("azure", "management.azure.com"), ("gcp", "compute.googleapis.com")):
        request = HttpRequest("GET", "https", host, 443, f"/{text}")
        body, headers = cloud_error(cloud, None, request, 403, "request_denied",
                                    f"denied {text} \x00", "rid")
        if headers["content-type"] == "text/xml":
            ET.fromstring(body)  # well-formed XML, the surrogate and the NUL shown as U+FFFD
        else:
            json.loads(body)


@pytest.mark.parametrize("text", HOSTILE)
def test_opa_input_is_ascii_json(text: str) -> None:
    from proxy.model import Effect

    document = input_for(hostile_call(text), exchange(text), source="llm", effect=Effect.WRITE)
    assert document.canonical().isascii() and len(document.key()) == 64


def test_replay_prints_records_holding_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    for text in HOSTILE:
        log.write({"kind": "decision", "tool": f"t{text}", "agent": f"a{text}",
                   "action": "allow", "rules": [], "arguments": {"v": text}})
    log.close()
    outcomes = replay(PolicyEngine(Policy(undeclared_tools=Action.ALLOW)), read_records([path]))
    assert [o.new_rules for o in outcomes] == [(MALFORMED,)] * (len(HOSTILE) - 1) + [()]
    with redirect_stdout(io.StringIO()):
        print(render_text(outcomes, "c.yaml", "rev").encode("utf-8").decode())


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e"])
def test_replay_reads_records_holding_unicode_line_separators(tmp_path: Path,
                                                             separator: str) -> None:
    """The encoder leaves U+2028, U+2029 and NEL raw in a string (JSON needs no escape for
    them); a record is one "\\n"-terminated line all the same, whatever str.splitlines says."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    log.write({"kind": "decision", "tool": f"get{separator}x", "agent": "a",
               "action": "allow", "rules": [], "arguments": {"v": f"1{separator}2"}})
    log.write({"kind": "decision", "tool": "get_y", "agent": "a", "action": "allow",
               "rules": [], "arguments": {}})
    log.close()
    records = list(read_records([path]))
    assert [r["tool"] for _, r in records] == [f"get{separator}x", "get_y"]


@pytest.mark.parametrize("json_lines", [False, True], ids=["table", "jsonl"])
def test_tether_audit_prints_records_holding_lone_surrogates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], json_lines: bool) -> None:
    """`tether audit verify` and `tether audit calls` (table and JSONL) on a log whose
    records hold lone surrogates: what they print can be written to a UTF-8 terminal."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    for n, text in enumerate(HOSTILE):
        log.write({"kind": "decision", "decision_id": f"d{n}", "tool": f"t{text}",
                   "session": f"s{text}", "agent": f"a{text}", "action": "deny",
                   "outcome": "denied", "rules": [MALFORMED], "arguments": {"v": text}})
    log.close()
    assert cli_main(["audit", "verify", str(path)]) == 0
    assert cli_main(["audit", "calls", str(path), *(["--json"] if json_lines else [])]) == 0
    out = capsys.readouterr().out
    assert not surrogates.holds(out) and out.encode("utf-8")
    if json_lines:
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [line["tool"] for line in lines] == [surrogates.joined(f"t{t}") for t in HOSTILE]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


async def test_spans_with_hostile_names_and_headers_still_export(
        make_stack: MakeStack, spans: InMemorySpanExporter) -> None:
    """The OTLP exporter cannot encode a lone surrogate (an attribute holding one is
    dropped with a logged error; a span name, the whole batch): a model-made tool name
    and call id, and a User-Agent that is not UTF-8, must reach the spans as text."""
    import asyncio

    stack = await make_stack(extra="defaults: {undeclared_tools: allow}\n")
    stack.fake.push(Reply(calls=(Call("delete\ud800", '{"v": "\\ud800"}', id="id\udc00"),)))
    body = b'{"model": "m", "messages": [{"role": "user", "content": "go"}]}'
    reader, writer = await asyncio.open_connection("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1]))
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"User-Agent: agent-\xc0\xaf\xed\xa0\x80\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [decision] = stack.decisions()
    assert decision["rules"] == [MALFORMED]
    done = spans.get_finished_spans()
    shown = [v for span in done for v in (span.name, *(span.attributes or {}).values())]
    texts = [t for v in shown for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, str)]
    assert "agent-\ufffd\ufffd\ufffd\ufffd\ufffd" in texts and "delete\ufffd" in texts
    assert not any(surrogates.holds(t) for t in texts)
    exported = encode_spans(done)
    assert sum(len(s.attributes) for r in exported.resource_spans for ss in r.scope_spans
               for s in ss.spans) == sum(len(span.attributes or {}) for span in done)
