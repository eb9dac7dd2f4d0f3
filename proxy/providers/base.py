"""What every provider and wire format provides, and the pieces they share.

A *provider* is an API family behind one route prefix (`/openai/`,
`/anthropic/` ...): it classifies request paths into routes and shapes errors
the way that API does. A *wire format* is one request/response codec
(Chat Completions, Responses, Messages ...). Both are sans-IO: bytes in,
neutral model or bytes out.

A format's stream filter is an incremental object driven by the front end:

    step = stream.feed(chunk)          # or stream.close() at end of input
    while True:
        send(step.data)                # bytes for the client, may be empty
        if not step.pending:
            break
        step = stream.decide([decide(c) for c in step.pending])

`pending` holds the tool calls completed by the input so far; nothing after
them is released until they are decided, which is how "decide before bytes
leave" holds in a stream while text before the calls flows at once.

Every format's filter is the one engine of stream_engine.py driving that format's
codec: the order, holds, cuts and failures are the engine's, the frames the codec's.

`approvals` holds OpenAI MCP approval requests (mcp_approvals.py), judged like calls
and answered with the filter's `approve`.

`ran` holds the provider-run calls (provider_ran.py) whose item or block the
input so far completed. They already happened, so their bytes pass unheld in
`data`; the front end judges them before it decides `pending`, and once one
broke the policy it denies every call the stream still hands out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..model import Decision, Exchange, ToolCall, Usage


@dataclass(frozen=True, slots=True)
class Step:
    data: bytes = b""
    pending: tuple[ToolCall, ...] = ()
    ran: tuple[ToolCall, ...] = ()
    # MCP approval requests to judge before anything after them is released; answered
    # with `approve(decisions)` (openai_responses_approving.py).
    approvals: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What a format reads from the agent's request body (and route)."""

    model: str
    stream: bool
    declared_tools: tuple[str, ...]
    user: str | None = None
    include_usage: bool = False
    max_output_tokens: int | None = None
    # System prompt and first user message: identifies a conversation across turns.
    fingerprint: str | None = None


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


class WireFormat(Protocol):
    """One request/response codec."""

    name: str

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest: ...

    def parse_response(self, body: bytes) -> ParsedResponse: ...

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes: ...

    def stream(self, route: Route, *, max_arguments: int = ...) -> StreamFilter:
        """`max_arguments`: the argument bytes the filter holds back at most, past which
        it cuts the stream (limits.max_arguments_bytes; providers/held.py)."""
        ...

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply: ...


@dataclass(frozen=True, slots=True)
class Restricted:
    """A request body with the tools outside an agent's scope removed."""

    body: bytes
    removed: tuple[str, ...]  # the names taken out, in the order they were declared


@runtime_checkable
class RestrictsTools(Protocol):
    """A format that can take declared tools out of a request before it goes upstream,
    so the model never sees a tool its agent may not use (hub and spoke).

    `permits(name)` says whether a declared tool may stay (hosted tools are named by
    their type, see each format). None means nothing was removed: the body is sent
    byte for byte as the agent wrote it. A `tool_choice` that forces a removed tool
    raises `BadRequest`: the agent asked for something it may not have, and quietly
    letting the model choose another tool would change what the request means.
    """

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]) -> Restricted | None: ...


class RouteKind(enum.Enum):
    GOVERNED = "governed"  # tool calls are read and decided
    PASS = "pass"          # forwarded unchanged (models list, embeddings ...)
    REFUSE = "refuse"      # answered with an error, nothing forwarded
    BATCH = "batch"        # a batch API step: judged by `upstreams.NAME.batches`, then passed
    RETRIEVE = "retrieve"  # a stored answer read back: shown as tether rewrote it, or refused


class BatchStep(enum.Enum):
    """Which step of a provider's batch API a BATCH route is."""

    UPLOAD = "upload"                      # a file upload that may be a batch's input
    CREATE_FROM_FILE = "create_from_file"  # a batch naming an uploaded input file
    CREATE_INLINE = "create_inline"        # a batch carrying its requests in the body
    MANAGE = "manage"                      # list, retrieve, cancel, delete, results


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    format: WireFormat | None = None
    upstream_path: str = ""      # path to append to the upstream base URL
    model: str | None = None     # when the path names it (Bedrock, Gemini, Azure)
    stream: bool | None = None   # when the path decides it (converse-stream ...)
    status: int = 404            # for REFUSE
    message: str = ""            # for REFUSE
    params: Mapping[str, str] = field(default_factory=dict)
    batch: BatchStep | None = None  # for BATCH
    files_path: str = ""         # for CREATE_FROM_FILE: where the input file is read


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class Provider(Protocol):
    """An API family behind one route prefix; `name` is also its upstream's name.

    `route` gets the path after the prefix still percent-encoded, already checked
    for ambiguity: no needless escapes, so comparing segments is safe. Escapes
    of `/`, `.`, `\\`, NUL and `;` appear only if named in `path_escapes`.
    """

    name: str
    path_escapes: frozenset[str]

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route: ...

    def error(self, status: int, message: str, code: str) -> ErrorReply: ...


def denial_text(call: ToolCall, decision: Decision) -> str:
    """The text the model reads in place of a denied call."""
    rules = ", ".join(decision.rules) or "policy"
    message = decision.message or "the call is not allowed"
    return (
        f"[tether] The tool call {call.name!r} was denied by {rules}: {message}. "
        "It was not executed."
    )


def denial_summary(calls: Sequence[ToolCall], decisions: Sequence[Decision]) -> str:
    return " ".join(denial_text(c, d) for c, d in zip(calls, decisions, strict=True)
                    if not d.allowed)


def exchange_for(
    provider: str,
    request: ParsedRequest,
    *,
    session: str | None,
    agent: str | None,
    endpoint: str,
    claims: Mapping[str, object] | None = None,
) -> Exchange:
    return Exchange(
        provider=provider,
        model=request.model,
        declared_tools=request.declared_tools,
        stream=request.stream,
        session=session,
        agent=agent,
        endpoint=endpoint,
        claims=claims or {},
    )
