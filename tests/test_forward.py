"""HTTP_PROXY mode: mitmproxy in tether's loop, LLM hosts governed, SSRF refused.

Everything binds 127.0.0.1. The agent side trusts tether's CA (exported the way
`tether ca export` does); tether trusts the fake tool API's own test CA through
`forward.upstream_ca`. LLM hosts (api.openai.com) are never resolved: the
addon re-addresses them to tether's reverse port, which forwards to the fake.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import ssl
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
from aiohttp import web
from cryptography import x509
from mitmproxy.connection import Client, Server
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from openai.types.chat import ChatCompletion

from proxy import config as config_mod
from proxy.cli import main as cli_main
from proxy.errors import ConfigError
from proxy.forward.ca import SECRET_FILES, export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.settings import ForwardSettings
from proxy.forward.targets import Targets, host_matches, ip_literal, llm_provider
from proxy.server.app import bound_port
from tests.conftest import MakeStack, Stack, Upstream
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.tls import FakeCA, make_fake_ca
from tests.test_e2e_openai import MESSAGES, PROD_DELETE, TOOLS, collect

WEATHER = Call("get_weather", '{"city": "Oslo"}')
TIMEOUT = 20


# -- fakes and harness ------------------------------------------------------------------------


@dataclass
class ToolAPI:
    """A fake tool API served over TLS with its own CA: records what reaches it."""

    seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def any_route(request: web.Request) -> web.Response:
            self.seen.append({"method": request.method, "path": request.path_qs,
                              "host": request.host,
                              **{k.lower(): v for k, v in request.headers.items()
                                 if k.lower().startswith("x-tether")}})
            return web.json_response({"ok": True, "path": request.path_qs})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_route)
        return app


@dataclass
class Fwd:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path          # tether's CA certificate, as `tether ca export` prints it
    tool: ToolAPI
    tool_port: int
    test_ca: FakeCA

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def openai(self, base_url: str = "https://api.openai.com/v1") -> openai.AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(proxy=self.url, verify=self.ssl_context(),
                                              trust_env=False)
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-agent", max_retries=0,
                                    http_client=http, timeout=TIMEOUT)
        self.stack.clients.append(client)
        return client

    def refusals(self) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == "request"
                and r["provider"] == "forward"]


StartFwd = Callable[..., Awaitable[Fwd]]


@pytest.fixture
async def start_fwd(make_stack: MakeStack, tmp_path: Path) -> AsyncIterator[StartFwd]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca")

    async def start(forward: str | None = None, fake: FakeOpenAI | None = None,
                    upstreams: dict[str, Upstream] | None = None, config: str = "") -> Fwd:
        """`forward`: the `forward:` section's body (YAML flow mapping entries)."""
        tool = ToolAPI()
        runner = web.AppRunner(tool.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=test_ca.server_context()).start()
        runners.append(runner)
        ca_dir = tmp_path / f"ca-{len(proxies)}"
        body = forward if forward is not None else \
            "pass_hosts: [localhost, 169.254.169.254], allow_private: [localhost]"
        extra = (f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}"
                 + (f", {body}" if body else "") + "}\n" + config)
        stack = await make_stack(fake=fake or FakeOpenAI(
            script=lambda _body: Reply(content="On it.", calls=(WEATHER, PROD_DELETE))),
            extra=extra, upstreams=upstreams)
        reverse_port = int(stack.proxy_url.rsplit(":", 1)[1])
        admin_port = int(stack.admin_url.rsplit(":", 1)[1])
        fwd = await start_forward(stack.tether.governor, stack.tether.governor.metrics,
                                  stack.tether.config.forward, host="127.0.0.1", port=0,
                                  reverse=("127.0.0.1", reverse_port), own_ports=(admin_port,))
        proxies.append(fwd)
        ca_file = tmp_path / f"tether-ca-{len(proxies)}.pem"
        ca_file.write_text(export_pem(stack.tether.config.forward.ca_dir))
        return Fwd(stack, fwd, f"http://127.0.0.1:{fwd.port}", ca_file, tool,
                   bound_port(runner), test_ca)

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


