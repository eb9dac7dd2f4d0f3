"""Tool-call arguments: strict JSON, one object, no duplicate keys.

A model's argument text is untrusted. Duplicate keys are refused because
parsers disagree on which one wins (Python keeps the last, others the first),
so a rule could check one value while the tool runs with the other. NaN and
Infinity are refused because they are not JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`object_pairs_hook` for bodies: a duplicate key is a ValueError (so a parse
    failure), never a silent last-one-wins."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_arguments(raw: str) -> tuple[Mapping[str, object] | None, str | None]:
    """Return (arguments, None) or (None, why they were refused)."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _Duplicate as e:
        return None, f"tool-call arguments hold a {e}"
    except RecursionError:
        return None, "tool-call arguments are nested too deeply"
    except ValueError as e:
        return None, f"tool-call arguments are not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"tool-call arguments must be a JSON object, not {type(value).__name__}"
    return value, None
