"""Strict JSON for everything tether reads from an agent, a model or a policy service.

Duplicate keys are refused because parsers disagree on which one wins (Python keeps
the last, others the first), so tether could judge one value while the upstream or
the tool acts on the other. NaN and Infinity are refused because they are not JSON.
"""

from __future__ import annotations

import json


class DuplicateKey(ValueError):
    """A JSON object names a key twice."""


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


def loads(text: str | bytes) -> object:
    """`json.loads` with both: raises DuplicateKey, ValueError or RecursionError."""
    return json.loads(text, object_pairs_hook=strict_pairs, parse_constant=no_constants)
