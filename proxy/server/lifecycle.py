"""A request's life on the proxy port, and tether's own end (SIGTERM).

`caller_middleware` tells the holds of each request how to see that its caller left
(the transport closed: aiohttp notices a peer's FIN or RST at once, whether or not a
response has started), and counts the requests in flight for the drain.

`shutdown` is the order tether stops in, so nobody is left without an answer:

  1. stop accepting: the proxy and forward listeners close, /readyz answers 503;
  2. every waiting hold ends `abandoned` (audited, its Slack message edited) and its
     request is answered at once with a denial in the provider's shape saying tether
     is restarting and the call was not executed; a hold that starts from now on ends
     the same way;
  3. requests still running get `server.drain_timeout` to finish;
  4. then the upstream connections under them are closed: a stream ends with the
     provider's error event (its open tool calls denied, never released), a whole
     answer with a 502 in the provider's shape; a moment for those answers to go out;
  5. the forward proxy and both ports close what is left;
  6. the audit log writes its last record, then the spool drains
     (`audit.spool.drain_timeout`): answer holds, close the log, then drain.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ..approvals import caller

if TYPE_CHECKING:
    from ..forward.master import ForwardProxy
    from .app import Tether

log = logging.getLogger("tether.server")

CUT_GRACE_S = 2.0   # after the upstream connections are cut, for the answers to go out
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """The requests the proxy port is handling."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False   # SIGTERM came: /readyz answers 503
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self._idle.set()

    async def settled(self, timeout: float) -> bool:
        """True when none are left within `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class UpstreamReads:
    """The upstream answers being read, so a stop can end them: closing a connection
    under aiohttp's client does not wake a reader of its body, an exception does."""

    def __init__(self) -> None:
        live: weakref.WeakSet[aiohttp.ClientResponse] = weakref.WeakSet()
        self._live = live

        class Answer(aiohttp.ClientResponse):
            """Known once its head is in (a trace config's on_request_end would do the
            same, at the price of a signal for every step of every request)."""

            async def start(self, connection: aiohttp.connector.Connection
                            ) -> aiohttp.ClientResponse:
                started = await super().start(connection)
                live.add(self)
                return started

        self.response_class: type[aiohttp.ClientResponse] = Answer

    def cut(self) -> int:
        """Each body still being read fails as a broken upstream; how many there were."""
        cut = 0
        for response in list(self._live):
            if not response.closed and not response.content.is_eof():
                response.content.set_exception(aiohttp.ClientPayloadError(
                    "tether is restarting: the upstream answer was cut"))
                cut += 1
        return cut


def _gone(request: web.BaseRequest) -> Callable[[], bool]:
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


def caller_middleware(inflight: InFlight) -> Any:
    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        inflight.enter()
        gone = _gone(request)
        try:
            with caller.watching(gone):
                return await handler(request)
        except ConnectionResetError:
            if not gone():
                raise
            # The caller left (a hold it waited on ended `abandoned`): nobody reads this.
            log.info("the caller of %s %s disconnected", request.method, request.path)
            return web.Response(status=499, text="the caller disconnected")
        finally:
            inflight.leave()

    return watch


async def shutdown(tether: Tether, runners: list[web.AppRunner],
                   forward: ForwardProxy | None = None) -> None:
    """The order above; returns once tether has stopped (the audit spool drained)."""
    drain_s = tether.config.connections.drain_timeout_s
    tether.inflight.draining = True
    proxy = runners[0]
    try:
        for site in list(proxy.sites):
            await site.stop()
        if forward is not None:
            await forward.stop_listening()
        await tether.holds.stop()
        if not await tether.inflight.settled(drain_s):
            log.warning("shutdown: %d request(s) still running after server.drain_timeout "
                        "(%g s): cutting their upstream connections", tether.inflight.count,
                        drain_s)
            await tether.cut_upstreams()
            await tether.inflight.settled(CUT_GRACE_S)
    finally:  # whatever failed above, the ports close and the audit log ends and ships
        try:
            if forward is not None:
                await forward.stop()
            for runner in reversed(runners):
                await runner.cleanup()
        finally:
            await tether.close()
