"""The approvals web page: one static file, served on the admin port.

It is the only admin path served without the token, because it holds no data
and no secret: everything it shows comes from the REST API (`/v1/approvals`),
called with the token the person types into the page (kept in the tab's
sessionStorage, never in a URL). A click on it releases a tool call, so the
response is locked down: a Content-Security-Policy that runs only the page's
own inline script and style (pinned by hash, computed here at load) and talks
only to its own origin, no framing (an Approve button must not be clickjacked),
no referrer, no caching.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

PAGE_PATH = "/ui/"
OPEN_PATHS = frozenset({"/ui", PAGE_PATH})


def _inline_hash(html: str, tag: str) -> str:
    """The CSP source for the page's one inline <tag> block; anything else fails at load."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    if len(blocks) != 1 or len(re.findall(rf"<{tag}\b", html)) != 1:
        raise RuntimeError(f"ui.html must hold exactly one plain <{tag}> block")
    digest = hashlib.sha256(blocks[0].encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def page_headers(html: str) -> dict[str, str]:
    csp = "; ".join([
        "default-src 'none'",
        f"script-src {_inline_hash(html, 'script')}",
        f"style-src {_inline_hash(html, 'style')}",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def ui_routes() -> list[web.RouteDef]:
    """`GET /ui/` (the page, read once here) and `GET /ui` (a redirect to it)."""
    html = resources.files("proxy.approvals").joinpath("ui.html").read_text(encoding="utf-8")
    body, headers = html.encode(), page_headers(html)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    async def to_page(request: web.Request) -> web.Response:
        # Relative, so it still lands right when a proxy serves tether under a path prefix.
        raise web.HTTPPermanentRedirect("ui/")

    return [web.get(PAGE_PATH, page), web.get("/ui", to_page)]
