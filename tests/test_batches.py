"""Batches through a running tether, with the official openai and anthropic SDKs.

A batch runs at the provider and its results file is not read by tether, so
under `upstreams.NAME.batches: refuse_tools` (the default) a batch that declares
tools is refused (501, the provider's shape, audited) before it reaches the
upstream: at upload (OpenAI `purpose=batch`), at creation (the input file read
back from the upstream; Anthropic's inline requests). Batches without tools run
end to end; `batches: refuse` refuses every batch step. docs/hardening.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from anthropic.types import ToolParam
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from proxy import config as config_mod
from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_openai import FakeOpenAI
from proxy.errors import ConfigError
from tests.conftest import MakeStack, Stack
from tests.test_routes import send

TOOL = {"type": "function", "function": {"name": "delete_volume",
                                         "parameters": {"type": "object"}}}
PARAMS: MessageCreateParamsNonStreaming = {
    "model": "claude-test", "max_tokens": 10,
    "messages": [{"role": "user", "content": "clean up"}]}


def jsonl(url: str, bodies: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                "body": body}).encode() + b"\n" for i, body in enumerate(bodies))


EMBEDDINGS = jsonl("/v1/embeddings", [{"model": "text-embedding-3-small", "input": "a"},
                                      {"model": "text-embedding-3-small", "input": "b"}])
CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "clean up"}]}
WITH_TOOLS = jsonl("/v1/chat/completions", [CHAT, {**CHAT, "tools": [TOOL]}, CHAT])


@dataclass
class Env:
    stack: Stack
    openai_fake: FakeOpenAI
    anthropic_fake: FakeAnthropic
    oai: openai.AsyncOpenAI
    azure: openai.AsyncAzureOpenAI
    claude: anthropic.AsyncAnthropic

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == kind]


async def make_env(make_stack: MakeStack, extra: str = "") -> AsyncIterator[Env]:
    fake, anth = FakeOpenAI(), FakeAnthropic()
    stack = await make_stack(fake=fake, upstreams={"azure": fake, "anthropic": anth},
                             extra=extra)
    azure = openai.AsyncAzureOpenAI(azure_endpoint=stack.proxy_url + "/azure", api_key="k",
                                    api_version="2024-10-21", max_retries=0)
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    yield Env(stack, fake, anth, stack.client(), azure, client)
    await azure.close()
    await client.close()


@pytest.fixture
async def env(make_stack: MakeStack) -> AsyncIterator[Env]:
    async for made in make_env(make_stack):
        yield made


@pytest.fixture
async def refusing(make_stack: MakeStack) -> AsyncIterator[Env]:
    extra = ("upstreams:\n  openai: {url: 'http://unused', batches: refuse}\n"
             "  anthropic: {url: 'http://unused', batches: refuse}\n")
    async for made in make_env(make_stack, extra):
        yield made


def assert_refused(env: Env, status: int, endpoint: str) -> dict[str, Any]:
    [record] = env.records("request")
    assert (record["status"], record["endpoint"]) == (status, endpoint)
    return record


# --- OpenAI ---------------------------------------------------------------------------------

async def test_a_batch_without_tools_runs_end_to_end(env: Env) -> None:
    uploaded = await env.oai.files.create(file=("in.jsonl", EMBEDDINGS), purpose="batch")
    batch = await env.oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                            completion_window="24h")
    done = await env.oai.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    output = await env.oai.files.content(done.output_file_id)
    lines = [json.loads(x) for x in output.content.splitlines()]
    assert [x["custom_id"] for x in lines] == ["req-0", "req-1"]
    assert [b.id for b in (await env.oai.batches.list()).data] == [batch.id]
    # Both judged steps are on the record, with what they would run.
    assert [(r["step"], r["requests"], r["with_tools"]) for r in env.records("batch")] == [
        ("upload", 2, 0), ("create_from_file", 2, 0)]
    assert env.records("request") == []


async def test_a_chat_batch_without_tools_passes_too(env: Env) -> None:
    data = jsonl("/v1/chat/completions", [CHAT, {**CHAT, "tools": []}])
    uploaded = await env.oai.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await env.oai.batches.create(input_file_id=uploaded.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
    assert batch.status == "validating"


async def test_an_upload_whose_requests_declare_tools_is_refused(env: Env) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await env.oai.files.create(file=("in.jsonl", WITH_TOOLS), purpose="batch")
    assert info.value.status_code == 501
    message = str(info.value)
    assert "1 of the 3 requests" in message and "'req-1'" in message
    assert "batches: refuse_tools" in message
    assert info.value.response.headers["x-should-retry"] == "false"
    assert env.openai_fake.batch_api.files == {}
    assert assert_refused(env, 501, "v1/files")["code"] == "endpoint_not_governed"


async def test_a_batch_whose_input_file_declares_tools_is_refused_at_creation(env: Env) -> None:
    # Uploaded some other way (another client, the Uploads API): read back at creation.
    file_id = env.openai_fake.batch_api.add_file("batch", WITH_TOOLS)
    with pytest.raises(openai.InternalServerError, match="declare tools") as info:
        await env.oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    assert info.value.status_code == 501
    assert env.openai_fake.batch_api.batches == {}
    assert_refused(env, 501, "v1/batches")


async def test_uploads_for_other_purposes_pass_unread(env: Env) -> None:
    uploaded = await env.oai.files.create(file=("data.jsonl", WITH_TOOLS), purpose="user_data")
    assert env.openai_fake.batch_api.files[uploaded.id] == ("user_data", WITH_TOOLS)
    assert env.records("batch") == [] and env.records("request") == []


@pytest.mark.parametrize("file_id, status, needle", [
    ("file-missing", 400, "could not read the batch input file 'file-missing'"),
    ("../../v1/models", 400, "must name an uploaded file"),
])
async def test_an_input_file_tether_cannot_read_refuses_the_batch(env: Env, file_id: str,
                                                                  status: int,
                                                                  needle: str) -> None:
    with pytest.raises(openai.BadRequestError, match=needle):
        await env.oai.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                        completion_window="24h")
    assert env.openai_fake.batch_api.batches == {}
    assert_refused(env, status, "v1/batches")


async def test_an_input_file_over_the_limit_refuses_the_batch(make_stack: MakeStack) -> None:
    async for env in make_env(make_stack, "limits: {max_response_bytes: 100}\n"):
        file_id = env.openai_fake.batch_api.add_file("batch", EMBEDDINGS)
        with pytest.raises(openai.APIStatusError, match="over the 100-byte limit") as info:
            await env.oai.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                            completion_window="24h")
        assert info.value.status_code == 413 and env.openai_fake.batch_api.batches == {}


async def test_azure_batches_are_judged_the_same_way(env: Env) -> None:
    tools = jsonl("/chat/completions", [{**CHAT, "tools": [TOOL]}])
    with pytest.raises(openai.InternalServerError, match="declare tools"):
        await env.azure.files.create(file=("in.jsonl", tools), purpose="batch")
    file_id = env.openai_fake.batch_api.add_file("batch", tools)
    with pytest.raises(openai.InternalServerError, match="declare tools"):
        await env.azure.batches.create(input_file_id=file_id,
                                       endpoint="/chat/completions",  # type: ignore[arg-type]
                                       completion_window="24h")
    assert env.openai_fake.batch_api.batches == {}
    plain = await env.azure.files.create(file=("in.jsonl", jsonl("/chat/completions", [CHAT])),
                                         purpose="batch")
    # Azure's classic API names the endpoint without /v1, which the SDK's types do not know.
    batch = await env.azure.batches.create(input_file_id=plain.id,
                                           endpoint="/chat/completions",  # type: ignore[arg-type]
                                           completion_window="24h")
    assert batch.status == "validating"


async def test_batches_refuse_refuses_every_step(refusing: Env) -> None:
    env = refusing
    for call in (lambda: env.oai.files.create(file=("in.jsonl", EMBEDDINGS), purpose="batch"),
                 lambda: env.oai.batches.list(),
                 lambda: env.oai.batches.retrieve("batch_1")):
        with pytest.raises(openai.InternalServerError, match="batches: refuse") as info:
            await call()
        assert info.value.status_code == 501
    assert env.openai_fake.batch_api.files == {}
    # What is not a batch still passes.
    uploaded = await env.oai.files.create(file=("d.jsonl", b"{}\n"), purpose="user_data")
    assert uploaded.purpose == "user_data"
    assert [r["endpoint"] for r in env.records("request")] == ["v1/files", "v1/batches",
                                                              "v1/batches/batch_1"]


# --- Anthropic ------------------------------------------------------------------------------

async def test_a_message_batch_without_tools_runs(env: Env) -> None:
    batch = await env.claude.messages.batches.create(requests=[
        {"custom_id": "a", "params": PARAMS}, {"custom_id": "b", "params": PARAMS}])
    assert batch.processing_status == "in_progress"
    done = await env.claude.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended" and done.request_counts.succeeded == 2
    assert [b.id async for b in env.claude.messages.batches.list()] == [batch.id]
    # Results through tether's route (the SDK's `results()` follows `results_url`, which
    # names the upstream: docs/hardening.md).
    answer = await send(int(env.stack.proxy_url.rsplit(":", 1)[1]), "GET",
                        f"/anthropic/v1/messages/batches/{batch.id}/results")
    assert answer.status == 200
    assert [json.loads(x)["custom_id"] for x in answer.body.splitlines()] == ["a", "b"]
    [record] = env.records("batch")
    assert (record["step"], record["requests"], record["with_tools"]) == ("create_inline", 2, 0)


async def test_a_message_batch_that_declares_tools_is_refused(env: Env) -> None:
    tools = [ToolParam(name="delete_volume", input_schema={"type": "object"})]
    with pytest.raises(anthropic.APIStatusError) as info:
        await env.claude.messages.batches.create(requests=[
            {"custom_id": "a", "params": PARAMS},
            {"custom_id": "b", "params": {**PARAMS, "tools": tools}}])
    assert info.value.status_code == 501 and info.value.type == "api_error"
    assert "1 of the 2 requests" in str(info.value) and "'b'" in str(info.value)
    assert env.anthropic_fake.batches.batches == {}
    assert_refused(env, 501, "v1/messages/batches")


async def test_mcp_servers_count_as_tools(env: Env) -> None:
    mcp = [{"type": "url", "url": "https://mcp.example", "name": "x"}]
    body = {"requests": [{"custom_id": "a", "params": {**PARAMS, "mcp_servers": mcp}}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(env.stack.proxy_url + "/anthropic/v1/messages/batches",
                             json=body) as resp:
            assert resp.status == 501
            assert (await resp.json())["type"] == "error"
    assert env.anthropic_fake.batches.batches == {}


async def test_message_batches_refuse_refuses_every_step(refusing: Env) -> None:
    env = refusing
    with pytest.raises(anthropic.APIStatusError, match="batches: refuse") as info:
        await env.claude.messages.batches.create(requests=[{"custom_id": "a",
                                                               "params": PARAMS}])
    assert info.value.status_code == 501
    with pytest.raises(anthropic.APIStatusError, match="batches: refuse"):
        await env.claude.messages.batches.retrieve("msgbatch_1")
    assert env.anthropic_fake.batches.batches == {}
    count = await env.claude.messages.count_tokens(model=PARAMS["model"],
                                                   messages=PARAMS["messages"])
    assert count.input_tokens == 7


# --- spellings, on a raw socket -------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("POST", "/openai/v1/batches/", 404),
    ("POST", "/openai/v1/Batches", 404),
    ("POST", "/openai/batches", 404),
    ("POST", "/openai/v1/batches%20", 400),
    ("POST", "/openai/v1/batches%0A", 400),
    ("POST", "/openai/v1/batches.", 400),
    ("POST", "/anthropic/v1/messages/batches/", 404),
    ("POST", "/anthropic/v1/messages/Batches", 404),
    ("POST", "/anthropic/v1/messages/batches%E2%80%8B", 400),
    ("POST", "/azure/openai/Batches?api-version=2024-10-21", 404),
])
async def test_near_misses_of_batch_creation_are_refused(env: Env, method: str, path: str,
                                                         status: int) -> None:
    port = int(env.stack.proxy_url.rsplit(":", 1)[1])
    answer = await send(port, method, path, b'{"input_file_id": "file-1", "requests": []}')
    assert answer.status == status and answer.json()
    assert env.openai_fake.batch_api.batches == {} and env.anthropic_fake.batches.batches == {}
    assert len(env.records("request")) == 1


async def test_listing_batches_passes_on_a_raw_socket(env: Env) -> None:
    port = int(env.stack.proxy_url.rsplit(":", 1)[1])
    answer = await send(port, "GET", "/openai/v1/batches")
    assert answer.status == 200 and answer.json()["data"] == []
    answer = await send(port, "GET", "/anthropic/v1/messages/batches")
    assert answer.status == 200 and answer.json()["data"] == []


# --- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("openai", "maybe", "must be refuse_tools"),
    ("anthropic", "[refuse]", "must be refuse_tools"),
    ("gemini", "refuse", "the batch APIs of other providers are always refused"),
    ("bedrock", "refuse_tools", "the batch APIs of other providers are always refused"),
])
def test_batch_modes_are_checked_at_load(tmp_path: Path, name: str, value: str,
                                         message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"upstreams:\n  {name}:\n    url: 'http://x'\n    batches: {value}\n")
    with pytest.raises(ConfigError, match=message) as info:
        config_mod.load(path, env={})
    assert (info.value.line, info.value.key) == (4, f"upstreams.{name}.batches")


def test_the_default_is_refuse_tools(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstreams:\n  anthropic: {url: 'http://x'}\n")
    upstreams = config_mod.load(path, env={}).upstreams
    assert {upstreams[n].batches.value for n in ("openai", "anthropic")} == {"refuse_tools"}
