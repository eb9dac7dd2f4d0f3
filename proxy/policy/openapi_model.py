"""What a compiled OpenAPI spec is: operations, their parameters, bodies and schemas.

Built by openapi.py (the compiler) at load; read by openapi_judge.py (requests),
openapi_arguments.py (tool-call arguments) and the egress routes. Plain frozen data,
no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema.protocols import Validator

from ..model import Effect

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

type Json = Any  # spec data inside this module and the openapi_* checkers only


@dataclass(frozen=True, slots=True)
class Shape:
    """What the top of a schema says, after following `$ref`, `allOf`, `anyOf`, `oneOf`:
    enough to turn query text into typed values and to spot undeclared names."""

    types: tuple[str, ...] = ()
    item_types: tuple[str, ...] = ()
    properties: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    additional: bool = False   # additionalProperties or patternProperties say so

    @property
    def open(self) -> bool:
        """Whether names beyond `properties` are accepted at the top. Stricter than JSON
        Schema's default on purpose: an object that declares properties is closed unless
        it says otherwise, since an undeclared top-level name is what a hallucinated
        argument looks like. One that declares none is free-form."""
        return self.additional or not self.properties


@dataclass(frozen=True, slots=True)
class Schema:
    pointer: str
    validator: Validator
    shape: Shape


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    location: str              # path | query | header | cookie
    required: bool
    schema: Schema | None
    style: str = "form"
    explode: bool = True


@dataclass(frozen=True, slots=True)
class Body:
    required: bool
    media: tuple[str, ...]                 # declared media types, as written
    schemas: Mapping[str, Schema]          # the ones tether validates (JSON and form)
    flat: bool                             # object body: its properties are arguments too

    def schema_for(self, media: str) -> Schema | None:
        return self.schemas.get(media)

    @property
    def argument_schema(self) -> Schema | None:
        """The schema tool-call arguments are checked against: JSON first, then form."""
        json_ = next((s for m, s in self.schemas.items() if is_json(m)), None)
        return json_ or next(iter(self.schemas.values()), None)


@dataclass(frozen=True, slots=True)
class Operation:
    api: str
    operation_id: str
    method: str                # upper case
    template: str
    params: tuple[Param, ...]
    body: Body | None
    effect: Effect
    pointer: str
    pattern: re.Pattern[str] = field(repr=False)
    param_names: tuple[str, ...] = ()      # the template's, in group order
    rank: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """What rules name it by: `jira.createIssue`."""
        return f"{self.api}.{self.operation_id}"

    def params_in(self, location: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.location == location)

    @property
    def argument_names(self) -> tuple[str, ...]:
        names = [p.name for p in self.params if p.location != "cookie"]
        if self.body is not None:
            schema = self.body.argument_schema
            if self.body.flat and schema is not None:
                names += [n for n in schema.shape.properties if n not in names]
            elif schema is not None or self.body.media:
                names.append("body")
        return tuple(names)


@dataclass(frozen=True, slots=True)
class Match:
    operation: Operation
    path_params: tuple[tuple[str, str], ...]   # (name, raw value) in template order


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    file: str
    version: str
    operations: tuple[Operation, ...]          # most literal template first

    def find(self, method: str, raw_path: str) -> Match | None:
        method = method.upper()
        for op in self.operations:
            if op.method != method:
                continue
            m = op.pattern.fullmatch(raw_path)
            if m:
                return Match(op, tuple(zip(op.param_names, m.groups(), strict=True)))
        return None

    def match(self, method: str, raw_path: str) -> Operation | None:
        found = self.find(method, raw_path)
        return found.operation if found else None

    def methods_at(self, raw_path: str) -> tuple[str, ...]:
        """The methods some operation accepts on this path (for a helpful deny)."""
        return tuple(sorted({op.method for op in self.operations
                             if op.pattern.fullmatch(raw_path)}))

    def operation(self, operation_id: str) -> Operation | None:
        return next((op for op in self.operations if op.operation_id == operation_id), None)


def is_json(media: str) -> bool:
    media = media.lower()
    return media == "application/json" or media.endswith("+json")


FORM = "application/x-www-form-urlencoded"


def pointer(base: str, *tokens: str | int) -> str:
    return base + "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def effect_of_method(method: str) -> Effect:
    return Effect.READ if method.upper() in READ_METHODS else Effect.WRITE
