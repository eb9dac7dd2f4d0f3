"""A fake tool API (Jira-like, cloud volumes, anything) that records what reaches it.

Used by the tests of `/apis/{name}/...`: the point there is what tether lets
through, so every request is recorded exactly as it arrived (method, raw path
and query, headers, body). It answers with a queued `ToolReply`, or by default
with a small JSON echo (201 for POST, 204 for DELETE, 200 otherwise).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str            # raw, as received
    query: str           # raw
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ToolReply:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    chunks: int = 1      # written in this many pieces, to exercise streaming back


class FakeToolApi:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.replies: deque[ToolReply] = deque()

    def push(self, reply: ToolReply) -> None:
        self.replies.append(reply)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.rel_url.raw_path,
                              request.rel_url.raw_query_string, dict(request.headers), body))
        reply = self.replies.popleft() if self.replies else self._default(request)
        out = web.StreamResponse(status=reply.status, headers=dict(reply.headers))
        if reply.status != 204:
            out.content_type = reply.content_type
        await out.prepare(request)
        if reply.status != 204 and reply.body:
            size = max(1, -(-len(reply.body) // reply.chunks))
            for i in range(0, len(reply.body), size):
                await out.write(reply.body[i:i + size])
        await out.write_eof()
        return out

    @staticmethod
    def _default(request: web.Request) -> ToolReply:
        status = {"POST": 201, "DELETE": 204}.get(request.method, 200)
        echo = {"ok": True, "method": request.method, "path": request.rel_url.raw_path}
        return ToolReply(status, json.dumps(echo).encode())
