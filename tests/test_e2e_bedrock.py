"""The official boto3 `bedrock-runtime` client, through a real tether, against the fake Bedrock.

The agent signs with stub credentials; the fake accepts only requests signed with
tether's own (set in tether's environment), so every answer here also proves
tether re-signed what it forwarded.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError
from yarl import URL

from proxy.demo.fake_bedrock import FakeBedrock, stream_frames
from proxy.providers.eventstream import Header, Message, encode, event
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, RawReply, Reply

TETHER_KEY, TETHER_SECRET = "AKIDTETHEROWNKEY", "tether-own-secret"
TOOLS = ("get_weather", "delete_volume", "drop_database", "resize_volume", "list_volumes")
TOOL_CONFIG = {"tools": [{"toolSpec": {"name": n, "inputSchema": {"json": {"type": "object"}}}}
                         for n in TOOLS]}
MESSAGES = [{"role": "user", "content": [{"text": "clean up"}]}]
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
OTHER_VENDOR = "meta.llama3-70b-instruct-v1:0"
ARN = ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
       "us.anthropic.claude-3-5-sonnet-20240620-v1:0")
ODD_ARGS = '{ "city":"Zürich",\n  "note": "tab\\there \\u00e9 \\"q\\" 漢字", "n": 1.50e2 }'
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')
EXTRA = "upstreams:\n  bedrock: {url: 'http://unused', region: us-east-1}\n"


@pytest.fixture(autouse=True)
def tether_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """tether's own AWS identity, and no way for botocore to look anywhere else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TETHER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TETHER_SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


_clients: list[Any] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack(upstreams={"bedrock": FakeBedrock(TETHER_KEY, TETHER_SECRET)},
                            extra=EXTRA)


def fake(stack: Stack) -> FakeBedrock:
    upstream = stack.fakes["bedrock"]
    assert isinstance(upstream, FakeBedrock)
    return upstream


def runtime(endpoint: str, key: str = "agent-stub", secret: str = "agent-stub") -> Any:
    """A client that makes exactly one attempt (`max_attempts: 1` would still retry once)."""
    c = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint,
                     aws_access_key_id=key, aws_secret_access_key=secret,
                     config=botocore.config.Config(retries={"total_max_attempts": 1}))
    _clients.append(c)
    return c


def client(stack: Stack) -> Any:
    return runtime(stack.proxy_url + "/bedrock")


