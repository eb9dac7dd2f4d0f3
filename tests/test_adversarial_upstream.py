"""A slow upstream peer: whole (non-streaming) answers that arrive in pieces. One
`read(n)` returns only what has arrived so far, so tether once judged the first
piece of a large completion as the whole of it (a 502, "not JSON") — or, for an
error answer, relayed a truncated body. Both are read whole now, up to the limit."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from aiohttp import web

from tests.conftest import POLICY, MakeStack
from tests.fakes import Call as FakeCall
from tests.fakes import Reply, completion


class Trickle:
    """An OpenAI upstream that writes each whole answer in small pieces, slowly."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=self.status,
                                  headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(self.body), 512):
            await resp.write(self.body[i:i + 512])
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "hi"}]
TOOLS: list[openai.types.chat.ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_weather"}},
    {"type": "function", "function": {"name": "drop_database"}}]


async def test_a_whole_answer_in_pieces_is_judged_whole(make_stack: MakeStack) -> None:
    reply = Reply(content="x" * 6000, calls=(FakeCall("get_weather", '{"city": "Oslo"}'),
                                             FakeCall("drop_database", '{"name": "prod"}')))
    body = json.dumps(completion(reply, "m")).encode()
    stack = await make_stack(policy=POLICY, upstreams={"openai": Trickle(200, body)})
    client = stack.client()
    # drop_database is denied with on_deny: error: the verdict needs the whole answer.
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert [d["tool"] for d in stack.decisions()] == ["get_weather", "drop_database"]


async def test_an_error_answer_in_pieces_is_relayed_whole(make_stack: MakeStack) -> None:
    error = {"error": {"message": "slow down " + "y" * 4000, "type": "rate_limit",
                       "code": "rate_limit_exceeded", "param": None}}
    stack = await make_stack(policy=POLICY, upstreams={
        "openai": Trickle(429, json.dumps(error).encode())})
    with pytest.raises(openai.RateLimitError) as e:
        await stack.client().chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.body == error["error"]
