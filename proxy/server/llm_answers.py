"""The upstream's answer to a governed LLM call: read whole, or filtered as it streams,
and every tool call in it decided before the agent can see it.

A whole answer is read within `limits.max_response_bytes` and decided before a byte
of it is returned. In a stream, text passes at once but the filter holds each tool
call back until it is complete and decided here (providers.base); while a call
waits for a human, an SSE stream is kept alive with comments. Time spent waiting on
the upstream and on humans is counted in `Call.waited`, so the overhead metrics
measure tether alone.

Provider-run calls an answer reports as run are judged before the calls it hands the
agent (`_judge_ran`). A whole answer's are all known first. A stream reports each as
its item or block completes (`Step.ran`); once one broke the policy, every call the
stream hands out after it is denied, but calls already released before it was seen
cannot be taken back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import aiohttp
from aiohttp import web

from .. import tracing
from ..approvals import context as hold_context
from ..approvals.context import HoldContext
from ..approvals.holds import KeepAlive
from ..auth.authenticator import ANONYMOUS, Identity
from ..config import Upstream
from ..errors import UpstreamError
from ..model import Action, Decision, Exchange, OnDeny, RuleTrace, ToolCall
from ..policy.openapi_arguments import arguments_trace
from ..providers import sse
from ..providers.base import ErrorReply, ParsedRequest, Provider, Route, Step, StreamFilter
from ..providers.continuation import ContinuingStream
from ..providers.held import over_limit
from ..providers.openai_responses_approving import ApprovingStream
from ..providers.provider_ran import VIOLATION
from ..sessions.guard import Admission
from . import approvals_continue, continuation, responses_turns
from .approvals_continue import Send
from .context import Context
from .errors import reply
from .flows import FlowState
from .upstream import StreamedAnswer, first_event_apart, read_at_most, return_headers

log = logging.getLogger("tether.server")


@dataclass(slots=True)
class Call:
    """One governed request in flight."""

    provider: Provider
    route: Route
    upstream: Upstream
    rid: str
    session: str | None
    agent: str | None
    admission: Admission | None = None
    started: float = field(default_factory=time.perf_counter)
    waited: float = 0.0  # upstream and human time, which is not tether's overhead
    who: Identity = ANONYMOUS  # the verified identity; its consumed credential is not forwarded
    inference: tracing.Span = tracing.NO_SPAN  # the call upstream, in the GenAI conventions
    flow: FlowState = field(default_factory=FlowState)  # the session history's part (flows.py)
    # Provider-run calls that ran though the policy does not allow them (`_judge_ran`),
    # and the trace that denies the calls a stream hands out after the first of them.
    broke: set[str] = field(default_factory=set)
    violation: RuleTrace | None = None
    # Continuing upstream for the agent (MCP approvals tether answers): the body last sent,
    # a way to send another to the same place, the continuations made, and the MCP tools
    # whose approval requests the agent asked for itself (providers/mcp_approvals.py).
    sent: bytes = b""
    send: Send | None = None
    rounds: int = 0
    agent_approves: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # A Responses turn: what it continued, for recording its answer (responses_turns.py).
    turn: responses_turns.Turn | None = None
    # The agent's request as parsed (a continuation is admitted by its max output tokens).
    parsed: ParsedRequest | None = None
    # The answer being decided (whole), or the tail of what a stream released so far:
    # where a hold's context reads the model's text before the call (approvals/context.py).
    answer: bytes = b""
    streamed: bytearray = field(default_factory=bytearray)

    def overhead(self) -> float:
        return time.perf_counter() - self.started - self.waited


class Answers:
    """The answer side of `LLMRoutes`, built with it for each request."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def upstream_error(self, resp: aiohttp.ClientResponse, ctype: str, call: Call,
                             exchange: Exchange) -> web.Response:
        body = await read_at_most(resp, self.ctx.config.max_response_bytes)
        if ctype != "application/json":
            raise UpstreamError(f"the upstream answered {resp.status} with "
                                f"{ctype or 'no content type'}, not a JSON error")
        self.ctx.governor.reject(provider=call.provider.name, status=resp.status,
                                 code="upstream_status",
                                 message=body[:500].decode("utf-8", "replace"),
                                 request_id=call.rid, session=exchange.session,
                                 agent=exchange.agent, endpoint=exchange.endpoint)
        self.ctx.governor.metrics.requests.labels(call.provider.name, str(resp.status)).inc()
        if call.turn is not None and resp.status == 400:  # a call tether denied, unanswered?
            body = responses_turns.explain_refusal(body)
        return web.Response(status=resp.status, body=body, headers=return_headers(resp.headers))

    def _judge_ran(self, ran: Sequence[ToolCall], exchange: Exchange, call: Call
                   ) -> RuleTrace | None:
        """Each provider-run call the answer reports as run, judged (and audited, `stage:
        ran`) by the rules that judged it on the request; one they would not allow ran
        anyway: a violation, counted once per answer, that denies every call the answer
        hands the agent from then on. A stream calls this once per step that reports some;
        the trace names every call that broke the policy so far."""
        first = not call.broke
        for done in ran:
            asked = replace(exchange, declared_tools=(done.name,))
            decision = self.ctx.governor.decide(done, asked, request_id=call.rid, stage="ran")
            if self.ctx.flows is not None:  # it ran: its content is in the model's context
                self.ctx.flows.ran(done, decision, call.flow)
            if not decision.allowed:
                call.broke.add(done.name)
        if not call.broke:
            return None
        if first:
            self.ctx.governor.metrics.provider_tool_violations.labels(call.provider.name).inc()
        return RuleTrace(VIOLATION, True, f"the provider ran {', '.join(sorted(call.broke))}, "
                         "which the policy does not allow, so nothing else in this answer "
                         "is released", Action.DENY)

    async def decide_calls(self, calls: Sequence[ToolCall], exchange: Exchange, call: Call,
                           out: object = None, violation: RuleTrace | None = None, *,
                           stage: str | None = None) -> list[Decision]:
        """`out`: the agent's stream, kept alive while a human decides. `stage`: for the
        audit record ("approval": an MCP approval request)."""
        decisions = []
        flows = self.ctx.flows if calls or call.flow.ran else None
        if flows is not None:  # flow rules read the session's history (server/flows.py)
            exchange, broken = await flows.before(exchange, call.flow)
            violation = violation or broken
        opa = self.ctx.opa
        budget = await opa.budget(self.ctx.guard, call.admission) if opa and calls else None
        # A call whose arguments are over the limit is judged (and audited, held) without
        # them: a stream filter already cut it; a whole answer's is cut here.
        limit = self.ctx.config.max_arguments_bytes
        calls = [over_limit(c, limit) or c for c in calls]
        for c in calls:
            trace = await self.ctx.guard.check_call(call.admission, c)
            # A tool linked to an OpenAPI operation: its arguments must fit the operation.
            op = self.ctx.config.apis.for_tool(c.name)
            extra: tuple[RuleTrace | None, ...] = (trace, arguments_trace(op, c) if op else None,
                                                   violation)
            if opa is not None:  # OPA's verdict joins the rules': the strictest wins
                extra += (await opa.judge(c, exchange, "llm", api=op.name if op else None,
                                          budget=budget),)
            decisions.append(self.ctx.governor.decide(
                c, exchange, request_id=call.rid, extra=tuple(t for t in extra if t),
                api=op.name if op else None, stage=stage))
        judged = list(decisions)  # before holds end: a hold that ends allowed was approved
        if any(d.action is Action.HOLD for d in decisions):
            held = time.perf_counter()
            if self.ctx.linked is not None:  # the approver sees what else approving lets run
                decisions = self.ctx.linked.for_approver(calls, decisions)
            decisions = await self.ctx.holds.resolve(
                calls, decisions, exchange, self._keepalive(out),
                self._contexts(calls, decisions, exchange, call, read=flows is not None))
            call.waited += time.perf_counter() - held
        if flows is not None:  # before the agent sees any of them
            decisions = await flows.after(calls, decisions, call.flow)
        if self.ctx.linked is not None and calls:  # filed before the agent sees them
            await self.ctx.linked.record(calls, judged, decisions, exchange)
        return decisions

    def _contexts(self, calls: Sequence[ToolCall], decisions: Sequence[Decision],
                  exchange: Exchange, call: Call, *, read: bool) -> list[HoldContext | None]:
        """What the approver of each held call is shown: the operation it maps to (its
        linked `tools.X.api`, else its OpenAPI operation), the user's request, the model's
        text before it (the answer read once for all), and the session's history when it
        was read (`read`). Only shown, never decided on: one that cannot be read is
        unknown, and the hold goes on."""
        try:
            user = hold_context.last_user_text(call.sent)
            answer = hold_context.read_answer(call.answer or bytes(call.streamed))
            out: list[HoldContext | None] = []
            for c, d in zip(calls, decisions, strict=True):
                link = self.ctx.linked.tools.for_tool(c.name) if self.ctx.linked else None
                op = self.ctx.config.apis.for_tool(c.name)
                out.append(None if d.action is not Action.HOLD else hold_context.build(
                    api=link.operation if link else op.name if op else None, user=user,
                    said=answer.before(c.id), history=exchange.history if read else None))
            return out
        except Exception:  # noqa: BLE001 - display only: the hold must not fail for it
            log.exception("approvals: the context of a held call could not be read")
            return []

    @staticmethod
    def _keepalive(out: object) -> KeepAlive | None:
        """SSE comments while a stream waits for a human; other framings (the binary
        event stream, Gemini's JSON array) have no comment, so they wait silently."""
        if not isinstance(out, web.StreamResponse) or not out.headers.get(
                "content-type", "").startswith("text/event-stream"):
            return None

        async def send(text: str) -> None:
            await out.write(sse.comment(text))

        return send

    async def whole(self, resp: aiohttp.ClientResponse, call: Call,
                    exchange: Exchange) -> web.Response:
        fmt = call.route.format
        assert fmt is not None
        limit = self.ctx.config.max_response_bytes
        reading = time.perf_counter()
        body = await read_at_most(resp, limit + 1)
        call.waited += time.perf_counter() - reading
        if len(body) > limit:
            raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
        parsed = fmt.parse_response(body)
        tracing.note_answer(call.inference, fmt.name, body, parsed.usage)
        tracing.finish(call.inference)  # the answer is in: deciding (and holds) are not in it
        if getattr(parsed, "approvals", ()):
            body, parsed = await approvals_continue.whole(self, body, parsed, call, exchange)
        await self.ctx.guard.settle(call.admission, parsed.usage, extra_calls=call.rounds)
        ran: tuple[ToolCall, ...] = getattr(parsed, "ran", ())
        violation = self._judge_ran(ran, exchange, call) if ran else None
        call.answer = body
        decisions = await self.decide_calls(parsed.calls, exchange, call, violation=violation)
        refused = any(not d.allowed and d.on_deny is OnDeny.ERROR for d in decisions)
        metrics = self.ctx.governor.metrics
        metrics.requests.labels(call.provider.name, "403" if refused else "200").inc()
        metrics.overhead_seconds.labels(call.provider.name, "whole").observe(call.overhead())
        if refused:
            return reply(fmt.denied_error(parsed.calls, decisions), retry=False,
                         code="tool_call_denied")
        out = fmt.render_response(parsed, decisions)
        # Its calls all denied: the model reads why and goes on (server/continuation.py).
        went_on = await continuation.whole(self, out, body, parsed.calls, decisions, call,
                                           exchange, call.parsed)
        if isinstance(went_on, ErrorReply):
            return reply(went_on, retry=False, code="tool_call_denied")
        out, last_out, last_calls, last_decisions = went_on
        if call.turn is not None:  # a Responses answer: what tether changed, for the next turn
            await responses_turns.after_whole(self.ctx.rewrites, call.agent, call.turn,
                                              last_out, last_calls, last_decisions)
        return web.Response(status=200, body=out, headers=return_headers(resp.headers))

    async def stream(self, request: web.Request, resp: aiohttp.ClientResponse, call: Call,
                     exchange: Exchange, stream: StreamFilter) -> web.StreamResponse:
        out = StreamedAnswer(status=200, headers=return_headers(resp.headers))
        out.headers["Cache-Control"] = "no-cache"
        try:
            await out.start(request, resp.content)
            # Time to first byte: the agent's response headers, less the upstream's.
            self.ctx.governor.metrics.overhead_seconds.labels(call.provider.name, "stream").observe(
                call.overhead())
            try:
                async for chunk in first_event_apart(resp.content.iter_any()):
                    await self.drive(stream, stream.feed(chunk), out, exchange, call)
                    if stream.failed is not None:
                        # The filter ended the stream (a cut, a denial, a broken upstream):
                        # nothing more goes to the client, so stop reading and close the
                        # upstream, which stops its generation.
                        resp.close()
                        break
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    TimeoutError) as e:
                log.warning("upstream stream broke: %s", type(e).__name__)
            await self.drive(stream, stream.close(), out, exchange, call)
            if isinstance(stream, ApprovingStream):  # tether answers MCP approvals upstream
                await approvals_continue.rounds(self, stream, out, call, exchange)
            elif isinstance(stream, ContinuingStream):  # its calls all denied: it goes on
                await continuation.rounds(self, stream, out, call, exchange, call.parsed)
            if call.turn is not None:  # a Responses answer: recorded for the next turn
                await responses_turns.after_stream(self.ctx.rewrites, call.agent, call.turn,
                                                   stream)
        except ConnectionResetError:
            # The agent went away: stop reading upstream (which stops its generation),
            # charge what was used so far. Decided calls are already audited.
            log.info("client disconnected mid-stream (request %s)", call.rid)
            return out
        finally:
            await self._settle_stream(call, stream)
        status = "200" if stream.failed is None else "200-error"
        self.ctx.governor.metrics.requests.labels(call.provider.name, status).inc()
        if stream.failed:
            self.ctx.governor.reject(provider=call.provider.name, status=200,
                                     code="stream_error", message=stream.failed,
                                     request_id=call.rid, session=exchange.session,
                                     agent=exchange.agent, endpoint=exchange.endpoint)
        await out.write_eof()
        return out

    async def _settle_stream(self, call: Call, stream: StreamFilter) -> None:
        tracing.note_usage(call.inference, stream.usage)
        if stream.failed:
            tracing.failed(call.inference, "stream_error")
        tracing.finish(call.inference)
        units = getattr(stream, "output_units", None)
        await self.ctx.guard.settle(call.admission, stream.usage,
                                    units if isinstance(units, int) else None,
                                    extra_calls=call.rounds)

    async def drive(self, stream: StreamFilter, step: Step, out: web.StreamResponse,
                     exchange: Exchange, call: Call) -> None:
        while True:
            if step.ran:  # what ran came before the pending calls: it is judged first
                call.violation = self._judge_ran(step.ran, exchange, call)
            if step.data:
                call.streamed += step.data
                if len(call.streamed) > 2 * hold_context.STREAM_TAIL:
                    del call.streamed[:-hold_context.STREAM_TAIL]
                await out.write(step.data)
            if step.approvals and isinstance(stream, ApprovingStream):
                step = stream.approve(await approvals_continue.judge(
                    self, step.approvals, exchange, call, out))
                continue
            if not step.pending:
                return
            step = stream.decide(await self.decide_calls(step.pending, exchange, call, out,
                                                    call.violation))