async def converse(stack: Stack, model: str = MODEL, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = await asyncio.to_thread(
        client(stack).converse, modelId=model, messages=MESSAGES, toolConfig=TOOL_CONFIG, **kw)
    return out


def _drain(response: dict[str, Any]) -> tuple[list[dict[str, Any]], ClientError | None]:
    events: list[dict[str, Any]] = []
    try:
        for item in response["stream"]:
            events.append(item)
    except ClientError as e:
        return events, e
    finally:
        response["stream"].close()
    return events, None


async def converse_stream(stack: Stack, model: str = MODEL
                          ) -> tuple[list[dict[str, Any]], ClientError | None]:
    """The stream's events as boto3 yields them, and the error that ended it, if any."""
    response = await asyncio.to_thread(client(stack).converse_stream, modelId=model,
                                       messages=MESSAGES, toolConfig=TOOL_CONFIG)
    return await asyncio.to_thread(_drain, response)


def assemble(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Content blocks by index, the way agents put a streamed answer together."""
    blocks: dict[int, dict[str, Any]] = {}
    stop = None
    for e in events:
        if "contentBlockStart" in e:
            start = e["contentBlockStart"]
            use = start["start"]["toolUse"]
            blocks[start["contentBlockIndex"]] = {"toolUse": {**use, "input": ""}}
        elif "contentBlockDelta" in e:
            delta = e["contentBlockDelta"]
            block = blocks.setdefault(delta["contentBlockIndex"], {})
            if "text" in delta["delta"]:
                block["text"] = block.get("text", "") + delta["delta"]["text"]
            if "toolUse" in delta["delta"]:
                block["toolUse"]["input"] += delta["delta"]["toolUse"]["input"]
        elif "messageStop" in e:
            stop = e["messageStop"]["stopReason"]
    return [blocks[i] for i in sorted(blocks)], stop


def calls_of(content: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(b["toolUse"]["name"], b["toolUse"]["input"]) for b in content if "toolUse" in b]


def text_of(content: list[dict[str, Any]]) -> str:
    return "".join(b.get("text", "") for b in content)


async def answer(stack: Stack, stream: bool) -> tuple[list[dict[str, Any]], str | None]:
    if stream:
        events, error = await converse_stream(stack)
        assert error is None
        return assemble(events)
    r = await converse(stack)
    return r["output"]["message"]["content"], r["stopReason"]


# --- governed answers ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_single_allowed_call(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    content, stop = await answer(stack, stream)
    expected = ODD_ARGS if stream else json.loads(ODD_ARGS)  # the stream carries the text
    assert calls_of(content) == [("get_weather", expected)]
    assert text_of(content) == "Let me check."
    assert stop == "tool_use"
    [record] = stack.decisions()
    assert (record["provider"], record["model"], record["action"], record["stream"]) == (
        "bedrock", MODEL, "allow", stream)
    assert record["arguments"]["city"] == "Zürich"
    assert fake(stack).models == [MODEL]
    assert f"Credential={TETHER_KEY}/" in fake(stack).headers[-1]["Authorization"]


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_use_blocks_all_allowed(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),
                                  Call("get_weather", '{"city": "Lima"}'),
                                  Call("list_volumes", "{}"))))
    content, stop = await answer(stack, stream)
    args = [a if isinstance(a, dict) else json.loads(a) for _, a in calls_of(content)]
    assert args == [{"city": "Oslo"}, {"city": "Lima"}, {}]
    ids = [b["toolUse"]["toolUseId"] for b in content]
    assert len(set(ids)) == 3 and stop == "tool_use"
    assert [r["action"] for r in stack.decisions()] == ["allow"] * 3


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_rewritten_and_allowed_call_kept(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE, Call("list_volumes", "{}"))))
    content, stop = await answer(stack, stream)
    expected = ODD_ARGS if stream else json.loads(ODD_ARGS)
    assert calls_of(content) == [("get_weather", expected), ("list_volumes", "{}" if stream else {})]
    # The denied block is text now, at the denied call's place (index 2).
    assert "toolUse" not in content[2]
    assert content[2]["text"].startswith("[tether] The tool call 'delete_volume' was denied by "
                                         "no-prod-deletes: Deleting production resources")
    assert content[0]["text"] == "Cleaning up."
    assert stop == "tool_use"
    assert [(r["tool"], r["action"], r["rules"]) for r in stack.decisions()] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["no-prod-deletes"]),
        ("list_volumes", "allow", [])]


@pytest.mark.parametrize("stream", [False, True])
async def test_only_call_denied_ends_the_turn(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(calls=(PROD_DELETE,)))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == []
    assert "no-prod-deletes" in text_of(content)
    assert stop == "end_turn"


async def test_on_deny_error_is_access_denied(stack: Stack) -> None:
    fake(stack).push(Reply(calls=(Call("drop_database", "{}"),)))
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "Dropping databases is never allowed" in info.value.response["Error"]["Message"]
    [record] = stack.decisions()
    assert record["action"] == "deny" and record["rules"] == ["no-drop"]


async def test_on_deny_error_in_a_stream_raises_while_iterating(stack: Stack) -> None:
    fake(stack).push(Reply(content="Dropping it.", calls=(Call("drop_database", "{}"),)))
    events, error = await converse_stream(stack)
    assert error is not None
    assert error.response["Error"]["Code"] == "AccessDeniedException"
    assert "Dropping databases is never allowed" in error.response["Error"]["Message"]
    content, stop = assemble(events)
    assert text_of(content) == "Dropping it." and calls_of(content) == [] and stop is None


@pytest.mark.parametrize("stream", [False, True])
async def test_model_arn_with_escaped_colons_and_slash(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(calls=(Call("get_weather", "{}"),)))
    if stream:
        events, error = await converse_stream(stack, model=ARN)
        assert error is None
        content, _ = assemble(events)
    else:
        content = (await converse(stack, model=ARN))["output"]["message"]["content"]
    assert calls_of(content)[0][0] == "get_weather"
    assert fake(stack).models == [ARN]
    assert stack.decisions()[0]["model"] == ARN


# --- signing --------------------------------------------------------------------------------


async def test_fake_rejects_the_agents_stub_signature_and_accepts_tethers(stack: Stack) -> None:
    direct = f"http://127.0.0.1:{URL(fake_url(stack)).port}"
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(runtime(direct).converse, modelId=MODEL, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(runtime(direct, TETHER_KEY, "wrong-secret").converse,
                                modelId=MODEL, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert len(fake(stack).rejected) == 2 and fake(stack).requests == []
    # Signed right (as tether signs), the fake answers: its check is botocore's signer.
    r = await asyncio.to_thread(runtime(direct, TETHER_KEY, TETHER_SECRET).converse,
                                modelId=MODEL, messages=MESSAGES)
    assert r["stopReason"] == "end_turn"
    # Through tether the agent's stub signature is replaced by tether's.
    r = await converse(stack)
    assert r["stopReason"] == "end_turn"
    assert len(fake(stack).requests) == 2 and len(fake(stack).rejected) == 2
    sent = fake(stack).headers[-1]
    assert "agent-stub" not in sent["Authorization"]
    assert f"Credential={TETHER_KEY}/" in sent["Authorization"]


def fake_url(stack: Stack) -> str:
    return stack.tether.config.upstreams["bedrock"].url


async def test_tether_picks_up_new_credentials_per_request(stack: Stack,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    await converse(stack)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-but-wrong")
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TETHER_SECRET)
    await converse(stack)
    assert len(fake(stack).requests) == 2 and len(fake(stack).rejected) == 1


async def test_signing_region_comes_from_the_config(make_stack: MakeStack) -> None:
    stack = await make_stack(upstreams={"bedrock": FakeBedrock(TETHER_KEY, TETHER_SECRET)},
                             extra=EXTRA.replace("us-east-1", "eu-west-1"))
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "eu-west-1/bedrock" in fake(stack).rejected[0]


async def test_without_credentials_nothing_is_sent(stack: Stack,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502
    assert "no AWS credentials" in info.value.response["Error"]["Message"]
    assert fake(stack).headers == []


# --- refused routes and bad requests --------------------------------------------------------


async def test_other_bedrock_operations_are_refused_with_501(stack: Stack) -> None:
    c = client(stack)
    calls: list[Callable[[], Any]] = [
        # InvokeModel is governed for Anthropic models (test_e2e_bedrock_invoke.py) only.
        lambda: c.invoke_model(modelId=OTHER_VENDOR, body=b'{"prompt": "hi"}'),
        lambda: c.invoke_model_with_response_stream(modelId=OTHER_VENDOR, body=b"{}"),
        lambda: c.apply_guardrail(guardrailIdentifier="g", guardrailVersion="1", source="INPUT",
                                  content=[{"text": {"text": "hi"}}]),
        lambda: c.count_tokens(modelId=MODEL, input={"converse": {"messages": MESSAGES}}),
    ]
    for call in calls:
        with pytest.raises(ClientError) as info:
            await asyncio.to_thread(call)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
        assert "not governed" in info.value.response["Error"]["Message"]
    assert fake(stack).headers == []


async def post(stack: Stack, path: str, body: bytes) -> tuple[int, str, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(URL(stack.proxy_url + path, encoded=True), data=io.BytesIO(body),
                             headers={"Content-Type": "application/json"}) as resp:
            return resp.status, resp.headers.get("x-amzn-ErrorType", ""), await resp.json()


@pytest.mark.parametrize("path, status, kind", [
    ("/bedrock/model/m/Converse", 404, "ResourceNotFoundException"),
    ("/bedrock/model/converse", 404, "ResourceNotFoundException"),
    ("/bedrock/model/m/converse/", 404, "ResourceNotFoundException"),
    ("/bedrock/model/m/converse-stream/x", 404, "ResourceNotFoundException"),
    ("/bedrock/model/a/b/converse", 404, "ResourceNotFoundException"),
    ("/bedrock/model/m/invoke", 501, "InternalServerException"),
    ("/bedrock/model/m%2e%2e/converse", 400, "ValidationException"),
    ("/bedrock/model/%2e%2e/converse", 400, "ValidationException"),
    ("/bedrock/model/m%3bx/converse", 400, "ValidationException"),
    ("/bedrock/model/m%5c/converse", 400, "ValidationException"),
    ("/bedrock/model/m%ff/converse", 400, "ValidationException"),
    ("/bedrock/model//converse", 400, "ValidationException"),
])
async def test_near_misses_and_ambiguous_paths(stack: Stack, path: str, status: int,
                                               kind: str) -> None:
    got, error_type, body = await post(stack, path, b'{"messages": []}')
    assert (got, error_type) == (status, kind)
    assert body["message"]
    assert fake(stack).headers == []


@pytest.mark.parametrize("body, needle", [
    (b'{"messages": [', "not valid JSON"),
    (b'["messages"]', "must be a JSON object"),
    (b'{"messages": [], "messages": []}', "duplicate key"),
    (b'{"toolConfig": {"tools": {}}}', "'toolConfig.tools' must be an array"),
    (b'{"toolConfig": {"tools": [{"toolSpec": {}}]}}', "must be an object with a name"),
])
async def test_malformed_request_is_a_validation_exception(stack: Stack, body: bytes,
                                                           needle: str) -> None:
    got, kind, error = await post(stack, f"/bedrock/model/{MODEL.replace(':', '%3A')}/converse",
                                  body)
    assert (got, kind) == (400, "ValidationException")
    assert needle in error["message"]
    assert fake(stack).headers == []


# --- bad upstream answers --------------------------------------------------------------------

TURN = Reply(content="Deleting.", calls=(Call("get_weather", '{"city": "Oslo"}'),
                                         Call("delete_volume", '{"volume_id": "vol-1"}')))
FRAMES = stream_frames(TURN)
CUT = next(i for i, f in enumerate(FRAMES) if b"delete_volume" in f) + 2


def stream_reply(*chunks: bytes, cut: bool = False) -> RawReply:
    return RawReply(content_type="application/vnd.amazon.eventstream", chunks=chunks, cut=cut)


def released(events: list[dict[str, Any]]) -> list[str]:
    return [e["contentBlockStart"]["start"]["toolUse"]["name"] for e in events
            if "contentBlockStart" in e]


async def test_stream_cut_mid_tool_use(stack: Stack) -> None:
    fake(stack).push(stream_reply(*FRAMES[:CUT], cut=True))
    events, error = await converse_stream(stack)
    assert error is not None
    assert error.response["Error"]["Code"] == "modelStreamErrorException"
    assert "ended before the response was complete" in error.response["Error"]["Message"]
    assert released(events) == ["get_weather"]
    assert [(r["tool"], r["action"], r["rules"]) for r in stack.decisions()] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(r["code"] == "stream_error" for r in stack.audit() if r["kind"] == "request")


async def test_stream_cut_inside_a_frame(stack: Stack) -> None:
    frame = FRAMES[CUT]
    fake(stack).push(stream_reply(*FRAMES[:CUT], frame[:len(frame) // 2], cut=True))
    events, error = await converse_stream(stack)
    assert error is not None and "ended inside a frame" in error.response["Error"]["Message"]
    assert released(events) == ["get_weather"]
    assert stack.decisions()[-1]["action"] == "deny"


async def test_corrupted_crc_denies_and_errors(stack: Stack) -> None:
    bad = bytearray(FRAMES[CUT])
    bad[-1] ^= 0xFF
    fake(stack).push(stream_reply(*FRAMES[:CUT], bytes(bad), *FRAMES[CUT + 1:]))
    events, error = await converse_stream(stack)
    assert error is not None
    assert error.response["Error"]["Code"] == "modelStreamErrorException"
    assert "bad message checksum" in error.response["Error"]["Message"]
    assert released(events) == ["get_weather"]
    assert [r["action"] for r in stack.decisions()] == ["allow", "deny"]


@pytest.mark.parametrize("continued", [False, True], ids=["rewrite", "continue"])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_with_a_cut_tool_use_is_denied(make_stack: MakeStack, stream: bool,
                                                        continued: bool) -> None:
    """Rewrite mode keeps the cut answer's stop reason; the default sends the model the
    denial as the call's result and the agent gets its next answer after the text."""
    rewrite = "" if continued else "defaults: {on_deny: rewrite}\n"
    stack = await make_stack(upstreams={"bedrock": FakeBedrock(TETHER_KEY, TETHER_SECRET)},
                             extra=EXTRA + rewrite)
    turn = Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),), finish_reason="max_tokens")
    fake(stack).push(turn, Reply(content="Shorter next time."))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == []
    assert "cut off (stopReason max_tokens)" in text_of(content)
    [record] = stack.decisions()
    assert record["action"] == "deny" and record["rules"] == ["tether:malformed-call"]
    if not continued:
        assert stop == "max_tokens" and len(fake(stack).requests) == 1
        return
    assert stop == "end_turn" and text_of(content).endswith("Shorter next time.")
    [result] = fake(stack).requests[1]["messages"][-1]["content"]
    assert result["toolResult"]["status"] == "error"
    assert "cut off" in result["toolResult"]["content"][0]["text"]


