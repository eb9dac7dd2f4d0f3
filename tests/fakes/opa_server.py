"""A fake but honest OPA: the real Data API's shape, decisions from real Rego.

    POST /v1/data/{path}   {"input": ...} -> 200 {"result": ...}, or 200 {} when undefined;
                           400 {"code": "invalid_parameter", "message"} on a body that is
                           not JSON (as OPA answers)
    GET  /health           200 {}

Decisions come from rego-cpp over the given policy directory (rules/opa by
default), queried at the URL's path. Fault knobs, set on the instance between
requests: `down` (the connection is dropped without an answer), `delay`
(seconds before answering), `answer` (a fixed body instead of the policy's:
`{}` for undefined, `{"result": "true"}` ...), `status` (answer this status with
OPA's internal_error body). `inputs` records every input document received.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.opa.embedded import new_interpreter, reply_of
from proxy.opa.settings import read_policy_dir
from proxy.policy.opa import Defined, Failed

RULES = Path(__file__).resolve().parent.parent.parent / "rules" / "opa"


class FakeOpa:
    def __init__(self, policy_dir: Path = RULES) -> None:
        modules, data = read_policy_dir(policy_dir)
        self._rego = new_interpreter(modules, data)
        self.inputs: list[Any] = []    # the JSON input documents, as received
        self.paths: list[str] = []
        self.down = False
        self.delay = 0.0
        self.answer: object | None = None
        self.status = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/data/{path:.*}", self._data)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({})

    async def _data(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more is written on a dropped connection
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as e:
            return web.json_response({"code": "invalid_parameter",
                                      "message": f"body contains malformed input document: {e}"},
                                     status=400)
        if not isinstance(body, dict):
            return web.json_response({"code": "invalid_parameter",
                                      "message": "body must be an object"}, status=400)
        path = request.match_info["path"].strip("/")
        self.paths.append(path)
        self.inputs.append(body.get("input"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"code": "internal_error", "message": "injected failure"},
                                     status=self.status)
        if self.answer is not None:
            return web.json_response(self.answer)
        self._rego.set_input_term(json.dumps(body.get("input")))
        reply = reply_of(self._rego.query("x = data." + path.replace("/", ".")))
        if isinstance(reply, Failed):
            return web.json_response({"code": "internal_error", "message": reply.detail},
                                     status=500)
        if isinstance(reply, Defined):
            return web.json_response({"result": reply.value})
        return web.json_response({})
