"""Agent authentication through a real tether: the official SDKs carry a JWT or a
static key as their API key; tether verifies it against a fake OIDC issuer on
loopback, names the agent for policy and audit, never forwards the credential,
and refuses anything else 401 in the provider's shape with nothing sent upstream."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import boto3
import botocore.config
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam

from proxy.demo.fake_anthropic import Call as ACall
from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_anthropic import Reply as AReply
from proxy.demo.fake_bedrock import FakeBedrock
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.fakes.oidc import K8S_ISSUER, FakeIssuer
from tests.fakes.tls import make_fake_ca

STATIC_KEY = "tk-static-agent-key-1"
POLICY = f"""
tools:
  delete_volume: {{effect: write}}
agents:
  static-agent: {{key_sha256: [{hashlib.sha256(STATIC_KEY.encode()).hexdigest()}]}}
rules:
  - id: db-agent-no-deletes
    match: {{tool: delete_volume, agent: db-agent}}
    action: deny
    message: db-agent may not delete volumes
"""
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "delete_volume", "parameters": {"type": "object"}}}]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "clean up"}]
DELETE = '{"volume_id": "vol-1", "tags": {"env": "dev"}}'


@pytest.fixture
async def oidc(oidc: FakeIssuer) -> FakeIssuer:
    """conftest's issuer with an EC key beside its RSA one."""
    oidc.add_key("ec-1", kind="EC")
    return oidc


def auth(issuer: FakeIssuer, mode: str = "required", more: str = "") -> str:
    return (f"auth:\n  mode: {mode}\n  jwt:\n    issuer: {issuer.issuer}\n"
            f"    audiences: [tether]\n    refetch_interval: 1\n    claims: [sub]\n{more}")


def answered(body: dict[str, Any]) -> bool:
    """Whether the conversation ends with a tool result (Chat, Anthropic or Bedrock): here
    only tether's continuation after a denial (on_deny: continue, the default) sends one."""
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content") if isinstance(last.get("content"), list) else []
    return last.get("role") == "tool" or any(
        isinstance(b, dict) and ("toolResult" in b or b.get("type") == "tool_result")
        for b in content)


READ_IT = "Understood, I will not delete it."  # the model, having read a denial


async def tether(make_stack: MakeStack, extra: str, **kw: Any) -> Stack:
    stack = await make_stack(policy=POLICY, extra=extra, **kw)
    stack.fake.script = lambda body: Reply(content=READ_IT) if answered(body) \
        else Reply(calls=(Call("delete_volume", DELETE),))
    return stack


MISSING = "<no credential>"  # the SDKs insist on a key; a bare HTTP request sends none


def client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    stack.clients.append(c)
    return c


async def ask(stack: Stack, key: str) -> str | None:
    """The first tool call's name, or None when it was denied (replaced by text)."""
    r = await client(stack, key).chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                         tools=TOOLS)
    calls = r.choices[0].message.tool_calls or []
    return calls[0].function.name if calls and calls[0].type == "function" else None


def failures(stack: Stack, reason: str) -> float:
    value = stack.tether.governor.metrics.registry.get_sample_value(
        "tether_auth_failures_total", {"reason": reason})
    return value or 0.0


def forwarded_secrets(headers: list[dict[str, str]], token: str) -> list[str]:
    return [k for h in headers for k, v in h.items() if token in v]


