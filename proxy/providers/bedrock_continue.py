"""Continuing a Bedrock Converse answer after its calls were denied (sans-IO; the
skeleton is continuation.py).

The next request is the last one sent, plus the assistant message with the denied
`toolUse` blocks and a user message with one `toolResult` per call, `status: error`,
carrying the denial text. Joined answers: content blocks follow one another, the
continuation's `stopReason`, `usage` and `metrics.latencyMs` added up. In a stream
(the binary event stream) the continuation's `messageStart` is dropped, its
`contentBlockIndex` runs on after the earlier rounds', and the last `metadata` event
carries every round's usage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import ProtocolError
from ..surrogates import json_text
from .continuation import Denied, JSONObject, add_usage, turn_request, without_denials
from .eventstream import EventStreamDecoder, Message, encode, event


def _request(sent: bytes) -> JSONObject | None:
    return turn_request(sent, "messages", "assistant")


def follow(sent: bytes, content: list[object], denied: Sequence[Denied]) -> bytes | None:
    obj = _request(sent)
    if obj is None:
        return None
    messages = list(obj["messages"])  # type: ignore[call-overload]
    messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user", "content": [
        {"toolResult": {"toolUseId": d.call.id, "status": "error",
                        "content": [{"text": d.text}]}} for d in denied]})
    return json_text({**obj, "messages": messages}).encode("utf-8")


def _tool_use(d: Denied) -> JSONObject:
    return {"toolUse": {"toolUseId": d.call.id, "name": d.call.name,
                        "input": dict(d.arguments)}}


class BedrockContinues:
    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None:
        obj = json.loads(answer)
        output = obj.get("output") if isinstance(obj, dict) else None
        message = output.get("message") if isinstance(output, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            return None
        return follow(sent, content, denied)

    def join(self, first: bytes, then: bytes) -> bytes:
        a, b = json.loads(first), json.loads(then)
        b["output"]["message"]["content"] = list(a["output"]["message"]["content"]) + \
            list(b["output"]["message"]["content"])
        b["usage"] = add_usage(a.get("usage"), b.get("usage"))
        if "metrics" in a or "metrics" in b:
            b["metrics"] = add_usage(a.get("metrics"), b.get("metrics"))
        return json_text(b).encode("utf-8")

    def seam(self, sent: bytes) -> BedrockSeam | None:
        return BedrockSeam() if _request(sent) is not None else None


def _payload(message: Message) -> JSONObject | None:
    if message.text(":message-type") != "event":
        return None
    try:
        obj = json.loads(message.payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class BedrockSeam:
    """Held: `messageStop` and `metadata`."""

    def __init__(self) -> None:
        self._decoder = EventStreamDecoder()
        self._held: list[tuple[Message, str, JSONObject]] = []
        self._offset = 0
        self._blocks = 0
        self._later = False
        self._usage: object = None
        self._metrics: object = None
        self._texts: dict[int, str] = {}

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        try:
            messages = self._decoder.feed(data)
        except ProtocolError:
            return data
        for message in messages:
            kind, obj = message.text(":event-type") or "", _payload(message)
            if obj is None:
                out += encode(message)
                continue
            if kind in ("messageStop", "metadata"):
                self._held.append((message, kind, obj))
                continue
            if kind == "messageStart" and self._later:
                continue
            out += self._pass(message, kind, obj)
        return bytes(out)

    def _pass(self, message: Message, kind: str, obj: JSONObject) -> bytes:
        index = obj.get("contentBlockIndex")
        if not isinstance(index, int) or isinstance(index, bool):
            return encode(message)
        self._blocks = max(self._blocks, index + 1)
        delta = obj.get("delta")
        if kind == "contentBlockDelta" and isinstance(delta, dict) \
                and isinstance(delta.get("text"), str):
            self._texts[index] = self._texts.get(index, "") + str(delta["text"])
        if not self._offset:
            return encode(message)
        moved = {**obj, "contentBlockIndex": index + self._offset}
        return encode(event(kind, json_text(moved, separators=(",", ":")).encode("utf-8")))

    def follow(self, sent: bytes, denied: Sequence[Denied]) -> bytes | None:
        content: list[object] = []
        for _, text in sorted(self._texts.items()):
            said = without_denials(text, denied)
            if said:
                content.append({"text": said})
        content += [_tool_use(d) for d in denied]
        return follow(sent, content, denied)

    def next_round(self) -> bytes:
        for _, kind, obj in self._held:
            if kind == "metadata":
                self._usage = add_usage(self._usage, obj.get("usage"))
                self._metrics = add_usage(self._metrics, obj.get("metrics"))
        self._held, self._texts = [], {}
        self._offset += self._blocks
        self._blocks = 0
        self._later = True
        return b""

    def release(self) -> bytes:
        out = bytearray()
        for message, kind, obj in self._held:
            if kind == "metadata" and self._later:
                summed = {**obj, "usage": add_usage(self._usage, obj.get("usage"))}
                if "metrics" in obj:
                    summed["metrics"] = add_usage(self._metrics, obj.get("metrics"))
                out += encode(event(kind, json_text(summed, separators=(",", ":"))
                                    .encode("utf-8")))
            else:
                out += encode(message)
        self._held = []
        return bytes(out)
