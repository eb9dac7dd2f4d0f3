"""A fake OpenAI Chat Completions server that speaks the real wire format.

Used by `tether demo`, by the tests (tests/fakes re-exports it) and by the
benchmark. Streams are written one SSE event per write, with argument text cut
into fragments of a few characters as the real API does, `usage: null` on
every chunk when usage was asked for, a final usage chunk, and `[DONE]`.

What it answers comes from a script: a function of the request body, or a
queue of replies the test pushes. `RawReply` answers with arbitrary bytes,
for upstreams that misbehave (HTML pages, cut streams).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .fake_flood import Flood, serve_chat
from .fake_history import chat_problem
from .fake_openai_batches import FakeBatchApi

type Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """One choice of an answer: text, tool calls, or both."""

    content: str | None = None
    calls: tuple[Call, ...] = ()
    finish_reason: str | None = None
    legacy_function_call: bool = False

    @property
    def finish(self) -> str:
        if self.finish_reason:
            return self.finish_reason
        if self.calls:
            return "function_call" if self.legacy_function_call else "tool_calls"
        return "stop"


@dataclass(frozen=True, slots=True)
class RawReply:
    """Bytes to send as they are. `cut` drops the connection after the last chunk."""

    status: int = 200
    content_type: str = "application/json"
    chunks: tuple[bytes, ...] = ()
    cut: bool = False


type Turn = Reply | tuple[Reply, ...] | RawReply
type Script = Callable[[Body], Turn]

_ids = itertools.count(1)


def _call_id(call: Call, n: int) -> str:
    return call.id or f"call_{n:024d}"


def completion(turn: Reply | tuple[Reply, ...], model: str, usage: tuple[int, int] = (24, 12)
               ) -> Body:
    replies = turn if isinstance(turn, tuple) else (turn,)
    choices = []
    for ci, reply in enumerate(replies):
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
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def stream_events(turn: Reply | tuple[Reply, ...], model: str, *, include_usage: bool = False,
                  fragment: int = 3, usage: tuple[int, int] = (24, 12)) -> list[bytes]:
    """The SSE events of a streamed answer, one `data:` event per element."""
    replies = turn if isinstance(turn, tuple) else (turn,)
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

    for ci, reply in enumerate(replies):
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
    out = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    if include_usage:
        tail = {**header, "choices": [],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                          "total_tokens": usage[0] + usage[1]}}
        out.append(b"data: " + json.dumps(tail).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class FakeOpenAI:
    """The fake server. Push turns onto `turns`, or give a `script`."""

    script: Script | None = None
    fragment: int = 3
    delay_s: float = 0.0
    first_delay_s: float = 0.0
    turns: deque[Turn | Flood] = field(default_factory=deque)
    requests: list[Body] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    batch_api: FakeBatchApi = field(default_factory=FakeBatchApi)  # files and batches
    mcp: object = None  # fake_responses_mcp.McpState: remote MCP tools, stored responses

    def push(self, *turns: Turn | Flood) -> None:
        self.turns.extend(turns)

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
        for route, what in (("/v1/responses/{id}", "get_response"),
                            ("/v1/responses/{id}/input_items", "input_items"),
                            ("/v1/conversations/{id}/items", "conversation_items")):
            app.router.add_get(route, self._stored(what))
        app.router.add_post("/v1/conversations", self._stored("create_conversation"))
        self.batch_api.add_routes(app)
        return app

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        from .fake_responses import serve  # it builds on this module's Reply and Call

        return await serve(self, request)

    def _stored(self, what: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            from . import fake_responses  # it builds on this module's Reply and Call

            handler: Callable[[FakeOpenAI, web.Request], Awaitable[web.StreamResponse]] = \
                getattr(fake_responses, what)
            return await handler(self, request)
        return handle

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}},
                                     status=404)
        return await self._chat(request)

    def _next(self, body: Body) -> Turn | Flood:
        if self.turns:
            return self.turns.popleft()
        if self.script is not None:
            return self.script(body)
        return Reply(content="Nothing else to do.")

    async def _models(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "tether-tests"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        problem = chat_problem(body)
        if problem is not None:
            return web.json_response({"error": {"message": problem, "type": "invalid_request_error",
                                                "param": "messages", "code": None}}, status=400)
        turn = self._next(body)
        if self.first_delay_s:
            await asyncio.sleep(self.first_delay_s)
        if isinstance(turn, RawReply):
            return await self._raw(request, turn)
        model = str(body.get("model") or request.match_info.get("deployment", "gpt-fake"))
        if isinstance(turn, Flood):
            return await serve_chat(request, turn, model)
        if not body.get("stream"):
            return web.json_response(completion(turn, model))
        options = body.get("stream_options") or {}
        events = stream_events(turn, model, include_usage=bool(options.get("include_usage")),
                               fragment=self.fragment)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await resp.write_eof()
        return resp

    async def _raw(self, request: web.Request, raw: RawReply) -> web.StreamResponse:
        if not raw.cut:
            return web.Response(status=raw.status, body=b"".join(raw.chunks),
                                headers={"Content-Type": raw.content_type})
        resp = web.StreamResponse(status=raw.status, headers={"Content-Type": raw.content_type})
        await resp.prepare(request)
        for piece in raw.chunks:
            await resp.write(piece)
        await asyncio.sleep(0.01)
        assert request.transport is not None
        request.transport.close()
        return resp


def sequence(turns: Sequence[Turn]) -> FakeOpenAI:
    fake = FakeOpenAI()
    fake.push(*turns)
    return fake
