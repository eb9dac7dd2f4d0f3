"""Bedrock InvokeModel for Anthropic models, as the fake Bedrock runtime answers it.

    POST /model/{modelId}/invoke                       a Messages answer (JSON)
    POST /model/{modelId}/invoke-with-response-stream  application/vnd.amazon.eventstream:
                                                       one `chunk` event per Messages
                                                       stream event, its JSON base64 in
                                                       `bytes`, with the `p` padding field

The body is Anthropic's Messages body as Bedrock takes it: `anthropic_version` must be
`bedrock-2023-05-31`, `max_tokens` and `messages` are required, and `model` or `stream`
are "extraneous keys" (the path names the model, the operation decides streaming),
refused with a ValidationException as the real service does. Answers are fake_anthropic's
own; the stream leaves out `ping` events and carries the
`amazon-bedrock-invocationMetrics` Bedrock adds to `message_stop`.
"""

from __future__ import annotations

import base64
import json

from ..providers.eventstream import encode, event
from ..providers.sse import SSEDecoder
from .fake_anthropic import USAGE, message, stream_events
from .fake_base import Body, Reply
from .fake_history import anthropic_problem

VERSION = "bedrock-2023-05-31"
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
HEADERS = {"X-Amzn-Bedrock-Input-Token-Count": str(USAGE["input_tokens"]),
           "X-Amzn-Bedrock-Output-Token-Count": str(USAGE["output_tokens"]),
           "X-Amzn-Bedrock-Invocation-Latency": "321"}


def invoke_problem(body: Body) -> str | None:
    """Why Bedrock would refuse this Anthropic body (a ValidationException), or None."""
    extraneous = [k for k in ("model", "stream") if k in body]
    if extraneous:
        return f"Malformed input request: #: extraneous key [{extraneous[0]}] is not permitted"
    if body.get("anthropic_version") != VERSION:
        return ("Malformed input request: #/anthropic_version: "
                f"{body.get('anthropic_version')!r} is not a valid enum value")
    for key in ("max_tokens", "messages"):
        if key not in body:
            return f"Malformed input request: #: required key [{key}] not found"
    return anthropic_problem(body)


def invoke_body(turn: Reply, model: str) -> bytes:
    return message(turn, model.rsplit("/", 1)[-1])


def invoke_frames(turn: Reply, model: str, *, fragment: int = 3) -> list[bytes]:
    """The frames of a streamed answer, one encoded message per element."""
    decoder = SSEDecoder()
    frames: list[bytes] = []
    for sse in decoder.feed(b"".join(stream_events(turn, model.rsplit("/", 1)[-1],
                                                   fragment=fragment))):
        body = json.loads(sse.data)
        if body["type"] == "ping":
            continue
        if body["type"] == "message_stop":
            body["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": USAGE["input_tokens"],
                "outputTokenCount": USAGE["output_tokens"],
                "invocationLatency": 321, "firstByteLatency": 123}
        data = json.dumps(body, ensure_ascii=False).encode()
        payload = {"bytes": base64.b64encode(data).decode(),
                   "p": _PADDING[:len(frames) % len(_PADDING) + 1]}
        frames.append(encode(event("chunk", json.dumps(payload).encode())))
    return frames

