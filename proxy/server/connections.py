"""Bounds on client connections for the aiohttp ports (proxy and admin): how many may be
open, how long a request head and body may take to arrive, how long a kept-alive
connection may idle (`server:`, proxy/server_settings.py).

aiohttp has one timer of its own, `keepalive_timeout`, which closes a connection
waiting for a request head; it does not tell a silent connection from one that
trickles its headers a byte at a time, and it counts nothing. So each connection's
protocol is wrapped in a `_Guard` that keeps the state and the timers, and hands
every byte and event to aiohttp's own protocol unchanged:

    head  (connected, or the first byte after idle)  header_timeout, then 408 + close
    busy  (a handler runs: `guard_middleware` saw it start)   body_timeout on its body
    idle  (the handler returned)                     idle_timeout, then close

aiohttp's `keepalive_timeout` stays on, set past these, as a backstop. One over
`max_connections` gets a 503 and is closed; its socket is drained for a moment
first, so the client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from ..server_settings import ServerLimits
from ..telemetry import Metrics

log = logging.getLogger("tether.connections")

LINGER_S = 2.0   # a refused connection is read (and dropped) this long before it is closed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answer(status: int, reason: str, message: str, code: str, retry_after: int | None = None
            ) -> bytes:
    body = json.dumps({"error": {"message": message, "type": code, "code": code}}).encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{retry}"
            f"x-tether-error: {code}\r\n\r\n").encode() + body


class Port:
    """One listening port's limits and its open connections."""

    def __init__(self, name: str, limits: ServerLimits, metrics: Metrics) -> None:
        self.name = name
        self.limits = limits
        self.metrics = metrics
        self.open = 0
        self.guards: dict[int, _Guard] = {}   # id(aiohttp's protocol) -> its guard
        self._gauge = metrics.connections_open.labels(name)
        self.refusal = _answer(503, "Service Unavailable",
                               f"tether has {limits.max_connections} connections open on its "
                               f"{name} port (server.max_connections); try again shortly",
                               "too_many_connections", retry_after=1)
        self.header_late = _answer(408, "Request Timeout",
                                   f"the request head did not arrive within "
                                   f"{limits.header_timeout_s:g} s (server.header_timeout)",
                                   "header_timeout")
        self.body_late = _answer(408, "Request Timeout",
                                 f"the request body did not arrive within "
                                 f"{limits.body_timeout_s:g} s (server.body_timeout)",
                                 "body_timeout")

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guard(self, inner)

    def opened(self, guard: _Guard, inner: asyncio.Protocol) -> None:
        self.open += 1
        self.guards[id(inner)] = guard
        self._gauge.set(self.open)

    def closed(self, inner: asyncio.Protocol) -> None:
        if self.guards.pop(id(inner), None) is not None:
            self.open -= 1
            self._gauge.set(self.open)

    def timed_out(self, which: str) -> None:
        self.metrics.connections_closed.labels(self.name, which).inc()


class _Guard(asyncio.Protocol):
    def __init__(self, port: Port, factory: Callable[[], asyncio.Protocol]) -> None:
        self.port = port
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.state = "head"
        self.timer: asyncio.TimerHandle | None = None

    # -- the asyncio protocol, passed on ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one, though no subclass of asyncio.Transport).
        self.transport = stream = cast(asyncio.Transport, transport)
        limits = self.port.limits
        if self.port.open >= limits.max_connections:
            self.state = "refused"
            self.port.metrics.connections_refused.labels(self.port.name).inc()
            stream.write(self.port.refusal)
            if stream.can_write_eof():
                stream.write_eof()   # the answer, then FIN; what the client sends is dropped
            self._arm(LINGER_S, stream.close)
            return
        self.inner = self.factory()
        self.port.opened(self, self.inner)
        self.inner.connection_made(transport)
        self._arm(limits.header_timeout_s, self._header_late)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return   # refused: read and dropped until it closes
        if self.state == "idle":
            self.state = "head"
            self._arm(self.port.limits.header_timeout_s, self._header_late)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None:
            if self.transport is not None:
                self.transport.close()
            return False
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.inner is not None:
            self.port.closed(self.inner)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- the states ---------------------------------------------------------------------

    def busy(self, request: web.BaseRequest) -> None:
        """A handler started: the head is in; the body must follow within body_timeout."""
        self.state = "busy"
        self._disarm()
        if request.body_exists and not request.content.is_eof():
            self._arm(self.port.limits.body_timeout_s, lambda: self._body_late(request))

    def idle(self) -> None:
        """The handler returned: the connection may wait for the next request."""
        if self.state != "busy":
            return
        self.state = "idle"
        self._arm(self.port.limits.idle_timeout_s, self._idle_late)

    def _header_late(self) -> None:
        if self.state == "head":
            self._close("header", self.port.header_late)

    def _body_late(self, request: web.BaseRequest) -> None:
        if self.state == "busy" and not request.content.is_eof():
            # Nothing of a response was sent: the handler is still reading the body.
            self._close("body", self.port.body_late)

    def _idle_late(self) -> None:
        if self.state != "idle":
            return
        if self.transport is not None and self.transport.get_write_buffer_size() > 0:
            # The last answer is still going out to a slow reader: not idle yet.
            self._arm(self.port.limits.idle_timeout_s, self._idle_late)
            return
        self._close("idle", None)

    def _close(self, which: str, answer: bytes | None) -> None:
        self.port.timed_out(which)
        self.state = "closed"
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if answer is not None:
            transport.write(answer)
        transport.close()

    def _arm(self, delay: float, callback: Callable[[], Any]) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def guard_middleware(port: Port) -> Any:
    """Tells the connection's guard when a handler starts and ends. Outermost: it
    sees the request as soon as aiohttp has parsed its head."""
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        found = port.guards.get(id(request.protocol))
        if found is not None:
            found.busy(request)
        try:
            return await handler(request)
        finally:
            if found is not None:
                found.idle()

    return guard


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites wrap every connection in a `_Guard` of `port`."""

    def __init__(self, app: web.Application, port: Port, **kwargs: Any) -> None:
        limits = port.limits
        # aiohttp's own idle timer: a backstop past the guard's (it counts nothing).
        kwargs.setdefault("keepalive_timeout",
                          limits.idle_timeout_s + limits.header_timeout_s + 5)
        super().__init__(app, **kwargs)
        self.port = port

    @property
    def server(self) -> Any:
        inner = super().server
        return None if inner is None else self.port.factory(inner)
