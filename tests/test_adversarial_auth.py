"""A hostile agent (and a broken issuer) against authentication: credentials in two
places at once, bytes that are not text, JWT headers built to hurt the parser,
`kid`/`jku`/`x5u`/`crit` games, 5-segment tokens, key sets that are huge, slow or
sent in pieces, and agent claims that would poison audit records. Every refusal is
a 401 in the provider's shape, audited and counted, with nothing forwarded; nothing
is a 500 and nothing hangs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from proxy.auth import jwks_fetch
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.fakes.oidc import FakeIssuer, new_key, public_jwk
from tests.test_auth_e2e import POLICY, STATIC_KEY, auth, failures

DELETE = Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "dev"}}')
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
           "tools": [{"type": "function", "function": {"name": "delete_volume"}}]}


async def tether(make_stack: MakeStack, extra: str) -> Stack:
    stack = await make_stack(policy=POLICY, extra=extra)
    stack.fake.script = lambda body: Reply(calls=(DELETE,))
    return stack


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def raw_request(stack: Stack, header_lines: bytes, body: bytes | None = None
                      ) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request written by hand, so header bytes need not be text."""
    body = json.dumps(REQUEST).encode() if body is None else body
    reader, writer = await asyncio.open_connection("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1]))
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n" + header_lines
                 + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return status, json.loads(payload) if payload else {}


async def post(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            stack.base_url + "/chat/completions", json=REQUEST, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def assert_refused(stack: Stack, status: int, error: dict[str, Any], reason: str) -> None:
    assert status == 401, error
    assert error["error"]["code"] == "unauthenticated"
    assert stack.fake.requests == []
    record = stack.audit()[-1]
    assert (record["kind"], record["status"], record["code"]) == ("request", 401,
                                                                  "unauthenticated")
    assert failures(stack, reason) >= 1, reason


# --- two credentials, repeated headers, odd spellings ------------------------------------


async def test_two_credential_headers_identify_by_one_and_forward_neither(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    token = oidc.mint("ops-agent")
    status, _ = await post(stack, {"Authorization": f"Bearer {token}", "x-api-key": STATIC_KEY,
                                   "api-key": "sk-other", "x-goog-api-key": "g-other"})
    assert status == 200
    assert [d["agent"] for d in stack.decisions()] == ["ops-agent"]  # Authorization first
    sent = stack.fake.headers[-1]
    assert not {k.lower() for k in sent} & {"x-api-key", "api-key", "x-goog-api-key"}
    assert token not in json.dumps(sent) and STATIC_KEY not in json.dumps(sent)
    # A Basic Authorization is not a credential: the next header names the agent.
    status, _ = await post(stack, {"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": token})
    assert status == 200 and stack.decisions()[-1]["agent"] == "ops-agent"
    assert "dXNlcjpwYXNz" not in json.dumps(stack.fake.headers[-1])


async def test_repeated_authorization_headers_use_the_first_and_forward_none(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    first, second = oidc.mint("ops-agent"), oidc.mint("db-agent")
    status, _ = await raw_request(stack, f"Authorization: Bearer {first}\r\n"
                                  f"Authorization: Bearer {second}\r\n".encode())
    assert status == 200
    assert stack.decisions()[-1]["agent"] == "ops-agent"
    assert first not in json.dumps(stack.fake.headers) and second not in json.dumps(
        stack.fake.headers)


@pytest.mark.parametrize(("value", "ok"), [
    ("bearer {t}", True), ("BEARER   {t}  ", True), ("  Bearer {t}", True),
    ("Bearer\t{t}", False), ("Bearer", False), ("Bearer    ", False), ("Token {t}", False),
    ("Bearer {t} trailing", False),
])
async def test_bearer_spellings(make_stack: MakeStack, oidc: FakeIssuer, value: str,
                                ok: bool) -> None:
    stack = await tether(make_stack, auth(oidc))
    status, error = await raw_request(
        stack, f"Authorization: {value.format(t=oidc.mint('ops-agent'))}\r\n".encode())
    if ok:
        assert status == 200, error
    else:
        assert status == 401 and error["error"]["code"] == "unauthenticated", error
        assert stack.fake.requests == []


@pytest.mark.parametrize("token", [b"t\xff\xfe-not-utf8", "t\u00f6k-\u2603".encode(),
                                   b"x" * 8000])
async def test_tokens_that_are_not_text_or_huge_are_refused_not_a_crash(
        make_stack: MakeStack, oidc: FakeIssuer, token: bytes) -> None:
    stack = await tether(make_stack, auth(oidc))
    status, error = await raw_request(stack, b"Authorization: Bearer " + token + b"\r\n")
    assert_refused(stack, status, error, "unknown_key")
    status, error = await raw_request(stack, b"x-api-key: " + token + b"\r\n")
    assert_refused(stack, status, error, "unknown_key")


async def test_control_bytes_and_oversized_headers_stop_at_the_http_parser(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    """aiohttp's parser answers these 400 itself (plain text, before any handler): not
    the provider's shape and not audited, but nothing is forwarded and nothing breaks."""
    stack = await tether(make_stack, auth(oidc))
    for line in (b"Authorization: Bearer \x01\x02ctl\r\n", b"x-api-key: " + b"k" * 9000 + b"\r\n"):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1]))
        writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\n" + line
                     + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert raw.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), raw[:100]
    assert stack.fake.requests == []
    status, _ = await post(stack, {"Authorization": f"Bearer {oidc.mint('ops-agent')}"})
    assert status == 200  # and the proxy serves the next request


async def test_a_non_utf8_key_in_optional_mode_is_anonymous(make_stack: MakeStack,
                                                            oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc, mode="optional"))
    status, _ = await raw_request(stack, b"Authorization: Bearer sk-\xff\xfe\r\n")
    assert status == 200
    assert stack.decisions()[-1]["agent"] is None


