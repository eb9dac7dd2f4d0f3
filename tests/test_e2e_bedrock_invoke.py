"""The official boto3 `bedrock-runtime` client's InvokeModel and
InvokeModelWithResponseStream, for an Anthropic model, through a real tether, against the
fake Bedrock (which checks tether's own SigV4 signature, and Bedrock's rules for the body).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from anthropic import AsyncAnthropicBedrock
from botocore.exceptions import ClientError, EventStreamError

from proxy.demo.fake_bedrock import FakeBedrock
from proxy.demo.fake_bedrock_invoke import invoke_frames
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, RawReply, Reply
from tests.test_e2e_bedrock import (
    ARN,
    EXTRA,
    MODEL,
    ODD_ARGS,
    PROD_DELETE,
    TETHER_KEY,
    TETHER_SECRET,
    client,
    fake,
)
from tests.test_e2e_bedrock import close_clients as close_clients  # noqa: F401
from tests.test_e2e_bedrock import stack as stack  # noqa: F401
from tests.test_e2e_bedrock import tether_credentials as tether_credentials  # noqa: F401

TOOLS = [{"name": n, "input_schema": {"type": "object"}}
         for n in ("get_weather", "delete_volume", "drop_database", "list_volumes")]
BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 512, "tools": TOOLS,
        "messages": [{"role": "user", "content": "clean up"}]}


async def invoke(stack: Stack, body: dict[str, Any] = BODY, model: str = MODEL
                 ) -> dict[str, Any]:
    r = await asyncio.to_thread(client(stack).invoke_model, modelId=model,
                                body=json.dumps(body).encode())
    out: dict[str, Any] = json.loads(r["body"].read())
    return out


def _drain(response: dict[str, Any]) -> tuple[list[dict[str, Any]], Exception | None]:
    events: list[dict[str, Any]] = []
    try:
        for item in response["body"]:
            events.append(json.loads(item["chunk"]["bytes"]))
    except (ClientError, EventStreamError) as e:
        return events, e
    finally:
        response["body"].close()
    return events, None


async def invoke_stream(stack: Stack, body: dict[str, Any] = BODY, model: str = MODEL
                        ) -> tuple[list[dict[str, Any]], Exception | None]:
    """The Messages events boto3 hands out, and the error that ended the stream, if any."""
    response = await asyncio.to_thread(client(stack).invoke_model_with_response_stream,
                                       modelId=model, body=json.dumps(body).encode())
    return await asyncio.to_thread(_drain, response)


def assemble(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Content blocks by index and the stop reason, as the Anthropic SDK builds them."""
    content: dict[int, dict[str, Any]] = {}
    stop = None
    for e in events:
        if e["type"] == "content_block_start":
            content[e["index"]] = dict(e["content_block"])
        elif e["type"] == "content_block_delta":
            block, delta = content[e["index"]], e["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                block["partial"] = block.get("partial", "") + delta["partial_json"]
        elif e["type"] == "content_block_stop" and "partial" in content[e["index"]]:
            block = content[e["index"]]
            block["input"] = json.loads(block.pop("partial") or "{}")
        elif e["type"] == "message_delta":
            stop = e["delta"]["stop_reason"]
    return [content[i] for i in sorted(content)], stop


async def answer(stack: Stack, stream: bool) -> tuple[list[dict[str, Any]], str | None]:
    if stream:
        events, error = await invoke_stream(stack)
        assert error is None
        return assemble(events)
    r = await invoke(stack)
    return r["content"], r["stop_reason"]


def calls_of(content: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(b["name"], b["input"]) for b in content if b["type"] == "tool_use"]


def text_of(content: list[dict[str, Any]]) -> str:
    return "".join(b.get("text", "") for b in content)


@pytest.mark.parametrize("stream", [False, True])
async def test_allowed_call_passes(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == [("get_weather", json.loads(ODD_ARGS))]
    assert text_of(content) == "Let me check." and stop == "tool_use"
    [record] = stack.decisions()
    assert (record["provider"], record["model"], record["action"], record["stream"]) == (
        "bedrock", MODEL, "allow", stream)
    assert record["arguments"]["city"] == "Zürich"
    assert fake(stack).models == [MODEL]
    assert fake(stack).requests == [BODY]  # forwarded as the agent wrote it
    assert f"Credential={TETHER_KEY}/" in fake(stack).headers[-1]["Authorization"]


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_rewritten_and_allowed_calls_kept(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE, Call("list_volumes", "{}"))))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == [("get_weather", json.loads(ODD_ARGS)), ("list_volumes", {})]
    # The denied block is text now, at the denied call's index.
    assert [b["type"] for b in content] == ["text", "tool_use", "text", "tool_use"]
    assert content[2]["text"].startswith("[tether] The tool call 'delete_volume' was denied by "
                                         "no-prod-deletes: Deleting production resources")
    assert stop == "tool_use"
    assert [(r["tool"], r["action"], r["rules"]) for r in stack.decisions()] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["no-prod-deletes"]),
        ("list_volumes", "allow", [])]


@pytest.mark.parametrize("stream", [False, True])
async def test_only_call_denied_ends_the_turn(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(calls=(PROD_DELETE,)))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == [] and "no-prod-deletes" in text_of(content)
    assert stop == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_inference_profile_arn(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(calls=(Call("get_weather", "{}"),)))
    if stream:
        events, error = await invoke_stream(stack, model=ARN)
        assert error is None
        content, _ = assemble(events)
    else:
        content = (await invoke(stack, model=ARN))["content"]
    assert calls_of(content) == [("get_weather", {})]
    assert fake(stack).models == [ARN] and stack.decisions()[0]["model"] == ARN


