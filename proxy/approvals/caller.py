"""Whether the caller a hold waits for is still there.

Each front end says how to tell that its caller left, once per request, and the
hold's wait asks every `PRESENCE_S`: the proxy port's middleware (server/lifecycle.py)
looks at the request's transport, the forward proxy at mitmproxy's client connection.
A contextvar carries it, so every route that can hold (every provider, streamed or
not, `/apis/`, MCP, the forward proxy's egress) is covered without threading an
argument through each one. Nothing here imports a web framework.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Gone = Callable[[], bool]
PRESENCE_S = 0.5   # how often a waiting hold looks at its caller

_GONE: ContextVar[Gone | None] = ContextVar("tether_caller_gone", default=None)


class CallerGone(ConnectionResetError):
    """The caller of a held request disconnected; its approval ended `abandoned`.

    A ConnectionResetError, so each front end's handling of a vanished client
    (nothing to answer, nothing forwarded) applies to it as well."""


def current() -> Gone | None:
    return _GONE.get()


@contextlib.contextmanager
def watching(gone: Gone) -> Iterator[None]:
    """While inside, holds wait on a caller that `gone()` says has left (or not)."""
    token = _GONE.set(gone)
    try:
        yield
    finally:
        _GONE.reset(token)
