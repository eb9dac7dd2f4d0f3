"""Stored answers read back (`GET /openai/v1/responses/{id}` and its input items, a
conversation's items): fetched upstream, shown as tether gave them to the agent.

The provider stored what the model made, denied calls included; tether's records
(sessions/rewrites.py) say what it replaced. Each denied call is shown as the message
the agent got; a call tether has no record of is refused 501 (it cannot tell whether
the agent was ever shown it), and so is a read of what tether rewrote for another agent
(400). Everything else the upstream answered (errors, a 404) is returned as it came.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from yarl import URL

from ..errors import UpstreamError
from ..providers import responses_history as history
from ..providers.openai_stored import CONVERSATION_ITEMS, RESPONSE
from ..sessions.rewrites import Rewrites
from ..surrogates import json_text
from .upstream import read_at_most, return_headers


async def view(rewrites: Rewrites, agent: str | None, params: Mapping[str, str],
               obj: dict[str, object]) -> dict[str, object]:
    """The upstream's stored object as the agent was given it (or BadRequest/NotGoverned)."""
    what, ident = params["what"], params["id"]
    if what == RESPONSE:
        return history.response_view(obj, await rewrites.response(ident), agent)
    if what == CONVERSATION_ITEMS:
        return history.items_view(obj, await rewrites.conversation(ident), agent,
                                  f"conversation {ident!r}")
    record = await rewrites.response(ident)
    return history.items_view(obj, [record] if record is not None else [], agent,
                              f"the input items of response {ident!r}")


async def retrieve(client: aiohttp.ClientSession, rewrites: Rewrites, url: URL,
                   headers: Mapping[str, str], ssl: object, limit: int, agent: str | None,
                   params: Mapping[str, str]) -> web.Response:
    async with client.get(url, headers=headers, ssl=ssl) as resp:  # type: ignore[arg-type]
        body = await read_at_most(resp, limit + 1)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        status, returned = resp.status, return_headers(resp.headers)
    if len(body) > limit:
        raise UpstreamError(f"the upstream response is over the {limit}-byte limit")
    if status != 200:
        return web.Response(status=status, body=body, headers=returned)
    try:
        obj = json.loads(body) if ctype == "application/json" else None
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise UpstreamError("the upstream answered a stored-answer read with something "
                            "other than a JSON object")
    shown = await view(rewrites, agent, params, obj)
    if shown is obj:
        return web.Response(status=200, body=body, headers=returned)
    return web.Response(status=200, body=json_text(shown).encode("utf-8"), headers=returned)