async def test_on_deny_error_is_access_denied(stack: Stack) -> None:
    fake(stack).push(Reply(calls=(Call("drop_database", "{}"),)))
    with pytest.raises(ClientError) as info:
        await invoke(stack)
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "Dropping databases is never allowed" in info.value.response["Error"]["Message"]


async def test_on_deny_error_in_a_stream_raises_while_iterating(stack: Stack) -> None:
    fake(stack).push(Reply(content="Dropping it.", calls=(Call("drop_database", "{}"),)))
    events, error = await invoke_stream(stack)
    assert isinstance(error, ClientError)
    assert error.response["Error"]["Code"] == "AccessDeniedException"
    assert "Dropping databases is never allowed" in error.response["Error"]["Message"]
    content, stop = assemble(events)
    assert text_of(content) == "Dropping it." and calls_of(content) == [] and stop is None


async def test_a_stream_cut_mid_call_ends_with_an_error_and_releases_nothing(stack: Stack
                                                                           ) -> None:
    frames = invoke_frames(Reply(content="Deleting.", calls=(PROD_DELETE,)), MODEL)
    fake(stack).push(RawReply(content_type="application/vnd.amazon.eventstream",
                              chunks=tuple(frames[:-5]), cut=True))
    events, error = await invoke_stream(stack)
    assert isinstance(error, EventStreamError)
    assert error.response["Error"]["Code"] == "modelStreamErrorException"
    content, _ = assemble(events)
    assert calls_of(content) == [] and text_of(content) == "Deleting."
    [record] = stack.decisions()
    assert (record["tool"], record["action"]) == ("delete_volume", "deny")


@pytest.mark.parametrize("stream", [False, True])
async def test_whole_answers_continue_after_a_denial_streams_end_as_the_rewrite(
        make_stack: MakeStack, stream: bool) -> None:
    upstream = FakeBedrock(TETHER_KEY, TETHER_SECRET)
    stack = await make_stack(policy="defaults: {on_deny: continue}\n" + POLICY,
                             upstreams={"bedrock": upstream}, extra=EXTRA)
    upstream.push(Reply(content="Cleaning up.", calls=(PROD_DELETE,)),
                  Reply(content="I will leave vol-9 alone."))
    content, stop = await answer(stack, stream)
    assert calls_of(content) == [] and "no-prod-deletes" in text_of(content)
    if stream:  # the seam reads SSE, not chunk frames: one round, rewritten
        assert len(upstream.requests) == 1 and stop == "end_turn"
        return
    assert text_of(content).endswith("I will leave vol-9 alone.") and stop == "end_turn"
    [_, sent] = upstream.requests
    assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent
    result = sent["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["is_error"] is True


# --- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_other_vendors_bodies_stay_refused_with_501(stack: Stack, stream: bool) -> None:
    c = client(stack)
    model, body = "meta.llama3-70b-instruct-v1:0", b'{"prompt": "hi"}'
    call = c.invoke_model_with_response_stream if stream else c.invoke_model
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(call, modelId=model, body=body)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
    assert "Anthropic models" in info.value.response["Error"]["Message"]
    assert fake(stack).headers == []


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 10}, "anthropic_version"),
    ({**BODY, "tools": "get_weather"}, "'tools' must be an array"),
])
async def test_bad_bodies_are_refused_before_anything_is_sent(stack: Stack, body: dict[str, Any],
                                                              needle: str) -> None:
    with pytest.raises(ClientError) as info:
        await invoke(stack, body)
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert needle in info.value.response["Error"]["Message"]
    assert fake(stack).headers == []


async def test_bedrocks_own_validation_comes_back_as_it_said(stack: Stack) -> None:
    with pytest.raises(ClientError) as info:
        await invoke(stack, {**BODY, "model": "claude"})
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert "extraneous key [model]" in info.value.response["Error"]["Message"]


# --- the Anthropic SDK's Bedrock client speaks InvokeModel too -----------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_sdks_bedrock_client(stack: Stack, stream: bool) -> None:
    fake(stack).push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE)))
    sdk = AsyncAnthropicBedrock(aws_access_key="agent-stub", aws_secret_key="agent-stub",
                                aws_region="us-east-1", base_url=stack.proxy_url + "/bedrock",
                                max_retries=0)
    # This SDK's default `anthropic_version` is its API version (a date); Bedrock documents
    # only "bedrock-2023-05-31", which the fake requires, so the test names it.
    kw: dict[str, Any] = {"model": MODEL, "max_tokens": 512, "tools": TOOLS,
                          "messages": [{"role": "user", "content": "clean up"}],
                          "extra_body": {"anthropic_version": "bedrock-2023-05-31"}}
    try:
        if stream:
            async with sdk.messages.stream(**kw) as events:
                message = await events.get_final_message()
        else:
            message = await sdk.messages.create(**kw)
    finally:
        await sdk.close()
    kinds = [b.type for b in message.content]
    assert kinds == ["text", "tool_use", "text"]
    assert message.content[1].input == json.loads(ODD_ARGS)  # type: ignore[union-attr]
    assert message.content[2].text.startswith(  # type: ignore[union-attr]
        "[tether] The tool call 'delete_volume' was denied by no-prod-deletes")
    assert message.stop_reason == "tool_use"
    [sent] = fake(stack).requests
    assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent
    assert f"Credential={TETHER_KEY}/" in fake(stack).headers[-1]["Authorization"]
