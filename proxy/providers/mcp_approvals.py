"""OpenAI's MCP approval requests: judged like calls, answered by tether where it asked.

Sans-IO. A Responses answer may stop at an `mcp_approval_request` output item: the
provider will run an MCP tool once the next request carries an `mcp_approval_response`
for it. tether judges each request by the rules, under the tool's canonical name
(`openai:mcp:<label>:<tool>`, with the tool's arguments), and holds it for a human
where a rule says `hold`. Then it is one of two kinds:

- **the agent's**: the agent's own `require_approval` asked for it, and tether allows
  it. It goes to the agent as it came; the agent answers it (tether never loosens what
  the agent asked, so a held one is approved twice).
- **tether's**: tether made the provider ask (the agent said `never`, or a rule says
  `hold`), or tether denies it. The agent may not know what to do with it, and must not
  be able to approve what tether denied, so it never sees it: tether answers it upstream
  itself (`approve` true or false, with the rule's reason for a denial, which the model
  reads) and hands the agent the provider's continuation, in one answer (`merge`).

tether continues only when its approvals are all that stands between the answer and
the next model turn. An answer that also hands the agent function calls, or approval
requests of its own, goes to the agent at once, and tether's approval requests are
taken out of it unanswered: the provider never runs them, and the model may ask again.
At most `MAX_ROUNDS` continuations are made for one answer; past it, tether's
remaining approval requests are taken out unanswered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..model import Decision, ToolCall
from ..policy.provider_tools import mcp_name
from ..surrogates import json_text
from .arguments import parse_arguments
from .base import denial_text

APPROVAL = "mcp_approval_request"
MAX_ROUNDS = 4

type JSONObject = dict[str, object]


def approval_call(item: Mapping[str, object], index: int) -> ToolCall | None:
    """The call an `mcp_approval_request` item asks to run, or None for any other item.
    One without a string id, label or tool name, or whose arguments are not a JSON
    object, is malformed, and so denied (it has not run: nothing is guessed)."""
    if item.get("type") != APPROVAL:
        return None
    item_id, label, tool = item.get("id"), item.get("server_label"), item.get("name")
    if not (isinstance(item_id, str) and isinstance(label, str) and isinstance(tool, str)):
        return ToolCall(id=str(item_id), name=mcp_name("openai", str(label), str(tool)),
                        raw_arguments=json_text(dict(item)), arguments=None, index=index,
                        problem="the MCP approval request has no string id, server_label "
                                "or name")
    name, text = mcp_name("openai", label, tool), item.get("arguments")
    if not isinstance(text, str):
        return ToolCall(id=item_id, name=name, raw_arguments=json_text(text), arguments=None,
                        index=index, problem="the MCP approval request's arguments are not "
                                             "JSON text")
    arguments, problem = parse_arguments(text)
    return ToolCall(id=item_id, name=name, raw_arguments=text,
                    arguments=None if problem else arguments, index=index, problem=problem)


def approval_calls(output: Iterable[object]) -> tuple[ToolCall, ...]:
    return tuple(c for i, item in enumerate(output) if isinstance(item, dict)
                 and (c := approval_call(item, i)) is not None)


@dataclass(frozen=True, slots=True)
class Answer:
    """tether's answer to one approval request, sent upstream as an input item; or
    (`output`) to a function call it denied with `on_deny: continue`: its output, the
    denial text (providers/continuation.py)."""

    request_id: str
    approve: bool
    reason: str = ""
    output: bool = False

    def item(self) -> JSONObject:
        if self.output:
            return {"type": "function_call_output", "call_id": self.request_id,
                    "output": self.reason}
        item: JSONObject = {"type": "mcp_approval_response",
                            "approval_request_id": self.request_id, "approve": self.approve}
        if self.reason:
            item["reason"] = self.reason
        return item


@dataclass(frozen=True, slots=True)
class Plan:
    answers: tuple[Answer, ...]   # tether's, to send upstream when it continues
    hidden: frozenset[str]        # the item ids the agent does not see (tether's)
    go_on: bool                   # continue upstream: tether's approvals are all there is


def agent_asked(call: ToolCall, agent_approves: Mapping[str, frozenset[str]]) -> bool:
    _, _, rest = call.name.partition("openai:mcp:")
    for label, tools in agent_approves.items():
        prefix = f"{label}:"
        if rest.startswith(prefix) and rest[len(prefix):] in tools:
            return True
    return False


def plan(approvals: Sequence[ToolCall], decisions: Sequence[Decision | None],
         agent_approves: Mapping[str, frozenset[str]], *, other_calls: bool) -> Plan:
    """Whose each approval request is, and whether tether continues. `other_calls`: the
    answer hands the agent calls of its own (function calls ...). A decision of None: the
    request was not judged, and is hidden and never answered."""
    answers: list[Answer] = []
    agents = 0
    unanswered: set[str] = set()
    for call, decision in zip(approvals, decisions, strict=True):
        if decision is None:
            unanswered.add(call.id)
        elif decision.allowed and agent_asked(call, agent_approves):
            agents += 1
        elif decision.allowed:
            answers.append(Answer(call.id, True))
        else:
            answers.append(Answer(call.id, False, denial_text(call, decision)))
    hidden = frozenset(a.request_id for a in answers) | unanswered
    return Plan(tuple(answers), hidden, bool(answers) and not agents and not other_calls)


def hide(response: JSONObject, ids: frozenset[str]) -> JSONObject:
    """`response` without the approval request items of `ids`."""
    if not ids:
        return response
    output = response.get("output")
    kept = [i for i in output if not (isinstance(i, dict) and i.get("type") == APPROVAL
                                      and i.get("id") in ids)] if isinstance(output, list) else output
    return {**response, "output": kept}


def follow_up(request: bytes, response: Mapping[str, object], answers: Sequence[Answer],
              output: Sequence[object] | None = None) -> bytes:
    """The request that continues `response` with tether's answers: chained to it by
    `previous_response_id` when it is stored, within its `conversation` when it has one,
    and otherwise (`store: false`) carrying the whole turn again: the agent's input, the
    answer's output items (`output`, where the response's own are not as the model made
    them), the approval responses. Every other field is the agent's (its tools, as
    narrowed; its instructions, which a chained request does not inherit)."""
    body = json.loads(request)
    items: list[object] = [a.item() for a in answers]
    if body.get("conversation") is not None:
        body["input"] = items
    elif body.get("store", True) is not False:
        body["previous_response_id"] = response.get("id")
        body["input"] = items
    else:
        prior = body.get("input")
        turn: list[object] = ([{"type": "message", "role": "user", "content": prior}]
                              if isinstance(prior, str) else list(prior or []))
        if output is None:  # the answer's items as the model made them
            made = response.get("output")
            output = list(made) if isinstance(made, list) else []
        body["input"] = turn + list(output) + items
    return json_text(body).encode("utf-8")


def _add(a: object, b: object) -> object:
    """Usage added up: numbers summed, objects field by field, anything else the latter."""
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a.get(k), b[k]) if k in a else b[k] for k in b} | \
            {k: v for k, v in a.items() if k not in b}
    return b if b is not None else a


def merge(shown: Mapping[str, object], then: Mapping[str, object]) -> JSONObject:
    """One answer for the agent: the continuation `then` (its id, status ...), its output
    after what the agent is shown of the earlier one, and the usage of both added up, so
    the agent's own accounting stays right."""
    first, second = shown.get("output"), then.get("output")
    merged: JSONObject = dict(then)
    merged["output"] = (list(first) if isinstance(first, list) else []) + \
        (list(second) if isinstance(second, list) else [])
    merged["usage"] = _add(shown.get("usage"), then.get("usage"))
    return merged
