"""Agent authentication through the forward proxy (HTTP_PROXY), end to end.

A real tether and its forward proxy; curl, requests and the openai SDK (httpx)
present the agent's JWT or static key as `Proxy-Authorization` (Bearer, or Basic
from `http://agent:TOKEN@proxy`). A tool API (`apis: jira`, TLS with a test CA)
and a plain-HTTP pass host record every header that reaches them, so "refused"
also means "nothing was sent", and "never forwarded" is checked on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests
from aiohttp import web

from proxy.egress import Egress
from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.targets import Address
from proxy.server.app import CONTEXT
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.fakes.oidc import FakeIssuer
from tests.fakes.opa_server import FakeOpa
from tests.fakes.tls import make_fake_ca
from tests.test_auth_e2e import MESSAGES, READ_IT, TOOLS, answered

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
JIRA, PLAIN = "jira.example.com", "plain.example.com"
STATIC_KEY = "tk-forward-static-key"
POLICY = f"""
tools:
  delete_volume: {{effect: write}}
agents:
  static-agent: {{key_sha256: [{hashlib.sha256(STATIC_KEY.encode()).hexdigest()}]}}
rules:
  - id: db-agent-no-comments
    match: {{api: jira.addComment, agent: db-agent}}
    action: deny
    message: db-agent may not comment
  - id: db-agent-no-deletes
    match: {{tool: delete_volume, agent: db-agent}}
    action: deny
    message: db-agent may not delete volumes
"""
ISSUE = "/rest/api/2/issue/OPS-1"
COMMENT = "/rest/api/2/issue/OPS-1/comment"
DELETE = '{"volume_id": "vol-1", "tags": {"env": "dev"}}'


@dataclass
class Recorder:
    """Every request that reached a fake host, with all its headers (lower-case)."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def any_route(request: web.Request) -> web.Response:
            self.seen.append({"method": request.method, "path": request.path_qs,
                              "headers": {k.lower(): v for k, v in request.headers.items()}})
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_route)
        return app

    def leaked(self, secret: str) -> list[str]:
        return [k for r in self.seen for k, v in r["headers"].items()
                if secret in v or k in ("proxy-authorization", "x-tether-handoff")]


@dataclass
class Fa:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path
    tool: Recorder
    tool_port: int
    plain: Recorder
    plain_port: int
    resolved: list[str]
    oidc: FakeIssuer

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == kind]

    def failures(self, reason: str) -> float:
        value = self.stack.tether.governor.metrics.registry.get_sample_value(
            "tether_auth_failures_total", {"reason": reason})
        return value or 0.0

    def proxy_with(self, user: str, password: str) -> str:
        return self.url.replace("http://", f"http://{user}:{password}@")

    def session(self, proxy: str | None = None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"https": proxy or self.url, "http": proxy or self.url}
        s.verify = str(self.ca_file)
        return s


StartFa = Callable[..., Awaitable[Fa]]


def auth(issuer: FakeIssuer, mode: str, claims: str = "[sub]") -> str:
    return (f"auth:\n  mode: {mode}\n  jwt:\n    issuer: {issuer.issuer}\n"
            f"    audiences: [tether]\n    claims: {claims}\n")


