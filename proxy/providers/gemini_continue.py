"""Continuing a Gemini answer after its calls were denied (sans-IO; the skeleton is
continuation.py).

The next request is the last one sent, plus the model `Content` with the denied
`functionCall` parts (a whole answer's parts as the model made them, thought signatures
included; in a stream, the signature tether kept on the replacement text goes back on
the call) and a user `Content` with one `functionResponse` per call, `response: {"error":
<denial text>}` (with the call's `id` when it had one). Only answers with one candidate
are continued.

Joined answers: the parts follow one another, the continuation's `finishReason`, the
`usageMetadata` added up, the first `responseId`. Streams are continued when they are SSE
(`alt=sse`, what the SDKs use); a JSON-array stream ends as the rewrite. The chunk that
carries `finishReason` is held; a continuation's chunks carry the usage of the earlier
rounds added to theirs, and the first round's `responseId`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import ProtocolError
from ..surrogates import json_text
from .continuation import Denied, JSONObject, add_usage, turn_request
from .sse import SSEDecoder, SSEEvent, encode


def _request(sent: bytes) -> JSONObject | None:
    return turn_request(sent, "contents", "model")


def _call_part(d: Denied, signature: object = None) -> JSONObject:
    call: JSONObject = {"name": d.call.name, "args": dict(d.arguments)}
    if d.call.id:
        call["id"] = d.call.id
    part: JSONObject = {"functionCall": call}
    if signature is not None:
        part["thoughtSignature"] = signature
    return part


def follow(sent: bytes, parts: list[object], denied: Sequence[Denied]) -> bytes | None:
    obj = _request(sent)
    if obj is None:
        return None
    answers: list[object] = []
    for d in denied:
        response: JSONObject = {"name": d.call.name, "response": {"error": d.text}}
        if d.call.id:
            response["id"] = d.call.id
        answers.append({"functionResponse": response})
    contents = list(obj["contents"])  # type: ignore[call-overload]
    contents += [{"role": "model", "parts": parts}, {"role": "user", "parts": answers}]
    return json_text({**obj, "contents": contents}).encode("utf-8")


def _candidate(obj: object) -> JSONObject | None:
    candidates = obj.get("candidates") if isinstance(obj, dict) else None
    if not isinstance(candidates, list) or len(candidates) != 1 \
            or not isinstance(candidates[0], dict):
        return None
    return candidates[0]


class GeminiContinues:
    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None:
        cand = _candidate(json.loads(answer))
        content = cand.get("content") if cand is not None else None
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            return None
        return follow(sent, parts, denied)

    def join(self, first: bytes, then: bytes) -> bytes:
        a, b = json.loads(first), json.loads(then)
        ca, cb = _candidate(a), _candidate(b)
        if ca is not None and cb is not None:
            content_a = ca.get("content")
            parts_a = content_a.get("parts") or [] if isinstance(content_a, dict) else []
            content_b = cb.setdefault("content", {"role": "model", "parts": []})
            assert isinstance(content_b, dict)
            content_b["parts"] = list(parts_a) + list(content_b.get("parts") or [])
        if "usageMetadata" in a or "usageMetadata" in b:
            b["usageMetadata"] = add_usage(a.get("usageMetadata"), b.get("usageMetadata"))
        if "responseId" in a:
            b["responseId"] = a["responseId"]
        return json_text(b).encode("utf-8")

    def seam(self, sent: bytes) -> GeminiSeam | None:
        return GeminiSeam() if _request(sent) is not None else None


class GeminiSeam:
    """Held: the chunk with the candidate's `finishReason`."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._array: bool | None = None   # a JSON-array stream: passed, never continued
        self._held: list[tuple[SSEEvent, JSONObject]] = []
        self._usage: object = None        # earlier rounds' usage, added up
        self._last: object = None         # this round's latest usageMetadata
        self._id: object = None
        self._parts: list[JSONObject] = []  # what the model said this round

    def feed(self, data: bytes) -> bytes:
        if self._array is None and data.strip():
            self._array = data.lstrip().startswith(b"[")
        if self._array is not False:
            return data
        out = bytearray()
        try:
            events = self._decoder.feed(data)
        except ProtocolError:
            return data
        for event in events:
            try:
                obj = json.loads(event.data)
            except ValueError:
                out += encode(event)
                continue
            if not isinstance(obj, dict) or "error" in obj:
                out += encode(event)
                continue
            if "usageMetadata" in obj:
                self._last = obj["usageMetadata"]
            cand = _candidate(obj)
            content = cand.get("content") if cand is not None else None
            parts = content.get("parts") if isinstance(content, dict) else None
            self._parts += [p for p in parts if isinstance(p, dict)] \
                if isinstance(parts, list) else []
            if cand is not None and cand.get("finishReason"):
                self._held.append((event, obj))
                continue
            out += self._pass(event, obj)
        return bytes(out)

    def _pass(self, event: SSEEvent, obj: JSONObject, changed: bool = False) -> bytes:
        if self._id is None:
            self._id = obj.get("responseId")
        if self._usage is not None and isinstance(obj.get("usageMetadata"), dict):
            obj, changed = {**obj, "usageMetadata": add_usage(self._usage,
                                                              obj["usageMetadata"])}, True
        if "responseId" in obj and obj["responseId"] != self._id:
            obj, changed = {**obj, "responseId": self._id}, True
        if not changed:
            return encode(event)
        return encode(SSEEvent(json_text(obj), event.event, event.id, event.retry))

    def follow(self, sent: bytes, denied: Sequence[Denied]) -> bytes | None:
        if self._array is not False:
            return None
        texts = {d.text: d for d in denied}
        parts: list[object] = []
        placed: set[int] = set()
        for part in self._parts:
            text = part.get("text")
            d = texts.get(text.strip()) if isinstance(text, str) else None
            if d is not None and id(d) not in placed:  # tether's text in the call's place
                placed.add(id(d))
                parts.append(_call_part(d, part.get("thoughtSignature")))
            elif "functionCall" not in part:
                parts.append(part)
        parts += [_call_part(d) for d in denied if id(d) not in placed]
        return follow(sent, parts, denied)

    def next_round(self) -> bytes:
        out = bytearray()
        for event, obj in self._held:
            cand = _candidate(obj)
            content = cand.get("content") if cand is not None else None
            if isinstance(content, dict) and content.get("parts") and cand is not None:
                # Text that came with the finish: still the client's.
                kept = {k: v for k, v in cand.items() if k != "finishReason"}
                rest = {k: v for k, v in obj.items() if k != "usageMetadata"}
                out += self._pass(event, {**rest, "candidates": [kept]}, True)
        self._usage = add_usage(self._usage, self._last)
        self._held, self._parts, self._last = [], [], None
        return bytes(out)

    def release(self) -> bytes:
        out = bytearray()
        for event, obj in self._held:
            out += self._pass(event, obj)
        self._held = []
        return bytes(out)
