"""The Responses API side of the fake OpenAI server: bodies and streams from `Reply`.

`FakeOpenAI` serves `POST /v1/responses` (and Azure's spellings) from the same
queue of turns as chat. A `Reply` becomes output items in order: a `message`
for its content, then one item per call: `function_call` for a `Call`,
`custom_tool_call` for a `CustomCall` (its `arguments` is the free-text input),
and a built-in item such as `web_search_call` for a `ServerCall`.

Streams are what the API sends: one SSE message per write, `event: <type>` and
`data:` holding the same `type` and a `sequence_number` from 0, text deltas of
a few characters, argument deltas of `fragment` characters, and no `[DONE]`.
A `finish_reason` of `length` or `content_filter` cuts the last item in half and
ends the stream `response.incomplete`; `failed` ends it `response.failed`.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from .fake_base import (
    SSE,
    Body,
    Call,
    RawReply,
    Reply,
    pieces,
    replies,
    send_raw,
    sse_event,
    write_stream,
)
from .fake_flood import Flood, serve_responses
from .fake_provider_tools import responses_problem
from .fake_responses_mcp import McpCall, McpState

if TYPE_CHECKING:
    from .fake_openai import FakeOpenAI

_ids = itertools.count(1)
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True, slots=True)
class CustomCall(Call):
    """A call to a custom (freeform) tool; `arguments` is its raw input text."""


@dataclass(frozen=True, slots=True)
class ServerCall(Call):
    """An item of a tool OpenAI runs itself: `name` is the item type (`web_search_call`),
    `arguments` JSON of its other fields."""


def _items(turn: Reply | tuple[Reply, ...], n: int, request: Body | None = None,
           mcp: McpState | None = None) -> list[Body]:
    """Every output item, complete. Raises McpRefused where the API would refuse a
    model's MCP call (fake_responses_mcp)."""
    items: list[Body] = []
    for reply in replies(turn):
        if reply.content is not None:
            items.append({"id": f"msg_{n}_{len(items)}", "type": "message", "status": "completed",
                          "role": "assistant", "content": [
                              {"type": "output_text", "annotations": [], "logprobs": [],
                               "text": reply.content}]})
        for i, call in enumerate(reply.calls):
            call_id = call.id or f"call_{n}_{i}"
            if isinstance(call, McpCall):
                made, problem = (mcp or McpState()).items(call, request or {})
                if problem is not None:
                    raise McpRefused(problem)
                items += made
            elif isinstance(call, ServerCall):
                items.append({"id": f"ws_{n}_{len(items)}", "type": call.name,
                              "status": "completed", **json.loads(call.arguments)})
            elif isinstance(call, CustomCall):
                items.append({"id": f"ctc_{n}_{len(items)}", "type": "custom_tool_call",
                              "status": "completed", "call_id": call_id, "name": call.name,
                              "input": call.arguments})
            else:
                items.append({"id": f"fc_{n}_{len(items)}", "type": "function_call",
                              "status": "completed", "arguments": call.arguments,
                              "call_id": call_id, "name": call.name})
    return items


def _status(turn: Reply | tuple[Reply, ...]) -> str:
    reason = replies(turn)[-1].finish_reason
    if reason == "failed":
        return "failed"
    return "incomplete" if reason in INCOMPLETE else "completed"


def _text_field(item: Body) -> str | None:
    return {"message": None, "function_call": "arguments", "custom_tool_call": "input"}.get(
        item["type"])


