from __future__ import annotations

import gc
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from hypothesis import settings
from openai import AsyncOpenAI

from proxy import config as config_mod
from proxy.server.app import Tether, bound_port, build, start
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.oidc import FakeIssuer
from tests.fakes.threaded import ThreadedServer
from tests.redis_server import RedisServer

# CI runs the property tests on a fixed sequence of examples, so a submission's
# verdict does not depend on luck; local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

POLICY = """
tools:
  get_weather: {effect: read}
rules:
  - id: no-prod-deletes
    description: Nothing tagged production or production-candidate is deleted
    match:
      tool: ["delete_*", "terminate_*"]
      args: {tags.env: {in: [production, production-candidate]}}
    action: deny
    message: Deleting production resources is not allowed
  - id: no-drop
    match: {tool: drop_database}
    action: deny
    on_deny: error
    message: Dropping databases is never allowed
  - id: writes-held
    match: {tool: resize_volume}
    action: hold
    timeout: 300ms
  - id: provider-search
    description: The providers' own web search may run (provider-run tools, docs/provider-tools.md)
    match: {tool: ["openai:web_search", "anthropic:web_search", "gemini:google_search"]}
    action: allow
"""


class Upstream(Protocol):
    """A fake upstream: anything that builds an aiohttp app."""

    def app(self) -> web.Application: ...


@dataclass
class Stack:
    fake: FakeOpenAI
    fakes: dict[str, Upstream]
    tether: Tether
    base_url: str
    admin_url: str
    proxy_url: str
    audit_path: Path
    clients: list[AsyncOpenAI] = field(default_factory=list)

    def client(self, **kw: Any) -> AsyncOpenAI:
        client = AsyncOpenAI(base_url=self.base_url, api_key="sk-agent", max_retries=0, **kw)
        self.clients.append(client)
        return client

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().split("\n") if line]

    def decisions(self) -> list[dict[str, Any]]:
        """Decisions on the calls in answers (provider-run tools judged on the request
        side are `provider_decisions`)."""
        return [r for r in self.audit() if r["kind"] == "decision" and "stage" not in r]

    def provider_decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r["kind"] == "decision" and r.get("stage") == "request"]


async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None = None
                 ) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, bound_port(runner)


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_earlier_modules_left() -> Iterator[None]:
    """The objects earlier test modules left on the heap are moved out of the collector's
    reach after each module, so a full collection late in a long run scans only what is
    new. In-process stacks talk to Redis with tether's 0.5 s timeout, which a long
    collection pause of this process would trip (seen once in CI, late in the run)."""
    yield
    gc.freeze()


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    runners: list[web.AppRunner] = []
    tethers: list[Tether] = []
    stacks: list[Stack] = []

    async def make(policy: str = POLICY, fake: FakeOpenAI | None = None, extra: str = "",
                   upstreams: dict[str, Upstream] | None = None) -> Stack:
        """A tether with the given policy in front of fake upstreams, all on loopback.

        `fake` is the OpenAI upstream; `upstreams` adds others by name
        (anthropic, bedrock, gemini, azure), each reached via TETHER_UPSTREAM_<NAME>.
        """
        fake = fake or FakeOpenAI()
        fakes: dict[str, Upstream] = {"openai": fake, **(upstreams or {})}
        env: dict[str, str] = {}
        for name, upstream in fakes.items():
            # A fake that offers `server_context()` is served over TLS as `localhost`.
            tls = getattr(upstream, "server_context", None)
            runner, fake_port = await _serve(upstream.app(), tls() if tls else None)
            runners.append(runner)
            env[f"TETHER_UPSTREAM_{name.upper()}"] = (
                f"https://localhost:{fake_port}" if tls else f"http://127.0.0.1:{fake_port}")
        cfg_path = tmp_path / f"tether-{len(tethers)}.yaml"
        audit_path = tmp_path / f"audit-{len(tethers)}.jsonl"
        cfg_path.write_text(f"audit: {{path: {audit_path}}}\n{extra}\n{policy}")
        cfg = config_mod.load(cfg_path, env=env)
        tether = build(cfg)
        tethers.append(tether)
        proxy_runner, admin_runner = await start(tether, host="127.0.0.1", port=0, admin_port=0)
        runners.extend([proxy_runner, admin_runner])
        port = bound_port(proxy_runner)
        made = Stack(
            fake=fake,
            fakes=fakes,
            tether=tether,
            base_url=f"http://127.0.0.1:{port}/openai/v1",
            admin_url=f"http://127.0.0.1:{bound_port(admin_runner)}",
            proxy_url=f"http://127.0.0.1:{port}",
            audit_path=audit_path,
        )
        stacks.append(made)
        return made

    yield make
    for made in stacks:
        for client in made.clients:
            await client.close()
    for runner in reversed(runners):
        await runner.cleanup()
    for tether in tethers:
        await tether.close()


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests use distinct session ids."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and start."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_upstream() -> Iterator[tuple[FakeOpenAI, int]]:
    """The fake OpenAI in a thread of its own, so a sync SDK client can call a subprocess."""
    fake = FakeOpenAI(script=lambda body: Reply(calls=(
        Call("get_weather", '{"city": "Oslo"}'),
        Call("delete_volume", '{"volume_id": "v", "tags": {"env": "production"}}'))))
    with ThreadedServer(fake.app()) as port:
        yield fake, port


@pytest.fixture
async def oidc() -> AsyncIterator[FakeIssuer]:
    """A fake OIDC issuer on loopback (discovery and JWKS) with one RSA key, `rsa-1`."""
    issuer = FakeIssuer()
    issuer.add_key("rsa-1")
    await issuer.serve()
    yield issuer
    await issuer.close()
