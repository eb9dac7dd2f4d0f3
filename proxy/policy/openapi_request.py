"""A request's parameters and body checked against the operation it matched.

Path, query, header and form values arrive as text; the operation's schemas
say what they mean (an integer, a comma- or pipe-separated array, a repeated
query key), so they are turned into typed arguments here and validated. The
arguments are what policy rules read, under the same names an LLM tool call for
the same operation would use. A `_method` override field is not reported as an
unknown parameter (openapi_wire.py has judged it already).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from .openapi_model import FORM, Json, Match, Param, Shape
from .openapi_problems import check_body, validate
from .openapi_wire import ABSENT, OVERRIDE_FIELD, Ambiguous, Payload, decode

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,30})")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,30})?(?:[eE][+-]?[0-9]{1,3})?")


def check_request(found: Match, query: Sequence[tuple[str, str]],
                  headers: Sequence[tuple[str, str]], payload: Payload
                  ) -> tuple[dict[str, object], list[str]]:
    """The request's arguments (path, query and header parameters, then the body) and
    every problem with them."""
    op = found.operation
    args: dict[str, object] = {}
    problems: list[str] = []
    by_name = {p.name: p for p in op.params_in("path")}
    for name, raw in found.path_params:
        try:
            text = decode(raw, plus=False)
        except Ambiguous as e:
            problems.append(f"path parameter {name!r} holds {e}")
            continue
        args[name] = _from_texts(by_name[name], [text], problems, "path parameter")
    given: dict[str, list[str]] = {}
    for key, text in query:
        given.setdefault(key, []).append(text)
    _params(op.params_in("query"), given, args, problems, "query parameter",
            skip={OVERRIDE_FIELD})
    sent: dict[str, list[str]] = {}
    for key, text in headers:
        sent.setdefault(key.lower(), []).append(text)
    wanted = op.params_in("header")
    _params(wanted, {k: v for k, v in sent.items() if k in {p.name for p in wanted}}, args,
            problems, "header")
    body = op.body
    if payload.empty:
        if body is not None and body.required:
            problems.append("a request body is required")
        return args, problems
    if body is None:
        problems.append("the operation takes no request body")
        return args, problems
    declared = _accepted(body.media, payload.media)
    if declared is None:
        problems.append(f"content type {payload.media or '(none)'} is not accepted "
                        f"(expected {', '.join(body.media)})")
    elif payload.problem:
        problems.append(payload.problem)
    elif payload.value is not ABSENT:
        schema = body.schema_for(declared)
        value: Json = payload.value
        if payload.media == FORM and isinstance(value, dict):
            value = _form(value, schema.shape if schema else Shape(), problems)
        problems += check_body(body, schema, value, "body property")
        if body.flat and isinstance(value, dict):
            args.update(value)
        else:
            args["body"] = value
    return args, problems


def _params(params: Iterable[Param], given: Mapping[str, list[str]], args: dict[str, object],
            problems: list[str], noun: str, skip: set[str] | None = None) -> None:
    known = {p.name: p for p in params}
    for name in given:
        if name not in known and name not in (skip or set()):
            accepted = ", ".join(known) or "none"
            problems.append(f"unknown {noun} {name!r} (accepted: {accepted})")
    for param in known.values():
        if param.name in given:
            args[param.name] = _from_texts(param, given[param.name], problems, noun)
        elif param.required:
            problems.append(f"missing required {noun} {param.name!r}")


def _from_texts(param: Param, texts: list[str], problems: list[str], noun: str) -> object:
    shape = param.schema.shape if param.schema else Shape()
    if "array" in shape.types:
        if param.location == "query" and param.style == "form" and param.explode:
            items = texts
        else:
            if len(texts) > 1:
                problems.append(f"{noun} {param.name!r} is given {len(texts)} times")
            sep = {"spaceDelimited": " ", "pipeDelimited": "|"}.get(param.style, ",")
            items = texts[0].split(sep) if texts[0] else []
        value: object = [coerce(t, shape.item_types) for t in items]
    else:
        if len(texts) > 1:
            problems.append(f"{noun} {param.name!r} is given {len(texts)} times")
        value = coerce(texts[0], shape.types)
    if param.schema is not None:
        problems += validate(param.schema, value, param.name, noun)
    return value


def _form(fields: Mapping[str, list[str]], shape: Shape, problems: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, texts in fields.items():
        if name == OVERRIDE_FIELD:
            continue
        types = shape.properties.get(name, ())
        if "array" in types:
            out[name] = texts
        else:
            if len(texts) > 1:
                problems.append(f"form field {name!r} is given {len(texts)} times")
            out[name] = coerce(texts[0], types)
    return out


def _accepted(declared: Sequence[str], media: str | None) -> str | None:
    if media is None:
        return None
    for candidate in (media, media.split("/")[0] + "/*", "*/*"):
        if candidate in declared:
            return candidate
    return None


def coerce(text: str, types: Sequence[str]) -> object:
    """Query, path, header and form values are text; the schema says what they mean.
    Text that fits none of the types is left as text, for the validator to report."""
    for t in types:
        if t == "integer" and _INT.fullmatch(text):
            return int(text)
        if t == "number" and _NUMBER.fullmatch(text):
            return int(text) if _INT.fullmatch(text) else float(text)
        if t == "boolean" and text in ("true", "false"):
            return text == "true"
    return text
