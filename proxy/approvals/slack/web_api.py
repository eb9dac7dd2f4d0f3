"""The Slack Web API as tether uses it: a failure is an exception, never a decision.

Posting and editing approval messages is best effort: a call that fails (no
token, transport, HTTP status, `ok: false`, still rate limited after a few
`Retry-After` waits) raises `SlackError`, which the caller logs and counts;
nothing is ever approved or denied because Slack could not be reached. The bot
token is read from the environment at each call, so a rotated token applies at
once. This module is an edge (it speaks HTTP to Slack), hence the aiohttp import.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from ...surrogates import json_bytes
from ..settings import SlackSettings
from .messages import Json


class SlackError(Exception):
    """A Slack Web API call failed (transport, HTTP status or `ok: false`)."""


# A session the caller owns, a factory for one tether owns (and closes), or None: a default.
type HttpSource = aiohttp.ClientSession | Callable[[], aiohttp.ClientSession] | None


class WebApi:
    def __init__(self, settings: SlackSettings, http: HttpSource, env: Mapping[str, str],
                 registry: CollectorRegistry | None) -> None:
        self.settings = settings
        self._env = env
        self._http = http if isinstance(http, aiohttp.ClientSession) else None
        self._factory = http if callable(http) and self._http is None else None
        self._owned: aiohttp.ClientSession | None = None
        self.calls = Counter("tether_slack_api_calls", "Slack Web API calls, by method and "
                             "outcome (ok, error)", ["method", "outcome"], registry=registry)

    async def call(self, method: str, body: Json) -> Json:
        try:
            reply = await self._request(method, body)
        except SlackError:
            self.calls.labels(method, "error").inc()
            raise
        self.calls.labels(method, "ok").inc()
        return reply

    def _client(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http
        if self._owned is None or self._owned.closed:
            self._owned = self._factory() if self._factory is not None else aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15, sock_connect=5), trust_env=False)
        return self._owned

    async def _request(self, method: str, body: Json, attempts: int = 3) -> Json:
        token = self._env.get(self.settings.bot_token_env, "")
        if not token:
            raise SlackError(f"{self.settings.bot_token_env} is not set")
        # Slack wants UTF-8 text: a lone surrogate in agent text is shown as U+FFFD.
        data = json_bytes(body, replace=True)
        headers = {"Authorization": f"Bearer {token}",
                   "Content-Type": "application/json; charset=utf-8"}
        for attempt in range(1, attempts + 1):
            try:
                async with self._client().post(f"{self.settings.api_url}/{method}", data=data,
                                               headers=headers) as resp:
                    if resp.status == 429 and attempt < attempts:
                        await asyncio.sleep(_retry_after(resp.headers.get("Retry-After")))
                        continue
                    if resp.status != 200:
                        raise SlackError(f"{method}: HTTP {resp.status}")
                    reply = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                raise SlackError(f"{method}: {type(e).__name__}: {e}") from e
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                error = reply.get("error") if isinstance(reply, dict) else "not a JSON object"
                raise SlackError(f"{method}: {error}")
            return reply
        raise SlackError(f"{method}: still rate limited after {attempts} attempts")

    async def close(self) -> None:
        """Close the session tether opened (one the caller passed in stays the caller's)."""
        if self._owned is not None:
            await self._owned.close()


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value or 1)
    except ValueError:
        return 1.0
    return min(max(seconds, 0.0), 30.0) if math.isfinite(seconds) else 1.0
