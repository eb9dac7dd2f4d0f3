"""The official openai SDK's AzureOpenAI client through tether's /azure/ routes."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.test_e2e_openai import MESSAGES, ODD_ARGS, PROD_DELETE, TOOLS, collect


@pytest.fixture
async def azure(make_stack: MakeStack) -> Stack:
    return await make_stack(upstreams={"azure": FakeOpenAI()})


def client(stack: Stack) -> openai.AsyncAzureOpenAI:
    c = openai.AsyncAzureOpenAI(azure_endpoint=stack.proxy_url + "/azure", api_key="azure-key",
                                api_version="2024-10-21", max_retries=0)
    stack.clients.append(c)
    return c


def fake(stack: Stack) -> FakeOpenAI:
    upstream = stack.fakes["azure"]
    assert isinstance(upstream, FakeOpenAI)
    return upstream


@pytest.mark.parametrize("stream", [False, True])
async def test_deployment_route_denies_and_keeps(azure: Stack, stream: bool) -> None:
    fake(azure).push(Reply(content="ok", calls=(Call("get_weather", ODD_ARGS), PROD_DELETE)))
    c = client(azure)
    if stream:
        s = await c.chat.completions.create(model="my-deployment", messages=MESSAGES,
                                            tools=TOOLS, stream=True)
        text, by_index, _ = await collect(s)
        calls = [(n, a) for _, n, a in by_index.values()]
    else:
        r = await c.chat.completions.create(model="my-deployment", messages=MESSAGES, tools=TOOLS)
        text = r.choices[0].message.content or ""
        calls = [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls
                 or [] if t.type == "function"]
    assert calls == [("get_weather", ODD_ARGS)]
    assert "no-prod-deletes" in text
    sent = fake(azure).headers[-1]
    assert "api-key" not in {k.lower() for k in sent}  # the agent's own key is stripped
    records = azure.decisions()
    assert [(r["provider"], r["model"], r["action"]) for r in records] == [
        ("azure", "my-deployment", "allow"), ("azure", "my-deployment", "deny")]


async def test_v1_route(azure: Stack) -> None:
    fake(azure).push(Reply(calls=(PROD_DELETE,)))
    c = openai.AsyncOpenAI(base_url=azure.proxy_url + "/azure/openai/v1", api_key="k",
                           max_retries=0)
    azure.clients.append(c)
    r = await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


async def test_on_deny_error_is_403(azure: Stack) -> None:
    fake(azure).push(Reply(calls=(Call("drop_database", "{}"),)))
    with pytest.raises(openai.PermissionDeniedError, match="never allowed"):
        await client(azure).chat.completions.create(model="d", messages=MESSAGES, tools=TOOLS)


async def test_tether_key_replaces_the_agents(make_stack: MakeStack,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_AZURE_KEY", "tether-held")
    stack = await make_stack(upstreams={"azure": FakeOpenAI()},
                             extra="upstreams:\n  azure: {url: 'http://unused', "
                                   "api_key_env: TETHER_TEST_AZURE_KEY}\n")
    fake(stack).push(Reply(content="hi"))
    await client(stack).chat.completions.create(model="d", messages=MESSAGES)
    assert fake(stack).headers[-1]["api-key"] == "tether-held"


async def test_azure_without_upstream_is_404(stack: Stack) -> None:
    c = openai.AsyncAzureOpenAI(azure_endpoint=stack.proxy_url + "/azure", api_key="k",
                                api_version="2024-10-21", max_retries=0)
    stack.clients.append(c)
    with pytest.raises(openai.NotFoundError, match="no 'azure' upstream"):
        await c.chat.completions.create(model="d", messages=MESSAGES)
