"""Strict JSON for everything tether reads from an agent, a model or a policy service.

Duplicate keys are refused because parsers disagree on which one wins (Python keeps
the last, others the first), so tether could judge one value while the upstream or
the tool acts on the other. NaN and Infinity are refused because they are not JSON.
A lone UTF-16 surrogate (`"\\ud800"`, or its three UTF-8 bytes) is refused because it
is not text: readers replace it, drop it or fail on it, each their own way, so what
tether judged would not be what the tool reads.
"""

from __future__ import annotations

import json

from . import surrogates


class DuplicateKey(ValueError):
    """A JSON object names a key twice."""


class NotText(ValueError):
    """A JSON string holds a lone UTF-16 surrogate. The message names where, never
    the string (it cannot be written as UTF-8)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"an unpaired UTF-16 surrogate (\\ud800-\\udfff) at {where}, "
                         "which is not text")
        self.where = where


def strict_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`object_pairs_hook`: a duplicate key is a ValueError, never a silent last-one-wins."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def no_constants(name: str) -> object:
    """`parse_constant`: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def refuse_surrogates(data: str | bytes, value: object) -> None:
    """Raise NotText when `value`, parsed from `data`, holds a lone surrogate. Only
    text that could make one (an escape of one, or one already there) is walked."""
    if surrogates.may_hold(data):
        where = surrogates.find(value)
        if where is not None:
            raise NotText(where)


# One decoder each, made once: `json.loads` with a hook builds a new JSONDecoder (and
# its scanner) on every call, a measurable share of a request's parsing.
PAIRS = json.JSONDecoder(object_pairs_hook=strict_pairs)
STRICT = json.JSONDecoder(object_pairs_hook=strict_pairs, parse_constant=no_constants)


def text_of(data: str | bytes | bytearray) -> str:
    """The text `json.loads(data)` parses, with its errors: bytes in UTF-8, or UTF-16/32
    when they look like it; a str starting with a BOM is refused."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        return data
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"the JSON object must be str, bytes or bytearray, "
                        f"not {type(data).__name__}")
    if len(data) > 1 and data[0] == 0x7B and data[1]:  # `{` then not NUL: plain UTF-8
        return data.decode("utf-8", "surrogatepass")
    return data.decode(json.detect_encoding(data), "surrogatepass")


def loads(text: str | bytes) -> object:
    """`json.loads` with all three: raises DuplicateKey, NotText, ValueError or
    RecursionError."""
    value = STRICT.decode(text_of(text))
    refuse_surrogates(text, value)
    return value
