"""The connection limits and the shutdown drain under `server:`.

    server:
      header_timeout: 10s     # a request head (line and headers) must arrive in full within
                              # this of the connection opening or of its first byte
      idle_timeout: 60s       # a kept-alive connection with no request is closed after this
      body_timeout: 60s       # a request body must arrive in full within this of its head
      max_connections: 1024   # open client connections per port (proxy, admin, forward);
                              # one more is answered 503 and closed
      drain_timeout: 10s      # at SIGTERM: how long requests still running may finish
      event_loop: asyncio     # asyncio | auto | uvloop (event_loop.py)
      workers: 1              # processes sharing every port (workers.py; --workers wins)

They hold on the proxy, admin and forward ports (server/connections.py; the forward
port through mitmproxy's own hooks, forward/limits.py). A connection closed for a
timeout gets a 408 first when nothing of a response was sent; each close and refusal
is counted (`tether_connections_timed_out_total`, `tether_connections_refused_total`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .policy.rules import parse_duration
from .policy.source import YMap

KEYS = frozenset({"header_timeout", "idle_timeout", "body_timeout", "max_connections",
                  "drain_timeout", "event_loop", "workers"})
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    drain_timeout_s: float = 10.0
    event_loop: str = "asyncio"
    workers: int = 1


def parse_server_limits(node: YMap) -> ServerLimits:
    """`node`: the `server:` mapping (its other keys are config.py's)."""
    def err(message: str, key: str) -> ConfigError:
        return ConfigError(message, file=node.file, line=node.line_of(key), key=f"server.{key}")

    def duration(key: str, default: float) -> float:
        if key not in node:
            return default
        return parse_duration(node[key], lambda m: err(m, key))

    max_connections = node.get("max_connections", 1024)
    if (not isinstance(max_connections, int) or isinstance(max_connections, bool)
            or not 1 <= max_connections <= 1_000_000):
        raise err("must be a whole number from 1 to 1000000", "max_connections")
    event_loop = node.get("event_loop", "asyncio")
    if event_loop not in ("auto", "asyncio", "uvloop"):
        raise err("must be auto, asyncio or uvloop", "event_loop")
    workers = node.get("workers", 1)
    if (not isinstance(workers, int) or isinstance(workers, bool)
            or not 1 <= workers <= MAX_WORKERS):
        raise err(f"must be a whole number from 1 to {MAX_WORKERS}", "workers")
    return ServerLimits(duration("header_timeout", 10.0), duration("idle_timeout", 60.0),
                        duration("body_timeout", 60.0), max_connections,
                        duration("drain_timeout", 10.0), str(event_loop), workers)
