"""What every fake LLM upstream shares: the script, the record, the HTTP plumbing.

A fake answers each request from a queue of turns a test pushes (`push`), else
from its `script` (a function of the request body), else with one line of text;
it records every request body and its headers. The script speaks in `Reply`
(text and tool calls), `Call` and `RawReply` (bytes sent as they are, or cut
off), whatever the wire format. This module holds that vocabulary and the
plumbing: a stream written one piece per write, raw and cut answers, SSE
framing, an app served on a loopback port. Each fake_<provider>.py holds only
its wire format.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from aiohttp import web

type Body = dict[str, Any]

SSE = {"Content-Type": "text/event-stream; charset=utf-8"}


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
IDLE = Reply(content="Nothing else to do.")  # what a fake says when nothing was scripted


@dataclass
class ScriptedFake[T]:
    """The part of a fake server that is not its wire format. `T`: what one turn may be."""

    _: KW_ONLY
    script: Callable[[Body], T] | None = None
    turns: deque[T] = field(default_factory=deque)
    requests: list[Body] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def push(self, *turns: T) -> None:
        self.turns.extend(turns)

    def _next(self, body: Body) -> T | Reply:
        if self.turns:
            return self.turns.popleft()
        if self.script is not None:
            return self.script(body)
        return IDLE

    def _record(self, request: web.Request, body: Body) -> None:
        self.requests.append(body)
        self.headers.append(dict(request.headers))


def pieces(text: str, size: int) -> list[str]:
    """`text` cut as an API streams it: `size` characters a piece, none for no text."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def replies(turn: Reply | tuple[Reply, ...]) -> tuple[Reply, ...]:
    """The choices (candidates) of a turn; one Reply is one choice."""
    return turn if isinstance(turn, tuple) else (turn,)


def sse_data(body: object) -> bytes:
    """An unnamed SSE event (OpenAI Chat Completions)."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def sse_event(kind: str, data: str) -> bytes:
    """A named SSE event (Anthropic, the Responses API)."""
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def write_stream(request: web.Request, chunks: Iterable[bytes], headers: Mapping[str, str],
                       *, delay_s: float = 0.0) -> web.StreamResponse:
    """A 200 answer written one chunk per write, `delay_s` apart."""
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk)
        if delay_s:
            await asyncio.sleep(delay_s)
    await resp.write_eof()
    return resp


async def send_raw(request: web.Request, raw: RawReply) -> web.StreamResponse:
    """A RawReply: its bytes whole, or written piece by piece and then the connection cut."""
    headers = {"Content-Type": raw.content_type}
    if not raw.cut:
        return web.Response(status=raw.status, body=b"".join(raw.chunks), headers=headers)
    resp = web.StreamResponse(status=raw.status, headers=headers)
    await resp.prepare(request)
    for piece in raw.chunks:
        await resp.write(piece)
    await asyncio.sleep(0.01)
    assert request.transport is not None
    request.transport.close()
    return resp


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0
                ) -> tuple[web.AppRunner, int]:
    """`app` served on `host`; the port it got (`port=0`: any free one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


async def serve_until_stopped(app: web.Application, announce: str = "fake on") -> None:
    """A fake in a process of its own (the benchmarks' `--serve-fake`): prints
    `<announce> <port>` once it listens, and stops on SIGINT or SIGTERM."""
    runner, port = await serve(app)
    print(f"{announce} {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
