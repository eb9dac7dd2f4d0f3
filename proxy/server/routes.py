"""The proxy port's route table: every request path reaches a handler of tether's.

aiohttp matches routes against the decoded path, and a `.*` pattern stops at a
newline, so `%0A` would fall through every route to aiohttp's own plain-text
404. Every pattern here matches any character, and the last route catches
everything else: a path under no known prefix is a 404 in the shape of the
provider its first segment resembles (OpenAI's otherwise), audited and counted.
Each handler then reads its path through `proxy.paths.canonical_path`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from ..errors import RouteNotFound
from ..ids import new_id
from ..providers import PROVIDERS
from ..providers.base import Provider
from .apis import ApiRoutes
from .context import Context
from .errors import PROVIDER_KEY
from .llm import LLMRoutes
from .mcp import McpRoutes

CONTEXT = web.AppKey("context", Context)
ANY = r"{tail:[\s\S]*}"  # `.` would stop at a newline
UNKNOWN = "unknown"  # the provider label of a path under no prefix: never the agent's text

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    router = app.router
    for provider in PROVIDERS:
        router.add_route("*", f"/{provider.name}/{ANY}", _llm(provider))
    router.add_route("*", f"/apis/{{name}}/{ANY}", _apis)
    router.add_route("*", "/mcp/{name}", _mcp)
    router.add_route("*", f"/mcp/{{name}}/{ANY}", _mcp)
    router.add_route("*", f"/{ANY}", _not_found)


def _llm(provider: Provider) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await LLMRoutes(request.app[CONTEXT]).handle(request, provider)

    return handle


async def _apis(request: web.Request) -> web.StreamResponse:
    return await ApiRoutes(request.app[CONTEXT]).handle(request)


async def _mcp(request: web.Request) -> web.StreamResponse:
    return await McpRoutes(request.app[CONTEXT]).handle(request)


async def _not_found(request: web.Request) -> web.StreamResponse:
    raw = request.rel_url.raw_path
    provider = resembled(raw)
    if provider is not None:
        request[PROVIDER_KEY] = provider
    known = ", ".join(f"/{p.name}/" for p in PROVIDERS)
    error = RouteNotFound(f"no route for {raw[:200]!r}; known prefixes: {known}, /apis/NAME/, "
                          "/mcp/NAME")
    governor = request.app[CONTEXT].governor
    label = provider.name if provider is not None else UNKNOWN
    governor.reject(provider=label, status=error.status, code=error.code, message=error.message,
                    request_id=new_id(), endpoint=raw[:200])
    governor.metrics.requests.labels(label, str(error.status)).inc()
    raise error


def resembled(raw_path: str) -> Provider | None:
    """The provider whose prefix the path's first segment is a variant of (`/OpenAI/`,
    `/open%61i/`, `/anthropic./`), so its SDK can read the 404; None for anything else."""
    first = unquote(raw_path.lstrip("/").split("/", 1)[0]).strip().strip(".").lower()
    return next((p for p in PROVIDERS if p.name == first), None)
