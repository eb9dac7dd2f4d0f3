"""A fake Slack Web API on loopback, for the demo and the tests.

It answers the three methods tether calls the way slack.com/api does: HTTP 200
with `{"ok": true, ...}` or `{"ok": false, "error": CODE}` (bad token:
`invalid_auth`, none: `not_authed`), JSON bodies with the bearer token in the
Authorization header. Every call is recorded, and the messages it holds can be
read back, so a test sees exactly what a person in the channel would.

It also plays the other half of Slack: `click_body` builds the form-encoded
`block_actions` payload Slack sends to an app's interactivity URL when a
button on one of those messages is clicked (signing it is left to the caller,
who holds the signing secret).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

type Body = dict[str, Any]

BOT_USER = "U0TETHERBOT"
BOT_ID = "B0TETHERBOT"


@dataclass(frozen=True, slots=True)
class SlackCall:
    method: str
    authorization: str | None
    content_type: str
    body: Body


@dataclass(frozen=True, slots=True)
class Failure:
    """What to answer, once, to the next call of a method instead of the real thing."""

    error: str = "internal_error"
    status: int = 200
    retry_after: int | None = None


@dataclass
class FakeSlack:
    token: str = "xoxb-fake-token"
    team: str = "T0TETHER"
    calls: list[SlackCall] = field(default_factory=list)
    messages: dict[tuple[str, str], Body] = field(default_factory=dict)
    originals: dict[tuple[str, str], Body] = field(default_factory=dict)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application()
        for method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            app.router.add_post(f"/api/{method}", self._handler(method))
        return app

    def fail(self, method: str, *failures: Failure) -> None:
        self.failures.setdefault(method, []).extend(failures)

    def of(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> list[SlackCall]:
        """The calls of `method` once there are at least `count` of them."""
        async with asyncio.timeout(timeout):
            while len(self.of(method)) < count:
                await self._event().wait()
                self._event().clear()
        return self.of(method)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _handler(self, method: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return await self._serve(method, request)

        return handle

    async def _serve(self, method: str, request: web.Request) -> web.Response:
        raw = await request.read()
        auth = request.headers.get("Authorization")
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        self.calls.append(SlackCall(method, auth, request.headers.get("Content-Type", ""), body))
        self._event().set()
        queued = self.failures.get(method)
        if queued:
            failure = queued.pop(0)
            headers = ({"Retry-After": str(failure.retry_after)} if failure.retry_after is not None
                       else None)
            return web.json_response({"ok": False, "error": failure.error},
                                     status=failure.status, headers=headers)
        if not auth:
            return _error("not_authed")
        if auth != f"Bearer {self.token}":
            return _error("invalid_auth")
        if "_raw" in body or not isinstance(body, dict):
            return _error("invalid_json")
        channel = body.get("channel")
        if not isinstance(channel, str) or not channel:
            return _error("channel_not_found")
        if method == "chat.postMessage":
            return self._post(channel, body)
        if method == "chat.update":
            return self._update(channel, body)
        if not isinstance(body.get("user"), str):
            return _error("user_not_in_channel")
        return web.json_response({"ok": True, "message_ts": self._next_ts()})

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _message(self, body: Body, ts: str) -> Body:
        return {"type": "message", "subtype": "bot_message", "text": body.get("text", ""),
                "blocks": body.get("blocks", []), "ts": ts, "user": BOT_USER, "bot_id": BOT_ID,
                "team": self.team}

    def _post(self, channel: str, body: Body) -> web.Response:
        if not body.get("text") and not body.get("blocks"):
            return _error("no_text")
        ts = self._next_ts()
        message = self._message(body, ts)
        self.messages[(channel, ts)] = self.originals[(channel, ts)] = message
        return web.json_response({"ok": True, "channel": channel, "ts": ts, "message": message})

    def _update(self, channel: str, body: Body) -> web.Response:
        ts = body.get("ts")
        if not isinstance(ts, str) or (channel, ts) not in self.messages:
            return _error("message_not_found")
        message = {**self._message(body, ts), "edited": {"user": BOT_USER, "ts": self._next_ts()}}
        self.messages[(channel, ts)] = message
        return web.json_response({"ok": True, "channel": channel, "ts": ts,
                                  "text": message["text"], "message": message})

    def click_body(self, channel: str, ts: str, action_id: str, *, user: str,
                   username: str = "someone") -> bytes:
        """The body Slack POSTs when `user` clicks the button `action_id` on a message, as
        first posted (a client that has not yet seen an update still shows the buttons)."""
        message = self.originals[(channel, ts)]
        button = next(e for b in message["blocks"] if b["type"] == "actions"
                      for e in b["elements"] if e["action_id"] == action_id)
        block = next(b for b in message["blocks"] if b["type"] == "actions"
                     and button in b["elements"])
        payload: Body = {
            "type": "block_actions",
            "user": {"id": user, "username": username, "name": username, "team_id": self.team},
            "api_app_id": "A0TETHER",
            "token": "deprecated-verification-token",
            "container": {"type": "message", "message_ts": ts, "channel_id": channel,
                          "is_ephemeral": False},
            "trigger_id": "1234567890.1234567890.abcdef",
            "team": {"id": self.team, "domain": "tether-tests"},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel, "name": "approvals"},
            "message": message,
            "state": {"values": {}},
            "response_url": "https://hooks.slack.invalid/actions/T0TETHER/1/xyz",
            "actions": [{
                "action_id": action_id, "block_id": block.get("block_id", "b0"),
                "text": button["text"], "value": button["value"], "type": "button",
                "style": button.get("style"), "action_ts": f"{time.time():.6f}",
            }],
        }
        return urlencode({"payload": json.dumps(payload)}).encode()


def _error(code: str) -> web.Response:
    return web.json_response({"ok": False, "error": code})
