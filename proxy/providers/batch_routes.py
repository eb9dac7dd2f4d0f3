"""Which paths of a provider's batch API are which step; every other spelling is refused.

A batch runs at the provider, where tether cannot hold back or rewrite the tool
calls in its output. So the steps that start a batch (creating it, and, for
OpenAI, uploading its input file) are BATCH routes, judged by the front end
against `upstreams.NAME.batches` before anything is forwarded, and any spelling
of a batch path other than the exact ones below is refused (404), so that an
upstream that normalises paths cannot turn a near-miss into an unchecked batch.

    OpenAI, Azure (BASE: v1; openai or openai/v1)
        POST BASE/files                 UPLOAD (read when purpose=batch)
        POST BASE/batches               CREATE_FROM_FILE (the input file is read)
        GET  BASE/batches, BASE/batches/ID;  POST BASE/batches/ID/cancel   MANAGE
    Anthropic
        POST v1/messages/batches        CREATE_INLINE
        GET  v1/messages/batches, .../ID, .../ID/results;  DELETE .../ID;
        POST .../ID/cancel              MANAGE
"""

from __future__ import annotations

import re

from .base import BatchStep, Route, RouteKind

_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
BATCHES = "batches"
ANTHROPIC_ROOT = "v1/messages/batches"
# (method, what follows BASE/batches/ID) -> the route is MANAGE
OPENAI_MANAGE = {("GET", ()), ("POST", ("cancel",))}
ANTHROPIC_MANAGE = {("GET", ()), ("DELETE", ()), ("POST", ("cancel",)), ("GET", ("results",))}


def openai_batches(provider: str, method: str, path: str, bases: tuple[str, ...]) -> Route | None:
    """OpenAI's (and Azure's) batch and upload routes; None: not a batch path."""
    if BATCHES in (s.lower() for s in path.split("/")):
        for base in bases:
            root = f"{base}/{BATCHES}"
            if path == root and method == "POST":
                return Route(RouteKind.BATCH, upstream_path=path,
                             batch=BatchStep.CREATE_FROM_FILE, files_path=f"{base}/files")
            if _manages(method, path, root, OPENAI_MANAGE):
                return Route(RouteKind.BATCH, upstream_path=path, batch=BatchStep.MANAGE)
        roots = " and ".join(f"/{provider}/{b}/{BATCHES}" for b in bases)
        return _near_miss(provider, method, path, f"POST and GET {roots}, GET .../ID and "
                                                  "POST .../ID/cancel")
    if method == "POST" and path in (f"{base}/files" for base in bases):
        return Route(RouteKind.BATCH, upstream_path=path, batch=BatchStep.UPLOAD)
    return None


def anthropic_batches(provider: str, method: str, path: str) -> Route | None:
    """Anthropic's Message Batches routes; None: not a batch path."""
    if BATCHES not in (s.lower() for s in path.split("/")):
        return None
    if path == ANTHROPIC_ROOT and method == "POST":
        return Route(RouteKind.BATCH, upstream_path=path, batch=BatchStep.CREATE_INLINE)
    if _manages(method, path, ANTHROPIC_ROOT, ANTHROPIC_MANAGE):
        return Route(RouteKind.BATCH, upstream_path=path, batch=BatchStep.MANAGE)
    return _near_miss(provider, method, path, f"POST and GET /{provider}/{ANTHROPIC_ROOT}, "
                                              "GET and DELETE .../ID, GET .../ID/results and "
                                              "POST .../ID/cancel")


def _manages(method: str, path: str, root: str, known: set[tuple[str, tuple[str, ...]]]) -> bool:
    if path == root:
        return method == "GET"
    if not path.startswith(root + "/"):
        return False
    batch_id, *rest = path[len(root) + 1:].split("/")
    return _ID.fullmatch(batch_id) is not None and (method, tuple(rest)) in known


def _near_miss(provider: str, method: str, path: str, endpoints: str) -> Route:
    return Route(RouteKind.REFUSE, status=404, message=(
        f"{method} /{provider}/{path} is not a batch endpoint tether knows; the batch "
        f"endpoints are {endpoints}"))
