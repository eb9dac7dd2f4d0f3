"""Loop breakers: the same call again and again, or two calls in ping-pong.

A call's signature is its normalised name and canonical arguments, so key order
or spacing does not make a repeat look new.
"""

from __future__ import annotations

import hashlib

from ..model import ToolCall
from ..policy.names import normalize
from ..surrogates import json_text, utf8
from .budgets import Loops

REPEAT_RULE = "tether:loop-repeat"
PINGPONG_RULE = "tether:loop-pingpong"


def signature(call: ToolCall) -> str:
    if call.arguments is not None:
        canonical = json_text(call.arguments, sort_keys=True, separators=(",", ":"))
    else:
        canonical = call.raw_arguments
    text = f"{normalize(call.name)}\0{canonical}"
    return "c:" + hashlib.sha256(utf8(text)).hexdigest()[:24]


def history_needed(loops: Loops) -> int:
    return 2 * loops.pingpong if loops.pingpong else 1


def verdict(loops: Loops, call: ToolCall, count: int, recent: list[str]) -> tuple[str, str] | None:
    """(rule id, message) when this call trips a loop breaker; `recent` is newest first."""
    if loops.repeats is not None and count > loops.repeats:
        return REPEAT_RULE, (
            f"{call.name} was called with the same arguments {count} times in this session "
            f"(at most {loops.repeats}); stop repeating it and report what you found")
    if loops.pingpong is not None:
        span = 2 * loops.pingpong
        window = recent[:span]
        if (len(window) == span and window[0] != window[1]
                and all(window[i] == window[i % 2] for i in range(span))):
            return PINGPONG_RULE, (
                f"{call.name} is alternating with another call ({loops.pingpong} rounds of "
                "A, B); the session is going in circles")
    return None