def _cut(item: Body) -> Body:
    """The last item of an answer that was cut off: half its text, status incomplete."""
    cut = {**item, "status": "incomplete"}
    if item["type"] == "message":
        text = item["content"][0]["text"]
        cut["content"] = [{**item["content"][0], "text": text[:len(text) // 2]}]
    elif (name := _text_field(item)) is not None:
        cut[name] = item[name][:len(item[name]) // 2]
    return cut


class McpRefused(Exception):
    pass


def response(turn: Reply | tuple[Reply, ...], model: str, *, request: Body | None = None,
             usage: tuple[int, int] = (24, 12), n: int | None = None,
             mcp: McpState | None = None, first: tuple[Body, ...] = ()) -> Body:
    """The whole response object, as `POST /v1/responses` returns it without `stream`.
    `first`: items that open the output (MCP calls an approval ran)."""
    n = next(_ids) if n is None else n
    status = _status(turn)
    output = list(first) + _items(turn, n, request, mcp)
    if status != "completed" and output:
        output[-1] = _cut(output[-1])
    reason = replies(turn)[-1].finish_reason or ""
    return {
        "id": f"resp_fake{n}", "object": "response", "created_at": int(time.time()),
        "status": status, "background": False,
        "error": {"code": "server_error", "message": "The model failed."} if status == "failed"
        else None,
        "incomplete_details": {"reason": INCOMPLETE[reason]} if status == "incomplete" else None,
        "instructions": None, "max_output_tokens": None, "model": model, "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": (request or {}).get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": (request or {}).get("tools") or [], "top_p": 1.0,
        "truncation": "disabled", "user": None, "metadata": {},
        "usage": {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage[0] + usage[1]},
    }


def _item_events(index: int, item: Body, fragment: int, cut: bool) -> list[Body]:
    """The events of one output item; a cut item stops halfway, without its `done`."""
    started: Body = {**item, "status": "in_progress"}
    where: Body = {"item_id": item["id"], "output_index": index}
    events: list[Body] = []
    if item["type"] == "message":
        part = item["content"][0]
        text = part["text"]
        started["content"] = []
        events += [{"type": "response.output_item.added", "output_index": index, "item": started},
                   {"type": "response.content_part.added", **where, "content_index": 0,
                    "part": {**part, "text": ""}}]
        deltas = pieces(text, 4)
        events += [{"type": "response.output_text.delta", **where, "content_index": 0,
                    "delta": d, "logprobs": []} for d in deltas[:len(deltas) // 2 if cut else None]]
        if not cut:
            events += [{"type": "response.output_text.done", **where, "content_index": 0,
                        "text": text, "logprobs": []},
                       {"type": "response.content_part.done", **where, "content_index": 0,
                        "part": part}]
    elif (name := _text_field(item)) is not None:
        started[name] = ""
        kind = "function_call_arguments" if name == "arguments" else "custom_tool_call_input"
        deltas = pieces(item[name], fragment)
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": started})
        events += [{"type": f"response.{kind}.delta", **where, "delta": d}
                   for d in deltas[:len(deltas) // 2 if cut else None]]
        if not cut:
            events.append({"type": f"response.{kind}.done", **where, name: item[name]})
    elif item["type"] == "mcp_approval_request":
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": item})
    else:
        events += [{"type": "response.output_item.added", "output_index": index, "item": started},
                   {"type": f"response.{item['type']}.in_progress", **where},
                   {"type": f"response.{item['type']}.completed", **where}]
    if not cut:
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events


def stream_events(turn: Reply | tuple[Reply, ...], model: str, *, request: Body | None = None,
                  fragment: int = 3, usage: tuple[int, int] = (24, 12),
                  final: Body | None = None, n: int | None = None) -> list[bytes]:
    """The SSE messages of a streamed answer, one per element; `final`: the response
    they build (number `n`), when it was made already."""
    n = next(_ids) if n is None else n
    final = final or response(turn, model, request=request, usage=usage, n=n)
    status = final["status"]
    items = final["output"] if status == "completed" else _items(turn, n)
    initial = {**final, "status": "in_progress", "output": [], "usage": None, "error": None,
               "incomplete_details": None}
    events: list[Body] = [{"type": "response.created", "response": initial},
                          {"type": "response.in_progress", "response": initial}]
    for i, item in enumerate(items):
        cut = status != "completed" and i == len(items) - 1
        events += _item_events(i, item, fragment, cut)
    events.append({"type": f"response.{status}", "response": final})
    return [sse_event(event["type"], json.dumps({**event, "sequence_number": seq}))
            for seq, event in enumerate(events)]


def mcp_state(fake: FakeOpenAI) -> McpState:
    """The fake's MCP memory (stored responses, answered approvals), made on first use."""
    if fake.mcp is None:
        fake.mcp = McpState()
    assert isinstance(fake.mcp, McpState)
    return fake.mcp


async def serve(fake: FakeOpenAI, request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses` for the fake server, from its queue or script."""
    if request.path == "/openai/responses" and "api-version" not in request.query:
        return web.json_response({"error": {"code": "404", "message": "Resource not found"}},
                                 status=404)
    body = await request.json()
    fake._record(request, body)
    problem = responses_problem(body)
    if problem is not None:
        return web.json_response({"error": {"type": "invalid_request_error", "message": problem,
                                            "param": None, "code": None}}, status=400)
    mcp = mcp_state(fake)
    first: list[Body] = []
    problem = mcp.history_problem(body)
    if problem is None:
        first, problem = mcp.answers(body)
    if problem is not None:
        return web.json_response({"error": {"type": "invalid_request_error", "message": problem,
                                            "param": "input", "code": None}}, status=400)
    turn = await fake._turn(body)
    if isinstance(turn, RawReply):
        return await send_raw(request, turn)
    model = str(body.get("model") or "gpt-fake")
    if isinstance(turn, Flood):
        return await serve_responses(request, turn, model)
    try:
        n = next(_ids)
        whole = response(turn, model, request=body, mcp=mcp, first=tuple(first), n=n)
    except McpRefused as e:
        return web.json_response({"error": {"type": "invalid_request_error", "message": str(e),
                                            "param": "tools", "code": None}}, status=400)
    mcp.remember(whole, body)
    if not body.get("stream"):
        return web.json_response(whole)
    events = stream_events(turn, model, request=body, fragment=fake.fragment, final=whole, n=n)
    return await write_stream(request, events, SSE, delay_s=fake.delay_s)


# --- stored responses and conversations --------------------------------------------------

_conversation_ids = itertools.count(1)


def _not_found(what: str) -> web.Response:
    return web.json_response({"error": {"type": "invalid_request_error", "message": what,
                                        "param": None, "code": None}}, status=404)


def _public(response: Body) -> Body:
    return {k: v for k, v in response.items() if not k.startswith("_")}


async def get_response(fake: FakeOpenAI, request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}`: the response as stored (as the model made it)."""
    fake.headers.append(dict(request.headers))
    found = mcp_state(fake).stored.get(request.match_info["id"])
    if found is None:
        return _not_found(f"Response with id '{request.match_info['id']}' not found.")
    return web.json_response(_public(found))


def _listed(item: Body, default_id: str) -> Body:
    """An item as the API lists it: an id, a type, a message's text as content parts."""
    out = {"id": default_id, "type": "message", **item}
    if out["type"] == "message" and isinstance(out.get("content"), str):
        out["content"] = [{"type": "input_text", "text": out["content"]}]
    return out


def _page(items: list[Body]) -> Body:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}


async def input_items(fake: FakeOpenAI, request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}/input_items`: the request's input, newest first."""
    fake.headers.append(dict(request.headers))
    found = mcp_state(fake).stored.get(request.match_info["id"])
    if found is None:
        return _not_found(f"Response with id '{request.match_info['id']}' not found.")
    items = [_listed(item, f"in_{i}") for i, item in enumerate(found["_input"])]
    return web.json_response(_page(list(reversed(items))))


async def create_conversation(fake: FakeOpenAI, request: web.Request) -> web.Response:
    """`POST /v1/conversations`: a new conversation, with the items given."""
    body = await request.json() if request.can_read_body else {}
    cid = f"conv_fake{next(_conversation_ids)}"
    items = body.get("items") if isinstance(body, dict) else None
    mcp_state(fake).conversations[cid] = [i for i in items or [] if isinstance(i, dict)]
    return web.json_response({"id": cid, "object": "conversation",
                              "created_at": int(time.time()), "metadata": {}})


async def conversation_items(fake: FakeOpenAI, request: web.Request) -> web.Response:
    """`GET /v1/conversations/{id}/items`: its items, oldest first (`order=asc`)."""
    fake.headers.append(dict(request.headers))
    items = mcp_state(fake).conversations.get(request.match_info["id"])
    if items is None:
        return _not_found(f"Conversation with id '{request.match_info['id']}' not found.")
    numbered = [_listed(item, f"ci_{i}") for i, item in enumerate(items)]
    return web.json_response(_page(numbered if request.query.get("order") == "asc"
                                   else list(reversed(numbered))))
