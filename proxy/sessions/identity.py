"""Who is calling: the agent, then the session within it.

Agent: a configured API key (by its SHA-256) names it; else `X-Tether-Agent`
where the config trusts that header. Session: `X-Tether-Session` (trusted
header); else the provider's own user field (OpenAI `user`, Anthropic
`metadata.user_id`); else a fingerprint of (agent, system prompt, first user
message), stable across the turns of one conversation because every request
carries the history; else the agent's catch-all session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from ..providers.base import ParsedRequest
from ..surrogates import utf8

KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


def presented_key(headers: Mapping[str, str]) -> str | None:
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value:
            return value.removeprefix("Bearer ").removeprefix("bearer ").strip()
    return None


def agent_of(headers: Mapping[str, str], keys: Mapping[str, str], trust_headers: bool
             ) -> str | None:
    key = presented_key(headers)
    if key and keys:
        name = keys.get(hashlib.sha256(utf8(key)).hexdigest())
        if name:
            return name
    if trust_headers:
        return headers.get("x-tether-agent") or None
    return None


def session_of(headers: Mapping[str, str], request: ParsedRequest, agent: str | None,
               trust_headers: bool) -> str:
    if trust_headers and headers.get("x-tether-session"):
        return headers["x-tether-session"]
    if request.user:
        return request.user
    if request.fingerprint:
        text = f"{agent or ''}\0{request.fingerprint}"
        return "fp-" + hashlib.sha256(utf8(text)).hexdigest()[:24]
    return "default"
