"""tether's forward proxy (HTTP_PROXY mode) in front of a test stack, as `tether serve` starts it."""

from __future__ import annotations

from proxy.egress import Egress
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.resolve import Resolver
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