async def refused(stack: Stack, key: str, reason: str) -> None:
    """401 in OpenAI's shape, audited, counted, nothing forwarded, token nowhere."""
    before = len(stack.fake.requests)
    if key == MISSING:
        async with aiohttp.ClientSession() as http, http.post(
                stack.base_url + "/chat/completions", json={"model": "m", "messages": []},
                headers={"X-Tether-Agent": "db-agent"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthenticated"
            assert resp.headers["www-authenticate"].startswith("Bearer")
    else:
        with pytest.raises(openai.AuthenticationError) as info:
            await ask(stack, key)
        assert info.value.status_code == 401
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "unauthenticated"
        assert info.value.response.headers["www-authenticate"].startswith("Bearer")
    assert len(stack.fake.requests) == before
    assert failures(stack, reason) >= 1
    record = stack.audit()[-1]
    assert (record["kind"], record["status"], record["code"]) == ("request", 401,
                                                                  "unauthenticated")
    assert record["agent"] is None
    if len(key) > 8:
        assert key not in stack.audit_path.read_text()


# -- valid identities -----------------------------------------------------------------------

async def test_jwt_names_the_agent_and_rules_apply(make_stack: MakeStack,
                                                   oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    db, ops = oidc.mint("db-agent", kid="rsa-1"), oidc.mint("ops-agent", kid="ec-1")
    assert await ask(stack, db) is None             # db-agent-no-deletes applies
    assert await ask(stack, ops) == "delete_volume"  # it does not apply to ops-agent
    got = [(d["agent"], d["action"], d["rules"]) for d in stack.decisions()]
    assert got == [("db-agent", "deny", ["db-agent-no-deletes"]), ("ops-agent", "allow", [])]
    # The credential tether consumed never went upstream.
    assert forwarded_secrets(stack.fake.headers, db) == []
    assert forwarded_secrets(stack.fake.headers, ops) == []
    assert oidc.discovery_hits == 1 and oidc.jwks_hits == 1  # cached for the second token


async def test_anthropic_sdk_carries_the_token(make_stack: MakeStack, oidc: FakeIssuer) -> None:
    fake = FakeAnthropic(script=lambda body: AReply(content=READ_IT) if answered(body)
                         else AReply(calls=(ACall("delete_volume", DELETE),)))
    stack = await make_stack(policy=POLICY, extra=auth(oidc), upstreams={"anthropic": fake})
    token = oidc.mint("db-agent")
    ac = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key=token,
                                  max_retries=0)
    tools: list[anthropic.types.ToolParam] = [
        {"name": "delete_volume", "input_schema": {"type": "object"}}]
    m = await ac.messages.create(model="claude-test", max_tokens=100, tools=tools,
                                 messages=[{"role": "user", "content": "clean up"}])
    # The delete was denied for db-agent: tether's text, then the model's after reading it.
    assert [b.type for b in m.content] == ["text", "text"]
    assert m.content[1].type == "text" and m.content[1].text == READ_IT
    assert [(d["agent"], d["rules"]) for d in stack.decisions()] == [
        ("db-agent", ["db-agent-no-deletes"])]
    assert forwarded_secrets(fake.headers, token) == []
    # A bad token: the SDK's own AuthenticationError, from Anthropic's error shape.
    expired = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic",
                                       api_key=oidc.mint("db-agent", ttl=-600), max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        await expired.messages.create(model="claude-test", max_tokens=100, tools=tools,
                                      messages=[{"role": "user", "content": "x"}])
    await expired.close()
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "expired" in info.value.body["error"]["message"]
    assert len(fake.requests) == 2  # the first turn and tether's continuation of it
    await ac.close()


async def test_static_key_names_the_agent(make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    assert await ask(stack, STATIC_KEY) == "delete_volume"
    assert [d["agent"] for d in stack.decisions()] == ["static-agent"]
    assert forwarded_secrets(stack.fake.headers, STATIC_KEY) == []
    await refused(stack, "tk-wrong-key", "unknown_key")


async def test_header_never_names_an_agent_under_required(make_stack: MakeStack,
                                                          oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    c = client(stack, oidc.mint("ops-agent"))
    r = await c.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                        extra_headers={"X-Tether-Agent": "db-agent"})
    assert r.choices[0].message.tool_calls  # not denied: the token, not the header, names it
    assert [d["agent"] for d in stack.decisions()] == ["ops-agent"]
    await refused(stack, MISSING, "missing")  # X-Tether-Agent alone is no identity


async def test_optional_mode_lets_anonymous_and_unknown_keys_on(make_stack: MakeStack,
                                                                oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc, mode="optional"))
    assert await ask(stack, "sk-agents-own-upstream-key") == "delete_volume"
    assert await ask(stack, oidc.mint("db-agent")) is None
    assert [d["agent"] for d in stack.decisions()] == [None, "db-agent"]
    # A token from the configured issuer that does not verify is refused even so.
    await refused(stack, oidc.mint("db-agent", aud="someone-else"), "audience")


# -- refusals ---------------------------------------------------------------------------------

BAD: list[tuple[str, str]] = [
    ("expired", "expired"),
    ("wrong-audience", "audience"),
    ("wrong-issuer", "issuer"),
    ("alg-none", "algorithm"),
    ("hs-rs-confusion", "algorithm"),
    ("unknown-kid", "unknown_kid"),
    ("bad-signature", "signature"),
    ("not-yet-valid", "not_yet_valid"),
    ("garbage", "unknown_key"),
    ("missing", "missing"),
    ("unmapped-agent-claim", "agent"),
]


def bad_token(oidc: FakeIssuer, kind: str) -> str:
    if kind == "expired":
        return oidc.mint(ttl=-120)  # past the 30 s leeway
    if kind == "wrong-audience":
        return oidc.mint(aud="another-service")
    if kind == "wrong-issuer":
        return oidc.mint(payload={**oidc.claims("db-agent"), "iss": "https://evil.example"})
    if kind == "alg-none":
        return oidc.alg_none()
    if kind == "hs-rs-confusion":
        return oidc.hs_confused()
    if kind == "unknown-kid":
        oidc.add_key("stolen", publish=False)
        return oidc.mint(kid="stolen")
    if kind == "bad-signature":
        head, body, _ = oidc.mint().split(".")
        _, _, other = oidc.mint("someone-else").split(".")
        return f"{head}.{body}.{other}"
    if kind == "not-yet-valid":
        return oidc.mint(payload={**oidc.claims("db-agent"), "nbf": int(oidc.claims("x")["iat"])
                                  + 600})
    if kind == "garbage":
        return "eyJhbGciOi.garbage.!!"
    if kind == "missing":
        return MISSING
    return oidc.mint(payload={k: v for k, v in oidc.claims("x").items() if k != "sub"})


@pytest.mark.parametrize(("kind", "reason"), BAD)
async def test_bad_credentials_are_refused(make_stack: MakeStack, oidc: FakeIssuer, kind: str,
                                           reason: str) -> None:
    stack = await tether(make_stack, auth(oidc))
    await refused(stack, bad_token(oidc, kind), reason)
    assert stack.fake.requests == []


async def test_pass_through_routes_need_identity_too(make_stack: MakeStack,
                                                     oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    with pytest.raises(openai.AuthenticationError):
        await client(stack, "nope").models.list()
    assert stack.fake.headers == []
    models = await client(stack, oidc.mint()).models.list()
    assert [m.id for m in models.data] == ["gpt-fake"]


# -- keys: rotation, floods, an issuer that is down ---------------------------------------

async def test_rotation_fetches_the_new_kid(make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    assert await ask(stack, oidc.mint("ops-agent", kid="rsa-1")) == "delete_volume"
    oidc.add_key("rsa-2")
    oidc.published.remove("rsa-1")
    await asyncio.sleep(1.1)  # refetch_interval: 1
    assert await ask(stack, oidc.mint("ops-agent", kid="rsa-2")) == "delete_volume"
    assert oidc.jwks_hits == 2


async def test_a_flood_of_random_kids_costs_the_issuer_one_fetch(make_stack: MakeStack,
                                                                 oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    assert await ask(stack, oidc.mint("ops-agent")) == "delete_volume"
    await asyncio.sleep(1.1)
    key = oidc.keys["rsa-1"][0]
    import jwt

    tokens = [jwt.encode(oidc.claims("db-agent"), key, algorithm="RS256",
                         headers={"kid": uuid.uuid4().hex}) for _ in range(20)]
    results = await asyncio.gather(*(ask(stack, t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, openai.AuthenticationError) for r in results)
    assert oidc.jwks_hits == 2  # one refetch for twenty unknown kids
    assert failures(stack, "unknown_kid") == 20


async def test_issuer_down_fails_closed(make_stack: MakeStack, oidc: FakeIssuer) -> None:
    oidc.down = True
    stack = await tether(make_stack, auth(oidc))
    await refused(stack, oidc.mint(), "jwks_unavailable")
    await refused(stack, oidc.mint(), "jwks_unavailable")
    assert oidc.discovery_hits == 1  # not asked again within refetch_interval
    assert stack.fake.requests == []


# -- Kubernetes service-account tokens ------------------------------------------------------

@pytest.fixture
async def k8s(tmp_path: Path) -> AsyncIterator[FakeIssuer]:
    issuer = FakeIssuer(issuer=K8S_ISSUER, token="pod-sa-token")
    issuer.add_key("k8s-1")
    await issuer.serve()
    yield issuer
    await issuer.close()


async def test_kubernetes_service_account_token(make_stack: MakeStack, k8s: FakeIssuer,
                                                tmp_path: Path) -> None:
    (tmp_path / "sa-token").write_text("pod-sa-token\n")
    extra = f"""auth:
  mode: required
  jwt:
    issuer: {K8S_ISSUER}
    audiences: [tether]
    jwks_url: {k8s.url}/jwks
    token_file: {tmp_path / "sa-token"}
    agents: {{"system:serviceaccount:agents:db-agent": db-agent,
             "system:serviceaccount:agents:ops": ops-agent}}
    claims: [kubernetes.io.namespace]
"""
    stack = await tether(make_stack, extra)
    assert await ask(stack, k8s.k8s("agents", "db-agent")) is None
    assert await ask(stack, k8s.k8s("agents", "ops")) == "delete_volume"
    assert [d["agent"] for d in stack.decisions()] == ["db-agent", "ops-agent"]
    assert k8s.seen_auth == ["Bearer pod-sa-token"]
    # The same account name in another namespace is not that agent.
    await refused(stack, k8s.k8s("sandbox", "db-agent"), "agent")
    await refused(stack, k8s.k8s("agents", "db-agent", aud="https://kubernetes.default.svc"),
                  "audience")


async def test_kubernetes_jwks_fetched_offline(make_stack: MakeStack, k8s: FakeIssuer,
                                               tmp_path: Path) -> None:
    import json

    (tmp_path / "jwks.json").write_text(json.dumps(k8s.jwks()))
    extra = f"""auth:
  mode: required
  jwt:
    issuer: {K8S_ISSUER}
    audiences: [tether]
    jwks_file: {tmp_path / "jwks.json"}
    agent_claim: kubernetes.io.serviceaccount.name
"""
    stack = await tether(make_stack, extra)
    assert await ask(stack, k8s.k8s("agents", "db-agent")) is None
    assert [d["agent"] for d in stack.decisions()] == ["db-agent"]
    assert k8s.jwks_hits == 0


# -- Bedrock: botocore's AWS_BEARER_TOKEN_BEDROCK ------------------------------------------

TETHER_KEY, TETHER_SECRET = "AKIDTETHEROWNKEY", "tether-own-secret"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TETHER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TETHER_SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    yield


async def test_bedrock_bearer_token_names_the_agent(make_stack: MakeStack, oidc: FakeIssuer,
                                                    aws_env: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBedrock(TETHER_KEY, TETHER_SECRET)
    fake.script = lambda body: Reply(content=READ_IT) if answered(body) \
        else Reply(calls=(Call("delete_volume", DELETE),))
    extra = "upstreams:\n  bedrock: {url: 'http://unused', region: us-east-1}\n" + auth(oidc)
    stack = await make_stack(policy=POLICY, extra=extra, upstreams={"bedrock": fake})
    # botocore sends a bearer token over HTTPS only: tether behind a TLS terminator.
    ca = make_fake_ca(tmp_path / "ca")
    port = int(stack.proxy_url.rsplit(":", 1)[1])
    conns: list[asyncio.StreamWriter] = []

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        await _relay(r, w, port)

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=ca.server_context())
    endpoint = f"https://localhost:{server.sockets[0].getsockname()[1]}/bedrock"
    token = oidc.mint("db-agent")
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", token)
    c = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint,
                     verify=str(ca.ca_file),
                     config=botocore.config.Config(retries={"total_max_attempts": 1}))
    out = await asyncio.to_thread(
        c.converse, modelId="anthropic.claude-3", messages=[
            {"role": "user", "content": [{"text": "clean up"}]}],
        toolConfig={"tools": [{"toolSpec": {"name": "delete_volume",
                                            "inputSchema": {"json": {"type": "object"}}}}]})
    blocks = out["output"]["message"]["content"]
    assert all("toolUse" not in b for b in blocks)  # denied for db-agent
    assert [d["agent"] for d in stack.decisions()] == ["db-agent"]
    assert forwarded_secrets(fake.headers, token) == []  # re-signed with tether's own keys
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", oidc.mint("db-agent", aud="nope"))
    c2 = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint,
                      verify=str(ca.ca_file),
                      config=botocore.config.Config(retries={"total_max_attempts": 1}))
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(c2.converse, modelId="anthropic.claude-3", messages=[
            {"role": "user", "content": [{"text": "x"}]}])
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    # AWS's code for credentials it does not recognise, not a policy denial.
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert len(fake.requests) == 2  # the first turn and tether's continuation of it
    c.close()
    c2.close()
    server.close()
    for w in conns:
        w.transport.abort()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    """TLS in, plain HTTP on to tether: a byte pipe each way."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
