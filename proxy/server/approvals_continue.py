"""MCP approval requests in an answer: judged, held, and answered upstream by tether.

The decision and its wire format are in providers/mcp_approvals.py; this module does
the I/O for whole answers: it judges each approval request by the same path as a call
(rules, scope, budgets, OPA, holds; audited with `stage: approval`), and where the
approvals are tether's to answer, sends the continuation upstream and merges what comes
back, round after round (at most `MAX_ROUNDS`), into the one answer the agent gets.
Each extra upstream call is charged to the session (`Call.rounds`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import aiohttp

from ..errors import UpstreamError
from ..model import Decision, Exchange, ToolCall, Usage
from ..providers import mcp_approvals, openai_responses_continue
from ..providers import responses_history as history
from ..providers.base import ParsedResponse, WireFormat
from ..providers.openai_responses_approving import ApprovingStream
from ..providers.openai_responses_stream import ResponsesStream
from ..sessions.rewrites import Rewrites
from ..surrogates import json_text
from . import continuation, responses_turns
from .upstream import read_at_most

if TYPE_CHECKING:
    from aiohttp import web

    from .llm_answers import Answers, Call

type Send = Callable[[bytes], Awaitable[aiohttp.ClientResponse]]


async def judge(answers: Answers, approvals: tuple[ToolCall, ...], exchange: Exchange,
                call: Call, out: object = None) -> list[Decision]:
    """Each approval request decided like a call the agent would run; its tool counts as
    declared (the provider offers it, under the narrowing tether made)."""
    asked = replace(exchange, declared_tools=exchange.declared_tools
                    + tuple(a.name for a in approvals))
    return await answers.decide_calls(approvals, asked, call, out, stage="approval")


def approving(fmt: WireFormat, call: Call, max_arguments: int, max_continuations: int = 0
              ) -> ApprovingStream:
    """The stream filter of a Responses request that declares MCP servers, or whose
    denied calls tether may continue (`max_continuations`, server/continuation.py)."""
    def make() -> ResponsesStream:
        inner = fmt.stream(call.route, max_arguments=max_arguments)
        assert isinstance(inner, ResponsesStream)
        return inner
    return ApprovingStream(make, call.agent_approves, max_continuations)


async def whole(answers: Answers, body: bytes, parsed: ParsedResponse, call: Call,
                exchange: Exchange) -> tuple[bytes, ParsedResponse]:
    """The answer the agent gets, with tether's approval requests answered upstream."""
    fmt = call.route.format
    assert fmt is not None
    approvals: tuple[ToolCall, ...] = getattr(parsed, "approvals", ())
    if not approvals or call.send is None:
        return body, parsed
    limit = answers.ctx.config.max_response_bytes
    last: dict[str, object] = json.loads(body)
    shown = last
    changed = False
    while approvals:
        other_calls = bool(getattr(parsed, "calls", ()))
        # Beside calls the agent runs, tether does not continue, so its own approval
        # requests would go unanswered whatever a human said: they are not judged (no
        # one is asked); only the agent's are.
        judged = tuple(a for a in approvals
                       if not other_calls or mcp_approvals.agent_asked(a, call.agent_approves))
        decided = dict(zip((a.index for a in judged),
                           await judge(answers, judged, exchange, call), strict=True))
        plan = mcp_approvals.plan(approvals, [decided.get(a.index) for a in approvals],
                                  call.agent_approves, other_calls=other_calls)
        shown = mcp_approvals.hide(shown, plan.hidden)
        changed = changed or bool(plan.hidden)
        if not plan.go_on or call.rounds >= mcp_approvals.MAX_ROUNDS:
            break
        call.rounds += 1
        request = mcp_approvals.follow_up(call.sent, last, plan.answers)
        sent = time.perf_counter()
        resp = await call.send(request)
        async with resp:
            more = await read_at_most(resp, limit + 1)
        call.waited += time.perf_counter() - sent
        if resp.status != 200:
            raise UpstreamError(f"the upstream refused tether's answer to an MCP approval "
                                f"request ({resp.status}): {more[:300].decode('utf-8', 'replace')}")
        if len(more) > limit:
            raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
        parsed_more = fmt.parse_response(more)
        last = json.loads(more)
        call.sent = request
        shown = mcp_approvals.merge(shown, last)
        changed = True
        parsed = parsed_more
        approvals = getattr(parsed_more, "approvals", ())
    if not changed:
        return body, parsed
    merged = json_text(shown).encode("utf-8")
    return merged, fmt.parse_response(merged)


