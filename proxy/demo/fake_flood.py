"""A streamed tool call with a very large argument, for the fake upstreams.

`Flood` is a turn the fake OpenAI (Chat Completions and Responses) and Anthropic
servers accept like a `Reply`: one call of `write_file` whose `content` is `size`
bytes of hex, sent in argument deltas of `piece` bytes as fast as the reader takes
them. The delta is built once, so a 100 MB flood costs the fake almost nothing; it
counts what it wrote (`sent`) and stops when the reader goes away, which is how a
test sees that tether stopped reading. With `pause_at`, it stops writing once that
many argument bytes are out, sets `paused` and waits for `resume`: a test can ask
tether other things while it holds a half-sent call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

_HEX = "0123456789abcdef"


@dataclass
class Flood:
    size: int = 100 * 1024 * 1024   # bytes of argument text
    piece: int = 64 * 1024          # bytes per argument delta
    name: str = "write_file"
    sent: int = 0                   # argument bytes written so far
    finished: bool = False          # the whole answer was written
    cut: bool = False               # the reader went away first
    pause_at: int | None = None     # argument bytes after which to wait for `resume`
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # finished or cut

    def head(self) -> str:
        return '{"path": "blob.hex", "content": "'

    def pieces(self) -> Iterator[str]:
        """The argument text: head, `size` bytes in `piece`-sized deltas, the closing."""
        yield self.head()
        chunk = (_HEX * (self.piece // len(_HEX) + 1))[:self.piece]
        left = self.size
        while left > 0:
            n = min(left, self.piece)
            yield chunk if n == self.piece else chunk[:n]
            left -= n
        yield '"}'

    def arguments(self) -> str:
        """The whole argument text (for the events that repeat it, at the very end)."""
        return "".join(self.pieces())


async def _write_all(request: web.Request, flood: Flood, events: Iterator[bytes]
                     ) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    try:
        for event in events:
            await resp.write(event)
            if flood.pause_at is not None and flood.sent >= flood.pause_at \
                    and not flood.paused.is_set():
                flood.paused.set()
                await flood.resume.wait()
        await resp.write_eof()
        flood.finished = True
    except ConnectionError:  # the reader (tether) closed the connection
        flood.cut = True
    finally:
        flood.ended.set()
    return resp


def _data(body: object) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def serve_chat(request: web.Request, flood: Flood, model: str) -> web.StreamResponse:
    head = {"id": "chatcmpl-flood", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        return _data({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]})

    def events() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": None})
        yield chunk({"tool_calls": [{"index": 0, "id": "call_flood", "type": "function",
                                     "function": {"name": flood.name, "arguments": ""}}]})
        for piece in flood.pieces():
            event = chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            flood.sent += len(piece)
            yield event
        yield chunk({}, "tool_calls")
        yield b"data: [DONE]\n\n"

    return await _write_all(request, flood, events())


async def serve_responses(request: web.Request, flood: Flood, model: str
                          ) -> web.StreamResponse:
    seq = iter(range(1 << 62))
    item = {"type": "function_call", "id": "fc_flood", "call_id": "call_flood",
            "name": flood.name, "arguments": "", "status": "in_progress"}
    response: dict[str, object] = {"id": "resp_flood", "object": "response", "model": model,
                                   "status": "in_progress", "output": []}

    def event(kind: str, body: dict[str, object]) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": next(seq), **body})
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def events() -> Iterator[bytes]:
        yield event("response.created", {"response": response})
        yield event("response.output_item.added", {"output_index": 0, "item": item})
        for piece in flood.pieces():
            delta = event("response.function_call_arguments.delta",
                          {"item_id": "fc_flood", "output_index": 0, "delta": piece})
            flood.sent += len(piece)
            yield delta
        text = flood.arguments()
        done = {**item, "arguments": text, "status": "completed"}
        yield event("response.function_call_arguments.done",
                    {"item_id": "fc_flood", "output_index": 0, "arguments": text})
        yield event("response.output_item.done", {"output_index": 0, "item": done})
        yield event("response.completed", {"response": {**response, "status": "completed",
                                                        "output": [done]}})

    return await _write_all(request, flood, events())


async def serve_messages(request: web.Request, flood: Flood, model: str
                         ) -> web.StreamResponse:
    def event(kind: str, body: dict[str, object]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    usage = {"input_tokens": 20, "output_tokens": 1}

    def events() -> Iterator[bytes]:
        yield event("message_start", {"message": {
            "id": "msg_flood", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
        yield event("content_block_start", {"index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_flood", "name": flood.name, "input": {}}})
        for piece in flood.pieces():
            delta = event("content_block_delta", {"index": 0, "delta": {
                "type": "input_json_delta", "partial_json": piece}})
            flood.sent += len(piece)
            yield delta
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": {"stop_reason": "tool_use",
                                                "stop_sequence": None}, "usage": usage})
        yield event("message_stop", {})

    return await _write_all(request, flood, events())
