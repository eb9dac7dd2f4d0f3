"""A broken (or hostile) OPA, and a policy that an agent can make slow. A remote OPA
that answers in pieces, streams a huge body slowly, answers gzip, answers 200 with
HTML, redirects or never answers; an embedded Rego policy whose cost grows with the
agent's own arguments. Every failure is a deny within the timeout (never a hang,
never an allow); a real answer is read whole; and one slow embedded query does not
deny every later decision until it ends."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.model import Action, Exchange, ToolCall
from proxy.opa.client import OpaClient
from proxy.opa.settings import OpaSettings
from proxy.policy.opa import UNAVAILABLE
from proxy.telemetry import Metrics
from tests.conftest import POLICY, MakeStack
from tests.fakes import Call, Reply

PATH = "tether/decision"
RULE = f"opa:{PATH}"
EXCHANGE = Exchange(provider="openai", model="m", declared_tools=("query",), session="s",
                    agent="a", endpoint="v1/chat/completions")
ALLOW = json.dumps({"result": {"allow": True}}).encode()

type Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def call(n: int = 1, name: str = "query") -> ToolCall:
    raw = json.dumps({"n": n})
    return ToolCall(id=f"c{n}", name=name, raw_arguments=raw, arguments={"n": n})


class Server:
    """A loopback HTTP server whose /v1/data/ answer is whatever `handler` does."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.hits: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if request.path.startswith("/elsewhere"):
            return web.json_response({"result": True})
        assert self.handler is not None
        return await self.handler(request)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    if s.runner is not None:
        await s.runner.cleanup()


async def remote(server: Server, timeout: float = 0.5) -> OpaClient:
    return OpaClient(OpaSettings(url=server.url, timeout_s=timeout, cache_ttl_s=0), Metrics())


async def stream(request: web.Request, pieces: list[bytes], gap: float,
                 ctype: str = "application/json", **headers: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": ctype, **headers})
    await resp.prepare(request)
    for piece in pieces:
        await resp.write(piece)
        await asyncio.sleep(gap)
    await resp.write_eof()
    return resp


async def judged(client: OpaClient, c: ToolCall | None = None) -> tuple[Action | None, str, str]:
    try:
        trace = await client.judge(c or call(), EXCHANGE, "llm")
    finally:
        pass
    return trace.action, trace.rule_id, trace.reason


# --- remote -----------------------------------------------------------------------------


async def test_an_answer_sent_in_pieces_is_read_whole(server: Server) -> None:
    body = json.dumps({"result": {"allow": True, "reason": "x" * 3000}}).encode()
    server.handler = lambda r: stream(r, [body[i:i + 700] for i in range(0, len(body), 700)], 0.02)
    client = await remote(server, timeout=2)
    try:
        action, rule, _ = await judged(client)
    finally:
        await client.close()
    assert (action, rule) == (Action.ALLOW, RULE)


async def test_a_huge_answer_streamed_slowly_is_cut_by_the_timeout(server: Server) -> None:
    server.handler = lambda r: stream(r, [b'{"result": {"allow": true, "pad": "'] + [
        b"x" * 4096] * 10_000, 0.01)
    client = await remote(server, timeout=0.4)
    try:
        started = time.monotonic()
        action, rule, reason = await judged(client)
        assert time.monotonic() - started < 1.5
    finally:
        await client.close()
    assert (action, rule) == (Action.DENY, UNAVAILABLE) and "0.4" in reason


async def test_a_huge_answer_is_cut_by_the_size_bound(server: Server) -> None:
    server.handler = lambda r: stream(r, [b'{"result": true, "pad": "'] + [b"x" * 65536] * 40
                                      + [b'"}'], 0)
    client = await remote(server, timeout=3)
    try:
        action, rule, reason = await judged(client)
    finally:
        await client.close()
    assert action is Action.DENY and rule != RULE and "bytes" in reason


async def test_gzip_answers_are_read_and_a_gzip_bomb_is_bounded(server: Server) -> None:
    small = gzip.compress(ALLOW)
    bomb = gzip.compress(b'{"result": true, "pad": "' + b"0" * (64 * 1024 * 1024) + b'"}')
    assert len(bomb) < 200_000
    answers = iter([small, bomb])
    server.handler = lambda r: stream(r, [next(answers)], 0, **{"Content-Encoding": "gzip"})
    client = await remote(server, timeout=3)
    try:
        assert (await judged(client))[:2] == (Action.ALLOW, RULE)
        action, rule, _ = await judged(client, call(2))
    finally:
        await client.close()
    assert action is Action.DENY and rule != RULE


@pytest.mark.parametrize("body", [b"<html><body>Sign in to the Wi-Fi</body></html>", ALLOW])
async def test_200_with_html_is_not_an_answer(server: Server, body: bytes) -> None:
    """A captive portal or a misrouted proxy: even a body that parses is not OPA's."""
    server.handler = lambda r: stream(r, [body], 0, ctype="text/html")
    client = await remote(server)
    try:
        action, rule, _ = await judged(client)
    finally:
        await client.close()
    assert action is Action.DENY and rule != RULE


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_not_followed(server: Server, status: int) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": f"{server.url}/elsewhere"})

    server.handler = redirect
    client = await remote(server)
    try:
        action, rule, reason = await judged(client)
    finally:
        await client.close()
    assert (action, rule) == (Action.DENY, UNAVAILABLE) and str(status) in reason
    assert not any(h.startswith("/elsewhere") for h in server.hits)


async def test_an_opa_that_never_answers_is_a_deny_on_time(server: Server) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.5)  # far past the timeout (and short, for the teardown)
        return web.json_response({"result": True})

    server.handler = silent
    client = await remote(server, timeout=0.3)
    try:
        started = time.monotonic()
        assert (await judged(client))[:2] == (Action.DENY, UNAVAILABLE)
        assert time.monotonic() - started < 1
    finally:
        await client.close()