# --- JWT headers built to hurt ---------------------------------------------------------


def forged(header: object, payload: object, sig: str = "c2ln") -> str:
    def seg(value: object) -> str:
        return value if isinstance(value, str) else b64(json.dumps(value).encode())
    return f"{seg(header)}.{seg(payload)}.{sig}"


async def test_deeply_nested_jwt_segments_are_malformed_not_a_crash(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    deep = b64(b"[" * 2000)
    for token in (f"{deep}.{deep}.x", forged({"alg": "RS256"}, deep),
                  forged(deep, {"iss": oidc.issuer})):
        status, error = await raw_request(stack, f"Authorization: Bearer {token}\r\n".encode())
        assert status == 401, error
        assert stack.fake.requests == []


@pytest.mark.parametrize("kid", ["../../etc/passwd", "https://evil.example/jwks?x=1#y",
                                 "%2e%2e%2f", "kid\r\nX-Injected: 1", "\u0000", "k" * 4000])
async def test_kids_with_path_and_url_characters_are_only_compared(
        make_stack: MakeStack, oidc: FakeIssuer, kid: str) -> None:
    stack = await tether(make_stack, auth(oidc))
    token = oidc.mint("ops-agent", headers={"kid": kid})  # signed with rsa-1, wrong kid
    status, error = await post(stack, {"Authorization": f"Bearer {token}"})
    assert_refused(stack, status, error, "unknown_kid")
    assert oidc.jwks_hits == 1  # the kid went into no URL; one fetch of the one JWKS


async def test_jku_and_x5u_are_never_fetched(make_stack: MakeStack, oidc: FakeIssuer) -> None:
    """The attacker hosts a JWKS with their own key and points the token at it."""
    hits: list[str] = []
    evil_key = new_key()

    async def evil(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [public_jwk(evil_key, "rsa-1", "RS256")]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", evil)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        stack = await tether(make_stack, auth(oidc))
        token = jwt.encode(oidc.claims("ops-agent"), evil_key, algorithm="RS256", headers={
            "kid": "rsa-1", "jku": f"{url}/jwks", "x5u": f"{url}/cert.pem",
            "x5c": ["AAAA"], "jwk": public_jwk(evil_key, "rsa-1")})
        status, error = await post(stack, {"Authorization": f"Bearer {token}"})
        assert_refused(stack, status, error, "signature")
        assert hits == []
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("crit", [["x-unknown"], ["exp"], [], "b64", [1]])
async def test_crit_headers_tether_does_not_understand_are_refused(
        make_stack: MakeStack, oidc: FakeIssuer, crit: object) -> None:
    stack = await tether(make_stack, auth(oidc))
    key, _ = oidc.keys["rsa-1"]
    token = jwt.encode(oidc.claims("ops-agent"), key, algorithm="RS256",
                       headers={"kid": "rsa-1", "crit": crit, "x-unknown": 1})
    status, error = await post(stack, {"Authorization": f"Bearer {token}"})
    assert_refused(stack, status, error, "malformed")


async def test_five_segment_jwe_shaped_and_nested_tokens_are_refused(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    good = oidc.mint("ops-agent")
    jwe = ".".join([b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM",
                                    "cty": "JWT"}).encode()), "a", "b", "c", "d"])
    for token in (jwe, good + ".x.y", good + "." + good, "." * 4):
        status, error = await post(stack, {"Authorization": f"Bearer {token}"})
        assert status == 401, (token, error)
    assert stack.fake.requests == []