async def raw(fwd: Fwd, head: str, *, tls_host: str | None = None,
              inner: str | None = None) -> tuple[str, dict[str, Any]]:
    """Speak HTTP to the forward proxy by hand: `head` first (a CONNECT or a plain proxy
    request); after a 200 to a CONNECT, TLS with SNI `tls_host` and then `inner`.
    Returns the last status line and JSON body."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", fwd.proxy.port), TIMEOUT)
    try:
        writer.write(head.encode())
        status, body = await asyncio.wait_for(_read_response(reader), TIMEOUT)
        if tls_host is not None and inner is not None and " 200 " in status + " ":
            ctx = fwd.ssl_context()
            ctx.check_hostname = False  # the point is a name that differs
            await writer.start_tls(ctx, server_hostname=tls_host)
            writer.write(inner.encode())
            status, body = await asyncio.wait_for(_read_response(reader), TIMEOUT)
        return status, json.loads(body) if body else {}
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return lines[0], body


def call_names(r: ChatCompletion) -> list[str]:
    return [c.function.name for c in r.choices[0].message.tool_calls or [] if c.type == "function"]


# -- LLM hosts: the reverse route's governance ----------------------------------------------


async def test_openai_sdk_through_https_proxy_is_governed_like_the_reverse_route(
        start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    via_proxy = await fwd.openai().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS)
    direct = await fwd.stack.client().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS)
    for r in (via_proxy, direct):
        assert call_names(r) == ["get_weather"]
        assert "'delete_volume' was denied by no-prod-deletes" in (r.choices[0].message.content or "")
    assert via_proxy.choices[0].message.model_dump() == direct.choices[0].message.model_dump()
    decisions = fwd.stack.decisions()
    assert [(d["tool"], d["action"]) for d in decisions] == [
        ("get_weather", "allow"), ("delete_volume", "deny")] * 2
    assert len(fwd.stack.fake.requests) == 2  # the proxied call reached the fake once


@dataclass
class TLSFakeOpenAI:
    """The fake OpenAI served over TLS with the test CA (conftest's make_stack sees
    `server_context` and serves it as https://localhost)."""

    fake: FakeOpenAI
    ca: FakeCA

    def app(self) -> web.Application:
        return self.fake.app()

    def server_context(self) -> ssl.SSLContext:
        return self.ca.server_context()


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_tls_all_the_way(start_fwd: StartFwd, tmp_path: Path,
                                         stream: bool) -> None:
    """agent --TLS (tether's CA)--> forward proxy --> reverse route --TLS (the fake's own
    CA, trusted through upstreams.openai.ca_file)--> fake api.openai.com."""
    upstream = FakeOpenAI(script=lambda _body: Reply(content="On it.",
                                                     calls=(WEATHER, PROD_DELETE)))
    ca = make_fake_ca(tmp_path / "openai-ca")
    fwd = await start_fwd(upstreams={"openai": TLSFakeOpenAI(upstream, ca)},
                          config=f"upstreams:\n  openai: {{url: 'https://unused', "
                                 f"ca_file: '{ca.ca_file}'}}\n")
    client = fwd.openai()
    if stream:
        s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                 stream=True)
        names, text = [], ""
        async for chunk in s:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                names += [tc.function.name for tc in choice.delta.tool_calls or []
                          if tc.function and tc.function.name]
    else:
        r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        names, text = call_names(r), r.choices[0].message.content or ""
    assert names == ["get_weather"] and "denied by no-prod-deletes" in text
    assert len(upstream.requests) == 1 and fwd.stack.fake.requests == []


