"""Continuing an answer upstream after its calls were denied: the I/O half.

The sans-IO half (which answers continue, the next request, joining answers, stream
surgery) is providers/continuation.py and one `*_continue` module per wire format,
listed in `FORMATS`. Here: each continuation is admitted by the session guard like a
request (budgets and the LLM-call cap; one that would overspend is not sent), sent with
the agent's headers (`Call.send`), traced as its own inference span, charged with its
own usage, and audited (`kind: continuation`, naming the denied decisions it answers).
Its answer's calls are judged like any (same request id). Anything that goes wrong ends
the answer as it stood, the rewrite, with a record: never an unjudged call, never a
crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
from opentelemetry.trace import get_current_span

from .. import tracing
from ..approvals import caller
from ..audit.log import AuditWriteError
from ..errors import BudgetExceeded, StoreUnavailable, TetherError, UpstreamError
from ..model import Decision, Exchange, OnDeny, ToolCall
from ..providers import responses_history as history
from ..providers.anthropic_continue import AnthropicContinues
from ..providers.base import ErrorReply, ParsedRequest, StreamFilter, WireFormat
from ..providers.bedrock_continue import BedrockContinues
from ..providers.bedrock_invoke import InvokeContinues
from ..providers.continuation import Continues, ContinuingStream, Denied, to_continue
from ..providers.gemini_continue import GeminiContinues
from ..providers.openai_chat_continue import ChatContinues
from ..providers.openai_responses_continue import ResponsesContinues
from ..sessions.guard import Admission
from . import responses_turns
from .upstream import read_at_most

if TYPE_CHECKING:
    from aiohttp import web

    from .context import Context
    from .llm_answers import Answers, Call

log = logging.getLogger("tether.server")

# Wire format name -> its part in continuing. Azure OpenAI speaks openai.chat.
FORMATS: dict[str, Continues] = {
    "openai.chat": ChatContinues(),
    "openai.responses": ResponsesContinues(),
    "anthropic.messages": AnthropicContinues(),
    "bedrock.converse": BedrockContinues(),
    "bedrock.invoke": InvokeContinues(),
    "gemini.generate": GeminiContinues(),
}

BOUND_RULE = "tether:continuations"
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream", "application/json")


def enabled(ctx: Context) -> bool:
    """Whether this policy can continue at all (PolicyEngine.continues)."""
    return ctx.governor.engine.continues


def continuing(ctx: Context, fmt: WireFormat, first: StreamFilter,
               remake: Callable[[], StreamFilter], sent: bytes) -> StreamFilter:
    """`first` wrapped so the answer can go on (or as it is, where it cannot). `remake`
    gives a fresh filter of the same kind for each continuation."""
    cont = FORMATS.get(fmt.name)
    seam = cont.seam(sent) if cont is not None and enabled(ctx) else None
    if seam is None:
        return first
    made: list[StreamFilter] = [first]

    def filters() -> StreamFilter:
        return made.pop() if made else remake()
    return ContinuingStream(filters, seam, sent, ctx.governor.engine.policy.max_continuations)


# --- the record of each continuation -----------------------------------------------------


def _record(ctx: Context, call: Call, exchange: Exchange, round_: int, denied: Sequence[Denied],
            outcome: str, message: str = "", status: int | None = None) -> None:
    ctx.governor.metrics.continuations.labels(call.provider.name, outcome).inc()
    if outcome == "bound":
        ctx.governor.metrics.loop_trips.labels(BOUND_RULE, "enforce").inc()
    span = get_current_span().get_span_context()
    record: dict[str, object] = {
        "kind": "continuation", "request_id": call.rid,
        "trace_id": format(span.trace_id, "032x") if span.is_valid else None,
        "provider": call.provider.name, "endpoint": exchange.endpoint,
        "session": exchange.session, "agent": exchange.agent, "model": exchange.model,
        "stream": exchange.stream, "round": round_, "outcome": outcome,
        "continues": [d.decision.decision_id for d in denied],
        "tools": [d.call.name for d in denied], "call_ids": [d.call.id for d in denied],
        "rules": sorted({r for d in denied for r in d.decision.rules}),
        "policy_revision": ctx.governor.engine.revision,
    }
    if outcome == "bound":
        record["rule"] = BOUND_RULE
    if message:
        record["message"] = message
    if status is not None:
        record["status"] = status
    try:
        ctx.governor.audit.write(record)
    except AuditWriteError:
        # The answer ends as the rewrite either way; a continuation is sent only after
        # its record is written (`_admit`), so this loses no trace of an upstream call.
        log.exception("audit write failed for a continuation record")
        ctx.governor.metrics.audit_write_errors.inc()


async def admit(ctx: Context, call: Call, exchange: Exchange, request: bytes,
                 parsed: ParsedRequest | None, round_: int, denied: Sequence[Denied]
                 ) -> Admission | None:
    """The continuation admitted (budgets reserved) and recorded before it is sent; None
    when it may not be (a budget spent, the store down, the record not written)."""
    try:
        admission = await ctx.guard.admit(
            agent=call.agent, session=call.session or "", model=exchange.model,
            body_bytes=len(request),
            max_output=parsed.max_output_tokens if parsed is not None else None)
    except (BudgetExceeded, StoreUnavailable) as e:
        _record(ctx, call, exchange, round_, denied, "budget", str(e))
        return None
    _record(ctx, call, exchange, round_, denied, "sent")
    return admission


def _span(ctx: Context, call: Call, exchange: Exchange, fmt: WireFormat, round_: int,
          denied: Sequence[Denied]) -> tracing.Span:
    span = tracing.start_inference(ctx.governor.tracer, exchange, fmt.name,
                                   legacy=ctx.config.telemetry.legacy_gen_ai_system)
    if span.is_recording():
        span.set_attribute("tether.continuation.round", round_)
        span.set_attribute("tether.continuation.continues",
                           [d.decision.decision_id for d in denied])
    return span


def failed(ctx: Context, call: Call, exchange: Exchange, round_: int,
           denied: Sequence[Denied], message: str, status: int | None = None) -> None:
    """A continuation the upstream refused or that could not be sent: the answer ends as
    the rewrite (the caller's part)."""
    _record(ctx, call, exchange, round_, denied, "failed", message, status=status)


def bound(ctx: Context, call: Call, exchange: Exchange, rounds: int,
          denied: Sequence[Denied]) -> None:
    """The loop breaker: the model asked only for denied calls once more than the bound
    allows; the answer ends as the rewrite."""
    _record(ctx, call, exchange, rounds, denied, "bound",
            f"the model asked only for denied calls {rounds + 1} times in a row; "
            f"defaults.max_continuations is {ctx.governor.engine.policy.max_continuations}")


# --- whole answers -----------------------------------------------------------------------


async def whole(answers: Answers, out: bytes, body: bytes, calls: Sequence[ToolCall],
                decisions: Sequence[Decision], call: Call, exchange: Exchange,
                parsed_request: ParsedRequest | None = None
                ) -> tuple[bytes, bytes, Sequence[ToolCall], Sequence[Decision]] | ErrorReply:
    """The answer the agent gets (`out`, as rendered), continued while its calls are all
    denied with `continue`, up to the bound; then the last round as rendered, its calls
    and decisions (what a Responses record keeps); or the 403 a continuation's
    `on_deny: error` call makes."""
    ctx = answers.ctx
    fmt = call.route.format
    cont = FORMATS.get(fmt.name) if fmt is not None else None
    if fmt is None or cont is None or call.send is None or not enabled(ctx):
        return out, out, calls, decisions
    most = ctx.governor.engine.policy.max_continuations
    limit = ctx.config.max_response_bytes
    last_out = out
    rounds = 0
    while (denied := to_continue(calls, decisions)) is not None:
        if rounds >= most:
            bound(ctx, call, exchange, rounds, denied)
            break
        try:
            request = cont.follow_whole(call.sent, body, denied)
        except (ValueError, KeyError, TypeError, RecursionError):
            request = None
        if request is None:
            _record(ctx, call, exchange, rounds + 1, denied, "unsupported",
                    "this answer cannot be continued (see docs/continuations.md)")
            break
        rounds += 1
        admission = await admit(ctx, call, exchange, request, parsed_request, rounds, denied)
        if admission is None:
            break
        span = _span(ctx, call, exchange, fmt, rounds, denied)
        status: int | None = None
        try:
            sent = time.perf_counter()
            with tracing.current(span):
                resp = await call.send(request)
            async with resp:
                status = resp.status
                more = await read_at_most(resp, limit + 1)
            call.waited += time.perf_counter() - sent
            if status != 200:
                raise UpstreamError(f"the upstream answered {status}: "
                                    f"{more[:300].decode('utf-8', 'replace')}")
            if len(more) > limit:
                raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
            parsed = fmt.parse_response(more)
            tracing.note_answer(span, fmt.name, more, parsed.usage)
        except (TetherError, aiohttp.ClientError, TimeoutError) as e:
            tracing.failed(span, type(e).__name__)
            tracing.finish(span)
            if status == 200:  # the upstream answered: what it used stays charged
                await ctx.guard.settle(admission, None)
            else:
                await ctx.guard.release(admission)
            _record(ctx, call, exchange, rounds, denied, "failed",
                    getattr(e, "message", "") or type(e).__name__, status=status)
            break
        tracing.finish(span)
        await ctx.guard.settle(admission, parsed.usage)
        call.answer = more  # a hold in this round shows the model's text from its answer
        more_decisions = await answers.decide_calls(parsed.calls, exchange, call)
        if any(not d.allowed and d.on_deny is OnDeny.ERROR for d in more_decisions):
            return fmt.denied_error(parsed.calls, more_decisions)
        if call.turn is not None:  # a Responses round continued past: its record, settled
            await responses_turns.put_answered(ctx.rewrites, history.from_whole(
                last_out, calls, decisions, call.agent, call.turn.conversation))
        last_out = fmt.render_response(parsed, more_decisions)
        out = cont.join(out, last_out)
        call.sent, body, calls, decisions = request, more, parsed.calls, more_decisions
    return out, last_out, calls, decisions


# --- streams -----------------------------------------------------------------------------


def _caller_left(e: BaseException) -> bool:
    """A reset on the agent's side (aiohttp's ClientConnectionResetError, raised writing to
    a closed client, is also a ClientError), as the front end's presence check says."""
    gone = caller.current()
    return isinstance(e, ConnectionResetError) and gone is not None and gone()


async def rounds(answers: Answers, stream: ContinuingStream, out: web.StreamResponse,
                 call: Call, exchange: Exchange, parsed_request: ParsedRequest | None = None
                 ) -> None:
    """The continuations of a stream whose round ended with its calls all denied: each
    sent upstream (streamed, like the agent's request), its events fed through the same
    filter to the same client. One that cannot be had ends the stream as the rewrite. A
    caller that leaves meanwhile ends it too (`outcome: abandoned`; what the round used
    is charged, and the caller's ConnectionResetError goes on up)."""
    inflight: list[tuple[int, Sequence[Denied]]] = []  # the round being sent, its denials
    try:
        await _rounds(answers, stream, out, call, exchange, parsed_request, inflight)
    except ConnectionResetError:
        if inflight:
            _record(answers.ctx, call, exchange, *inflight[-1], "abandoned",
                    "the caller disconnected during a continuation")
        raise


async def _rounds(answers: Answers, stream: ContinuingStream, out: web.StreamResponse,
                  call: Call, exchange: Exchange, parsed_request: ParsedRequest | None,
                  inflight: list[tuple[int, Sequence[Denied]]]) -> None:
    ctx = answers.ctx
    fmt = call.route.format
    assert fmt is not None
    while True:
        if stream.bounded:
            bound(ctx, call, exchange, stream.rounds, stream.denied)
            return
        request, denied = stream.follow, stream.denied
        if request is None or call.send is None:
            return
        round_ = stream.rounds + 1
        inflight.append((round_, denied))
        admission = await admit(ctx, call, exchange, request, parsed_request, round_, denied)
        if admission is None:
            await out.write(stream.give_up())
            return
        span = _span(ctx, call, exchange, fmt, round_, denied)
        settled = False
        try:
            sent = time.perf_counter()
            with tracing.current(span):
                resp = await call.send(request)
            async with resp:
                call.waited += time.perf_counter() - sent
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if resp.status != 200 or ctype not in STREAM_TYPES:
                    more = await read_at_most(resp, 2048)
                    tracing.failed(span, str(resp.status))
                    await ctx.guard.release(admission)
                    settled = True
                    _record(ctx, call, exchange, round_, denied, "failed",
                            more[:300].decode("utf-8", "replace"), status=resp.status)
                    await out.write(stream.give_up())
                    return
                await out.write(stream.resume())
                try:
                    async for chunk in resp.content.iter_any():
                        await answers.drive(stream, stream.feed(chunk), out, exchange, call)
                        if stream.failed is not None:
                            resp.close()
                            break
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                        TimeoutError) as e:
                    log.warning("upstream stream broke in a continuation: %s", type(e).__name__)
                await answers.drive(stream, stream.close(), out, exchange, call)
        except (aiohttp.ClientError, TimeoutError) as e:
            tracing.failed(span, type(e).__name__)
            if _caller_left(e):  # not the upstream's doing: `rounds` records it
                raise
            _record(ctx, call, exchange, round_, denied, "failed", type(e).__name__)
            if stream.follow is not None:
                # Not sent, or no answer: the answer ends as the rewrite.
                await ctx.guard.release(admission)
                settled = True
                await out.write(stream.give_up())
                return
            # Broken mid-stream: the filter ends it (open calls denied, an error event).
            await answers.drive(stream, stream.close(), out, exchange, call)
        finally:
            if not settled:  # the client may have gone: what was used is charged
                tracing.note_usage(span, stream.round_usage)
                if stream.failed:
                    tracing.failed(span, "stream_error")
                await ctx.guard.settle(admission, stream.round_usage)
            tracing.finish(span)
