"""Continuing an Anthropic Messages answer after its calls were denied (sans-IO; the
skeleton is continuation.py).

The next request is the last one sent, plus the assistant turn with the denied `tool_use`
blocks (a whole answer's content as the model made it, thinking blocks and signatures
included) and a user turn with one `tool_result` per call, `is_error: true`, carrying the
denial text. A request whose last message is the assistant's (a prefill) is not
continued: the answer finishes that message, and a turn cannot be added after it.

Joined answers keep the first `id`; content blocks follow one another; the stop reason is
the continuation's, the usage both added up. In a stream the continuation's
`message_start` is dropped, its blocks' `index` runs on after the earlier rounds', and the
last `message_delta` carries every round's usage (input tokens of each round included,
which the SDKs read from `message_delta` when it has them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import ProtocolError
from ..surrogates import json_text
from .anthropic_wire import GOVERNED_BLOCK
from .continuation import Denied, JSONObject, add_usage, turn_request, without_denials
from .sse import SSEDecoder, SSEEvent, encode

INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _request(sent: bytes) -> JSONObject | None:
    return turn_request(sent, "messages", "assistant")


def follow(sent: bytes, content: list[object], denied: Sequence[Denied]) -> bytes | None:
    obj = _request(sent)
    if obj is None:
        return None
    messages = list(obj["messages"])  # type: ignore[call-overload]
    messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": d.call.id, "is_error": True,
         "content": [{"type": "text", "text": d.text}]} for d in denied]})
    return json_text({**obj, "messages": messages}).encode("utf-8")


def _tool_use(d: Denied) -> JSONObject:
    return {"type": GOVERNED_BLOCK, "id": d.call.id, "name": d.call.name,
            "input": dict(d.arguments)}


class AnthropicContinues:
    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None:
        obj = json.loads(answer)
        content = obj.get("content") if isinstance(obj, dict) else None
        if not isinstance(content, list):
            return None
        return follow(sent, content, denied)

    def join(self, first: bytes, then: bytes) -> bytes:
        a, b = json.loads(first), json.loads(then)
        b["content"] = list(a.get("content") or []) + list(b.get("content") or [])
        b["id"] = a.get("id", b.get("id"))
        b["usage"] = add_usage(a.get("usage"), b.get("usage"))
        return json_text(b).encode("utf-8")

    def seam(self, sent: bytes) -> AnthropicSeam | None:
        return AnthropicSeam() if _request(sent) is not None else None


class AnthropicSeam:
    """Held: `message_delta` and `message_stop`."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._held: list[tuple[SSEEvent, JSONObject]] = []
        self._offset = 0          # blocks the client has from earlier rounds
        self._blocks = 0          # blocks of this round
        self._later = False       # this round is a continuation
        self._usage: object = None          # earlier rounds' usage, added up
        self._input: object = None          # this round's message_start usage
        # What the model said this round, for the next request: text, thinking blocks.
        self._content: list[JSONObject] = []

    def feed(self, data: bytes) -> bytes:
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
            if not isinstance(obj, dict):
                out += encode(event)
                continue
            kind = obj.get("type")
            if kind in ("message_delta", "message_stop"):
                self._held.append((event, obj))
                continue
            if kind == "message_start":
                message = obj.get("message")
                self._input = message.get("usage") if isinstance(message, dict) else None
                if self._later:
                    continue
            out += self._pass(event, obj)
        return bytes(out)

    def _pass(self, event: SSEEvent, obj: JSONObject) -> bytes:
        kind = obj.get("type")
        index = obj.get("index")
        if kind == "content_block_start" and isinstance(obj.get("content_block"), dict):
            self._blocks += 1
            block = dict(obj["content_block"])  # type: ignore[call-overload]
            if block.get("type") in ("text", "thinking", "redacted_thinking"):
                self._content.append(block)
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict) \
                and self._content:
            self._said(obj["delta"])  # type: ignore[arg-type]
        if not self._offset or not isinstance(index, int) or isinstance(index, bool):
            return encode(event)
        return encode(SSEEvent(json_text({**obj, "index": index + self._offset}), event.event,
                               event.id, event.retry))

    def _said(self, delta: JSONObject) -> None:
        block = self._content[-1]
        for key, field in (("text_delta", "text"), ("thinking_delta", "thinking"),
                           ("signature_delta", "signature")):
            if delta.get("type") == key and isinstance(delta.get(field), str):
                block[field] = str(block.get(field) or "") + str(delta[field])

    def follow(self, sent: bytes, denied: Sequence[Denied]) -> bytes | None:
        content: list[object] = []
        for block in self._content:
            if block.get("type") != "text":
                content.append(block)
                continue
            text = without_denials(str(block.get("text") or ""), denied)
            if text:
                content.append({"type": "text", "text": text})
        content += [_tool_use(d) for d in denied]
        return follow(sent, content, denied)

    def _round_usage(self) -> object:
        usage: object = self._input
        for _, obj in self._held:
            delta_usage = obj.get("usage")
            if isinstance(delta_usage, dict):  # cumulative: it replaces the start's fields
                usage = {**(usage if isinstance(usage, dict) else {}), **delta_usage}
        return usage

    def next_round(self) -> bytes:
        self._usage = add_usage(self._usage, self._round_usage())
        self._held, self._content, self._input = [], [], None
        self._offset += self._blocks
        self._blocks = 0
        self._later = True
        return b""

    def release(self) -> bytes:
        out = bytearray()
        for event, obj in self._held:
            if obj.get("type") == "message_delta" and self._usage is not None:
                total = add_usage(self._usage, self._round_usage())
                shown = obj.get("usage")
                usage = {k: v for k, v in total.items() if k in INPUT_FIELDS
                         or k == "output_tokens" or (isinstance(shown, dict) and k in shown)} \
                    if isinstance(total, dict) else total
                obj = {**obj, "usage": usage}
                out += encode(SSEEvent(json_text(obj), event.event, event.id, event.retry))
            else:
                out += encode(event)
        self._held = []
        return bytes(out)