async def test_openai_sdk_stream_through_https_proxy_is_governed_incrementally(
        start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    results = []
    for client in (fwd.openai(), fwd.stack.client()):
        stream = await client.chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True)
        results.append(await collect(stream))
    (text, calls, finishes), direct = results
    assert (text, finishes) == (direct[0], direct[2])
    assert [c[1:] for c in calls.values()] == [c[1:] for c in direct[1].values()]
    assert [name for _id, name, _args in calls.values()] == ["get_weather"]
    assert "'delete_volume' was denied by no-prod-deletes" in text
    assert [d["stream"] for d in fwd.stack.decisions()] == [True] * 4


async def test_stream_is_not_buffered_by_the_forward_proxy(start_fwd: StartFwd) -> None:
    """Text reaches the agent while the upstream is still streaming."""
    fwd = await start_fwd(fake=FakeOpenAI(delay_s=0.05, script=lambda _b: Reply(
        content="word " * 30)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals: list[float] = []
    stream = await fwd.openai().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(loop.time() - started)
    assert len(arrivals) > 10
    assert arrivals[-1] - arrivals[0] > 0.3  # spread out over time, not one buffered burst


async def test_on_deny_error_through_the_proxy_is_the_providers_403(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(fake=FakeOpenAI(script=lambda _b: Reply(
        calls=(Call("drop_database", '{"name": "prod"}'),))))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await fwd.openai().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert "Dropping databases is never allowed" in str(err.value)


async def test_anthropic_sdk_stream_through_https_proxy(start_fwd: StartFwd) -> None:
    """Another provider's host, its own prefix: the same reverse-route governance."""
    from proxy.demo import fake_anthropic as fa

    fake = fa.FakeAnthropic(script=lambda _b: fa.Reply(content="Cleaning up.", calls=(
        fa.Call("get_weather", '{"city": "Oslo"}'), fa.Call(PROD_DELETE.name, PROD_DELETE.arguments))))
    fwd = await start_fwd(upstreams={"anthropic": fake})
    http = anthropic.DefaultAsyncHttpxClient(proxy=fwd.url, verify=fwd.ssl_context(),
                                             trust_env=False)
    client = anthropic.AsyncAnthropic(api_key="k", max_retries=0, http_client=http,
                                      base_url="https://api.anthropic.com", timeout=TIMEOUT)
    try:
        async with client.messages.stream(
                model="claude-test", max_tokens=1024, tools=[
                    {"name": n, "input_schema": {"type": "object"}}
                    for n in ("get_weather", "delete_volume")],
                messages=[{"role": "user", "content": "clean up"}]) as stream:
            final = await stream.get_final_message()
    finally:
        await client.close()
    kinds = [(b.type, b.name if b.type == "tool_use" else None) for b in final.content]
    assert kinds == [("text", None), ("tool_use", "get_weather"), ("text", None)]
    denial = final.content[2]
    assert denial.type == "text" and "'delete_volume' was denied by no-prod-deletes" in denial.text
    assert [(d["provider"], d["action"]) for d in fwd.stack.decisions()] == [
        ("anthropic", "allow"), ("anthropic", "deny")]


async def test_plain_http_to_an_llm_host_is_governed_too(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    r = await fwd.openai("http://api.openai.com/v1").chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert call_names(r) == ["get_weather"]


async def test_curl_through_the_proxy_to_openai(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    body = json.dumps({"model": "gpt-x", "messages": MESSAGES, "tools": TOOLS})
    out = await _curl(fwd, "https://api.openai.com/v1/chat/completions",
                      "-H", "content-type: application/json", "-H", "authorization: Bearer sk-a",
                      "--data-binary", body)
    answer = json.loads(out)
    message = answer["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert "was denied by no-prod-deletes" in message["content"]


# -- tool hosts: pass_hosts, requests and curl ----------------------------------------------


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no NO_PROXY from the environment
    return s


async def test_requests_through_the_proxy_to_a_pass_host(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()

    def get() -> requests.Response:
        return _session().get(f"https://localhost:{fwd.tool_port}/items?x=1",
                              proxies={"https": fwd.url}, verify=str(fwd.ca_file),
                              headers={"X-Tether-Session": "s1"}, timeout=TIMEOUT)

    r = await asyncio.to_thread(get)
    assert r.status_code == 200 and r.json() == {"ok": True, "path": "/items?x=1"}
    assert fwd.tool.seen[0]["path"] == "/items?x=1"
    assert "x-tether-session" not in fwd.tool.seen[0]  # identity headers stay inside


async def test_many_requests_on_one_kept_alive_connection(start_fwd: StartFwd) -> None:
    """A regression: pinning the upstream address defeated mitmproxy's connection reuse,
    and its limit of five open connections per address made the sixth request hang."""
    fwd = await start_fwd()

    def many() -> list[int]:
        with _session() as s:
            return [s.get(f"https://localhost:{fwd.tool_port}/n{i}", proxies={"https": fwd.url},
                          verify=str(fwd.ca_file), timeout=TIMEOUT).status_code
                    for i in range(12)]

    assert await asyncio.to_thread(many) == [200] * 12
    assert [seen["path"] for seen in fwd.tool.seen] == [f"/n{i}" for i in range(12)]


async def test_curl_through_the_proxy_to_a_pass_host(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    out = await _curl(fwd, f"https://localhost:{fwd.tool_port}/v1/things")
    assert json.loads(out) == {"ok": True, "path": "/v1/things"}


async def test_upstream_tls_is_verified_against_the_configured_ca(start_fwd: StartFwd) -> None:
    """Without `upstream_ca`, the fake's certificate is not trusted: no silent pass."""
    fwd = await start_fwd()
    fwd.proxy.master.options.update(ssl_verify_upstream_trusted_ca=None)  # type: ignore[no-untyped-call]

    def get() -> requests.Response:
        return _session().get(f"https://localhost:{fwd.tool_port}/x", proxies={"https": fwd.url},
                              verify=str(fwd.ca_file), timeout=TIMEOUT)

    r = await asyncio.to_thread(get)
    assert r.status_code == 502 and fwd.tool.seen == []


async def test_a_host_not_listed_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    status, body = await raw(fwd, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert status.startswith("HTTP/1.1 403")
    assert body["error"]["code"] == "tether:host-not-allowed"
    assert fwd.refusals()[-1]["code"] == "tether:host-not-allowed"


async def test_anchored_host_patterns(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    status, body = await raw(
        fwd, "CONNECT api.openai.com.evil.net:443 HTTP/1.1\r\nHost: api.openai.com.evil.net\r\n\r\n")
    assert status.startswith("HTTP/1.1 403") and body["error"]["code"] == "tether:host-not-allowed"


# -- SSRF ----------------------------------------------------------------------------------


async def test_loopback_is_refused_by_default(start_fwd: StartFwd) -> None:
    fwd = await start_fwd("pass_hosts: [localhost]")  # listed, but not allow_private
    status, body = await raw(
        fwd, f"CONNECT localhost:{fwd.tool_port} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status.startswith("HTTP/1.1 403")
    assert body["error"]["code"] == "tether:loopback-address"
    [record] = fwd.refusals()
    assert record["status"] == 403 and record["code"] == "tether:loopback-address"
    assert fwd.tool.seen == []


async def test_plain_http_to_loopback_is_refused_by_default(start_fwd: StartFwd) -> None:
    fwd = await start_fwd("pass_hosts: [localhost]")
    status, body = await raw(fwd, f"GET http://localhost:{fwd.tool_port}/ HTTP/1.1\r\n"
                                  f"Host: localhost:{fwd.tool_port}\r\n\r\n")
    assert status.startswith("HTTP/1.1 403") and body["error"]["code"] == "tether:loopback-address"


async def test_metadata_address_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd("pass_hosts: [169.254.169.254]")
    status, body = await raw(fwd, "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n"
                                  "Host: 169.254.169.254\r\n\r\n")
    assert status.startswith("HTTP/1.1 403")
    assert body["error"]["code"] == "tether:link-local-address"
    assert "169.254.169.254" in body["error"]["message"]
    assert fwd.refusals()[-1]["code"] == "tether:link-local-address"


async def test_ip_literal_connect_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd("pass_hosts: [localhost]")
    for target in ("127.0.0.1", "[::1]", "169.254.169.254", "8.8.8.8"):
        status, body = await raw(fwd, f"CONNECT {target}:443 HTTP/1.1\r\nHost: {target}\r\n\r\n")
        assert status.startswith("HTTP/1.1 403"), target
        assert body["error"]["code"] == "tether:ip-literal", target
    assert len(fwd.refusals()) == 4


async def test_ip_literal_allowed_when_named(start_fwd: StartFwd) -> None:
    fwd = await start_fwd("pass_hosts: [127.0.0.1], allow_private: [127.0.0.1/32]")

    def get() -> requests.Response:
        return _session().get(f"https://127.0.0.1:{fwd.tool_port}/ip", proxies={"https": fwd.url},
                              verify=str(fwd.ca_file), timeout=TIMEOUT)

    r = await asyncio.to_thread(get)
    assert r.status_code == 200 and fwd.tool.seen[0]["path"] == "/ip"


async def test_sni_that_differs_from_the_connect_host_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    status, body = await raw(
        fwd, "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
        tls_host="evil.example",
        inner="GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    assert status.startswith("HTTP/1.1 403"), status
    assert body["error"]["code"] == "tether:host-mismatch"
    assert fwd.stack.fake.requests == [] and fwd.refusals()[-1]["code"] == "tether:host-mismatch"


async def test_host_header_that_differs_from_the_connect_host_is_refused(
        start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    status, body = await raw(
        fwd, "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
        tls_host="api.openai.com",
        inner=f"GET /items HTTP/1.1\r\nHost: localhost:{fwd.tool_port}\r\n\r\n")
    assert status.startswith("HTTP/1.1 403") and body["error"]["code"] == "tether:host-mismatch"
    assert fwd.tool.seen == []


async def test_plain_request_whose_host_header_differs_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    status, body = await raw(fwd, "GET http://api.openai.com/v1/models HTTP/1.1\r\n"
                                  "Host: localhost\r\n\r\n")
    assert status.startswith("HTTP/1.1 403") and body["error"]["code"] == "tether:host-mismatch"


async def test_tethers_own_ports_are_refused_even_when_loopback_is_allowed(
        start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    for url in (fwd.stack.admin_url, fwd.stack.proxy_url, fwd.url):
        port = url.rsplit(":", 1)[1]
        status, body = await raw(fwd, f"GET http://localhost:{port}/v1/approvals HTTP/1.1\r\n"
                                      f"Host: localhost:{port}\r\n\r\n")
        assert status.startswith("HTTP/1.1 403"), url
        assert body["error"]["code"] == "tether:own-port", url


# -- fail closed ---------------------------------------------------------------------------


class BrokenTargets(Targets):
    """Fault injection: the target check itself blows up."""

    def literal_allowed(self, host: str) -> None:
        raise RuntimeError("boom")


async def test_an_exception_in_the_addon_kills_the_flow(start_fwd: StartFwd) -> None:
    fwd = await start_fwd()
    targets = fwd.proxy.addon.targets
    fwd.proxy.addon.targets = BrokenTargets(targets.settings, targets.own_ports)
    with pytest.raises(openai.APIConnectionError):  # request hook: nothing forwarded
        await fwd.openai("http://api.openai.com/v1").chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=TOOLS)

    def get() -> requests.Response:  # http_connect hook
        return _session().get(f"https://localhost:{fwd.tool_port}/x", proxies={"https": fwd.url},
                              verify=str(fwd.ca_file), timeout=TIMEOUT)

    with pytest.raises(requests.exceptions.ConnectionError):
        await asyncio.to_thread(get)
    assert fwd.stack.fake.requests == [] and fwd.tool.seen == []
    assert [r["code"] for r in fwd.refusals()] == ["tether:internal-error"] * 2
    metrics = fwd.stack.tether.governor.metrics
    assert metrics.fail_closed.labels("forward")._value.get() == 2


async def test_server_connect_resolves_checks_and_pins_the_address(start_fwd: StartFwd) -> None:
    """The last gate before a socket opens: the connection goes to the address that
    was checked, not to a name that could resolve differently a moment later."""
    fwd = await start_fwd()
    addon = fwd.proxy.addon
    allowed = ServerConnectionHookData(server=Server(address=("localhost", 8443)),
                                       client=Client(peername=("127.0.0.1", 1), sockname=("", 0)))
    await addon.server_connect(allowed)
    assert allowed.server.error is None and allowed.server.address == ("127.0.0.1", 8443)
    addon.targets = Targets(ForwardSettings(pass_hosts=("localhost",)), addon.targets.own_ports)
    refused = ServerConnectionHookData(server=Server(address=("localhost", 8443)),
                                       client=Client(peername=("127.0.0.1", 1), sockname=("", 0)))
    await addon.server_connect(refused)
    assert refused.server.error and "tether:loopback-address" in refused.server.error
    assert refused.server.address == ("localhost", 8443)
    assert fwd.refusals()[-1]["code"] == "tether:loopback-address"


# -- the CA and the CLI --------------------------------------------------------------------


async def test_ca_is_private_and_export_prints_the_certificate_only(
        start_fwd: StartFwd, capsys: pytest.CaptureFixture[str]) -> None:
    fwd = await start_fwd()
    ca_dir = Path(fwd.stack.tether.config.forward.ca_dir)
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for name in SECRET_FILES:
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600, name
    assert cli_main(["ca", "export", "--config", str(fwd.stack.tether.config.source)]) == 0
    out = capsys.readouterr().out
    assert "PRIVATE KEY" not in out and out.count("BEGIN CERTIFICATE") == 1
    cert = x509.load_pem_x509_certificate(out.encode())
    assert out == fwd.ca_file.read_text()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "tether forward proxy CA" in cert.subject.rfc4514_string()


def test_ca_export_creates_the_ca_when_missing(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("forward: {ca_dir: ca}\n")
    assert cli_main(["ca", "export", "--config", str(cfg)]) == 0
    assert "BEGIN CERTIFICATE" in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    os.chmod(tmp_path / "ca" / SECRET_FILES[0], 0o644)  # loosened by hand: tightened again
    export_pem(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / SECRET_FILES[0]).stat().st_mode) == 0o600


async def test_serve_with_forward_port(tmp_path: Path) -> None:
    """`tether serve --forward-port` starts the listener in the same process."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"audit: {{path: {tmp_path / 'a.jsonl'}}}\nforward: {{ca_dir: ca}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(cfg),
        "--port", "0", "--admin-port", "0", "--forward-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        if not line and proc.stderr is not None:
            line = (await proc.stderr.read()).decode()
        assert "HTTP_PROXY on http://127.0.0.1:" in line, line
        port = int(line.split("HTTP_PROXY on http://127.0.0.1:")[1].split()[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
        status, body = await asyncio.wait_for(_read_response(reader), TIMEOUT)
        writer.close()
        assert status.startswith("HTTP/1.1 403") and b"tether:ip-literal" in body
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode == 0


# -- pure units ----------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "provider"), [
    ("api.openai.com", "openai"), ("API.OpenAI.com.", "openai"),
    ("myres.openai.azure.com", "azure"), ("api.anthropic.com", "anthropic"),
    ("bedrock-runtime.eu-west-1.amazonaws.com", "bedrock"),
    ("generativelanguage.googleapis.com", "gemini"),
    ("api.openai.com.evil.net", None), ("evilapi.openai.com", None), ("openai.azure.com", None),
    ("a.b.openai.azure.com", None), ("bedrock-runtime.us-east-1.amazonaws.com.evil.net", None),
    ("bedrock.us-east-1.amazonaws.com", None), ("xgenerativelanguage.googleapis.com", None),
])
def test_llm_host_patterns_are_anchored(host: str, provider: str | None) -> None:
    assert llm_provider(host) == provider


@pytest.mark.parametrize(("host", "patterns", "matched"), [
    ("jira.example.com", ["jira.example.com"], True),
    ("a.example.com", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),
    ("evilexample.com", ["*.example.com"], False),
    ("example.com.evil.net", ["example.com"], False),
])
def test_pass_host_patterns(host: str, patterns: list[str], matched: bool) -> None:
    assert host_matches(host, patterns) is matched


@pytest.mark.parametrize(("host", "ip", "port", "code"), [
    ("x", "8.8.8.8", 443, None),
    ("x", "127.0.0.1", 443, "tether:loopback-address"),
    ("x", "::1", 443, "tether:loopback-address"),
    ("x", "::ffff:127.0.0.1", 443, "tether:loopback-address"),
    ("x", "169.254.169.254", 80, "tether:link-local-address"),
    ("x", "fd00:ec2::254", 80, "tether:private-address"),
    ("x", "10.1.2.3", 443, "tether:private-address"),
    ("x", "192.168.0.1", 443, "tether:private-address"),
    ("x", "0.0.0.0", 443, "tether:private-address"),
    ("x", "100.64.0.1", 443, "tether:non-public-address"),
    ("db.internal", "10.1.2.3", 443, None),          # named in allow_private
    ("x", "172.16.5.5", 443, None),                  # in an allowed CIDR
    ("x", "172.16.5.5", 9090, "tether:own-port"),    # but never tether's own port
])
def test_address_checks(host: str, ip: str, port: int, code: str | None) -> None:
    settings = ForwardSettings(allow_hosts=("db.internal",),
                               allow_networks=(ipaddress.ip_network("172.16.0.0/12"),))
    targets = Targets(settings, own_ports=(9090,))
    address = ip_literal(ip)
    assert address is not None
    refusal = targets.address_allowed(host, address, port)
    assert (refusal.code if refusal else None) == code


@pytest.mark.parametrize(("yaml", "message"), [
    ("forward: {bogus: 1}", "unknown key"),
    ("forward: {allow_private: [10.0.0.0/33]}", "neither a host name"),
    ("forward: {allow_private: 10.0.0.0/8}", "list of host names"),
    ("forward: {pass_hosts: ['a.*.com']}", "leading"),
    ("forward: {pass_hosts: ['*example.com']}", "leading"),
    ("forward: {ca_dir: 3}", "must be a path"),
    ("forward: [1]", "must be a mapping"),
])
def test_forward_config_errors_name_file_and_line(tmp_path: Path, yaml: str, message: str) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("audit: {path: null}\n" + yaml + "\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(cfg, env={})
    assert message in str(err.value) and f"{cfg}:2" in str(err.value)


def test_forward_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("forward: {ca_dir: ca, upstream_ca: certs/corp.pem}\n")
    forward = config_mod.load(cfg, env={}).forward
    assert forward.ca_dir == str(tmp_path / "ca")
    assert forward.upstream_ca == str(tmp_path / "certs" / "corp.pem")
    default = tmp_path / "d.yaml"
    default.write_text("audit: {path: null}\n")
    assert config_mod.load(default, env={}).forward.ca_dir == str(tmp_path / ".tether" / "ca")


async def _curl(fwd: Fwd, url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", "--max-time", str(TIMEOUT), "--proxy", fwd.url,
        "--cacert", str(fwd.ca_file), *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT + 5)
    assert proc.returncode == 0, err.decode() + out.decode()
    return out.decode()
