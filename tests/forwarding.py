"""tether's forward proxy (HTTP_PROXY mode) in front of a test stack, as `tether serve` starts it."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from proxy.demo.tls import FakeCA
from proxy.egress import Egress
from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.resolve import Resolver
from proxy.server.app import bound_port
from tests.conftest import Stack


async def forward_for(stack: Stack, resolver: Resolver) -> ForwardProxy:
    """A forward proxy judging with `stack`'s governor and config; `resolver` stands in for DNS."""
    cfg = stack.tether.config
    return await start_forward(
        stack.tether.governor, stack.tether.governor.metrics, cfg.forward,
        host="127.0.0.1", port=0, reverse=("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1])),
        own_ports=(), resolver=resolver,
        egress=Egress(cfg.apis, cfg.cloud, stack.tether.holds, cfg.agent_keys,
                      cfg.trust_identity_headers, cfg.lookups))


async def agent_proxy(stack: Stack, resolver: Resolver, ca_file: Path,
                      monkeypatch: pytest.MonkeyPatch) -> ForwardProxy:
    """`forward_for`, with the agent's environment pointed at it: HTTPS_PROXY, and tether's
    CA written to `ca_file` for the agent's clients to trust."""
    fwd = await forward_for(stack, resolver)
    ca_file.write_text(export_pem(stack.tether.config.forward.ca_dir))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{fwd.port}")
    monkeypatch.setenv("NO_PROXY", "")
    return fwd


async def serve_tls(app: web.Application, ca: FakeCA, runners: list[web.AppRunner]) -> int:
    """`app` on a loopback port over TLS with the fakes' CA; its runner joins `runners`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context()).start()
    runners.append(runner)
    return bound_port(runner)
