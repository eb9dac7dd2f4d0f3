"""A fake Anthropic Messages server that speaks the real wire format.

Streams are written one SSE event per write, each named (`event: ...`) as the
API names it: `message_start`, a `ping`, then per block `content_block_start`,
deltas and `content_block_stop`, then `message_delta` with the stop reason and
usage, and `message_stop`. Tool input arrives as `input_json_delta` fragments
of a few characters, the first one empty as the API sends it, with a `ping` in
the middle, as the API sends them when it keeps a slow stream alive.

A non-streamed answer carries each tool's input as the argument text given,
spliced in verbatim, so tests can send odd spacing or duplicate keys.

What it answers comes from a queue of turns (`push`) or a script. A turn is a
`Reply` (text and tool calls, from fake_openai), a `Message` (blocks of any
kind: thinking, server tools and their results), or a `RawReply` (any bytes).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .fake_anthropic_batches import FakeMessageBatches
from .fake_base import (
    SSE,
    Body,
    Call,
    RawReply,
    Reply,
    ScriptedFake,
    Turn,
    pieces,
    send_raw,
    sse_event,
    write_stream,
)
from .fake_flood import Flood, serve_messages
from .fake_history import anthropic_problem as history_problem
from .fake_provider_tools import anthropic_problem

__all__ = ["Call", "FakeAnthropic", "Message", "RawReply", "Reply", "ServerCall", "Thinking",
           "message", "stream_events"]


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str
    signature: str = "EqQBCkYIBRgCIkBfake"


@dataclass(frozen=True, slots=True)
class ServerCall:
    """A server tool (web search) that Anthropic runs itself; its result block follows it."""

    name: str
    arguments: str
    id: str | None = None
    results: tuple[tuple[str, str], ...] = (("https://example.com/", "Example Domain"),)


type Block = str | Call | Thinking | ServerCall  # a str is a text block


@dataclass(frozen=True, slots=True)
class Message:
    """An answer given block by block."""

    blocks: tuple[Block, ...]
    stop_reason: str | None = None

    @property
    def stop(self) -> str:
        if self.stop_reason:
            return self.stop_reason
        return "tool_use" if any(isinstance(b, Call) for b in self.blocks) else "end_turn"


type AnthropicTurn = Turn | Message | Flood
type Script = Callable[[Body], AnthropicTurn]

_ids = itertools.count(1)
USAGE = {"input_tokens": 24, "output_tokens": 12, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0}


def as_message(turn: Reply | Message) -> Message:
    if isinstance(turn, Message):
        return turn
    blocks: tuple[Block, ...] = ((turn.content,) if turn.content else ()) + turn.calls
    return Message(blocks, turn.finish_reason)


def _tool_id(call: Call | ServerCall, n: int) -> str:
    prefix = "srvtoolu" if isinstance(call, ServerCall) else "toolu"
    return call.id or f"{prefix}_{n:024d}"


def _results(call: ServerCall, n: int) -> Body:
    return {"type": "web_search_tool_result", "tool_use_id": _tool_id(call, n), "content": [
        {"type": "web_search_result", "url": url, "title": title,
         "encrypted_content": "EqgfCioIARgBIiQ3YTAw", "page_age": None}
        for url, title in call.results]}


def _header(model: str) -> Body:
    return {"id": f"msg_fake{next(_ids):020d}", "type": "message", "role": "assistant",
            "model": model}


def message(turn: Reply | Message, model: str) -> bytes:
    """A whole answer's body, each tool's input spliced in as its argument text."""
    msg = as_message(turn)
    content: list[Body] = []
    spliced: list[str] = []
    for n, block in enumerate(msg.blocks):
        if isinstance(block, str):
            content.append({"type": "text", "text": block})
        elif isinstance(block, Thinking):
            content.append({"type": "thinking", "thinking": block.text,
                            "signature": block.signature})
        else:
            kind = "server_tool_use" if isinstance(block, ServerCall) else "tool_use"
            content.append({"type": kind, "id": _tool_id(block, n), "name": block.name,
                            "input": f"\x00ARGS{len(spliced)}\x00"})
            spliced.append(block.arguments or "{}")
            if isinstance(block, ServerCall):
                content.append(_results(block, n))
    text = json.dumps({**_header(model), "content": content, "stop_reason": msg.stop,
                       "stop_sequence": None, "usage": USAGE}, ensure_ascii=False)
    for i, raw in enumerate(spliced):
        text = text.replace(json.dumps(f"\x00ARGS{i}\x00"), raw, 1)
    return text.encode()


def _sse(kind: str, body: Body) -> bytes:
    return sse_event(kind, json.dumps(body, ensure_ascii=False))


def stream_events(turn: Reply | Message, model: str, *, fragment: int = 3) -> list[bytes]:
    """The SSE events of a streamed answer, one element per event."""
    msg = as_message(turn)
    start = {**_header(model), "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**USAGE, "output_tokens": 1}}
    out = [_sse("message_start", {"type": "message_start", "message": start}),
           _sse("ping", {"type": "ping"})]
    index = 0

    def block(first: Body, deltas: list[Body], pings_at: int = -1) -> None:
        nonlocal index
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": index,
                                                "content_block": first}))
        for i, delta in enumerate(deltas):
            if i == pings_at:
                out.append(_sse("ping", {"type": "ping"}))
            out.append(_sse("content_block_delta", {"type": "content_block_delta",
                                                    "index": index, "delta": delta}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    for n, b in enumerate(msg.blocks):
        if isinstance(b, str):
            block({"type": "text", "text": ""},
                  [{"type": "text_delta", "text": p} for p in pieces(b, 4)])
        elif isinstance(b, Thinking):
            block({"type": "thinking", "thinking": "", "signature": ""},
                  [{"type": "thinking_delta", "thinking": p} for p in pieces(b.text, 5)]
                  + [{"type": "signature_delta", "signature": b.signature}])
        else:
            kind = "server_tool_use" if isinstance(b, ServerCall) else "tool_use"
            deltas = [""] + pieces(b.arguments, fragment)
            block({"type": kind, "id": _tool_id(b, n), "name": b.name, "input": {}},
                  [{"type": "input_json_delta", "partial_json": p} for p in deltas],
                  pings_at=len(deltas) // 2)
            if isinstance(b, ServerCall):
                block(_results(b, n), [])
    out.append(_sse("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": msg.stop, "stop_sequence": None},
        "usage": {"output_tokens": USAGE["output_tokens"]}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return out


@dataclass
class FakeAnthropic(ScriptedFake[AnthropicTurn]):
    """The fake server. Push turns with `push`, or give a `script`."""

    fragment: int = 3
    delay_s: float = 0.0
    batches: FakeMessageBatches = field(default_factory=FakeMessageBatches)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        self.batches.add_routes(app)
        return app

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        return web.json_response({"input_tokens": 7 * len(body.get("messages") or [])})

    async def _models(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"data": [
            {"type": "model", "id": "claude-fake", "display_name": "Claude Fake",
             "created_at": "2025-01-01T00:00:00Z"}],
            "has_more": False, "first_id": "claude-fake", "last_id": "claude-fake"})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._record(request, body)
        problem = anthropic_problem(body) or history_problem(body)
        if problem is not None:
            return web.json_response({"type": "error", "error": {
                "type": "invalid_request_error", "message": problem}}, status=400)
        turn = self._next(body)
        if isinstance(turn, RawReply):
            return await send_raw(request, turn)
        if isinstance(turn, tuple):
            raise TypeError("the Messages API answers with one message, not several choices")
        model = str(body.get("model") or "claude-fake")
        if isinstance(turn, Flood):
            return await serve_messages(request, turn, model)
        if not body.get("stream"):
            return web.Response(body=message(turn, model), content_type="application/json")
        return await write_stream(request, stream_events(turn, model, fragment=self.fragment),
                                  SSE, delay_s=self.delay_s)
