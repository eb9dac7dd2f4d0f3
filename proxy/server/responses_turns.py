"""A Responses conversation that goes on after tether rewrote an answer: the I/O half.

Before a Responses request goes upstream (`before`), the ids it names are looked up in
the rewrite store (sessions/rewrites.py) and the request made to fit what tether changed
(providers/responses_history.py): a first round's id stands for the last round tether
continued to, references to replacement messages are expanded, denied calls the
provider still holds get their outputs. After the answer was decided (`after`), what
tether changed in it is recorded for the next turn.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import StoreUnavailable
from ..model import Decision, ToolCall
from ..providers import responses_history as history
from ..providers.base import StreamFilter
from ..providers.openai_responses_approving import ApprovingStream
from ..providers.openai_responses_stream import ResponsesStream
from ..sessions.results import result_ids
from ..sessions.rewrites import Rewrites
from ..surrogates import json_text

log = logging.getLogger("tether.server")


@dataclass(frozen=True, slots=True)
class Turn:
    """What one request continued: its conversation, and the answers in it whose denied
    calls it answered (settled once its own answer came back)."""

    conversation: str | None = None
    answered: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # the call ids tether answered with their denial text


NO_TURN = Turn()
MAX_ID = 256  # longer ids are none that tether or OpenAI made: not looked up


async def before(rewrites: Rewrites, agent: str | None, body: bytes) -> tuple[bytes, Turn]:
    """The body to send upstream. Raises BadRequest for what tether cannot resolve,
    StoreUnavailable when the store cannot be read (the caller fails closed)."""
    if not history.may_name(body):
        return body, NO_TURN
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return body, NO_TURN  # the format's parser refuses it, with its own message
    if not isinstance(obj, dict):
        return body, NO_TURN
    changed = False
    first = obj.get("previous_response_id")
    if isinstance(first, str) and len(first) <= MAX_ID:
        # A stream tether continued: chain from its last round.
        last = await rewrites.alias(agent, first)
        if last is not None:
            obj["previous_response_id"], changed = last, True
    wanted = history.wanted(obj)
    previous = await rewrites.response(wanted.previous) \
        if wanted.previous and len(wanted.previous) <= MAX_ID else None
    owed = await rewrites.owed(wanted.conversation) \
        if wanted.conversation and len(wanted.conversation) <= MAX_ID else []
    refs = list(dict.fromkeys(wanted.refs))  # each looked up once; one too long is none of ours
    items = await rewrites.items([r for r in refs if len(r) <= MAX_ID]) if refs else {}
    items.update((r, None) for r in refs if len(r) > MAX_ID)
    out = history.apply(obj, agent, previous, owed, items)
    outputs = history.owed_outputs(obj.get("input"), previous, owed, agent)
    turn = Turn(wanted.conversation, tuple(r.response_id for r in owed),
                tuple(d.call_id for d in outputs))
    if out is not None:
        return out, turn
    return (json_text(obj).encode("utf-8") if changed else body), turn


def results(body: bytes, turn: Turn | None) -> tuple[str, ...]:
    """The call ids the request's tool results answer (sessions/results.py), less those
    tether answered itself: the model reads tether's denial there, not a tool's output."""
    found = result_ids(body)
    if turn is None or not turn.outputs:
        return found
    return tuple(r for r in found if r not in turn.outputs)


async def alias(rewrites: Rewrites, agent: str | None, first: str, last: str) -> None:
    """A continued stream's first round's id stands for its last; a store that cannot
    take it is logged (the stream is already the agent's): a later turn chained from the
    first round then lacks the continuation, and may be asked again."""
    try:
        await rewrites.put_alias(agent, first, last)
    except StoreUnavailable:
        log.exception("could not record the last round of a continued Responses stream")


NOT_FOUND = b"No tool output found for function call"


def explain_refusal(body: bytes) -> bytes:
    """The upstream's 400 for a chained turn that leaves a stored call unanswered, with
    tether's part named: a call tether denied whose record it no longer holds (expired,
    or kept by a replica without the shared store) looks exactly like this."""
    if NOT_FOUND not in body:
        return body
    try:
        obj = json.loads(body)
        error = obj["error"]
        message = error["message"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return body
    if not isinstance(message, str) or not isinstance(error, dict):
        return body
    error["message"] = (message + " (tether: if tether denied that call, it no longer holds "
                        "the record of the denial, which expired or was kept elsewhere, so it "
                        "could not answer it for you; send a function_call_output for it, or "
                        "start a new conversation)")
    return json_text(obj).encode("utf-8")


async def _put(rewrites: Rewrites, record: history.Rewrite | None, turn: Turn) -> None:
    try:
        if turn.conversation is not None and turn.answered:
            await rewrites.settle(turn.conversation, turn.answered)
        if record is not None:
            await rewrites.put(record)
    except StoreUnavailable:
        # The answer is decided and goes out; its next turn may then fail upstream.
        log.exception("could not record what tether changed in a Responses answer")


async def put_answered(rewrites: Rewrites, record: history.Rewrite | None) -> None:
    """The record of a round tether continued past (server/continuation.py): kept, so a
    reference to its replacement message resolves, and settled at once in its
    conversation, since tether answered its denied calls upstream itself."""
    if record is None:
        return
    try:
        await rewrites.put(record)
        if record.conversation is not None:
            await rewrites.settle(record.conversation, (record.response_id,))
    except StoreUnavailable:
        log.exception("could not record a Responses round tether continued past")


async def after_whole(rewrites: Rewrites, agent: str | None, turn: Turn, out: bytes,
                      calls: Sequence[ToolCall], decisions: Sequence[Decision]) -> None:
    await _put(rewrites, history.from_whole(out, calls, decisions, agent, turn.conversation),
               turn)


async def after_stream(rewrites: Rewrites, agent: str | None, turn: Turn,
                       stream: StreamFilter) -> None:
    inner = stream.inner if isinstance(stream, ApprovingStream) else stream
    if not isinstance(inner, ResponsesStream) or stream.failed is not None:
        return
    await _put(rewrites, history.from_stream(inner.response_id, inner.decided,
                                             inner.replaced, agent, turn.conversation), turn)