# --- the issuer's key set: huge, slow, malformed, in pieces ----------------------------


class Jwks:
    """An issuer's JWKS endpoint that misbehaves on demand."""

    def __init__(self, issuer: FakeIssuer) -> None:
        self.issuer = issuer
        self.mode = "pieces"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/jwks"

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        body = json.dumps(self.issuer.jwks()).encode()
        if self.mode == "huge":
            body = body[:-2] + b',"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}]}'
        elif self.mode == "malformed":
            body = b'{"keys": [' + b"[" * 5000
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if self.mode == "slow":
            for byte in body:  # one byte at a time, for ever (well, far past the timeout)
                await resp.write(bytes([byte]))
                await asyncio.sleep(0.05)
        step = max(1, len(body) // 4) if self.mode == "pieces" else len(body)
        for i in range(0, len(body), step):
            await resp.write(body[i:i + step])
            await asyncio.sleep(0.02 if self.mode == "pieces" else 0)
        await resp.write_eof()
        return resp


@pytest.fixture
async def jwks(oidc: FakeIssuer) -> AsyncIterator[Jwks]:
    server = Jwks(oidc)
    await server.serve()
    yield server
    if server.runner is not None:
        await server.runner.cleanup()


async def test_a_jwks_sent_in_pieces_is_read_whole(make_stack: MakeStack, oidc: FakeIssuer,
                                                   jwks: Jwks) -> None:
    stack = await tether(make_stack, auth(oidc, more=f"    jwks_url: {jwks.url}\n"))
    status, error = await post(stack, {"Authorization": f"Bearer {oidc.mint('ops-agent')}"})
    assert status == 200, error


@pytest.mark.parametrize("mode", ["huge", "malformed"])
async def test_a_huge_or_malformed_jwks_is_unavailable(make_stack: MakeStack, oidc: FakeIssuer,
                                                       jwks: Jwks, mode: str) -> None:
    jwks.mode = mode
    stack = await tether(make_stack, auth(oidc, more=f"    jwks_url: {jwks.url}\n"))
    status, error = await post(stack, {"Authorization": f"Bearer {oidc.mint('ops-agent')}"})
    assert_refused(stack, status, error, "jwks_unavailable")


async def test_a_slow_jwks_is_bounded_in_time(make_stack: MakeStack, oidc: FakeIssuer,
                                              jwks: Jwks, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwks_fetch, "TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    jwks.mode = "slow"
    stack = await tether(make_stack, auth(oidc, more=f"    jwks_url: {jwks.url}\n"))
    started = time.monotonic()
    status, error = await post(stack, {"Authorization": f"Bearer {oidc.mint('ops-agent')}"})
    assert time.monotonic() - started < 3
    assert_refused(stack, status, error, "jwks_unavailable")


# --- agent names from claims -----------------------------------------------------------


@pytest.mark.parametrize("sub", ["evil\nagent", "a\r\nX-Injected: 1", "nul\u0000",
                                 "bell\u0007", "rtl\u202eevil", "zw\u200bsp", "x" * 201])
async def test_agent_claims_with_control_characters_are_refused(
        make_stack: MakeStack, oidc: FakeIssuer, sub: str) -> None:
    stack = await tether(make_stack, auth(oidc))
    status, error = await post(stack, {"Authorization": f"Bearer {oidc.mint(sub)}"})
    assert_refused(stack, status, error, "agent")
    assert "\n" not in error["error"]["message"]


async def test_odd_but_printable_agent_names_stay_sane_in_audit_and_metrics(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack = await tether(make_stack, auth(oidc))
    name = 'agent "quoted" {braces} \u00e9t\u00e9 ' + "y" * 150
    status, _ = await post(stack, {"Authorization": f"Bearer {oidc.mint(name)}"})
    assert status == 200
    assert stack.decisions()[-1]["agent"] == name
    for line in stack.audit_path.read_text().splitlines():
        json.loads(line)  # one record a line, whatever the name
    async with aiohttp.ClientSession() as http, http.get(stack.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert "quoted" not in text  # an agent the config does not name is `other`
