"""Drive a provider stream filter synchronously, as the server does."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.model import Decision, ToolCall
from proxy.providers.base import Step, StreamFilter
from proxy.providers.sse import SSEDecoder


@dataclass
class Run:
    output: bytes = b""
    decided: list[tuple[str, str, str]] = field(default_factory=list)

    def events(self) -> list[str]:
        decoder = SSEDecoder()
        return [e.data for e in decoder.feed(self.output)]

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events() if e != "[DONE]"]


def run_stream(stream: StreamFilter, pieces: Iterable[bytes],
               decide: Callable[[ToolCall], Decision]) -> Run:
    run = Run()
    out = bytearray()

    def drive(step: Step) -> None:
        while True:
            out.extend(step.data)
            if not step.pending:
                return
            decisions = [decide(c) for c in step.pending]
            run.decided += [(c.name, c.raw_arguments, d.action.value)
                            for c, d in zip(step.pending, decisions, strict=True)]
            step = stream.decide(decisions)

    for piece in pieces:
        drive(stream.feed(piece))
    drive(stream.close())
    run.output = bytes(out)
    return run


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces
