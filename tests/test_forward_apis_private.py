"""An `apis:` host named exactly may lead to a private address; one a glob covers may not.

The operator who writes `hosts: [jira.internal.example]` chose that name, so it may
resolve to a private address without `forward.allow_private`. A glob
(`"*.atlassian.net"`) covers names whose DNS someone else answers: any tenant of
the domain can point one at 127.0.0.1 or 169.254.169.254, so a name matched only
by a glob gets the loopback / private / link-local refusal unless
`forward.allow_private` names it. Through a running forward proxy with `requests`
(HTTPS_PROXY) and raw CONNECTs; the forward proxy's resolver (the split-horizon
hook) maps the names, and the fake upstream records what reaches it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from proxy.egress import Egress
from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.settings import ForwardSettings
from proxy.forward.targets import Address, Targets
from proxy.server.app import bound_port
from tests.conftest import MakeStack, Stack
from tests.fakes.tls import make_fake_ca
from tests.test_forward_egress import FakeUpstream

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
EXACT = "jira.example.com"          # named exactly under `hosts:`
GLOBBED = "acme.atlassian.net"      # covered only by "*.atlassian.net"
METADATA = "meta.atlassian.net"     # a glob name someone pointed at the metadata service
ANSWERS = {EXACT: "127.0.0.1", GLOBBED: "127.0.0.1", METADATA: "169.254.169.254"}
ISSUE = "/rest/api/2/issue/OPS-1"


@dataclass
class Fwd:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path
    fake: FakeUpstream
    port: int

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"https": self.url}
        s.verify = str(self.ca_file)
        return s

    async def get(self, host: str) -> requests.Response:
        return await asyncio.to_thread(
            lambda: self.session().get(f"https://{host}:{self.port}{ISSUE}", timeout=20))

    async def connect(self, host: str) -> tuple[str, dict[str, Any]]:
        """A raw CONNECT: the status line and the JSON body of a refusal."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        writer.write(f"CONNECT {host}:{self.port} HTTP/1.1\r\nHost: {host}:{self.port}\r\n\r\n"
                     .encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b"{}"
        writer.close()
        return head.split("\r\n", 1)[0], json.loads(body)

    def refusals(self) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r.get("code", "").endswith("-address")]


StartFwd = Callable[..., Awaitable[Fwd]]


@pytest.fixture
async def start_fwd(make_stack: MakeStack, tmp_path: Path) -> AsyncIterator[StartFwd]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=tuple(ANSWERS))

    async def resolver(host: str, port: int) -> list[Address]:
        answer = ANSWERS.get(host)
        return [ipaddress.ip_address(answer)] if answer else []

    async def start(hosts: str, allow_private: str = "[]") -> Fwd:
        fake = FakeUpstream()
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=test_ca.server_context()).start()
        runners.append(runner)
        ca_dir = tmp_path / f"ca-{len(proxies)}"
        stack = await make_stack(policy="", extra=(
            f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
            f"allow_private: {allow_private}}}\n"
            f"apis:\n  jira: {{url: 'https://{EXACT}', spec: {SPECS / 'jira.yaml'}, "
            f"hosts: {hosts}}}\n"))
        cfg = stack.tether.config
        fwd = await start_forward(
            stack.tether.governor, stack.tether.governor.metrics, cfg.forward,
            host="127.0.0.1", port=0, reverse=("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1])),
            own_ports=(), resolver=resolver, egress=Egress(cfg.apis, cfg.cloud, stack.tether.holds))
        proxies.append(fwd)
        ca_file = tmp_path / f"tether-ca-{len(proxies)}.pem"
        ca_file.write_text(export_pem(cfg.forward.ca_dir))
        return Fwd(stack, fwd, f"http://127.0.0.1:{fwd.port}", ca_file, fake, bound_port(runner))

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


BOTH = f"[{EXACT}, '*.atlassian.net']"


async def test_a_name_matched_by_a_glob_is_refused_on_loopback(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(BOTH)
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        await fwd.get(GLOBBED)
    status, body = await fwd.connect(GLOBBED)
    assert status.startswith("HTTP/1.1 403")
    assert body["error"]["code"] == "tether:loopback-address"
    assert "forward.allow_private" in body["error"]["message"]
    assert fwd.fake.seen == []
    assert {r["code"] for r in fwd.refusals()} == {"tether:loopback-address"}


async def test_a_glob_name_pointed_at_the_metadata_service_is_refused(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(BOTH)
    status, body = await fwd.connect(METADATA)
    assert status.startswith("HTTP/1.1 403")
    assert body["error"]["code"] == "tether:link-local-address"
    assert fwd.fake.seen == []


@pytest.mark.parametrize("spelling", [GLOBBED.upper(), GLOBBED + ".", "Acme.Atlassian.Net."])
async def test_every_spelling_of_a_glob_name_is_refused(start_fwd: StartFwd, spelling: str) -> None:
    fwd = await start_fwd(BOTH)
    status, body = await fwd.connect(spelling)
    assert status.startswith("HTTP/1.1 403"), spelling
    assert body["error"]["code"] == "tether:loopback-address"


async def test_the_exactly_named_host_still_reaches_its_private_address(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(BOTH)
    ok = await fwd.get(EXACT)
    assert ok.status_code == 200 and ok.json()["path"] == ISSUE
    for spelling in (EXACT.upper(), EXACT + "."):
        status, _ = await fwd.connect(spelling)
        assert status.startswith("HTTP/1.1 200"), spelling
    assert [(r["host"], r["path"]) for r in fwd.fake.seen] == [(EXACT, ISSUE)]
    assert fwd.refusals() == []


async def test_the_default_host_from_the_url_counts_as_named(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(f"[{EXACT}]")  # what `hosts:` defaults to: the url's host
    ok = await fwd.get(EXACT)
    assert ok.status_code == 200


async def test_allow_private_opens_a_glob_name_and_only_that_one(start_fwd: StartFwd) -> None:
    fwd = await start_fwd(BOTH, allow_private=f"[{GLOBBED}]")
    ok = await fwd.get(GLOBBED)
    assert ok.status_code == 200 and ok.json()["path"] == ISSUE
    assert [r["host"] for r in fwd.fake.seen] == [GLOBBED]
    unknown = await asyncio.to_thread(lambda: fwd.session().get(
        f"https://{GLOBBED}:{fwd.port}/rest/api/2/admin/everything", timeout=20))
    assert unknown.status_code == 403  # still judged against jira's spec
    assert unknown.json()["error"]["rule"] == "tether:unknown-operation"
    status, body = await fwd.connect(METADATA)
    assert status.startswith("HTTP/1.1 403") and body["error"]["code"] == "tether:link-local-address"


@pytest.mark.parametrize(("host", "named"), [
    (EXACT, True), (EXACT.upper() + ".", True), (GLOBBED, False), ("atlassian.net", False),
    ("*.atlassian.net", False),
])
def test_names_is_exact_and_never_a_glob(tmp_path: Path, host: str, named: bool) -> None:
    from proxy import config as config_mod

    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"apis:\n  jira: {{url: 'https://{EXACT}', spec: {SPECS / 'jira.yaml'}, "
                   f"hosts: {BOTH}}}\n")
    api = config_mod.load(cfg, env={}).apis.apis["jira"]
    assert api.names(host) is named
    targets = Targets(ForwardSettings(), (), named=api.names)
    refusal = targets.address_allowed(host, ipaddress.ip_address("10.0.0.5"), 443)
    assert (refusal is None) is named