async def test_exception_frame_inside_a_200(stack: Stack) -> None:
    throttled = encode(_exception("throttlingException", "Too many tokens, slow down"))
    fake(stack).push(stream_reply(*FRAMES[:CUT], throttled))
    events, error = await converse_stream(stack)
    assert error is not None
    assert error.response["Error"]["Code"] == "throttlingException"
    assert error.response["Error"]["Message"] == "Too many tokens, slow down"
    assert released(events) == ["get_weather"]
    assert stack.decisions()[-1]["tool"] == "delete_volume"
    assert stack.decisions()[-1]["action"] == "deny"


def _exception(kind: str, message: str) -> Message:
    return Message((Header.string(":exception-type", kind),
                    Header.string(":content-type", "application/json"),
                    Header.string(":message-type", "exception")),
                   json.dumps({"message": message}).encode())


async def test_unknown_event_type_fails_closed(stack: Stack) -> None:
    odd = encode(event("toolCallStart", b'{"name": "delete_volume"}'))
    fake(stack).push(stream_reply(*FRAMES[:3], odd, *FRAMES[3:]))
    events, error = await converse_stream(stack)
    assert error is not None and "'toolCallStart' is not one tether can read" in str(error)


async def test_upstream_json_error_passes_through(stack: Stack) -> None:
    fake(stack).push(RawReply(status=429, chunks=(b'{"message": "Too many requests"}',)))
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert info.value.response["Error"]["Message"] == "Too many requests"
    assert [r["status"] for r in stack.audit() if r["kind"] == "request"] == [429]


async def test_html_from_upstream_is_a_502(stack: Stack) -> None:
    fake(stack).push(RawReply(status=200, content_type="text/html", chunks=(b"<html>x</html>",)))
    with pytest.raises(ClientError) as info:
        await converse(stack)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502
    assert info.value.response["Error"]["Code"] == "InternalServerException"


@pytest.mark.parametrize("raw, why", [
    ('{"volume_id": "vol-1", "volume_id": "vol-2"}', "duplicate key"),
    ('["vol-1"]', "must be a JSON object"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_tool_input_is_denied(stack: Stack, raw: str, why: str, stream: bool) -> None:
    fake(stack).push(Reply(calls=(Call("get_weather", raw), Call("list_volumes", "{}"))))
    content, _ = await answer(stack, stream)
    assert [n for n, _ in calls_of(content)] == ["list_volumes"]
    assert why in text_of(content)
    first = stack.decisions()[0]
    assert first["action"] == "deny" and first["rules"] == ["tether:malformed-call"]
