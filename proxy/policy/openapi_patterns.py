"""JSON Schema validators whose regular expressions run as ECMA-262 on RE2 (patterns.py).

jsonschema evaluates `pattern`, `patternProperties` and the `additionalProperties` that
depends on them with Python's `re.search`, where `$` also matches before a final
newline (`^T-[0-9]+$` accepts "T-1\\n") and a pattern may backtrack for ever on an
agent's text. The validator classes here replace those three keywords; everything
else is jsonschema's. `unevaluatedProperties` reads `patternProperties` on its own,
so a spec that has both is refused at load (`unevaluated_with_patterns`).

At load, `pattern_problems` walks a schema for its patterns, so a bad one is an error
naming its JSON pointer; `check_schema` checks the meta-schema's `format: regex` with the
same dialect, so Python's `re` never judges a pattern either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jsonschema import Draft4Validator, Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import extend

from ..errors import ConfigError
from .openapi_model import Json, pointer
from .patterns import schema_pattern

_SHOWN = 80
type _Checking = Any  # the validator jsonschema hands a keyword (its stubs say Any too)
_ONE_SCHEMA = ("additionalProperties", "additionalItems", "items", "contains", "not", "if",
               "then", "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
               "contentSchema")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                "dependencies")


def _shown(text: str) -> str:
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "..."


def _unusable(source: str, e: ConfigError) -> ValidationError:
    return ValidationError(f"pattern {source!r} cannot be evaluated: {e.message}")


def matches(source: str, text: str) -> bool:
    """Whether an OpenAPI pattern matches `text`; a pattern that cannot run matches
    nothing (the caller then refuses: it is read where a match would admit)."""
    try:
        return schema_pattern(source).search(text)
    except ConfigError:
        return False


def matches_any(sources: Iterable[str], text: str) -> bool:
    return any(matches(source, text) for source in sources)


def _pattern(validator: _Checking, source: Json, instance: Json, schema: Json
             ) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string") or not isinstance(source, str):
        return
    try:
        found = schema_pattern(source).search(instance)
    except ConfigError as e:
        yield _unusable(source, e)
        return
    if not found:
        yield ValidationError(f"{_shown(instance)} does not match {source!r}")


def _pattern_properties(validator: _Checking, patterns: Json, instance: Json, schema: Json
                        ) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object") or not isinstance(patterns, Mapping):
        return
    for source, subschema in patterns.items():
        try:
            compiled = schema_pattern(source)
        except ConfigError as e:
            yield _unusable(source, e)
            continue
        for key, value in instance.items():
            if compiled.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=source)


def _additional_properties(validator: _Checking, extra: Json, instance: Json, schema: Json
                           ) -> Iterator[ValidationError]:
    """jsonschema's own, with `patternProperties` read by `matches_any`."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties and not matches_any(patterns, k)]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        shown = ", ".join(repr(k) for k in sorted(extras))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(f"{shown} {verb} not match any of the regexes: "
                                  + ", ".join(repr(p) for p in sorted(patterns)))
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({shown} {verb} "
                                  "unexpected)")


_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
             "additionalProperties": _additional_properties}
# OpenAPI 3.0 schemas are draft 4 (with `nullable`), 3.1 schemas are 2020-12.
VALIDATOR_30: type[Validator] = extend(Draft4Validator, _KEYWORDS)  # type: ignore[no-untyped-call]
VALIDATOR_31: type[Validator] = extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, _KEYWORDS)


def _is_pattern(instance: object) -> bool:
    if isinstance(instance, str):
        schema_pattern(instance)
    return True


def _formats(base: FormatChecker) -> FormatChecker:
    checker = FormatChecker(formats=())
    checker.checkers = dict(base.checkers)
    checker.checks("regex", raises=ConfigError)(_is_pattern)
    return checker


_FORMATS_30 = _formats(Draft4Validator.FORMAT_CHECKER)
_FORMATS_31 = _formats(Draft202012Validator.FORMAT_CHECKER)


def check_schema(validator_class: type[Validator], node: Json) -> None:
    """The meta-schema check (SchemaError), with `format: regex` read as ECMA-262."""
    if validator_class is VALIDATOR_30:
        Draft4Validator.check_schema(node, format_checker=_FORMATS_30)
    else:
        Draft202012Validator.check_schema(node, format_checker=_FORMATS_31)


def pattern_problems(node: Json, ptr: str) -> Iterator[tuple[str, str]]:
    """(pointer, message) for each pattern in the schema at `ptr` that tether will not
    run; `$ref`s are not followed (their targets are checked where they stand)."""
    stack: list[tuple[Json, str]] = [(node, ptr)]
    while stack:
        schema, at = stack.pop()
        if not isinstance(schema, dict):
            continue
        sources = [(pointer(at, "pattern"), schema.get("pattern"))]
        patterns = schema.get("patternProperties")
        if isinstance(patterns, dict):
            sources += [(pointer(at, "patternProperties", k), k) for k in patterns]
        for where, source in sources:
            if isinstance(source, str):
                try:
                    schema_pattern(source)
                except ConfigError as e:
                    yield where, f"pattern {source!r}: {e.message}"
        stack += [(schema[k], pointer(at, k)) for k in _ONE_SCHEMA
                  if isinstance(schema.get(k), dict)]
        for key in _SCHEMA_LISTS:
            if isinstance(schema.get(key), list):
                stack += [(s, pointer(at, key, i)) for i, s in enumerate(schema[key])]
        for key in _SCHEMA_MAPS:
            if isinstance(schema.get(key), dict):
                stack += [(s, pointer(at, key, name)) for name, s in schema[key].items()]


def unevaluated_with_patterns(doc: Json) -> str | None:
    """The pointer of an `unevaluatedProperties` in a document that also holds a
    `patternProperties`: jsonschema would read those patterns with Python's `re`."""
    first: dict[str, str] = {}
    stack: list[tuple[Json, str]] = [(doc, "")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            for key in ("unevaluatedProperties", "patternProperties"):
                if key in node:
                    first.setdefault(key, pointer(at, key))
            stack += [(v, pointer(at, k)) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, pointer(at, i)) for i, v in enumerate(node)]
    return first["unevaluatedProperties"] if len(first) == 2 else None
