"""Continuing a Chat Completions answer after its calls were denied (sans-IO; the
skeleton is continuation.py). Azure OpenAI speaks the same format.

The next request is the last one sent, plus the assistant message with the denied
`tool_calls` and one `tool` message per call carrying the denial text. Joined answers
keep the first `id`; the content is the first's then the continuation's, the
continuation's `tool_calls` and `finish_reason`, the usage of both added up. An answer
with more than one choice (`n` > 1) is not continued: which choice would the agent's
loop go on from?
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import ProtocolError
from ..surrogates import json_text
from .continuation import Denied, JSONObject, add_usage, without_denials
from .sse import SSEDecoder, SSEEvent, encode


def _request(sent: bytes) -> JSONObject | None:
    obj = json.loads(sent)
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return None
    n = obj.get("n")
    if n is not None and n != 1:
        return None
    return obj


def follow(sent: bytes, said: str | None, denied: Sequence[Denied]) -> bytes | None:
    obj = _request(sent)
    if obj is None or any(not d.call.id for d in denied):  # a legacy function_call
        return None
    messages = list(obj["messages"])  # type: ignore[call-overload]
    messages.append({"role": "assistant", "content": said or None, "tool_calls": [
        {"id": d.call.id, "type": "function",
         "function": {"name": d.call.name, "arguments": d.call.raw_arguments}}
        for d in denied]})
    messages += [{"role": "tool", "tool_call_id": d.call.id, "content": d.text} for d in denied]
    return json_text({**obj, "messages": messages}).encode("utf-8")


def _message(answer: bytes) -> JSONObject | None:
    obj = json.loads(answer)
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None


class ChatContinues:
    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None:
        message = _message(answer)
        if message is None:
            return None
        content = message.get("content")
        return follow(sent, content if isinstance(content, str) else None, denied)

    def join(self, first: bytes, then: bytes) -> bytes:
        a, b = json.loads(first), json.loads(then)
        ma, mb = a["choices"][0]["message"], b["choices"][0]["message"]
        texts = [t for t in (ma.get("content"), mb.get("content")) if isinstance(t, str) and t]
        mb["content"] = "\n\n".join(texts) if texts else mb.get("content")
        b["id"] = a.get("id", b.get("id"))
        if "usage" in a or "usage" in b:
            b["usage"] = add_usage(a.get("usage"), b.get("usage"))
        return json_text(b).encode("utf-8")

    def seam(self, sent: bytes) -> ChatSeam | None:
        return ChatSeam() if _request(sent) is not None else None


class ChatSeam:
    """Held: chunks with a `finish_reason`, the usage chunk, `[DONE]`. The continuation's
    chunks take the first round's `id` and lose their `role` (the SDKs add string deltas
    up); its first text starts a new paragraph."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._held: list[tuple[SSEEvent, JSONObject | None]] = []
        self._id: object = None
        self._said: list[str] = []      # this round's content
        self._spoke = False             # some round's content reached the client
        self._gap = False               # the next content starts a paragraph
        self._usage: object = None      # earlier rounds' usage, added up
        self._later = False             # this round is a continuation

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        try:
            events = self._decoder.feed(data)
        except ProtocolError:  # not expected of the filter's own output: passed as it is
            return data
        for event in events:
            if event.data.strip() == "[DONE]":
                self._held.append((event, None))
                continue
            try:
                obj = json.loads(event.data)
            except ValueError:
                out += encode(event)
                continue
            if not isinstance(obj, dict) or "error" in obj:
                out += encode(event)
                continue
            choices = obj.get("choices")
            ends = isinstance(choices, list) and (not choices or any(
                isinstance(c, dict) and c.get("finish_reason") for c in choices))
            if ends:
                self._held.append((event, obj))
                continue
            out += self._pass(event, obj)
        return bytes(out)

    def _pass(self, event: SSEEvent, obj: JSONObject, changed: bool = False) -> bytes:
        if self._id is None:
            self._id = obj.get("id")
        changed = changed or obj.get("id") != self._id
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if self._later and isinstance(delta, dict) and "role" in delta:
                # The SDKs add string deltas up: a second role reads "assistantassistant".
                del delta["role"]
                changed = True
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                assert isinstance(delta, dict)
                self._said.append(text)
                if self._gap:
                    delta["content"], changed, self._gap = "\n\n" + text, True, False
                self._spoke = True
        if not changed:
            return encode(event)
        return encode(SSEEvent(json_text({**obj, "id": self._id}), event.event, event.id,
                               event.retry))

    def follow(self, sent: bytes, denied: Sequence[Denied]) -> bytes | None:
        return follow(sent, without_denials("".join(self._said), denied), denied)

    def next_round(self) -> bytes:
        out = bytearray()
        for event, obj in self._held:
            if obj is None:
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._usage = add_usage(self._usage, usage)
            kept = []
            choices = obj.get("choices")
            for choice in choices if isinstance(choices, list) else []:
                if isinstance(choice, dict) and (choice.get("delta") or {}).get("content"):
                    kept.append({**choice, "finish_reason": None})
            if kept:  # text that came with the finish: still the client's
                out += self._pass(event, {**obj, "choices": kept, "usage": None}, True)
        self._held, self._said = [], []
        self._gap = self._spoke
        self._later = True
        return bytes(out)

    def release(self) -> bytes:
        out = bytearray()
        for event, obj in self._held:
            if obj is None:
                out += encode(event)
                continue
            usage = obj.get("usage")
            summed = isinstance(usage, dict) and self._usage is not None
            if summed:
                obj = {**obj, "usage": add_usage(self._usage, usage)}
            out += self._pass(event, obj, summed)
        self._held = []
        return bytes(out)
