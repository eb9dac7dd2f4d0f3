"""One Responses call item held back in a stream, from `response.output_item.added`
until it is decided.

A client could read the call from any of its pieces (the added item, the argument
deltas, the `.done` text, the done item), so every held event is checked against
the others before it is kept, and any disagreement fails the stream. What is kept
must stay about the size of the arguments, not of the events around each few
characters: past EVENTS_KEPT bytes of held events, further argument deltas are
kept as text only, and replayed as one delta. The stream filter that holds these
is openai_responses_stream.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import ToolCall
from .held import HeldText
from .openai_responses_wire import (
    DELTA_EVENTS,
    DONE_EVENTS,
    TEXT_FIELD,
    JSONObject,
    check_call_item,
    item_call,
    output_text,
    replacement,
)
from .sse import SSEEvent

EVENTS_KEPT = 64 * 1024


@dataclass(slots=True)
class Held:
    """One call item, from `output_item.added` until it is decided."""

    index: int
    item: JSONObject
    events: list[tuple[SSEEvent, JSONObject]] = field(default_factory=list)
    pieces: HeldText = field(default_factory=HeldText)
    kept: int = 0                # bytes of event data in `events`
    tail_at: int | None = None   # where in `events` the delta standing for the rest is
    tail_from: int = 0           # ... and where in the text the rest begins
    text_done: bool = False
    done: JSONObject | None = None

    @property
    def kind(self) -> str:
        return str(self.item.get("type"))

    def text(self) -> str | None:
        """The argument text as a client accumulating the deltas would see it."""
        name = TEXT_FIELD.get(self.kind)
        if name is None:
            return None
        start = self.item.get(name)
        return (start if isinstance(start, str) else "") + self.pieces.text()

    def call(self, problem: str | None = None) -> ToolCall:
        if self.done is None:
            return item_call(self.item, self.index, problem, text=self.text())
        status = self.done.get("status")
        if problem is None and status not in (None, "completed"):
            problem = f"the tool call item ended with status {status!r}"
        return item_call(self.done, self.index, problem)

    def take(self, event: SSEEvent, obj: JSONObject, kind: str) -> bool:
        """Check and keep one event of the item; True when it completed the item."""
        self._check(obj, kind)
        if kind in DELTA_EVENTS:
            if self.tail_at is not None:
                return False  # its text is in self.pieces, replayed with the tail
            if self.kept > EVENTS_KEPT:
                self.tail_at = len(self.events)
                self.tail_from = self.pieces.length - len(str(obj["delta"]))
        self.kept += len(event.data)
        self.events.append((event, obj))
        return self.done is not None

    def replayed(self) -> Iterator[tuple[SSEEvent, JSONObject, bool]]:
        """The held events of an allowed call, each with whether its data changed: the
        delta standing for the tail carries all the text after it."""
        for i, (event, obj) in enumerate(self.events):
            if i == self.tail_at:
                yield event, {**obj, "delta": self.pieces.text()[self.tail_from:]}, True
            else:
                yield event, obj, False

    def replaced(self, text: str) -> tuple[JSONObject, tuple[JSONObject, ...]]:
        """The assistant message standing in for a call that is not released, and the
        events that send it at the call's `output_index`."""
        item = replacement(self.done or self.item, text)
        mid, oi, part = item["id"], self.index, output_text(text)
        where: JSONObject = {"item_id": mid, "output_index": oi, "content_index": 0}
        return item, (
            {"type": "response.output_item.added", "output_index": oi,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **where, "part": output_text("")},
            {"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": oi, "item": item},
        )

    def _check(self, obj: JSONObject, kind: str) -> None:
        """Check one event of a held call item; any inconsistency fails the stream, since
        a client could read the call from any of the pieces."""
        item_id = obj.get("item_id")
        if item_id is not None and self.item.get("id") is not None and item_id != self.item["id"]:
            raise ProtocolError(f"stream event for output item {self.index} names another item")
        text_kind = DELTA_EVENTS.get(kind) or DONE_EVENTS.get(kind)
        if text_kind is not None and text_kind != self.kind:
            raise ProtocolError(f"{kind} event for a {self.kind} item")
        if kind in DELTA_EVENTS:
            delta = obj.get("delta")
            if not isinstance(delta, str) or self.text_done:
                raise ProtocolError(f"bad {kind} event for tool call item {self.index}")
            self.pieces.append(delta)
        elif kind in DONE_EVENTS:
            if obj.get(TEXT_FIELD[self.kind]) != self.text():
                raise ProtocolError(f"{kind} for tool call item {self.index} does not match its deltas")
            self.text_done = True
        elif kind == "response.output_item.done":
            done = obj.get("item")
            if not isinstance(done, dict):
                raise ProtocolError("response.output_item.done has no item")
            for key in ("type", "id", "call_id", "name"):
                if key in self.item and done.get(key) != self.item[key]:
                    raise ProtocolError(f"tool call item {self.index} changed its {key}")
            check_call_item(done, f"upstream stream item {self.index}")
            name = TEXT_FIELD.get(self.kind)
            if name and (self.pieces.pieces or self.text_done) and done.get(name) != self.text():
                raise ProtocolError(f"tool call item {self.index} does not match its deltas")
            self.done = done
