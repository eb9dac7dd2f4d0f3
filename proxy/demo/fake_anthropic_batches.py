"""Anthropic's Message Batches API, faked with the real API's rules.

    POST v1/messages/batches              `requests`: 1 to 100,000 of `{custom_id, params}`;
                                          custom_id unique, 1-64 of [A-Za-z0-9_-]; params
                                          need model, max_tokens and messages; else 400
    GET  v1/messages/batches/{id}         the batch; the first look ends it, with
                                          `results_url` naming this server
    GET  v1/messages/batches/{id}/results one JSON line per request (a text-only answer)
    GET  v1/messages/batches              the list

Every answer is a fixed text message; nothing here runs tools.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

type Body = dict[str, Any]

_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ids = itertools.count(1)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeMessageBatches:
    batches: dict[str, Body] = field(default_factory=dict)
    requests: dict[str, list[Body]] = field(default_factory=dict)  # batch id -> its requests

    def add_routes(self, app: web.Application) -> None:
        root = "/v1/messages/batches"
        app.router.add_post(root, self._create)
        app.router.add_get(root, self._list)
        app.router.add_get(f"{root}/{{id}}", self._retrieve)
        app.router.add_get(f"{root}/{{id}}/results", self._results)

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not 1 <= len(requests) <= 100_000:
            return _error(400, "invalid_request_error", "requests: must hold 1 to 100000 items")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id) \
                    or custom_id in seen:
                return _error(400, "invalid_request_error",
                              f"requests.{i}.custom_id: must be unique, 1-64 of [A-Za-z0-9_-]")
            seen.add(custom_id)
            if not isinstance(params, dict) or not all(k in params for k in
                                                       ("model", "max_tokens", "messages")):
                return _error(400, "invalid_request_error",
                              f"requests.{i}.params: model, max_tokens and messages are required")
        batch_id = f"msgbatch_fake{next(_ids)}"
        created = datetime.now(UTC)
        self.requests[batch_id] = requests
        self.batches[batch_id] = {
            "id": batch_id, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0,
                               "canceled": 0, "expired": 0},
            "ended_at": None, "created_at": _now(),
            "expires_at": (created + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
            "archived_at": None, "cancel_initiated_at": None, "results_url": None}
        return web.json_response(self.batches[batch_id])

    async def _list(self, request: web.Request) -> web.Response:
        data = list(self.batches.values())
        return web.json_response({"data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found_error", "No such message batch")
        if batch["processing_status"] == "in_progress":
            total = len(self.requests[batch["id"]])
            batch.update(processing_status="ended", ended_at=_now(),
                         request_counts={"processing": 0, "succeeded": total, "errored": 0,
                                         "canceled": 0, "expired": 0},
                         results_url=f"{request.scheme}://{request.host}/v1/messages/batches/"
                                     f"{batch['id']}/results")
        return web.json_response(batch)

    async def _results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None or batch["processing_status"] != "ended":
            return _error(404, "not_found_error", "No results for this message batch")
        lines = []
        for item in self.requests[batch["id"]]:
            message = {"id": f"msg_fake{next(_ids)}", "type": "message", "role": "assistant",
                       "model": item["params"]["model"], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 4},
                       "content": [{"type": "text", "text": "Nothing else to do."}]}
            lines.append(json.dumps({"custom_id": item["custom_id"],
                                     "result": {"type": "succeeded", "message": message}}))
        return web.Response(body="\n".join(lines).encode() + b"\n",
                            content_type="application/binary")