@pytest.fixture
async def start_fa(make_stack: MakeStack, tmp_path: Path,
                   oidc: FakeIssuer) -> AsyncIterator[StartFa]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", JIRA))

    async def serve(app: web.Application, tls: bool) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0,
                           ssl_context=test_ca.server_context() if tls else None)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    async def start(mode: str = "required", more: str = "", claims: str = "[sub]",
                    upstreams: dict[str, Any] | None = None) -> Fa:
        tool, plain = Recorder(), Recorder()
        tool_port, plain_port = await serve(tool.app(), True), await serve(plain.app(), False)
        resolved: list[str] = []

        async def resolver(host: str, port: int) -> list[Address]:
            resolved.append(host)
            return [ipaddress.ip_address("127.0.0.1")] if host in (JIRA, PLAIN) else []

        ca_dir = tmp_path / f"ca-{len(proxies)}"
        extra = (f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
                 f"allow_private: [{JIRA}, {PLAIN}], pass_hosts: [{PLAIN}]}}\n"
                 f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}}}\n"
                 + auth(oidc, mode, claims) + more)
        stack = await make_stack(policy=POLICY, extra=extra, upstreams=upstreams)
        stack.fake.script = lambda body: Reply(content=READ_IT) if answered(body) \
            else Reply(calls=(Call("delete_volume", DELETE),))
        cfg = stack.tether.config
        fwd = await start_forward(
            stack.tether.governor, stack.tether.governor.metrics, cfg.forward,
            host="127.0.0.1", port=0,
            reverse=("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1])), own_ports=(),
            resolver=resolver, auth=stack.tether.proxy[CONTEXT].auth,
            egress=Egress(cfg.apis, cfg.cloud, stack.tether.holds, cfg.agent_keys,
                          cfg.trust_identity_headers, cfg.lookups, opa=stack.tether.opa))
        proxies.append(fwd)
        ca_file = tmp_path / f"tether-ca-{len(proxies)}.pem"
        ca_file.write_text(export_pem(cfg.forward.ca_dir))
        return Fa(stack, fwd, f"http://127.0.0.1:{fwd.port}", ca_file, tool, tool_port, plain,
                  plain_port, resolved, oidc)

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


# -- helpers: curl and a raw CONNECT ---------------------------------------------------------

async def curl(fa: Fa, url: str, *args: str) -> tuple[int, int, str]:
    """(CONNECT status, final status, body) of one curl through the forward proxy."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    proc = await asyncio.create_subprocess_exec(
        exe, "-sS", "--max-time", "20", "--proxy", fa.url, "--cacert", str(fa.ca_file),
        "-w", "\n%{http_connect} %{http_code}", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _err = await proc.communicate()
    body, _, codes = out.decode().rpartition("\n")
    connect, code = codes.split()
    return int(connect), int(code), body


async def raw_connect(fa: Fa, authorization: str | None) -> tuple[int, dict[str, str], bytes,
                                                                  bytes]:
    """A CONNECT by hand: (status, headers, body, what came after) — a refused CONNECT
    must not become a tunnel, so bytes written after it must never reach the host."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fa.proxy.port)
    lines = [f"CONNECT {JIRA}:{fa.tool_port} HTTP/1.1", f"Host: {JIRA}:{fa.tool_port}"]
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for f in fields:
        if f:
            k, _, v = f.partition(":")
            key = k.strip().lower()
            headers[key] = f"{headers[key]}, {v.strip()}" if key in headers else v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    writer.write(f"GET {ISSUE} HTTP/1.1\r\nHost: {JIRA}\r\n\r\n".encode())
    try:
        after = await asyncio.wait_for(reader.read(4096), 2)
    except (TimeoutError, ConnectionError):
        after = b""
    writer.close()
    return int(status_line.split()[1]), headers, body, after


# -- valid credentials name the agent -----------------------------------------------------

async def test_curl_bearer_on_connect_names_the_agent(start_fa: StartFa) -> None:
    fa = await start_fa()
    token = fa.oidc.mint("db-agent")
    bearer = ("--proxy-header", f"Proxy-Authorization: Bearer {token}")
    base = f"https://{JIRA}:{fa.tool_port}"
    assert await curl(fa, base + ISSUE, *bearer) == (200, 200, '{"ok": true}')
    # X-Tether-Agent names nobody under `required`: the token does.
    connect, code, body = await curl(fa, base + COMMENT, *bearer, "-X", "POST",
                                     "-H", "X-Tether-Agent: ops-agent",
                                     "-H", "Content-Type: application/json",
                                     "--data", '{"body": "hi"}')
    assert (connect, code) == (200, 403)
    assert json.loads(body)["error"]["rule"] == "db-agent-no-comments"
    got = [(d["agent"], d["api"], d["action"]) for d in fa.records("decision")]
    assert got == [("db-agent", "jira.getIssue", "allow"),
                   ("db-agent", "jira.addComment", "deny")]
    assert [r["path"] for r in fa.tool.seen] == [ISSUE]
    assert fa.tool.leaked(token) == []
    assert "x-tether-agent" not in fa.tool.seen[0]["headers"]


async def test_requests_basic_password_and_static_key(start_fa: StartFa) -> None:
    fa = await start_fa()
    s = fa.session(fa.proxy_with("anything", STATIC_KEY))
    r = await asyncio.to_thread(
        s.post, f"https://{JIRA}:{fa.tool_port}{COMMENT}", json={"body": "hi"}, timeout=20)
    assert r.status_code == 200  # static-agent is not db-agent: the rule does not apply
    assert [(d["agent"], d["api"]) for d in fa.records("decision")] == [
        ("static-agent", "jira.addComment")]
    assert fa.tool.leaked(STATIC_KEY) == []


# -- refusals: 407 before anything is resolved or sent ------------------------------------

BAD = [("missing", "missing"), ("expired", "expired"), ("audience", "audience"),
       ("unknown-key", "unknown_key"), ("not-a-scheme", "missing")]


def _authorization(oidc: FakeIssuer, kind: str) -> str | None:
    values: dict[str, str | None] = {
        "missing": None,
        "expired": f"Bearer {oidc.mint(ttl=-120)}",
        "audience": f"Bearer {oidc.mint(aud='someone-else')}",
        "unknown-key": "Basic " + base64.b64encode(b"a:tk-nope").decode(),
        "not-a-scheme": "Digest username=x"}
    return values[kind]


@pytest.mark.parametrize(("kind", "reason"), BAD)
async def test_connect_without_a_valid_credential_is_refused_407(
        start_fa: StartFa, kind: str, reason: str) -> None:
    fa = await start_fa()
    status, headers, body, after = await raw_connect(fa, _authorization(fa.oidc, kind))
    assert status == 407
    assert 'Bearer realm="tether"' in headers["proxy-authenticate"]
    assert json.loads(body)["error"]["code"] == "unauthenticated"
    # No tunnel: the GET written next is a proxy request of its own, refused too.
    assert after.startswith(b"HTTP/1.1 407 ")
    assert fa.tool.seen == [] and fa.resolved == []  # nothing sent, not even resolved
    connect, get = fa.records("request")
    assert (connect["provider"], connect["status"], connect["code"], connect["agent"]) == (
        "forward", 407, "unauthenticated", None)
    assert connect["endpoint"] == f"CONNECT {JIRA}:{fa.tool_port}"
    assert (get["status"], get["endpoint"]) == (407, f"GET {JIRA}:80{ISSUE}")
    assert fa.failures(reason) == (2 if reason == "missing" else 1)
    assert fa.records("decision") == []


async def test_curl_without_credentials_gets_407(start_fa: StartFa) -> None:
    fa = await start_fa()
    connect, code, _ = await curl(fa, f"https://{JIRA}:{fa.tool_port}{ISSUE}",
                                  "-H", "X-Tether-Agent: db-agent")
    assert connect == 407 and code in (0, 407)
    assert fa.tool.seen == []


async def test_plain_http_request_needs_proxy_authorization(start_fa: StartFa) -> None:
    fa = await start_fa()
    url = f"http://{PLAIN}:{fa.plain_port}/x"
    refused = await asyncio.to_thread(fa.session().get, url, timeout=20)
    assert refused.status_code == 407
    assert 'Bearer realm="tether"' in refused.headers["proxy-authenticate"]
    assert fa.plain.seen == [] and fa.resolved == []
    token = fa.oidc.mint("ops-agent")
    ok = await asyncio.to_thread(fa.session(fa.proxy_with("agent", token)).get, url,
                                 timeout=20)
    assert ok.status_code == 200
    assert len(fa.plain.seen) == 1 and fa.plain.leaked(token) == []
    assert [r["code"] for r in fa.records("request")] == ["unauthenticated"]


async def test_proxy_authorization_is_never_forwarded_in_optional_mode(
        start_fa: StartFa) -> None:
    fa = await start_fa(mode="optional")
    url = f"http://{PLAIN}:{fa.plain_port}/x"
    r = await asyncio.to_thread(fa.session(fa.proxy_with("u", "some-other-secret")).get, url,
                                timeout=20)
    assert r.status_code == 200
    assert fa.plain.leaked("some-other-secret") == []
    # Anonymous is allowed in optional mode; the trusted header still names an agent.
    s = fa.session()
    s.headers["X-Tether-Agent"] = "db-agent"
    denied = await asyncio.to_thread(s.post, f"https://{JIRA}:{fa.tool_port}{COMMENT}",
                                     json={"body": "x"}, timeout=20)
    assert denied.status_code == 403
    assert [d["agent"] for d in fa.records("decision")] == ["db-agent"]


# -- LLM hosts: the identity is handed to the reverse route ------------------------------

def _sdk(fa: Fa, proxy: str) -> openai.AsyncOpenAI:
    import ssl

    http = openai.DefaultAsyncHttpxClient(
        proxy=proxy, verify=ssl.create_default_context(cafile=str(fa.ca_file)), trust_env=False)
    client = openai.AsyncOpenAI(base_url="https://api.openai.com/v1", api_key="sk-agent-own",
                                max_retries=0, http_client=http, timeout=20)
    fa.stack.clients.append(client)
    return client


async def test_llm_request_through_the_tunnel_is_the_proxy_credentials_agent(
        start_fa: StartFa) -> None:
    fa = await start_fa()
    db, ops = fa.oidc.mint("db-agent"), fa.oidc.mint("ops-agent")
    for token in (db, ops):
        r = await _sdk(fa, fa.proxy_with("agent", token)).chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=TOOLS)
        calls = r.choices[0].message.tool_calls or []
        assert bool(calls) == (token == ops)  # db-agent-no-deletes applies to db-agent only
        if token == db:  # the denial went to the model (on_deny: continue) and it answered
            assert (r.choices[0].message.content or "").endswith(READ_IT)
    assert [(d["agent"], d["provider"]) for d in fa.stack.decisions()] == [
        ("db-agent", "openai"), ("ops-agent", "openai")]
    # db-agent's turn and tether's continuation of it, then ops-agent's turn; the
    # continuation's record names the agent the proxy credentials named.
    [cont] = [r for r in fa.stack.audit() if r["kind"] == "continuation"]
    assert (cont["agent"], cont["outcome"]) == ("db-agent", "sent")
    leaked = [k for h in fa.stack.fake.headers for k, v in h.items()
              if db in v or ops in v or k.lower() in ("x-tether-handoff", "proxy-authorization")]
    assert leaked == []
    with pytest.raises(openai.APIConnectionError):  # the CONNECT was refused 407
        await _sdk(fa, fa.url).chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert len(fa.stack.fake.requests) == 3