# --- embedded: a policy the agent can make slow -----------------------------------------

SLOW = """package tether
import rego.v1

# Quadratic in an argument the agent chooses: n = 3000 costs rego-cpp ~15 s.
n := input.arguments.n
work := count([1 | some i in numbers.range(1, n); some j in numbers.range(1, n)])
decision := {"allow": work > 0}
"""


def embedded(timeout: float) -> OpaClient:
    return OpaClient(OpaSettings(modules=(("slow.rego", SLOW),), timeout_s=timeout,
                                 cache_ttl_s=0), Metrics())


async def test_a_slow_embedded_query_denies_and_does_not_block_later_decisions() -> None:
    client = embedded(timeout=0.3)
    try:
        started = time.monotonic()
        action, rule, reason = await judged(client, call(1500))  # ~3 s of work
        assert (action, rule) == (Action.DENY, UNAVAILABLE) and "0.3" in reason
        # The next, cheap decisions get real answers, not a queue behind the slow one.
        for n in range(2, 6):
            assert (await judged(client, call(n)))[:2] == (Action.ALLOW, RULE), n
        assert time.monotonic() - started < 2
    finally:
        await client.close()


async def test_a_flood_of_slow_queries_is_bounded_and_fails_closed() -> None:
    """Each overrun frees the engine for later decisions, but only a few threads may be
    left finishing overrun queries; past that, decisions deny (fail closed) until one
    ends, rather than spawning a thread (and a CPU core's worth of work) per attack."""
    import threading

    client = embedded(timeout=0.2)
    try:
        before = threading.active_count()
        results = [await judged(client, call(1000 + 50 * i)) for i in range(6)]
        assert all(r[:2] == (Action.DENY, UNAVAILABLE) for r in results)
        assert threading.active_count() - before <= 4
    finally:
        await client.close()


async def test_end_to_end_the_slow_call_is_denied_and_the_next_request_is_decided(
        make_stack: MakeStack, tmp_path: Any) -> None:
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "slow.rego").write_text(SLOW)
    stack = await make_stack(policy=POLICY, extra=(
        f"opa: {{embedded: '{tmp_path / 'policy'}', timeout: 0.3, cache: {{ttl: 0}}}}\n"))
    stack.fake.push(Reply(calls=(Call("query", '{"n": 1500}'),)),
                    Reply(calls=(Call("query", '{"n": 3}'),)),
                    Reply(calls=(Call("query", '{"n": 4}'),)))
    client = stack.client()
    tools: Any = [{"type": "function", "function": {"name": "query"}}]
    messages: Any = [{"role": "user", "content": "go"}]
    started = time.monotonic()
    first = await client.chat.completions.create(model="m", messages=messages, tools=tools)
    second = await client.chat.completions.create(model="m", messages=messages, tools=tools)
    assert time.monotonic() - started < 2.5
    # Denied, replaced by text; sent to the model (on_deny: continue), whose next call,
    # in the same answer, is decided by the policy again: allowed.
    assert UNAVAILABLE in (first.choices[0].message.content or "")
    assert [c.function.arguments for c in first.choices[0].message.tool_calls or []
            if c.type == "function"] == ['{"n": 3}']
    assert second.choices[0].message.tool_calls  # decided by the policy: allowed
    decisions = stack.decisions()
    assert decisions[0]["action"] == "deny" and UNAVAILABLE in decisions[0]["rules"]
    assert [d["action"] for d in decisions[1:]] == ["allow", "allow"]
