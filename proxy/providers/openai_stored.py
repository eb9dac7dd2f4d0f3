"""OpenAI's stored answers behind `/openai/`: which reads tether can show as it rewrote them.

A stored response, its input items and a conversation's items hold what the model made,
denied calls included. tether reads them back only where it can show them as the agent
got them (responses_history.py: `response_view`, `items_view`): these GETs are RETRIEVE
routes. Creating a conversation carries no model output, so it passes. Every other
stored-answer endpoint (delete, cancel, adding items, stored chat completions ...) stays
refused by the provider's routing.
"""

from __future__ import annotations

import re

from .base import Route, RouteKind

_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
RESPONSE = "response"
INPUT_ITEMS = "input_items"
CONVERSATION_ITEMS = "conversation_items"


def stored_route(method: str, path: str) -> Route | None:
    """The route of a stored-answer read (`path` canonical, after the prefix), or None."""
    parts = path.split("/")
    if method == "POST" and path == "v1/conversations":
        return Route(RouteKind.PASS, upstream_path=path)
    if method != "GET" or len(parts) not in (3, 4) or parts[0] != "v1" \
            or not _ID.fullmatch(parts[2]):
        return None
    what = {("responses", 3): RESPONSE, ("responses", 4): INPUT_ITEMS,
            ("conversations", 4): CONVERSATION_ITEMS}.get((parts[1], len(parts)))
    if what is None or (len(parts) == 4 and parts[3] != ("input_items" if what == INPUT_ITEMS
                                                         else "items")):
        return None
    return Route(RouteKind.RETRIEVE, upstream_path=path, params={"what": what, "id": parts[2]})
