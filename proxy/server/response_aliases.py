"""Response ids the agent holds that stand for a later response tether continued to.

A streamed answer that tether continued upstream (MCP approvals it answered,
server/approvals_continue.py) reaches the agent under the first round's id: the stream
announced it in `response.created`, and the openai SDK refuses a lifecycle event whose
id changes. The provider's conversation, though, goes on from the last round. tether
remembers first -> last, per agent, and a later request that chains from the first
(`previous_response_id`) is sent upstream chained from the last.

Kept in this replica's memory, bounded (least recently used out first) and for
`TTL_S`; a request that reaches another replica, or comes later, chains from the first
round, where the provider holds the approval request and not what followed: the model
then lacks that continuation, and may ask again (and be judged again).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict

from ..surrogates import json_text

TTL_S = 3600.0
MAX_ENTRIES = 100_000


class ResponseAliases:
    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._map: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def put(self, agent: str | None, first: str, last: str) -> None:
        key = (agent or "", first)
        self._map[key] = (last, time.monotonic() + self._ttl_s)
        self._map.move_to_end(key)
        while len(self._map) > self._max:
            self._map.popitem(last=False)

    def get(self, agent: str | None, first: str) -> str | None:
        found = self._map.get((agent or "", first))
        if found is None:
            return None
        if found[1] < time.monotonic():
            del self._map[(agent or "", first)]
            return None
        return found[0]

    def rewrite(self, agent: str | None, body: bytes) -> bytes:
        """`body` chained from the last round where it names a first round's id."""
        if not self._map or b"previous_response_id" not in body:
            return body
        obj = json.loads(body)
        first = obj.get("previous_response_id") if isinstance(obj, dict) else None
        last = self.get(agent, first) if isinstance(first, str) else None
        if last is None:
            return body
        obj["previous_response_id"] = last
        return json_text(obj).encode("utf-8")
