"""Errors on the proxy port, in the shape of the provider the agent speaks.

One middleware turns every `TetherError` (and anything unexpected) into a
provider-shaped JSON error: the agent's SDK raises its own exception type with
a readable message, never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import RequestError, TetherError, UpstreamError
from ..providers import openai_chat

log = logging.getLogger("tether.server")

PROVIDER_KEY = web.RequestKey("tether.provider", str)


def error_response(
    provider: str,
    status: int,
    message: str,
    *,
    kind: str,
    code: str,
    retry: bool | None = None,
) -> web.Response:
    # Every route speaks OpenAI's error shape until the other providers land.
    body = openai_chat.error_body(message, kind=kind, code=code)
    headers = {"x-tether-error": code}
    if retry is not None:
        headers["x-should-retry"] = "true" if retry else "false"
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)


def from_exception(provider: str, e: TetherError) -> web.Response:
    if isinstance(e, RequestError):
        return error_response(provider, e.status, e.message, kind=e.kind, code=e.code,
                              retry=False)
    if isinstance(e, UpstreamError):
        return error_response(provider, e.status, e.message, kind=e.kind, code=e.code)
    return error_response(provider, 500, str(e), kind="internal_error", code="internal_error")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except TetherError as e:
        return from_exception(request.get(PROVIDER_KEY, "openai"), e)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request.get(PROVIDER_KEY, "openai"), 500,
                              "tether hit an internal error; the request was not forwarded",
                              kind="internal_error", code="internal_error")
