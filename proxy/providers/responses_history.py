"""What tether changed in a Responses answer, and the next request made to fit it (sans-IO).

A denied call is replaced in the answer the agent gets (openai_responses.py), but the
provider stored the answer as it made it: with the call, and without the message tether
put in its place. The agent's next turn then names things the provider does not hold,
or leaves out things it requires:

- an `item_reference` to the replacement message (`msg_tether_...`): the provider never
  stored it ("Item with id ... not found"). It is expanded to the message tether sent,
  without the made-up id;
- a `previous_response_id` (or `conversation`) whose stored answer holds the denied
  call: the provider wants its output ("No tool output found for function call ...").
  Each denied call the agent did not answer gets a `function_call_output` carrying the
  denial text, at the head of the input, so the turn is accepted and the model reads why;
- a full replacement message sent back with its made-up id: the id is dropped.

A reference tether cannot resolve (its record expired, or it was made for another agent)
is refused 400, naming the cause, rather than passed on to fail upstream for no reason
the agent could read. `Rewrite` is what tether keeps per answer (sessions/rewrites.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import BadRequest, NotGoverned
from ..model import Decision, ToolCall
from ..surrogates import json_text
from .base import denial_text
from .openai_responses_wire import is_call

type JSONObject = dict[str, object]

MADE_UP = "msg_tether_"  # the prefix of every item id tether makes (openai_responses.replacement_id)


@dataclass(frozen=True, slots=True)
class Denied:
    """One call tether took out of an answer."""

    call_id: str
    text: str            # the denial text the agent was shown in its place
    item: JSONObject     # the replacement message, as the agent got it


@dataclass(frozen=True, slots=True)
class Rewrite:
    """What tether did to one stored answer: the ids of the agent-run calls it decided
    (`calls`), of which `denied` were replaced."""

    response_id: str
    agent: str | None
    denied: tuple[Denied, ...]
    calls: tuple[str, ...] = ()
    conversation: str | None = None


def dumps(r: Rewrite) -> str:
    """JSON with every non-ASCII character escaped, so a lone surrogate in model text
    is stored and read back as it was."""
    return json.dumps({"r": r.response_id, "a": r.agent, "n": list(r.calls),
                       "c": r.conversation,
                       "d": [{"id": d.call_id, "t": d.text, "i": d.item} for d in r.denied]},
                      separators=(",", ":"))


def loads(text: str) -> Rewrite:
    """Raises ValueError on anything but a record tether wrote."""
    try:
        raw = json.loads(text)
        return Rewrite(str(raw["r"]), None if raw["a"] is None else str(raw["a"]),
                       tuple(Denied(str(d["id"]), str(d["t"]), dict(d["i"])) for d in raw["d"]),
                       tuple(str(c) for c in raw["n"]),
                       None if raw.get("c") is None else str(raw["c"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"a rewrite record does not read back: {type(e).__name__}") from e


# --- answers ----------------------------------------------------------------------------


def _message_text(item: Mapping[str, object]) -> str:
    content = item.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        if isinstance(text, str):
            return text
    return ""


def from_whole(out: bytes, calls: Sequence[ToolCall], decisions: Sequence[Decision],
               agent: str | None, conversation: str | None = None) -> Rewrite | None:
    """The record of a whole answer as rendered (`out`), or None when it holds no call."""
    if not calls:
        return None
    obj = json.loads(out)
    rid = obj.get("id") if isinstance(obj, dict) else None
    output = obj.get("output") if isinstance(obj, dict) else None
    if not isinstance(rid, str) or not isinstance(output, list):
        return None
    denied = []
    for call, decision in zip(calls, decisions, strict=True):
        if decision.allowed or not call.id:
            continue
        item = output[call.index] if call.index < len(output) else None
        if isinstance(item, dict):
            denied.append(Denied(call.id, denial_text(call, decision), item))
    return Rewrite(rid, agent, tuple(denied), tuple(c.id for c in calls), conversation)


def from_stream(response_id: str | None, calls: Sequence[str],
                replaced: Sequence[tuple[str, JSONObject]],
                agent: str | None, conversation: str | None = None) -> Rewrite | None:
    """The record of a streamed answer: `replaced` holds (call id, replacement item)."""
    if response_id is None or not calls:
        return None
    return Rewrite(response_id, agent,
                   tuple(Denied(cid, _message_text(item), item) for cid, item in replaced if cid),
                   tuple(calls), conversation)


# --- the next request -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wanted:
    """What a request names that tether may hold: the records to look up."""

    previous: str | None
    conversation: str | None
    refs: tuple[str, ...]          # item references to ids tether made


def _conversation(obj: Mapping[str, object]) -> str | None:
    conv = obj.get("conversation")
    if isinstance(conv, dict):
        conv = conv.get("id")
    return conv if isinstance(conv, str) else None


def wanted(obj: Mapping[str, object]) -> Wanted:
    given = obj.get("input")
    refs = tuple(str(i["id"]) for i in given if isinstance(i, dict)
                 and i.get("type") == "item_reference" and isinstance(i.get("id"), str)
                 and str(i["id"]).startswith(MADE_UP)) if isinstance(given, list) else ()
    previous = obj.get("previous_response_id")
    return Wanted(previous if isinstance(previous, str) else None, _conversation(obj), refs)


def may_name(body: bytes) -> bool:
    """False when the body cannot name anything tether keeps (no need to parse it)."""
    return b"previous_response_id" in body or b"conversation" in body or MADE_UP.encode() in body


def _input_item(item: Mapping[str, object]) -> JSONObject:
    """The replacement message as an input item: the made-up id left out."""
    return {k: v for k, v in item.items() if k != "id"}


def _answered(given: list[object]) -> set[str]:
    return {str(i.get("call_id")) for i in given if isinstance(i, dict)
            and str(i.get("type", "")).endswith("_output")}


def owed_outputs(given: object, previous: Rewrite | None, conversation: Sequence[Rewrite],
                 agent: str | None) -> list[Denied]:
    """The denied calls the request continues and does not answer itself."""
    owed: list[Denied] = []
    for record in ([previous] if previous is not None else []) + list(conversation):
        if record.agent != agent:
            raise BadRequest(
                f"the request continues response {record.response_id!r}, which tether "
                "rewrote for another agent: tether will not answer its denied calls for "
                "this one, so the request was not forwarded")
        owed += record.denied
    answered = _answered(given) if isinstance(given, list) else set()
    return [d for d in owed if d.call_id not in answered]


def apply(obj: JSONObject, agent: str | None, previous: Rewrite | None,
          conversation: Sequence[Rewrite], items: Mapping[str, Rewrite | None]) -> bytes | None:
    """The request made to fit what tether changed, or None when nothing changes.

    `previous`: the record of `previous_response_id`, if tether holds one; `conversation`:
    the records of the conversation's answers whose denied calls are still unanswered;
    `items`: for each referenced made-up id, the record holding it (None: not held).
    Raises BadRequest for a reference tether cannot resolve."""
    given = obj.get("input")
    changed = False
    if isinstance(given, list):
        out: list[object] = []
        for item in given:
            if isinstance(item, dict) and item.get("type") == "item_reference" \
                    and str(item.get("id", "")).startswith(MADE_UP):
                out.append(_input_item(_resolve(str(item["id"]), items.get(str(item["id"])),
                                                agent)))
                changed = True
            elif isinstance(item, dict) and str(item.get("id", "")).startswith(MADE_UP):
                out.append(_input_item(item))
                changed = True
            else:
                out.append(item)
        given = out
    outputs: list[object] = [{"type": "function_call_output", "call_id": d.call_id,
                              "output": d.text}
                             for d in owed_outputs(given, previous, conversation, agent)]
    if outputs:
        if isinstance(given, str):
            given = [*outputs, {"type": "message", "role": "user", "content": given}]
        else:
            given = [*outputs, *(given if isinstance(given, list) else [])]
        changed = True
    if not changed:
        return None
    return json_text({**obj, "input": given}).encode("utf-8")


def _resolve(ref: str, record: Rewrite | None, agent: str | None) -> JSONObject:
    """The message a reference names; `ref` is the agent's text, so it is shown clipped."""
    for d in record.denied if record is not None and record.agent == agent else ():
        if d.item.get("id") == ref:
            return d.item
    ref = ref[:120]
    if record is None:
        raise BadRequest(
            f"input item_reference {ref!r} names a message tether put in place of a denied "
            "tool call, and tether no longer holds it (its record expired, or it was made "
            "elsewhere); send the conversation's items in full, or start a new one")
    if record.agent != agent:
        raise BadRequest(
            f"input item_reference {ref!r} names a message tether made for another agent, "
            "so it was not forwarded")
    raise BadRequest(f"input item_reference {ref!r} is not a message tether made")


