"""A fake Gemini (generativelanguage API) server that speaks the real wire format.

    POST /{version}/models/{model}:generateContent          one GenerateContentResponse
    POST /{version}/models/{model}:streamGenerateContent    ?alt=sse: one `data:` event per
                                                            chunk; else one JSON array,
                                                            written element by element
    POST /{version}/models/{model}:countTokens, GET /{version}/models
    POST /{version}/openai/chat/completions                 the OpenAI-compatible endpoint

`tunedModels/{model}` works like `models/{model}`. Answers come from the same
`Reply` / `Call` / `RawReply` script as the fake OpenAI server. A call's
`arguments` text is written into the JSON exactly as given (Gemini sends `args`
as an object), so tests can check that it reaches the agent byte for byte.
Streams cut text into pieces of a few characters; all of a reply's calls come
in one chunk (`split_calls`: one chunk each), and the finishReason with the
last chunk (`finish_apart`: in a chunk of its own, as Gemini sometimes does).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .fake_base import (
    Body,
    Call,
    RawReply,
    Reply,
    ScriptedFake,
    Turn,
    replies,
    send_raw,
    write_stream,
)
from .fake_history import gemini_problem
from .fake_openai import completion, stream_events

__all__ = ["Call", "FakeGemini", "RawReply", "Reply", "response", "stream_chunks"]

type Script = Callable[[Body], Turn]

SIGNATURE = "c2lnbmF0dXJlLW9mLXRoZS1maXJzdC1jYWxs"  # base64, as Gemini 3 sends them
_RAW = "\x00raw{}\x00"
_ids = itertools.count(1)


def _dumps(obj: Body, raws: list[str], indent: int | None) -> str:
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    for n, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(n)), raw, 1)
    return text


def _call_parts(reply: Reply, raws: list[str], signatures: bool) -> list[Body]:
    parts: list[Body] = []
    for i, c in enumerate(reply.calls):
        call: Body = {"name": c.name, "args": _RAW.format(len(raws))}
        raws.append(c.arguments)
        if c.id:
            call["id"] = c.id
        part: Body = {"functionCall": call}
        if signatures and i == 0:
            part["thoughtSignature"] = SIGNATURE
        parts.append(part)
    return parts


def _usage(usage: tuple[int, int], final: bool) -> Body:
    if not final:
        return {"promptTokenCount": usage[0], "totalTokenCount": usage[0]}
    return {"promptTokenCount": usage[0], "candidatesTokenCount": usage[1],
            "totalTokenCount": usage[0] + usage[1]}


def _finish(reply: Reply) -> str:
    return reply.finish_reason or "STOP"


def response(turn: Reply | tuple[Reply, ...], model: str, *, usage: tuple[int, int] = (24, 12),
             signatures: bool = False) -> bytes:
    """A whole generateContent answer, pretty-printed as Gemini sends it."""
    raws: list[str] = []
    candidates = []
    for ci, reply in enumerate(replies(turn)):
        parts: list[Body] = [{"text": reply.content}] if reply.content else []
        parts += _call_parts(reply, raws, signatures)
        candidates.append({"content": {"parts": parts, "role": "model"},
                           "finishReason": _finish(reply), "index": ci})
    body = {"candidates": candidates, "usageMetadata": _usage(usage, True),
            "modelVersion": model, "responseId": f"fake-{next(_ids)}"}
    return _dumps(body, raws, 2).encode()


def stream_chunks(turn: Reply | tuple[Reply, ...], model: str, *, sse: bool,
                  usage: tuple[int, int] = (24, 12), signatures: bool = False,
                  split_calls: bool = False, finish_apart: bool = False,
                  piece: int = 4) -> list[bytes]:
    """A streamed answer as the writes Gemini makes: SSE events, or array pieces."""
    rid = f"fake-{next(_ids)}"
    choices = replies(turn)
    elements: list[str] = []
    for ci, reply in enumerate(choices):
        text = reply.content or ""
        groups: list[tuple[list[Body], list[str]]] = [
            ([{"text": text[i:i + piece]}], []) for i in range(0, len(text), piece)]
        if split_calls:
            for i, c in enumerate(reply.calls):
                one: list[str] = []
                groups.append((_call_parts(Reply(calls=(c,)), one, signatures and i == 0), one))
        elif reply.calls:
            raws: list[str] = []
            groups.append((_call_parts(reply, raws, signatures), raws))
        if finish_apart or not groups:
            groups.append(([{"text": ""}], []))
        for g, (parts, group_raws) in enumerate(groups):
            last = g == len(groups) - 1
            cand: Body = {"content": {"parts": parts, "role": "model"}}
            if last:
                cand["finishReason"] = _finish(reply)
            cand["index"] = ci
            body = {"candidates": [cand],
                    "usageMetadata": _usage(usage, last and ci == len(choices) - 1),
                    "modelVersion": model, "responseId": rid}
            elements.append(_dumps(body, group_raws, None if sse else 2))
    if sse:
        # A chunk is one line unless an argument text holds a newline: then one per line.
        return [b"".join(b"data: " + line + b"\r\n" for line in e.encode().split(b"\n"))
                + b"\r\n" for e in elements]
    if not elements:
        return [b"[]"]
    return ([b"[" + elements[0].encode()] + [b"\n,\r\n" + e.encode() for e in elements[1:]]
            + [b"\n]"])


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": kind}},
                             status=status)


@dataclass
class FakeGemini(ScriptedFake[Turn]):
    """The fake server. Push turns onto `turns`, or give a `script`."""

    signatures: bool = False
    split_calls: bool = False
    finish_apart: bool = False
    paths: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{version}/{collection:models|tunedModels}/{call}", self._generate)
        app.router.add_get("/{version}/models", self._models)
        app.router.add_post("/{version}/openai/chat/completions", self._openai_chat)
        return app

    def _record(self, request: web.Request, body: Body) -> None:
        super()._record(request, body)
        self.paths.append(request.raw_path)

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, {})
        return web.json_response({"models": [{"name": "models/gemini-fake",
                                              "displayName": "Gemini Fake",
                                              "supportedGenerationMethods": ["generateContent"]}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        body = await request.json()
        self._record(request, body)
        if method == "countTokens":
            return web.json_response({"totalTokens": 7})
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(404, f"method {method!r} not found", "NOT_FOUND")
        alt = request.query.get("alt", "json")
        if alt not in ("json", "sse"):
            return _error(400, f"unsupported alt {alt!r}", "INVALID_ARGUMENT")
        problem = gemini_problem(body)
        if problem is not None:
            return _error(400, problem, "INVALID_ARGUMENT")
        turn = self._next(body)
        if isinstance(turn, RawReply):
            return await send_raw(request, turn)
        if method == "generateContent":
            return web.Response(body=response(turn, model, signatures=self.signatures),
                                content_type="application/json", charset="UTF-8")
        sse = alt == "sse"
        pieces = stream_chunks(turn, model, sse=sse, signatures=self.signatures,
                               split_calls=self.split_calls, finish_apart=self.finish_apart)
        ctype = "text/event-stream" if sse else "application/json; charset=UTF-8"
        return await write_stream(request, pieces, {"Content-Type": ctype})

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._record(request, body)
        turn = self._next(body)
        if isinstance(turn, RawReply):
            return await send_raw(request, turn)
        model = str(body.get("model") or "gemini-fake")
        if not body.get("stream"):
            return web.json_response(completion(turn, model))
        return await write_stream(request, stream_events(turn, model),
                                  {"Content-Type": "text/event-stream"})
