"""The in-process mitmproxy master: same event loop as the aiohttp servers.

`Master.run()` is not used: it swaps the loop's task factory for the eager
one for as long as it runs, which would change how every aiohttp task of the
process is scheduled. The steps it takes are taken here instead (servers up,
`running`, and at the end `done`), with only the addons HTTP_PROXY mode needs.

One master runs up to two listeners, one addon judging both: the HTTP_PROXY
listener (mitmproxy's `regular` mode) and the transparent one (`transparent`
mode: connections an iptables REDIRECT sent here; mitmproxy reads their
original destination with SO_ORIGINAL_DST, see `deploy/transparent/`).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mitmproxy import options
from mitmproxy.proxy import mode_servers, mode_specs

# mitmproxy.addons (which mitmproxy.master imports) loads every addon, proxyauth's
# ldap3 included, which warns about pyasn1 names it still uses: not tether's to see.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.addons import block, core, disable_h2c, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

from ..auth.authenticator import Authenticator
from ..egress import Egress
from ..governor import Governor
from ..server_settings import ServerLimits
from ..telemetry import Metrics
from .addon import ForwardAddon
from .ca import ensure_ca
from .limits import ConnectionLimits
from .resolve import Resolver
from .settings import ForwardSettings
from .targets import Targets

log = logging.getLogger("tether.forward")


class ForwardStartError(RuntimeError):
    """The forward listener could not be opened (port taken, bad option)."""


@dataclass(slots=True)
class ForwardProxy:
    master: Master
    server: proxyserver.Proxyserver
    addon: ForwardAddon
    host: str
    port: int                        # the HTTP_PROXY listener; 0 when only the transparent one runs
    transparent_port: int | None = None

    async def stop_listening(self) -> None:
        """Accept no new connection (SIGTERM); those open go on (server/lifecycle.py)."""
        await self.server.servers.update([])

    async def stop(self) -> None:
        """Close the listener, then end the connections still open (a client that
        keeps a tunnel alive must not keep tether from shutting down)."""
        await self.server.servers.update([])
        for handler in list(self.server.connections.values()):
            try:
                handler.close_connection(handler.client)
            except (KeyError, AssertionError):
                pass  # already closing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while self.server.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.master.done()


async def start_forward(governor: Governor, metrics: Metrics, settings: ForwardSettings, *,
                        host: str, port: int | None, reverse: tuple[str, int],
                        own_ports: Iterable[int], egress: Egress | None = None,
                        resolver: Resolver | None = None,
                        transparent_port: int | None = None,
                        auth: Authenticator | None = None,
                        limits: ServerLimits | None = None,
                        reuse_port: bool = False) -> ForwardProxy:
    """Open the HTTP_PROXY listener on `host:port` (0: any free port; None: none) and,
    with `transparent_port`, the transparent listener on `host:transparent_port`
    (0 is allowed for one of the two only: mitmproxy refuses two servers on one address).

    `reverse`: where LLM requests are re-addressed (tether's proxy port, reachable
    from here); `own_ports`: tether's other ports, never a forwarding target.
    `egress`: what tool and cloud API requests are judged by (none: only LLM and
    pass hosts); `resolver`: replaces the system's DNS (split-horizon, tests);
    `auth`: the reverse route's Authenticator (`auth:`), shared so that the identity
    the forward proxy established reaches the reverse route (proxy/auth/handoff.py);
    `limits`: `server:` timeouts and connection cap (forward/limits.py; default: the
    defaults); `reuse_port`: the ports are shared with the other workers of
    `tether serve --workers N` (workers.py).
    One per process: mitmproxy keeps its master and options in a module global."""
    modes = ([] if port is None else [f"regular@{port}"]) + (
        [] if transparent_port is None else [f"transparent@{transparent_port}"])
    if not modes:
        raise ForwardStartError("neither an HTTP_PROXY nor a transparent port was given")
    if port is not None and port == transparent_port:
        raise ForwardStartError(f"the HTTP_PROXY and transparent listeners share port {port}")
    ensure_ca(settings.ca_dir)
    if reuse_port:
        _share_ports()
    opts = options.Options()
    master = Master(opts, event_loop=asyncio.get_running_loop())
    server = proxyserver.Proxyserver()  # type: ignore[no-untyped-call]
    egress = egress or Egress()
    targets = Targets(settings, (*own_ports, reverse[1]),
                      # the addon's egress, read at use: a config reload replaces it
                      named=lambda host: any(a.names(host)
                                             for a in addon.egress.apis.apis.values()))
    addon = ForwardAddon(governor, metrics, targets, reverse, egress, resolver, auth)
    limits = limits or ServerLimits()
    master.addons.add(core.Core(), server, next_layer.NextLayer(), tlsconfig.TlsConfig(),
                      block.Block(), disable_h2c.DisableH2C(), addon,
                      # Last: its 503 to a connection over the limit is the answer.
                      ConnectionLimits(limits, metrics, server))  # type: ignore[no-untyped-call]
    opts.update(  # type: ignore[no-untyped-call]
        mode=modes,
        listen_host=host,
        listen_port=port,
        confdir=settings.ca_dir,
        connection_strategy="lazy",
        ssl_verify_upstream_trusted_ca=settings.upstream_ca,
        ssl_insecure=False,
        tcp_timeout=max(1, round(limits.idle_timeout_s)),  # mitmproxy's inactivity timeout
    )
    if not await server.setup_servers() or not server.listen_addrs():
        await master.done()
        raise ForwardStartError(f"cannot listen on {host}:{port} (see the log)")
    bound = {type(instance.mode): int(instance.listen_addrs[0][1])
             for instance in server.servers if instance.listen_addrs}
    regular = bound.get(mode_specs.RegularMode, 0)
    transparent = bound.get(mode_specs.TransparentMode)
    if (port is not None and not regular) or (transparent_port is not None and transparent is None):
        await master.done()
        raise ForwardStartError(f"a forward listener on {host} did not open (see the log)")
    targets.own_ports = frozenset({*targets.own_ports, *bound.values()})
    targets.transparent_port = transparent
    await master.running()
    if port is not None:
        log.info("forward proxy on %s:%d", host, regular)
    if transparent is not None:
        log.info("transparent proxy on %s:%d", host, transparent)
    return ForwardProxy(master, server, addon, host, regular, transparent)


def _share_ports() -> None:
    """The HTTP_PROXY and transparent listeners open with SO_REUSEPORT, so the kernel
    spreads connections over the workers. mitmproxy opens them with asyncio.start_server
    and no such option, so their `listen` is replaced in this process (a worker runs one
    forward proxy, and its parent has made every port concrete: never 0 here)."""
    async def listen(self: mode_servers.AsyncioServerInstance[Any], host: str,
                     port: int) -> list[asyncio.Server]:
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    for instance in (mode_servers.RegularInstance, mode_servers.TransparentInstance):
        instance.listen = listen  # type: ignore[method-assign,assignment]
