"""Schema validation errors turned into problems a model can act on.

Both sides (an egress request, an LLM tool call) report the same way: every
problem listed by name - unknown, missing, mistyped - rather than jsonschema's
first message, so a model that hallucinated a parameter reads what to fix.
Lists are de-duplicated and capped at MAX_PROBLEMS so a hostile body cannot
make the audit record or the 403 arbitrarily long.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from jsonschema.exceptions import ValidationError

from ..model import Action, RuleTrace
from .openapi_model import Body, Json, Schema
from .openapi_patterns import matches_any

MAX_PROBLEMS = 20


def deny(rule: str, message: str) -> RuleTrace:
    return RuleTrace(rule, True, message, Action.DENY)


def check_body(body: Body, schema: Schema | None, value: object, noun: str) -> list[str]:
    if schema is None:
        return []
    problems: list[str] = []
    base = "" if body.flat else "body"
    shape = schema.shape
    if body.flat and isinstance(value, dict) and not shape.open:
        problems += [f"unknown {noun} {k!r}" for k in value if k not in shape.properties]
    problems += validate(schema, value, base, noun)
    return unique(problems)


def validate(schema: Schema, value: Json, base: str, noun: str) -> list[str]:
    errors = sorted(schema.validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
    out: list[str] = []
    for error in errors[:MAX_PROBLEMS]:
        out += _describe(error, base, noun)
    return out


def _label(base: str, path: Iterable[object]) -> str:
    out = base
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _describe(e: ValidationError, base: str, noun: str) -> list[str]:
    where = _label(base, e.absolute_path)
    here = where if base or e.absolute_path else ""   # names inside this value
    inst: Json = e.instance
    if e.validator == "required" and isinstance(inst, dict) and isinstance(e.validator_value, list):
        return [f"missing required {noun} {_label(here, [r])!r}"
                for r in e.validator_value if r not in inst]
    if e.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(inst, dict):
        schema: Json = e.schema if isinstance(e.schema, dict) else {}
        props = schema.get("properties") or {}
        patterns = list(schema.get("patternProperties") or {})
        extra = [k for k in inst if k not in props and not matches_any(patterns, k)]
        return [f"unknown {noun} {_label(here, [k])!r}" for k in extra] or \
            [f"{noun} {where!r}: {_short(e.message)}"]
    if e.validator == "type":
        wanted = e.validator_value if isinstance(e.validator_value, list) else [e.validator_value]
        return [f"{noun} {where!r} must be {' or '.join(map(str, wanted))}, not {_json_type(inst)}"]
    if e.validator == "enum" and isinstance(e.validator_value, list):
        return [f"{noun} {where!r} must be one of {_short(json.dumps(e.validator_value))} "
                f"(got {_short(json.dumps(inst, default=str))})"]
    return [f"{noun} {where!r}: {_short(e.message)}"]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def join(problems: Sequence[str]) -> str:
    """The problems as one message: de-duplicated, at most MAX_PROBLEMS, then a count."""
    shown = unique(problems)
    more = len(shown) - MAX_PROBLEMS
    text = "; ".join(shown[:MAX_PROBLEMS])
    return text + (f"; and {more} more" if more > 0 else "")
