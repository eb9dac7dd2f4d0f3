"""The aiohttp halves of tracing (see proxy/tracing.py): the server and client hooks.

The server span is made here from the aiohttp-server instrumentation's own helpers
(span name, request attributes, status, W3C extraction) rather than its
`create_aiohttp_middleware`, which only works after the instrumentor has patched
`web.Application` process-wide (and would trace the admin port and every other
app in the process). The query string never reaches a span: Gemini's API key
travels there.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import (
    collect_request_attributes,
    get_default_span_name,
    getter,
    set_status_code,
)
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace import TracerProvider
from yarl import URL

from ..surrogates import scrub

_URL_KEYS = ("http.target", "http.url", "url.full")


def _request_attributes(request: web.Request) -> dict[str, object]:
    """aiohttp decodes headers with `surrogateescape`, so a User-Agent that is not UTF-8
    holds lone surrogates: scrubbed, or the exporter would drop the attribute."""
    attrs: dict[str, object] = dict(collect_request_attributes(request))
    attrs.pop("url.query", None)
    for key in _URL_KEYS:
        value = attrs.get(key)
        if isinstance(value, str):
            attrs[key] = value.split("?", 1)[0]
    return {k: scrub(v) if isinstance(v, str) else v for k, v in attrs.items()}


def server_middleware(provider: TracerProvider) -> Middleware:
    """A SERVER span per request, continuing the agent's trace when it sent `traceparent`."""
    tracer = provider.get_tracer("tether.server")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        attrs = _request_attributes(request)
        with tracer.start_as_current_span(
                get_default_span_name(request), context=extract(request, getter=getter),
                kind=trace.SpanKind.SERVER, attributes=attrs,  # type: ignore[arg-type]
                record_exception=False, set_status_on_exception=False) as span:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                set_status_code(span, e.status_code)
                raise
            except Exception as e:
                set_status_code(span, 500)
                span.record_exception(e)
                raise
            set_status_code(span, response.status)
            return response

    return middleware


def _no_query(url: URL) -> str:
    return str(url.with_query(None))


def client_trace_config(provider: TracerProvider) -> aiohttp.TraceConfig:
    """A CLIENT span per upstream request; injects W3C `traceparent` into its headers."""
    config: aiohttp.TraceConfig = create_trace_config(url_filter=_no_query, tracer_provider=provider)
    return config
