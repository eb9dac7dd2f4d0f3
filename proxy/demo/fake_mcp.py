"""A small, honest MCP server over Streamable HTTP (protocol 2025-03-26 .. 2025-11-25).

Used by the tests of `/mcp/{name}`: the point there is what tether lets
through, so every JSON-RPC message that reaches it is recorded. It speaks the
transport as the spec has it: one endpoint; POST with `Accept: application/json,
text/event-stream`; `initialize` opens a session named by `Mcp-Session-Id`, which
every later request must carry (400 without it, 404 when unknown); requests are
answered with JSON or, when `sse` is set, with an SSE stream (one `message`
event per response, written one event per write); notifications and responses
get 202; GET opens the server-to-client stream (pings until DELETE ends the
session); batches are accepted for 2025-03-26 only.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
TOOLS: list[dict[str, object]] = [
    {"name": name, "description": f"The {name} tool",
     "inputSchema": {"type": "object", "additionalProperties": True}}
    for name in ("get_weather", "delete_volume", "resize_volume", "drop_database")
]


@dataclass
class Session:
    version: str
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeMcp:
    def __init__(self, *, sse: bool = False, path: str = "/") -> None:
        self.sse = sse
        self.path = path
        self.seen: list[dict[str, Any]] = []      # every JSON-RPC message received
        self.http: list[tuple[str, dict[str, str]]] = []
        self.sessions: dict[str, Session] = {}
        self.ping_s = 0.2

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("POST", self.path, self.post)
        app.router.add_route("GET", self.path, self.get)
        app.router.add_route("DELETE", self.path, self.delete)
        return app

    def calls(self) -> list[str]:
        """The tools that were called (what tether let through)."""
        return [str(m["params"]["name"]) for m in self.seen if m.get("method") == "tools/call"]

    def _session(self, request: web.Request) -> Session | web.Response:
        sid = request.headers.get("mcp-session-id")
        if not sid:
            return web.json_response(_error(None, -32600, "missing Mcp-Session-Id"), status=400)
        session = self.sessions.get(sid)
        if session is None:
            return web.json_response(_error(None, -32600, "unknown session"), status=404)
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in VERSIONS:
            return web.json_response(_error(None, -32600, f"unsupported version {version}"),
                                     status=400)
        return session

    async def post(self, request: web.Request) -> web.StreamResponse:
        self.http.append(("POST", dict(request.headers)))
        accept = request.headers.get("accept", "")
        if "application/json" not in accept or "text/event-stream" not in accept:
            return web.json_response(_error(None, -32600, "Accept must list application/json "
                                            "and text/event-stream"), status=406)
        try:
            doc = json.loads(await request.read())
        except ValueError:
            return web.json_response(_error(None, -32700, "parse error"), status=400)
        batch = isinstance(doc, list)
        messages = doc if batch else [doc]
        self.seen.extend(messages)
        headers: dict[str, str] = {}
        if any(m.get("method") == "initialize" for m in messages):
            sid = uuid.uuid4().hex
            offered = messages[0].get("params", {}).get("protocolVersion")
            self.sessions[sid] = Session(offered if offered in VERSIONS else VERSIONS[-1])
            headers["Mcp-Session-Id"] = sid
        else:
            session = self._session(request)
            if isinstance(session, web.Response):
                return session
            if batch and session.version != "2025-03-26":
                return web.json_response(_error(None, -32600, "no batches"), status=400)
        answers = [self._answer(m) for m in messages if "method" in m and "id" in m]
        if not answers:
            return web.Response(status=202, headers=headers)
        if not self.sse:
            return web.json_response(answers if batch else answers[0], headers=headers)
        out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
        await out.prepare(request)
        for answer in answers:
            await out.write(f"id: {uuid.uuid4().hex}\nevent: message\n"
                            f"data: {json.dumps(answer)}\n\n".encode())
        await out.write_eof()
        return out

    def _answer(self, message: dict[str, object]) -> dict[str, object]:
        rpc_id = message["id"]
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        method = message["method"]
        if method == "initialize":
            offered = params.get("protocolVersion")
            return _result(rpc_id, {
                "protocolVersion": offered if offered in VERSIONS else VERSIONS[-1],
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "fake-mcp", "version": "1.0.0"}})
        if method == "ping":
            return _result(rpc_id, {})
        if method == "tools/list":
            return _result(rpc_id, {"tools": TOOLS})
        if method == "tools/call":
            name, args = params.get("name"), params.get("arguments", {})
            if name not in {t["name"] for t in TOOLS}:
                return _error(rpc_id, -32602, f"unknown tool {name}")
            text = f"{name} ran with {json.dumps(args, sort_keys=True)}"
            return _result(rpc_id, {"content": [{"type": "text", "text": text}],
                                    "isError": False})
        return _error(rpc_id, -32601, f"method not found: {method}")

    async def get(self, request: web.Request) -> web.StreamResponse:
        self.http.append(("GET", dict(request.headers)))
        if "text/event-stream" not in request.headers.get("accept", ""):
            return web.Response(status=406)
        session = self._session(request)
        if isinstance(session, web.Response):
            return session
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
        await out.prepare(request)
        try:
            while not session.closed.is_set():
                await out.write(b": ping\n\n")
                try:
                    await asyncio.wait_for(session.closed.wait(), self.ping_s)
                except TimeoutError:
                    pass
            await out.write_eof()
        except ConnectionResetError:
            pass
        return out

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self.http.append(("DELETE", dict(request.headers)))
        session = self._session(request)
        if isinstance(session, web.Response):
            return session
        session.closed.set()
        self.sessions.pop(request.headers["mcp-session-id"], None)
        return web.Response(status=200)


def _result(rpc_id: object, result: dict[str, object]) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def _error(rpc_id: object, code: int, message: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}