# --- stored retrieval -------------------------------------------------------------------


def _calls_in(items: list[object]) -> list[JSONObject]:
    return [i for i in items if isinstance(i, dict) and is_call(i.get("type"))]


def _replaced(items: list[object], records: Sequence[Rewrite], what: str) -> list[object]:
    """`items` with each denied call replaced by the message the agent got; a call no
    record names is refused, since tether cannot tell whether the agent was shown it."""
    by_call = {d.call_id: d.item for r in records for d in r.denied}
    known = {c for r in records for c in r.calls}
    for item in _calls_in(items):
        if str(item.get("call_id")) not in known:
            raise NotGoverned(
                f"{what} holds a tool call ({item.get('type')} {str(item.get('call_id'))[:80]!r}) "
                "that tether has no record of deciding (made elsewhere, or the record "
                "expired), so it is refused rather than shown as the model made it")
    return [by_call.get(str(i.get("call_id")), i)
            if isinstance(i, dict) and is_call(i.get("type")) else i for i in items]


def _owned(records: Sequence[Rewrite], agent: str | None, what: str) -> None:
    if any(r.agent != agent for r in records):
        raise BadRequest(f"{what} was rewritten by tether for another agent, so it is not shown")


def response_view(response: JSONObject, record: Rewrite | None, agent: str | None
                  ) -> JSONObject:
    """A stored answer (`GET /v1/responses/{id}`) as tether gave it to the agent."""
    output = response.get("output")
    if not isinstance(output, list):
        return response
    records = [record] if record is not None else []
    _owned(records, agent, f"response {response.get('id')!r}")
    return {**response, "output": _replaced(output, records,
                                            f"response {response.get('id')!r}")}


def items_view(page: JSONObject, records: Sequence[Rewrite], agent: str | None, what: str
               ) -> JSONObject:
    """A page of stored items (input items, conversation items) as the agent was given
    them: each `data` item read like an answer's output."""
    data = page.get("data")
    if not isinstance(data, list):
        return page
    _owned(records, agent, what)
    return {**page, "data": _replaced(data, records, what)}
