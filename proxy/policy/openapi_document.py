"""An OpenAPI document as the compiler walks it: version, `$ref`s, lines, schemas.

Every load error must name the spec file, the line and the JSON pointer of the
offending node, so the parsed original (whose nodes know their lines) is kept
beside the copy that 3.0 specs are rewritten into (`nullable` in draft-4 terms).
`$ref`s must point inside the same document (an external ref is an error: bundle
the spec); they are checked here, at load, so a dangling one fails before the
first request. Schemas are checked against their JSON Schema meta-schema and
compiled into validators (draft 4 with OpenAPI 3.0's `nullable` for 3.0 specs,
2020-12 for 3.1) whose patterns are ECMA-262, run on RE2 (openapi_patterns.py);
they resolve refs through one registry of the whole document. The operations
are compiled on top of this in openapi.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.jsonschema import DRAFT4, DRAFT202012

from ..errors import ConfigError
from .openapi_model import Json, Schema, Shape, pointer
from .openapi_patterns import VALIDATOR_30, VALIDATOR_31, check_schema, pattern_problems

SPEC_URI = "urn:tether:openapi"


def _tokens(ptr: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in ptr.split("/")[1:]] if ptr else []


class SpecDocument:
    """One spec's document, checked at load; `fail` builds the error for a node."""

    def __init__(self, doc: Mapping[str, Json], name: str, file: str) -> None:
        self.original = doc
        self.name = name
        self.file = file
        version = doc.get("openapi")
        if "swagger" in doc:
            raise self.fail("", "Swagger 2.0 is not supported: convert the spec to OpenAPI 3")
        if not isinstance(version, str) or not re.fullmatch(r"3\.[01]\.\d+(-.+)?", version):
            raise self.fail("/openapi", f"openapi must be a 3.0.x or 3.1.x version, not {version!r}")
        self.version = version
        self._check_refs()
        self.v30 = version.startswith("3.0.")
        self.doc: Json = _nullable_to_types(copy.deepcopy(doc)) if self.v30 else doc
        spec = DRAFT4 if self.v30 else DRAFT202012
        self.validator_class: type[Validator] = VALIDATOR_30 if self.v30 else VALIDATOR_31
        self.registry: Registry[Json] = Registry().with_resource(SPEC_URI,
                                                                 spec.create_resource(self.doc))

    # --- errors, pointers, refs -------------------------------------------------------

    def fail(self, ptr: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self._line(ptr), key=ptr or "/")

    def _line(self, ptr: str) -> int | None:
        node: Json = self.original
        line = getattr(node, "line", None)
        for token in _tokens(ptr):
            if isinstance(node, dict) and token in node:
                line = node.key_lines.get(token, line) if hasattr(node, "key_lines") else line
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                break
            line = getattr(node, "line", line)
        return line

    def at(self, ptr: str) -> Json:
        node: Json = self.doc if hasattr(self, "doc") else self.original
        for token in _tokens(ptr):
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise KeyError(ptr)
        return node

    def _check_refs(self) -> None:
        stack: list[tuple[Json, str]] = [(self.original, "")]
        while stack:
            node, ptr = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if ref is not None:
                    where = pointer(ptr, "$ref")
                    if not isinstance(ref, str) or not ref.startswith("#"):
                        raise self.fail(where, f"external $ref {ref!r} is not supported: "
                                               "bundle the spec into one document")
                    try:
                        self.at(unquote(ref[1:]))
                    except KeyError:
                        raise self.fail(where, f"$ref {ref!r} points at nothing") from None
                stack += [(v, pointer(ptr, k)) for k, v in node.items()]
            elif isinstance(node, list):
                stack += [(v, pointer(ptr, i)) for i, v in enumerate(node)]

    def deref(self, node: Json, ptr: str) -> tuple[Json, str]:
        """Follow `$ref` objects (parameters, request bodies, path items, schemas)."""
        seen, start = set(), ptr
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            target = unquote(node["$ref"][1:])
            if target in seen:
                raise self.fail(start, f"$ref cycle through {node['$ref']!r}")
            seen.add(target)
            node, ptr = self.at(target), target
        return node, ptr

    # --- schemas ----------------------------------------------------------------------

    def schema(self, ptr: str) -> Schema:
        node = self.at(ptr)
        if not isinstance(node, dict | bool):
            raise self.fail(ptr, "a schema must be a mapping")
        self.check_schema(node, ptr)
        validator = self.validator_class({"$ref": f"{SPEC_URI}#{quote(ptr, safe='/~')}"},
                                         registry=self.registry)
        return Schema(ptr, validator, self.shape(node, ptr))

    def check_schema(self, node: Json, ptr: str) -> None:
        for where, problem in pattern_problems(node, ptr):
            raise self.fail(where, problem)
        try:
            check_schema(self.validator_class, node)
        except SchemaError as e:
            raise self.fail(pointer(ptr, *e.path), f"invalid schema: {e.message}") from None

    def types(self, node: Json, ptr: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The JSON types a schema admits, as far as its top says (empty: unknown)."""
        node, ptr = self.deref(node, ptr)
        if ptr in seen or not isinstance(node, dict):
            return ()
        raw = node.get("type")
        if isinstance(raw, list):
            return tuple(t for t in raw if isinstance(t, str))
        if isinstance(raw, str):
            return (raw,)
        for i, branch in enumerate(node.get("allOf") or []):
            found = self.types(branch, pointer(ptr, "allOf", i), seen | {ptr})
            if found:
                return found
        union: list[str] = []
        for key in ("anyOf", "oneOf"):
            for i, branch in enumerate(node.get(key) or []):
                union += self.types(branch, pointer(ptr, key, i), seen | {ptr})
        if union:
            return tuple(dict.fromkeys(union))
        return ("object",) if "properties" in node else ()

    def shape(self, node: Json, ptr: str, seen: frozenset[str] = frozenset()) -> Shape:
        node, ptr = self.deref(node, ptr)
        if ptr in seen or not isinstance(node, dict):
            return Shape()
        seen = seen | {ptr}
        props: dict[str, tuple[str, ...]] = {}
        for prop, sub in (node.get("properties") or {}).items():
            props[prop] = self.types(sub, pointer(ptr, "properties", prop))
        extra = node.get("additionalProperties")
        additional = extra is True or isinstance(extra, dict) or bool(node.get("patternProperties"))
        items = node.get("items")
        item_types = self.types(items, pointer(ptr, "items")) if isinstance(items, dict) else ()
        for key in ("allOf", "anyOf", "oneOf"):
            for i, branch in enumerate(node.get(key) or []):
                sub = self.shape(branch, pointer(ptr, key, i), seen)
                item_types = item_types or sub.item_types
                additional = additional or sub.additional
                for prop, t in sub.properties.items():
                    props.setdefault(prop, t)
        return Shape(self.types(node, ptr), item_types, props, additional)


def _nullable_to_types(node: Json) -> Json:
    """OpenAPI 3.0's `nullable: true` in draft-4 terms: `null` joins the types."""
    if isinstance(node, list):
        return [_nullable_to_types(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_types(v) for k, v in node.items()}
    if out.get("nullable") is True:
        del out["nullable"]
        if isinstance(out.get("type"), str) and "$ref" not in out:
            out["type"] = [out["type"], "null"]
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [{"type": "null"}, out]}
    return out
