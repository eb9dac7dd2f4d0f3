"""Bedrock InvokeModel for Anthropic models: the Messages API in AWS clothing (sans-IO).

    POST model/{modelId}/invoke                      a Messages body, a Messages answer
    POST model/{modelId}/invoke-with-response-stream the same body; the answer is the AWS
                                                     event stream, each `chunk` event's
                                                     `bytes` (base64) one Messages event

The body is Anthropic's own, with `anthropic_version: bedrock-2023-05-31` and neither
`model` (the path names it) nor `stream` (the operation decides it); the answer and the
stream events are Anthropic's too. So this format is the Anthropic one read through
another framing: requests by anthropic.read_request, whole answers by anthropic's
parse_response and render_response, streams by the Messages codec (anthropic_stream.py)
on the stream engine, with `InvokeFraming` in place of SSE. Errors have Bedrock's shape:
a denial is a 403 AccessDeniedException, whole or (as an error frame) mid-stream.

Only Anthropic models are governed here (model ids `anthropic.*`, or an inference
profile's `us.anthropic.*` ...): every other vendor's body carries its own tool-call
format, which tether does not read, so those stay refused with 501 (bedrock.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BadRequest, ProtocolError
from ..model import Decision, ToolCall
from . import anthropic, tool_scope
from .anthropic_continue import AnthropicContinues
from .anthropic_stream import MessagesStream
from .base import ErrorReply, ParsedRequest, ParsedResponse, Restricted, Route, denial_summary
from .bedrock_stream import error_frame, exception_frame
from .bedrock_wire import error_reply, has_duplicate, load_object
from .eventstream import BadFrame, EventStreamDecoder, Message, encode, event
from .held import DEFAULT_MAX_ARGUMENTS
from .sse import SSEEvent
from .stream_engine import Broken

VERSION = "bedrock-2023-05-31"
OPERATIONS = {"invoke": False, "invoke-with-response-stream": True}  # operation -> streamed


def is_anthropic(model: str) -> bool:
    """Whether a model id (or ARN) names an Anthropic model: `anthropic.claude-...`,
    a cross-region profile's `us.anthropic.claude-...`; an opaque ARN (a provisioned
    model) names no vendor and is not."""
    return "anthropic" in model.rsplit("/", 1)[-1].split(".")[:2]


def parse_request(body: bytes, route: Route) -> ParsedRequest:
    obj = anthropic.request_object(body)
    version = obj.get("anthropic_version")
    if not isinstance(version, str):
        raise BadRequest(f"'anthropic_version' must be a string (InvokeModel for Anthropic "
                         f"models takes \"{VERSION}\")")
    return anthropic.read_request(obj, route.model or "", bool(route.stream))


@dataclass(frozen=True, slots=True)
class UpstreamFrame(SSEEvent):
    """An exception or error frame from upstream: passed on to the client as it came."""

    frame: Message | None = None


class InvokeFraming:
    """Messages events in AWS event-stream `chunk` frames (anthropic_stream.Framing)."""

    def __init__(self) -> None:
        self._decoder = EventStreamDecoder()

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        try:
            messages = self._decoder.feed(chunk)
        except BadFrame as e:
            raise Broken(e.message, [self._read(m) for m in e.messages]) from None
        return [self._read(m) for m in messages]

    def flush(self) -> list[SSEEvent]:
        try:
            self._decoder.flush()
        except BadFrame as e:
            raise Broken(e.message, []) from None
        return []

    def encode(self, sse: SSEEvent) -> bytes:
        if isinstance(sse, UpstreamFrame) and sse.frame is not None:
            return encode(sse.frame)
        data = base64.b64encode(sse.data.encode("utf-8")).decode("ascii")
        return encode(event("chunk", json.dumps({"bytes": data}).encode()))

    def error(self, message: str, kind: str) -> bytes:
        if kind == "permission_error":
            return error_frame(message, "AccessDeniedException")
        return exception_frame(message)

    @staticmethod
    def _read(message: Message) -> SSEEvent:
        """The Messages event a frame carries; exceptions become `error` events that
        re-encode to their own frame."""
        kind = message.text(":message-type")
        if kind in ("exception", "error"):
            name = message.text(":exception-type") or message.text(":error-code") or "an error"
            return UpstreamFrame(name, event="error", frame=message)
        event_type = message.text(":event-type")
        if kind != "event" or event_type != "chunk":
            raise ProtocolError(f"stream frame {kind!r} {event_type!r} is not a chunk event")
        try:
            payload = load_object(message.payload, "stream chunk event")
            data = payload.get("bytes")
            if has_duplicate(payload) or not isinstance(data, str):
                raise ValueError("stream chunk event has no single 'bytes' text")
            text = base64.b64decode(data, validate=True).decode("utf-8")
            inner = json.loads(text)
        except (ValueError, binascii.Error, RecursionError) as e:
            raise ProtocolError(f"stream chunk cannot be read: {e}") from e
        inner_type = inner.get("type") if isinstance(inner, dict) else None
        # anthropic_wire.read_event reads `text` again, strictly, and checks the name.
        return SSEEvent(text, event=inner_type if isinstance(inner_type, str) else "")


class BedrockInvoke:
    """InvokeModel with an Anthropic Messages body."""

    name = "bedrock.invoke"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.anthropic(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body, route)

    def parse_response(self, body: bytes) -> anthropic.MessagesResponse:
        return anthropic.parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, anthropic.MessagesResponse)
        return anthropic.render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS
               ) -> MessagesStream:
        return MessagesStream(max_arguments=max_arguments, framing=InvokeFraming())

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return error_reply(403, denial_summary(calls, decisions), "tool_call_denied")


INVOKE = BedrockInvoke()


class InvokeContinues(AnthropicContinues):
    """Continuing after a denial (continuation.py): whole answers as Anthropic's, since
    body and answer are Anthropic's; the stream seam reads SSE, not chunk frames, so an
    invoke stream whose calls are all denied ends as the rewrite."""

    def seam(self, sent: bytes) -> None:
        return None
