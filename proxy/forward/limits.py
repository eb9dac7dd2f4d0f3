"""`server:` connection limits on the forward port, through mitmproxy's own hooks.

mitmproxy closes a connection idle for `tcp_timeout` (set to `server.idle_timeout`,
forward/master.py) but has no deadline for a request head and no connection cap.
This addon adds both:

- the first request head (a CONNECT, or a plain proxied request) must arrive within
  `server.header_timeout` of the connection, or the connection is closed. Only the
  first: inside a tunnel whose bytes tether does not read, no later head is seen, so
  later requests on a kept-alive connection are bounded by the idle timeout alone;
- past `server.max_connections` open connections, a new one is answered 503 on its
  first head (a proxy client reads that as a refusal, not a network fault) and closed
  within `LINGER_S` whether it sent one or not.

Both are counted, with the proxy and admin ports' series (`port="forward"`).
"""

from __future__ import annotations

import asyncio
import json
import logging

from mitmproxy import connection, http
from mitmproxy.addons import proxyserver

from ..server_settings import ServerLimits
from ..telemetry import Metrics

log = logging.getLogger("tether.forward")

PORT = "forward"
LINGER_S = 2.0
REFUSED = "tether_refused"


class ConnectionLimits:
    def __init__(self, limits: ServerLimits, metrics: Metrics,
                 server: proxyserver.Proxyserver) -> None:
        self.limits = limits
        self.metrics = metrics
        self.server = server
        self.open: set[str] = set()             # client ids counted as open
        self.refused: set[str] = set()
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self._gauge = metrics.connections_open.labels(PORT)

    def client_connected(self, client: connection.Client) -> None:
        loop = asyncio.get_running_loop()
        if len(self.open) >= self.limits.max_connections:
            self.refused.add(client.id)
            self.metrics.connections_refused.labels(PORT).inc()
            self.timers[client.id] = loop.call_later(LINGER_S, self._close, client.id, None)
            return
        self.open.add(client.id)
        self._gauge.set(len(self.open))
        self.timers[client.id] = loop.call_later(self.limits.header_timeout_s, self._close,
                                                 client.id, "header")

    def client_disconnected(self, client: connection.Client) -> None:
        timer = self.timers.pop(client.id, None)
        if timer is not None:
            timer.cancel()
        self.refused.discard(client.id)
        if client.id in self.open:
            self.open.discard(client.id)
            self._gauge.set(len(self.open))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._head(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._head(flow)

    def _head(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn.id
        if client in self.refused:
            body = json.dumps({"error": {
                "message": f"tether has {self.limits.max_connections} connections open on its "
                           f"forward port (server.max_connections); try again shortly",
                "type": "too_many_connections", "code": "too_many_connections"}}).encode()
            flow.response = http.Response.make(
                503, body, {"content-type": "application/json", "retry-after": "1",
                            "connection": "close", "x-tether-error": "too_many_connections"})
            return
        timer = self.timers.pop(client, None)
        if timer is not None:   # the first head is in: the deadline is met
            timer.cancel()

    def _close(self, client_id: str, which: str | None) -> None:
        self.timers.pop(client_id, None)
        if which is not None:
            self.metrics.connections_closed.labels(PORT, which).inc()
        for handler in list(self.server.connections.values()):
            if handler.client.id == client_id:
                try:
                    handler.close_connection(handler.client)
                except (KeyError, AssertionError):
                    pass   # already closing
                return
