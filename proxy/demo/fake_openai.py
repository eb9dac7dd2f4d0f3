"""A fake OpenAI Chat Completions server that speaks the real wire format.

Used by `tether demo`, by the tests (tests/fakes re-exports it) and by the
benchmark. Streams are written one SSE event per write, with argument text cut
into fragments of a few characters as the real API does, `usage: null` on
every chunk when usage was asked for, a final usage chunk, and `[DONE]`.

What it answers comes from a script: a function of the request body, or a
queue of replies the test pushes. `RawReply` answers with arbitrary bytes,
for upstreams that misbehave (HTML pages, cut streams). The script's types and
the HTTP plumbing are fake_base's, shared with the other fakes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from . import fake_responses
from .fake_base import (
    SSE,
    Body,
    Call,
    RawReply,
    Reply,
    ScriptedFake,
    Turn,
    pieces,
    replies,
    send_raw,
    sse_data,
    write_stream,
)
from .fake_flood import Flood, serve_chat
from .fake_history import chat_problem
from .fake_openai_batches import FakeBatchApi

__all__ = ["Body", "Call", "FakeOpenAI", "RawReply", "Reply", "Turn", "completion", "sequence",
           "stream_events"]

type Script = Callable[[Body], Turn]

_ids = itertools.count(1)


def _call_id(call: Call, n: int) -> str:
    return call.id or f"call_{n:024d}"


def completion(turn: Reply | tuple[Reply, ...], model: str, usage: tuple[int, int] = (24, 12)
               ) -> Body:
    choices = []
    for ci, reply in enumerate(replies(turn)):
        message: Body = {"role": "assistant", "content": reply.content, "refusal": None,
                         "annotations": []}
        if reply.calls and reply.legacy_function_call:
            c = reply.calls[0]
            message["function_call"] = {"name": c.name, "arguments": c.arguments}
        elif reply.calls:
            message["tool_calls"] = [
                {"id": _call_id(c, i), "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(reply.calls)
            ]
        choices.append({"index": ci, "message": message, "logprobs": None,
                        "finish_reason": reply.finish})
    return {
        "id": f"chatcmpl-fake{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": usage[0] + usage[1]},
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _pieces(text: str, size: int) -> list[str]:
    return pieces(text, size) or [""]  # an empty argument text is one empty delta


def stream_events(turn: Reply | tuple[Reply, ...], model: str, *, include_usage: bool = False,
                  fragment: int = 3, usage: tuple[int, int] = (24, 12)) -> list[bytes]:
    """The SSE events of a streamed answer, one `data:` event per element."""
    header: Body = {"id": f"chatcmpl-fake{next(_ids)}", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": model, "service_tier": "default",
                    "system_fingerprint": "fp_fake"}
    events: list[Body] = []

    def chunk(ci: int, delta: Body, finish: str | None = None) -> None:
        body: Body = {**header, "choices": [{"index": ci, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        events.append(body)

    for ci, reply in enumerate(replies(turn)):
        first: Body = {"role": "assistant", "content": "" if reply.content else None,
                       "refusal": None}
        chunk(ci, first)
        for piece in _pieces(reply.content or "", 4) if reply.content else []:
            chunk(ci, {"content": piece})
        for i, c in enumerate(reply.calls):
            if reply.legacy_function_call:
                chunk(ci, {"function_call": {"name": c.name, "arguments": ""}})
                for piece in _pieces(c.arguments, fragment):
                    chunk(ci, {"function_call": {"arguments": piece}})
                break
            chunk(ci, {"tool_calls": [{"index": i, "id": _call_id(c, i), "type": "function",
                                       "function": {"name": c.name, "arguments": ""}}]})
            for piece in _pieces(c.arguments, fragment):
                chunk(ci, {"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        chunk(ci, {}, reply.finish)
    out = [sse_data(e) for e in events]
    if include_usage:
        tail = {**header, "choices": [],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                          "total_tokens": usage[0] + usage[1]}}
        out.append(sse_data(tail))
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class FakeOpenAI(ScriptedFake[Turn | Flood]):
    """The fake server. Push turns onto `turns`, or give a `script`."""

    fragment: int = 3
    delay_s: float = 0.0
    first_delay_s: float = 0.0
    batch_api: FakeBatchApi = field(default_factory=FakeBatchApi)  # files and batches
    mcp: object = None  # fake_responses_mcp.McpState: remote MCP tools, stored responses

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # Azure OpenAI's spellings of the same endpoint.
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        app.router.add_post("/openai/v1/chat/completions", self._chat)
        # The Responses API, and Azure's spellings of it (fake_responses serves them).
        for path in ("/v1/responses", "/openai/v1/responses", "/openai/responses"):
            app.router.add_post(path, self._responses)
        # Stored responses and conversations (fake_responses), read back as stored.
        for route, read in (("/v1/responses/{id}", fake_responses.get_response),
                            ("/v1/responses/{id}/input_items", fake_responses.input_items),
                            ("/v1/conversations/{id}/items", fake_responses.conversation_items)):
            app.router.add_get(route, self._stored(read))
        app.router.add_post("/v1/conversations",
                            self._stored(fake_responses.create_conversation))
        self.batch_api.add_routes(app)
        return app

    async def _turn(self, body: Body) -> Turn | Flood:
        """The next turn, `first_delay_s` after the request (a slow first token)."""
        turn = self._next(body)
        if self.first_delay_s:
            await asyncio.sleep(self.first_delay_s)
        return turn

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await fake_responses.serve(self, request)

    def _stored(self, handler: Callable[[FakeOpenAI, web.Request], Awaitable[web.Response]]
                ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await handler(self, request)
        return handle

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}},
                                     status=404)
        return await self._chat(request)

    async def _models(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "tether-tests"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._record(request, body)
        problem = chat_problem(body)
        if problem is not None:
            return web.json_response({"error": {"message": problem, "type": "invalid_request_error",
                                                "param": "messages", "code": None}}, status=400)
        turn = await self._turn(body)
        if isinstance(turn, RawReply):
            return await send_raw(request, turn)
        model = str(body.get("model") or request.match_info.get("deployment", "gpt-fake"))
        if isinstance(turn, Flood):
            return await serve_chat(request, turn, model)
        if not body.get("stream"):
            return web.json_response(completion(turn, model))
        options = body.get("stream_options") or {}
        events = stream_events(turn, model, include_usage=bool(options.get("include_usage")),
                               fragment=self.fragment)
        return await write_stream(request, events, SSE, delay_s=self.delay_s)


def sequence(turns: Sequence[Turn]) -> FakeOpenAI:
    fake = FakeOpenAI()
    fake.push(*turns)
    return fake
