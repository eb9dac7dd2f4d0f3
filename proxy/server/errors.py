"""Errors on the proxy port, in the shape of the provider the agent speaks.

One middleware turns every `TetherError` (and anything unexpected) into the
error body of the provider whose route was called, so the agent's SDK raises
its own exception type with a readable message, never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import (
    BudgetExceeded,
    RequestError,
    StoreUnavailable,
    TetherError,
    Unauthorized,
    UpstreamError,
)
from ..providers import PROVIDERS
from ..providers.base import ErrorReply, Provider

log = logging.getLogger("tether.server")

PROVIDER_KEY = web.RequestKey("tether.provider", Provider)
DEFAULT = PROVIDERS[0]


def reply(error: ErrorReply, *, retry: bool | None = None, code: str = "") -> web.Response:
    headers = dict(error.headers)
    if code:
        headers["x-tether-error"] = code
    if retry is not None:
        headers["x-should-retry"] = "true" if retry else "false"
    return web.Response(status=error.status, body=error.body, content_type=error.content_type,
                        headers=headers)


def status_and_code(e: TetherError) -> tuple[int, str]:
    if isinstance(e, RequestError | UpstreamError | StoreUnavailable):
        return e.status, e.code
    return 500, "internal_error"


def from_exception(provider: Provider, e: TetherError) -> web.Response:
    status, code = status_and_code(e)
    retry = False if isinstance(e, RequestError) else None
    response = reply(provider.error(status, str(e), code), retry=retry, code=code)
    if isinstance(e, BudgetExceeded) and e.retry_after is not None:
        response.headers["retry-after"] = str(e.retry_after)
    if isinstance(e, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except TetherError as e:
        return from_exception(request.get(PROVIDER_KEY, DEFAULT), e)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        provider = request.get(PROVIDER_KEY, DEFAULT)
        return reply(provider.error(500, "tether hit an internal error; the request was not "
                                    "forwarded", "internal_error"), code="internal_error")
