"""OpenAI's Files and Batch APIs, faked with the real API's rules.

    POST files                    multipart `purpose` + `file`; any purpose the API knows
    GET  files/{id}/content       the bytes as uploaded (or a finished batch's output)
    POST batches                  `input_file_id` (a file of purpose `batch`), `endpoint`,
                                  `completion_window: 24h`; every line of the input must be
                                  JSON with `custom_id`, `method: POST`, the batch's `url`
                                  and a `body` object, else 400
    GET  batches/{id}             the batch; the first look runs it (`completed`), writing
                                  an output file with one answer per line
    GET  batches                  the list

Served under `/v1/` and under Azure's `/openai/` (with `api-version`), whose line
URLs drop the `/v1`. Answers are fixed: an embedding, or a text-only chat answer.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

type Body = dict[str, Any]

PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
ENDPOINTS = {"/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
             "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos"}
AZURE_ENDPOINTS = {"/chat/completions", "/embeddings", "/responses"} | ENDPOINTS
_ids = itertools.count(1)


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": param, "code": None}}, status=status)


@dataclass
class FakeBatchApi:
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (purpose, bytes)
    batches: dict[str, Body] = field(default_factory=dict)

    def add_routes(self, app: web.Application) -> None:
        for root in ("/v1", "/openai", "/openai/v1"):
            app.router.add_post(f"{root}/files", self._upload)
            app.router.add_get(f"{root}/files/{{id}}/content", self._content)
            app.router.add_post(f"{root}/batches", self._create)
            app.router.add_get(f"{root}/batches", self._list)
            app.router.add_get(f"{root}/batches/{{id}}", self._retrieve)

    def add_file(self, purpose: str, data: bytes) -> str:
        """A file as if uploaded some other way (another client, the Uploads API)."""
        file_id = f"file-fake{next(_ids)}"
        self.files[file_id] = (purpose, data)
        return file_id

    @staticmethod
    def _azure_without_version(request: web.Request) -> web.Response | None:
        if request.path.startswith("/openai/") and not request.path.startswith("/openai/v1/") \
                and "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}},
                                     status=404)
        return None

    async def _upload(self, request: web.Request) -> web.Response:
        if (missing := self._azure_without_version(request)) is not None:
            return missing
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            return _error(400, f"Invalid value for 'purpose': {purpose!r}", "purpose")
        if not isinstance(upload, web.FileField):
            return _error(400, "'file' is a required property", "file")
        data = upload.file.read()
        file_id = self.add_file(purpose, data)
        return web.json_response({
            "id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": upload.filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None})

    async def _content(self, request: web.Request) -> web.Response:
        if (missing := self._azure_without_version(request)) is not None:
            return missing
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['id']}", "id")
        return web.Response(body=found[1], content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        if (missing := self._azure_without_version(request)) is not None:
            return missing
        body = await request.json()
        azure = request.path.startswith("/openai/")
        endpoint = body.get("endpoint")
        if endpoint not in (AZURE_ENDPOINTS if azure else ENDPOINTS):
            return _error(400, f"Invalid value for 'endpoint': {endpoint!r}", "endpoint")
        if body.get("completion_window") != "24h":
            return _error(400, "'completion_window' must be '24h'", "completion_window")
        found = self.files.get(str(body.get("input_file_id")))
        if found is None or found[0] != "batch":
            return _error(400, "'input_file_id' must name a file uploaded with purpose "
                               "'batch'", "input_file_id")
        lines = [line for line in found[1].split(b"\n") if line.strip()]
        for n, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                return _error(400, f"line {n} of the input file is not valid JSON")
            if not (isinstance(entry, dict) and isinstance(entry.get("custom_id"), str)
                    and entry.get("method") == "POST" and entry.get("url") == endpoint
                    and isinstance(entry.get("body"), dict)):
                return _error(400, f"line {n} of the input file is not a request for {endpoint}")
        batch_id = f"batch_fake{next(_ids)}"
        now = int(time.time())
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h",
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata")}
        return web.json_response(self.batches[batch_id])

    async def _list(self, request: web.Request) -> web.Response:
        data = list(self.batches.values())
        return web.json_response({"object": "list", "data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, f"No batch found with id '{request.match_info['id']}'", "id")
        if batch["status"] == "validating":
            self._run(batch)
        return web.json_response(batch)

    def _run(self, batch: Body) -> None:
        _, data = self.files[batch["input_file_id"]]
        out = []
        for line in (json.loads(x) for x in data.split(b"\n") if x.strip()):
            out.append(json.dumps({"id": f"batch_req_{next(_ids)}", "custom_id": line["custom_id"],
                                   "response": {"status_code": 200, "request_id": "req_fake",
                                                "body": _answer(batch["endpoint"], line["body"])},
                                   "error": None}))
        batch["output_file_id"] = self.add_file("batch_output", "\n".join(out).encode() + b"\n")
        batch["status"], batch["completed_at"] = "completed", int(time.time())
        total = batch["request_counts"]["total"]
        batch["request_counts"] = {"total": total, "completed": total, "failed": 0}


def _answer(endpoint: str, body: Body) -> Body:
    model = str(body.get("model", "fake"))
    if endpoint.endswith("embeddings"):
        return {"object": "list", "model": model, "usage": {"prompt_tokens": 2, "total_tokens": 2},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]}
    from .fake_openai import Reply, completion

    return completion(Reply(content="Nothing else to do."), model)