async def rounds(answers: Answers, stream: ApprovingStream, out: web.StreamResponse, call: Call,
                 exchange: Exchange) -> None:
    """The continuations of a stream whose last round ended with tether's approvals to
    answer: each sent upstream (streamed, like the agent's), and fed through the same
    filter to the same client. One that fails ends the client's stream with an error, or,
    when it only answers denied calls, as the rewrite (`ended`)."""
    while (follow := stream.follow) is not None and call.send is not None:
        output = openai_responses_continue.made(follow.response.get("output"), follow.denied) \
            if follow.denied else None
        request = mcp_approvals.follow_up(call.sent, follow.response, follow.answers, output)
        if follow.denied:  # denied calls answered: admitted, charged and recorded as such
            admission = await continuation.admit(
                answers.ctx, call, exchange, request, call.parsed,
                stream.denial_rounds + 1, follow.denied)
            if admission is None:  # recorded (`outcome: budget`)
                await ended(answers, stream, out, call, "a budget of this session is spent: "
                            "tether could not send the model its denied calls' results")
                return
            # Its tokens are in the stream's usage, which adds every round up.
            await answers.ctx.guard.settle(admission, Usage(0, 0))
        else:
            call.rounds += 1
        sent = time.perf_counter()
        try:
            resp = await call.send(request)
            async with resp:
                call.waited += time.perf_counter() - sent
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if resp.status != 200 or ctype != "text/event-stream":
                    more = (await read_at_most(resp, 2048))[:300].decode("utf-8", "replace")
                    if follow.denied:
                        continuation.failed(answers.ctx, call, exchange,
                                            stream.denial_rounds + 1, follow.denied, more,
                                            resp.status)
                    await ended(answers, stream, out, call, f"the upstream refused tether's "
                                f"answer to an MCP approval request ({resp.status}): {more}")
                    return
                if follow.denied:  # sent past: its record, settled
                    await record_round(answers.ctx.rewrites, call, stream)
                call.sent = request
                stream.resume()
                async for chunk in resp.content.iter_any():
                    await answers.drive(stream, stream.feed(chunk), out, exchange, call)
                    if stream.failed is not None:
                        resp.close()
                        break
                await answers.drive(stream, stream.close(), out, exchange, call)
                if stream.rounds_ids is not None:
                    await responses_turns.alias(answers.ctx.rewrites, call.agent,
                                                *stream.rounds_ids)
                if stream.bounded:
                    continuation.bound(answers.ctx, call, exchange, stream.denial_rounds,
                                       stream.denied)
        except (aiohttp.ClientError, TimeoutError) as e:
            if stream.follow is None:  # broken mid-stream: an error event ends it
                await out.write(stream.give_up(f"the upstream stream broke in tether's "
                                               f"continuation: {type(e).__name__}"))
                return
            if follow.denied:
                continuation.failed(answers.ctx, call, exchange, stream.denial_rounds + 1,
                                    follow.denied, type(e).__name__)
            await ended(answers, stream, out, call, f"the upstream could not be reached to "
                        f"answer an MCP approval request: {type(e).__name__}")
            return


async def ended(answers: Answers, stream: ApprovingStream, out: web.StreamResponse, call: Call,
                message: str) -> None:
    """No continuation: a round of denials only ends as the rewrite (its first id then
    stands for this round), any other with the error `message`."""
    rewrite = stream.end_as_rewrite()
    await out.write(rewrite if rewrite is not None else stream.give_up(message))
    if rewrite is not None and stream.rounds_ids is not None:
        await responses_turns.alias(answers.ctx.rewrites, call.agent, *stream.rounds_ids)


async def record_round(rewrites: Rewrites, call: Call, stream: ApprovingStream) -> None:
    """A round tether continues past: what it replaced is recorded under that round's id
    (an `item_reference` to tether's message must resolve), and settled at once: its
    denied calls are answered upstream by the continuation, not owed by the next turn."""
    inner = stream.inner
    if call.turn is None or not inner.replaced:
        return
    record = history.from_stream(inner.response_id, inner.decided, inner.replaced, call.agent,
                                 call.turn.conversation)
    await responses_turns.put_answered(rewrites, record)
