"""Continuing an OpenAI Responses answer after its function calls were denied (sans-IO;
the skeleton is continuation.py, the request itself mcp_approvals.follow_up, which
tether's answers to MCP approval requests use too).

The next request carries a `function_call_output` per denied call, with the denial
text: chained to the answer by `previous_response_id` when it is stored (the default),
within its `conversation` when it has one, and with `store: false` carrying the whole
turn again (the agent's input, the answer's items as the model made them, the outputs).
Joined answers (`mcp_approvals.merge`): the output items follow one another, the usage
is added up, and the id is the last round's, so the agent chains its next turn from the
answer that holds everything. Streams are continued by `ApprovingStream`
(openai_responses_approving.py), which already splices rounds of one Responses stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..surrogates import json_text
from .continuation import Denied, JSONObject
from .mcp_approvals import Answer, follow_up, merge
from .responses_history import MADE_UP


def answers(denied: Sequence[Denied]) -> tuple[Answer, ...]:
    return tuple(Answer(d.call.id, False, d.text, output=True) for d in denied)


def made(output: object, denied: Sequence[Denied]) -> list[object]:
    """A streamed answer's output as the model made it: each message tether put in a
    denied call's place turned back into the call (what `store: false` sends again)."""
    texts = {d.text: d for d in denied}
    items: list[object] = []
    for item in output if isinstance(output, list) else []:
        if isinstance(item, dict) and str(item.get("id", "")).startswith(MADE_UP):
            content = item.get("content")
            first = content[0] if isinstance(content, list) and content else None
            text = first.get("text") if isinstance(first, dict) else None
            d = texts.get(text) if isinstance(text, str) else None
            if d is not None:
                items.append({"type": "function_call", "call_id": d.call.id,
                              "name": d.call.name, "arguments": d.call.raw_arguments})
                continue
        items.append(item)
    return items


class ResponsesContinues:
    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None:
        response = json.loads(answer)
        if not isinstance(response, dict) or any(not d.call.id for d in denied):
            return None
        return follow_up(sent, response, answers(denied))

    def join(self, first: bytes, then: bytes) -> bytes:
        shown: Mapping[str, object] = json.loads(first)
        merged: JSONObject = merge(shown, json.loads(then))
        return json_text(merged).encode("utf-8")

    def seam(self, sent: bytes) -> None:
        return None  # ApprovingStream continues Responses streams
