"""What the admin port answers without the admin token, asked the way an agent in the
same pod would: it shares the pod's loopback, so it can connect to the admin port.

A real tether holds a call from the official OpenAI SDK while "the agent" (curl and
raw sockets, no token) tries every admin route and every spelling of one: it may
read the health checks and metrics, get the static approvals page, and nothing
else; the held call is still pending afterwards. Every route the admin app has is
in the table below, so a new route fails here until someone decides who may call it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_openai import MESSAGES, TOOLS

TOKEN = "admin-surface-token"
SECRET = "slack-signing-secret"
POLICY = """
rules:
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 60s
approvals: {keepalive: 100ms}
"""
SLACK = ("slack:\n  channel: C0TETHER\n  approvers: [U0ALICE]\n"
         "  bot_token_env: TETHER_TEST_SLACK_BOT\n  signing_secret_env: TETHER_TEST_SLACK_SECRET\n"
         "  api_url: http://127.0.0.1:9/api\n")
ID = "apv_x"

# (method, route as aiohttp names it) -> who may call it without the admin token.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "open", ("HEAD", "/healthz"): "open",
    ("GET", "/readyz"): "open", ("HEAD", "/readyz"): "open",
    ("GET", "/metrics"): "open", ("HEAD", "/metrics"): "open",
    ("GET", "/ui/"): "static", ("HEAD", "/ui/"): "static",
    ("GET", "/ui"): "static", ("HEAD", "/ui"): "static",
    ("POST", "/slack/interactions"): "signed",
    ("GET", "/v1/approvals"): "token", ("HEAD", "/v1/approvals"): "token",
    ("GET", "/v1/approvals/{id}"): "token", ("HEAD", "/v1/approvals/{id}"): "token",
    ("POST", "/v1/approvals/{id}/{verb}"): "token",
    ("GET", "/v1/sessions/{id}"): "token", ("HEAD", "/v1/sessions/{id}"): "token",
    ("POST", "/v1/sessions/{id}/reset"): "token",
    ("POST", "/v1/reload"): "token",  # docs/reload.md
}


def concrete(route: str) -> str:
    return route.replace("{id}", ID).replace("{verb}", "approve")


@pytest.fixture
async def held(make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    """A tether with Slack configured and one call from the openai SDK held."""
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("TETHER_TEST_SLACK_BOT", "xoxb-test")
    monkeypatch.setenv("TETHER_TEST_SLACK_SECRET", SECRET)
    stack = await make_stack(policy=POLICY, extra=SLACK)
    stack.fake.push(Reply(content="Resizing.", calls=(Call("resize_volume", '{"size_gb": 5}'),)))
    agent = asyncio.create_task(stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    for _ in range(250):
        if await stack.tether.holds.queue.pending():
            break
        await asyncio.sleep(0.02)
    yield stack
    for approval in await stack.tether.holds.queue.pending():  # end the hold: the agent returns
        await curl(stack, "POST", f"/v1/approvals/{approval.id}/deny", "--data-binary", "{}",
                   "-H", f"Authorization: Bearer {TOKEN}")
    await asyncio.wait_for(agent, 20)


async def pending_ids(stack: Stack) -> list[str]:
    return [a.id for a in await stack.tether.holds.queue.pending()]


async def curl(stack: Stack, method: str, path: str, *extra: str) -> tuple[int, str]:
    """curl as the agent would run it: no token, the path sent as written."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    method_args = ["-I"] if method == "HEAD" else ["-X", method]
    done = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--path-as-is", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}",
        *method_args, *extra, stack.admin_url + path], capture_output=True, text=True, timeout=20)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body