async def test_a_forged_handoff_ticket_is_refused(start_fa: StartFa) -> None:
    fa = await start_fa(mode="optional")
    async with aiohttp.ClientSession() as http, http.post(
            fa.stack.base_url + "/chat/completions", json={"model": "m", "messages": []},
            headers={"X-Tether-Handoff": "forged", "X-Tether-Agent": "ops-agent"}) as resp:
        assert resp.status == 401
    assert fa.stack.fake.requests == []
    assert fa.failures("malformed") == 1


# -- verified claims reach the egress decision (OPA input) ----------------------------------

async def test_claims_reach_opa_through_the_forward_proxy(start_fa: StartFa) -> None:
    opa = FakeOpa()
    fa = await start_fa(more="opa: {url: 'http://opa.invalid', timeout: 2}\n",
                        claims="[sub, roles]", upstreams={"opa": opa})
    url = f"https://{JIRA}:{fa.tool_port}{COMMENT}"
    deployer = fa.oidc.mint("ops-agent", roles=["deployer"])
    viewer = fa.oidc.mint("ops-agent", roles=["viewer"])
    ok = await asyncio.to_thread(fa.session(fa.proxy_with("a", deployer)).post, url,
                                 json={"body": "hi"}, timeout=20)
    denied = await asyncio.to_thread(fa.session(fa.proxy_with("a", viewer)).post, url,
                                     json={"body": "hi"}, timeout=20)
    assert (ok.status_code, denied.status_code) == (200, 403)
    claims = [i["claims"] for i in opa.inputs]
    assert claims == [{"sub": "ops-agent", "roles": ["deployer"]},
                      {"sub": "ops-agent", "roles": ["viewer"]}]
    assert len(fa.tool.seen) == 1
