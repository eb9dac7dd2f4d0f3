"""What every wire-format module provides, and the pieces they share.

A provider is sans-IO: it turns request and response bytes into the neutral
model and renders rewritten bytes back. Its stream filter is an incremental
object driven by the front end:

    step = stream.feed(chunk)          # or stream.close() at end of input
    while True:
        send(step.data)                # bytes for the client, may be empty
        if not step.pending:
            break
        step = stream.decide([decide(c) for c in step.pending])

`pending` holds the tool calls completed by the input so far; nothing after
them is released until they are decided, which is how "decide before bytes
leave" holds in a stream while text before the calls flows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..model import Decision, Exchange, ToolCall, Usage


@dataclass(frozen=True, slots=True)
class Step:
    data: bytes = b""
    pending: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What a provider reads from the agent's request body."""

    model: str
    stream: bool
    declared_tools: tuple[str, ...]
    user: str | None = None
    include_usage: bool = False


class ParsedResponse(Protocol):
    @property
    def calls(self) -> tuple[ToolCall, ...]: ...

    @property
    def usage(self) -> Usage | None: ...


class StreamFilter(Protocol):
    def feed(self, chunk: bytes) -> Step: ...

    def decide(self, decisions: Sequence[Decision]) -> Step: ...

    def close(self) -> Step: ...

    @property
    def usage(self) -> Usage | None: ...

    @property
    def failed(self) -> str | None: ...


def denial_text(call: ToolCall, decision: Decision) -> str:
    """The text the model reads in place of a denied call."""
    rules = ", ".join(decision.rules) or "policy"
    message = decision.message or "the call is not allowed"
    return (
        f"[tether] The tool call {call.name!r} was denied by {rules}: {message}. "
        "It was not executed."
    )


def exchange_for(
    provider: str,
    request: ParsedRequest,
    *,
    session: str | None,
    agent: str | None,
    endpoint: str,
) -> Exchange:
    return Exchange(
        provider=provider,
        model=request.model,
        declared_tools=request.declared_tools,
        stream=request.stream,
        session=session,
        agent=agent,
        endpoint=endpoint,
    )