async def raw(stack: Stack, request: bytes) -> tuple[int, bytes]:
    """One request on a raw socket: the status and body of the answer."""
    url = urlsplit(stack.admin_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_every_admin_route_is_in_the_table(held: Stack) -> None:
    served = {(r.method, r.resource.canonical) for r in held.tether.admin.router.routes()
              if r.resource is not None}
    assert served == set(ROUTES)


@pytest.mark.parametrize(("method", "route"), sorted(k for k, v in ROUTES.items() if v == "token"))
async def test_a_token_route_refuses_the_agent(held: Stack, method: str, route: str) -> None:
    [approval] = await pending_ids(held)
    path = concrete(route).replace(ID, approval)
    for extra in ((), ("-H", "Authorization: Bearer wrong"), ("-H", f"Authorization: {TOKEN}"),
                  ("-H", f"Authorization: Basic {TOKEN}"), ("-H", f"X-Admin-Token: {TOKEN}")):
        status, body = await curl(held, method, path, *extra)
        assert status == 401, (extra, body)
        assert approval not in body
    assert await pending_ids(held) == [approval]


async def test_what_the_agent_can_read_health_and_metrics(held: Stack) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        status, body = await curl(held, "GET", path)
        assert status == 200, path
        status, _ = await curl(held, "HEAD", path)
        assert status == 200, path
    [approval] = await pending_ids(held)
    for path in ("/healthz", "/readyz", "/metrics"):
        _, body = await curl(held, "GET", path)
        assert approval not in body and "size_gb" not in body, path
    for method in ("POST", "PUT", "DELETE"):  # only GET and HEAD are open
        status, _ = await curl(held, method, "/metrics")
        assert status == 401, method


async def test_the_static_page_carries_no_data(held: Stack) -> None:
    from importlib import resources

    page = resources.files("proxy.approvals").joinpath("ui.html").read_text(encoding="utf-8")
    status, body = await curl(held, "GET", "/ui/")
    assert status == 200 and body == page  # the packaged file, whatever is pending
    [approval] = await pending_ids(held)
    assert approval not in body
    status, _ = await curl(held, "GET", "/ui")
    assert status == 308


def _signed(body: bytes, secret: str, timestamp: int) -> list[str]:
    base = b"v0:" + str(timestamp).encode() + b":" + body
    sig = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return ["-H", f"X-Slack-Request-Timestamp: {timestamp}", "-H", f"X-Slack-Signature: {sig}"]


async def test_slack_interactions_need_slacks_signature(held: Stack) -> None:
    [approval] = await pending_ids(held)
    click = {"type": "block_actions", "user": {"id": "U0ALICE"},
             "actions": [{"action_id": "tether_approve", "value": approval}]}
    form = "payload=" + json.dumps(click)
    body = form.encode()
    now = int(time.time())
    for extra in ((), _signed(body, "not-the-secret", now), _signed(body, SECRET, now - 3600),
                  ("-H", f"Authorization: Bearer {TOKEN}")):
        status, answer = await curl(held, "POST", "/slack/interactions", "--data-binary", form,
                                    *extra)
        assert status == 401, (extra, answer)
    assert await pending_ids(held) == [approval]


async def test_without_slack_the_interactions_path_needs_the_token(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    stack = await make_stack()
    status, _ = await curl(stack, "POST", "/slack/interactions", "--data-binary", "payload={}")
    assert status == 401


async def test_no_token_configured_closes_every_token_route(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_ADMIN_TOKEN", raising=False)
    stack = await make_stack()
    for (method, route), who in ROUTES.items():
        if who == "token":
            status, body = await curl(stack, method, concrete(route), "-H", "Authorization: Bearer ")
            assert status == 503, (method, route, body)
    assert (await curl(stack, "GET", "/healthz"))[0] == 200


SPELLINGS = [
    "//v1/approvals", "/v1//approvals", "/v1/approvals/", "/V1/approvals", "/v1/Approvals",
    "/healthz/../v1/approvals", "/metrics/%2e%2e/v1/approvals", "/%2e%2e/v1/approvals",
    "/metrics%2F..%2Fv1%2Fapprovals", "/healthz;/../v1/approvals", "/ui/../v1/approvals",
    "/healthz%00/../v1/approvals", "/v1/approvals%20", "/v1/approvals?/healthz",
    "/v1/approvals#/metrics", "/%76%31/approvals", "/v1/approvals/%2e", "/v1/approvals/.",
    "/v1/approvals/{id}/approve/", "/v1/approvals/{id}//approve", "/v1/approvals/{id}/APPROVE",
    "/v1/approvals/{id}/approve;x", "/v1/approvals/{id}%2Fapprove", "/healthz/../v1/approvals/{id}/approve",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_no_spelling_of_a_token_route_gets_past(held: Stack, spelling: str) -> None:
    [approval] = await pending_ids(held)
    path = spelling.replace("{id}", approval).encode()
    for method in (b"GET", b"POST"):
        status, body = await raw(held, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert status in (400, 401, 404, 405), (method, spelling, status, body)
        assert approval.encode() not in body
    assert await pending_ids(held) == [approval]


@pytest.mark.parametrize("request_line", [
    b"GET http://127.0.0.1/v1/approvals HTTP/1.1",           # absolute form
    b"GET /healthz HTTP/1.1\r\nX-HTTP-Method-Override: POST\r\nX-Original-URL: /v1/approvals",
    b"GET /healthz HTTP/1.1\r\nX-Rewrite-URL: /v1/approvals",
    b"POST /healthz HTTP/1.1\r\nX-HTTP-Method-Override: GET",
    b"GET /v1/approvals HTTP/1.1\r\nAuthorization: Bearer \xff\xfe",  # not UTF-8
    b"GET /v1/approvals HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\x00",
    b"GET /v1/approvals HTTP/1.1\r\nAuthorization: Bearer x\r\nAuthorization: Bearer x",
    b"GET /v1/approvals HTTP/1.0",
])
async def test_protocol_tricks_do_not_open_a_token_route(held: Stack, request_line: bytes) -> None:
    [approval] = await pending_ids(held)
    status, body = await raw(held, request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
    assert status in (200, 400, 401, 405), (request_line, status, body)
    assert approval.encode() not in body and b"Traceback" not in body
    if status == 200:  # the health check answered, and only that
        assert json.loads(body) == {"status": "ok"}
    assert await pending_ids(held) == [approval]


async def test_the_token_still_opens_the_api(held: Stack) -> None:
    [approval] = await pending_ids(held)
    status, body = await curl(held, "GET", "/v1/approvals", "-H", f"Authorization: Bearer {TOKEN}")
    assert status == 200 and approval in body
    parsed: dict[str, Any] = json.loads(body)
    assert [a["id"] for a in parsed["pending"]] == [approval]
    status, body = await curl(held, "POST", f"/v1/approvals/{approval}/deny",
                              "-H", f"Authorization: Bearer {TOKEN}", "--data-binary", "{}")
    assert status == 200 and json.loads(body)["state"] == "denied"

