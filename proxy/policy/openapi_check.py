"""Requests and tool-call arguments checked against the operations of an OpenAPI spec.

Two entry points, one law:

- `judge(spec, request)` (egress): which operation an outgoing HTTP request is,
  as the upstream would read it, and whether its parameters and body fit.
  Method overrides (`X-HTTP-Method-Override`, `X-HTTP-Method`,
  `X-Method-Override`, a `_method` query, form or JSON field) are judged as the
  method they ask for; overrides that disagree, an override on anything but
  POST, or a POST whose override leaves two operations possible are denied, as
  is a `_method` inside a multipart body (not parsed here). A query with `;`,
  a bad escape or non-UTF-8 text is refused as ambiguous.
- `check_arguments(operation, args)` (LLM side): a tool call mapped to an
  operation; its arguments are the operation's parameters by name plus the
  body's top-level properties (or `body`, for a body that is not an object
  with declared properties).

Every problem is listed by name (unknown, missing, mistyped), so a model that
hallucinated a parameter reads what to fix. Built-in rule ids:

  tether:unknown-operation   no operation of the spec has this method and path
  tether:invalid-request     the request's parameters or body do not fit it
  tether:invalid-arguments   an LLM tool call's arguments do not fit it
  tether:method-override     overrides that disagree or cannot be judged
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from jsonschema.exceptions import ValidationError

from ..model import Action, Effect, HttpRequest, RuleTrace, ToolCall
from .openapi_model import (
    FORM,
    Body,
    Json,
    Match,
    Operation,
    Param,
    Schema,
    Shape,
    Spec,
    effect_of_method,
    is_json,
)

UNKNOWN_OPERATION = "tether:unknown-operation"
INVALID_REQUEST = "tether:invalid-request"
INVALID_ARGUMENTS = "tether:invalid-arguments"
METHOD_OVERRIDE = "tether:method-override"
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_FIELD = "_method"
MAX_PROBLEMS = 20
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,30})")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,30})?(?:[eE][+-]?[0-9]{1,3})?")
_MULTIPART_METHOD = re.compile(rb'name\s*=\s*"?_method"?', re.IGNORECASE)
_ABSENT = object()


class Ambiguous(ValueError):
    """The request could be read two ways; it is refused, not guessed."""


@dataclass(frozen=True, slots=True)
class Judged:
    """One outgoing request as judged. `denial`: a built-in check failed (deny it);
    `refusal`: the request is ambiguous and is refused whole (400)."""

    method: str
    path: str
    operation: Operation | None = None
    arguments: Mapping[str, object] = field(default_factory=dict)
    denial: RuleTrace | None = None
    refusal: str | None = None

    @property
    def effect(self) -> Effect:
        return self.operation.effect if self.operation else effect_of_method(self.method)

    def tool(self, api: str) -> str:
        """The name the request is audited and decided under."""
        return self.operation.name if self.operation else f"{api}:{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class _Payload:
    media: str | None = None
    value: object = _ABSENT           # parsed JSON, or form fields (name -> texts)
    problem: str | None = None
    empty: bool = True


def _deny(rule: str, message: str) -> RuleTrace:
    return RuleTrace(rule, True, message, Action.DENY)


# --- decoding --------------------------------------------------------------------------

def decode(text: str, *, plus: bool = True) -> str:
    if _BAD_ESCAPE.search(text):
        raise Ambiguous("a malformed percent escape")
    if plus:
        text = text.replace("+", " ")
    try:
        out = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise Ambiguous("percent escapes that are not UTF-8 text") from None
    if "\x00" in out:
        raise Ambiguous("a NUL character")
    return out


def parse_query(raw: str) -> list[tuple[str, str]]:
    """`a=1&b=2` into decoded pairs; `;` is refused (some servers split on it)."""
    if ";" in raw:
        raise Ambiguous("';' in the query, which some servers read as a separator")
    pairs = []
    for part in raw.split("&"):
        if part:
            key, _, value = part.partition("=")
            pairs.append((decode(key), decode(value)))
    return pairs


def _strict_json(body: bytes) -> object:
    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _payload(request: HttpRequest) -> _Payload:
    if not request.body:
        return _Payload(media=_media(request))
    media = _media(request)
    if media is not None and is_json(media):
        try:
            return _Payload(media, _strict_json(request.body), empty=False)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            return _Payload(media, problem=f"the body is not valid JSON ({why})", empty=False)
    if media == FORM:
        try:
            text = request.body.decode("ascii")
        except UnicodeDecodeError:
            raise Ambiguous("a form body that is not ASCII") from None
        fields: dict[str, list[str]] = {}
        for key, value in parse_query(text):
            fields.setdefault(key, []).append(value)
        return _Payload(media, fields, empty=False)
    return _Payload(media, empty=False)


def _media(request: HttpRequest) -> str | None:
    ctype = request.header("content-type")
    return ctype.split(";")[0].strip().lower() or None if ctype else None


# --- the egress side -------------------------------------------------------------------

def judge(spec: Spec, request: HttpRequest, base_path: str = "") -> Judged:
    """Which operation `request` is and whether it fits; `request.path` is raw and
    canonical, `base_path` (the API's, from its URL) is taken off it first."""
    method = request.method.upper()
    path = request.path
    try:
        if base_path:
            if path != base_path and not path.startswith(base_path.rstrip("/") + "/"):
                return Judged(method, path, denial=_deny(
                    UNKNOWN_OPERATION, f"{path} is outside the {spec.name} API ({base_path})"))
            path = path[len(base_path.rstrip("/")):] or "/"
        query = parse_query(request.query)
        payload = _payload(request)
    except Ambiguous as e:
        return Judged(method, path, refusal=f"the request is ambiguous ({e}); it was not forwarded")

    asked, problem = _override(request, method, query, payload)
    if problem:
        return Judged(asked, path, denial=_deny(METHOD_OVERRIDE, problem))
    found = spec.find(asked, path)
    if found is None:
        allowed = spec.methods_at(path)
        hint = (f"the spec allows {', '.join(allowed)} there" if allowed
                else "no path of the spec matches")
        return Judged(asked, path, denial=_deny(
            UNKNOWN_OPERATION, f"{asked} {path} is not an operation of the {spec.name} API "
                               f"({hint})"))
    if asked != method:
        other = spec.find(method, path)
        if other is not None:
            return Judged(asked, path, found.operation, denial=_deny(
                METHOD_OVERRIDE, f"this {method} asks to be {asked}: an upstream that ignores "
                f"the override runs {other.operation.name}, one that honours it runs "
                f"{found.operation.name}; tether does not guess which"))
    arguments, problems = check_request(found, query, request.headers, payload)
    denial = None
    if problems:
        denial = _deny(INVALID_REQUEST, f"{asked} {path} does not fit {found.operation.name}: "
                                        + _join(problems))
    return Judged(asked, path, found.operation, arguments, denial)


def _override(request: HttpRequest, method: str, query: list[tuple[str, str]],
              payload: _Payload) -> tuple[str, str | None]:
    """The method the request asks to be judged as, or why that cannot be told."""
    sources = [(k, v) for k, v in request.headers if k.lower() in OVERRIDE_HEADERS]
    sources += [(f"query {OVERRIDE_FIELD}", v) for k, v in query if k == OVERRIDE_FIELD]
    if isinstance(payload.value, dict):
        if payload.media == FORM:
            sources += [(f"form {OVERRIDE_FIELD}", v)
                        for v in payload.value.get(OVERRIDE_FIELD, [])]
        elif OVERRIDE_FIELD in payload.value:
            sources.append((f"JSON body {OVERRIDE_FIELD}", str(payload.value[OVERRIDE_FIELD])))
    if payload.media and payload.media.startswith("multipart/") \
            and _MULTIPART_METHOD.search(request.body):
        return method, f"a {OVERRIDE_FIELD} field in a multipart body is not judged; refused"
    if not sources:
        return method, None
    asked = {v.strip().upper() for _, v in sources}
    listed = ", ".join(f"{k}: {v.strip()}" for k, v in sources)
    if len(asked) > 1:
        return method, f"method overrides disagree ({listed})"
    value = asked.pop()
    if not re.fullmatch(r"[A-Z]{1,20}", value):
        return method, f"{value!r} is not an HTTP method ({listed})"
    if value != method and method != "POST":
        return value, (f"a {method} request asks to be {value} ({listed}); method overrides "
                       "are judged only on POST")
    return value, None


def check_request(found: Match, query: Sequence[tuple[str, str]],
                  headers: Sequence[tuple[str, str]], payload: _Payload
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
    elif payload.value is not _ABSENT:
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


# --- the LLM side ----------------------------------------------------------------------

def check_arguments(op: Operation, args: Mapping[str, object]) -> list[str]:
    """Every problem with a tool call's arguments for `op` (empty: they fit)."""
    problems: list[str] = []
    params = {p.name: p for p in op.params if p.location != "cookie"}
    body_args: dict[str, object] = {}
    body_value: object = _ABSENT
    for name, value in args.items():
        param = params.get(name)
        if param is not None:
            if param.schema is not None:
                problems += validate(param.schema, value, name, "argument")
        elif op.body is not None and op.body.flat:
            body_args[name] = value
        elif op.body is not None and name == "body":
            body_value = value
        else:
            problems.append(f"unknown argument {name!r}")
    for param in params.values():
        if param.required and param.name not in args:
            problems.append(f"missing required argument {param.name!r}")
    if op.body is not None:
        if op.body.flat and (body_args or op.body.required):
            body_value = body_args
        if body_value is _ABSENT and op.body.required:
            problems.append("missing required argument 'body'")
        elif body_value is not _ABSENT:
            problems += check_body(op.body, op.body.argument_schema, body_value, "argument")
    if any(p.startswith("unknown ") for p in problems):
        problems.append(f"{op.name} takes: {', '.join(op.argument_names) or 'no arguments'}")
    return _unique(problems)


def arguments_trace(op: Operation, call: ToolCall) -> RuleTrace | None:
    """A deny for the engine's `extra` when the call's arguments do not fit `op`."""
    if call.arguments is None:
        return None  # already denied as malformed
    try:
        problems = check_arguments(op, call.arguments)
    except Exception as e:  # noqa: BLE001 - a check that breaks must deny, not pass
        return _deny(INVALID_ARGUMENTS, f"the arguments could not be checked against "
                                        f"{op.name} ({type(e).__name__}); denied")
    if not problems:
        return None
    return _deny(INVALID_ARGUMENTS, f"the arguments do not fit the operation {op.name}: "
                                    + _join(problems))


# --- shared ----------------------------------------------------------------------------

def check_body(body: Body, schema: Schema | None, value: object, noun: str) -> list[str]:
    if schema is None:
        return []
    problems: list[str] = []
    base = "" if body.flat else "body"
    shape = schema.shape
    if body.flat and isinstance(value, dict) and not shape.open:
        problems += [f"unknown {noun} {k!r}" for k in value if k not in shape.properties]
    problems += validate(schema, value, base, noun)
    return _unique(problems)


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
        extra = [k for k in inst if k not in props and not any(re.search(p, k) for p in patterns)]
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


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _join(problems: Sequence[str]) -> str:
    shown = _unique(problems)
    more = len(shown) - MAX_PROBLEMS
    text = "; ".join(shown[:MAX_PROBLEMS])
    return text + (f"; and {more} more" if more > 0 else "")
