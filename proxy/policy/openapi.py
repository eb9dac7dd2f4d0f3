"""OpenAPI 3.0 / 3.1 specs compiled, once at load, into an allow-list of operations.

An operation is a method plus a path template (`/issue/{issueIdOrKey}`); each
`{param}` matches exactly one path segment, never a `/`. Templates are matched
against the *raw* (still percent-encoded, already canonical) path, so what is
judged is what the upstream receives. When several templates match, the more
literal one wins, segment by segment from the left (`/issue/picker` over
`/issue/{id}`), as the OpenAPI spec asks; two templates that differ only in
their parameter names are an error.

Schemas are checked against their JSON Schema meta-schema at load and compiled
into validators (draft 4 with OpenAPI 3.0's `nullable` for 3.0 specs, 2020-12
for 3.1) whose patterns are ECMA-262, run on RE2 (openapi_patterns.py).
`$ref`s must point inside the same document (an external ref is an error:
bundle the spec); they are resolved at load, so a dangling one fails here,
not on the first request. Every error names the spec file, the line and
the JSON pointer of the offending node.

The caller parses the file (YAML or JSON) and hands over the data: no I/O here.
Requests are judged in openapi_judge.py, tool-call arguments in openapi_arguments.py.
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
from ..model import Effect
from .openapi_model import (
    FORM,
    Body,
    Json,
    Operation,
    Param,
    Schema,
    Shape,
    Spec,
    effect_of_method,
    is_json,
    pointer,
)
from .openapi_patterns import (
    VALIDATOR_30,
    VALIDATOR_31,
    check_schema,
    pattern_problems,
    unevaluated_with_patterns,
)

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
LOCATIONS = ("path", "query", "header", "cookie")
SPEC_URI = "urn:tether:openapi"
# Characters that may stand unescaped in a path segment (RFC 3986 pchar).
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"
_TEMPLATE_PARAM = re.compile(r"\{([^{}/]+)\}")
_STYLES = {"query": {"form", "spaceDelimited", "pipeDelimited"}, "path": {"simple"},
           "header": {"simple"}, "cookie": {"form"}}

def _tokens(ptr: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in ptr.split("/")[1:]] if ptr else []


class _Compiler:
    def __init__(self, doc: Mapping[str, Json], name: str, file: str,
                 effects: Mapping[str, Effect]) -> None:
        self.original = doc
        self.name = name
        self.file = file
        self.effects = effects
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

    # --- operations -------------------------------------------------------------------

    def compile(self) -> Spec:
        paths = self.doc.get("paths")
        if not isinstance(paths, dict) or not paths:
            raise self.fail("/paths", "the spec defines no paths (nothing would be allowed)")
        unevaluated = unevaluated_with_patterns(self.doc)
        if unevaluated is not None:
            raise self.fail(unevaluated, "unevaluatedProperties is not supported in a spec that "
                                         "has patternProperties: use additionalProperties")
        components = self.doc.get("components") or {}
        for name in (components.get("schemas") or {}):
            self.check_schema(components["schemas"][name], pointer("/components/schemas", name))
        operations: list[Operation] = []
        shapes: dict[tuple[str, tuple[str, ...]], str] = {}
        ids: dict[str, str] = {}
        for template, raw_item in paths.items():
            item_ptr = pointer("/paths", template)
            if not isinstance(template, str) or not template.startswith("/") \
                    or "?" in template or "#" in template:
                raise self.fail(item_ptr, "a path must start with '/' and hold no query")
            item, resolved_item_ptr = self.deref(raw_item, item_ptr)
            if not isinstance(item, dict):
                raise self.fail(item_ptr, "a path item must be a mapping")
            pattern, names, rank, skeleton = self.template(template, item_ptr)
            shared = self.parameters(item.get("parameters"), pointer(resolved_item_ptr,
                                                                      "parameters"))
            for method in METHODS:
                if method not in item:
                    continue
                op_ptr = pointer(resolved_item_ptr, method)
                op = item[method]
                if not isinstance(op, dict):
                    raise self.fail(op_ptr, "an operation must be a mapping")
                key = (method, skeleton)
                if key in shapes:
                    raise self.fail(op_ptr, f"{method.upper()} {template} is the same as "
                                            f"{method.upper()} {shapes[key]} (only parameter "
                                            "names differ)")
                shapes[key] = template
                operations.append(self.operation(template, method, op, op_ptr, shared,
                                                 pattern, names, rank))
                oid = operations[-1].operation_id
                if oid in ids:
                    raise self.fail(pointer(op_ptr, "operationId"),
                                    f"operationId {oid!r} is also used at {ids[oid]}")
                ids[oid] = op_ptr
        operations.sort(key=lambda o: o.rank)
        return Spec(self.name, self.file, self.version, tuple(operations))

    def template(self, template: str, ptr: str
                 ) -> tuple[re.Pattern[str], tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
        parts, names, rank, skeleton = [], [], [], []
        for segment in template.split("/")[1:]:
            literal = _TEMPLATE_PARAM.sub("", segment)
            if "{" in literal or "}" in literal or "}{" in segment:
                raise self.fail(ptr, f"malformed path template segment {segment!r}")
            params = list(_TEMPLATE_PARAM.finditer(segment))
            pieces, last = [], 0
            for i, m in enumerate(params):
                pieces.append(re.escape(quote(segment[last:m.start()], safe=_PCHAR_SAFE)))
                if m.group(1) in names:
                    raise self.fail(ptr, f"path parameter {{{m.group(1)}}} appears twice")
                names.append(m.group(1))
                if i + 1 < len(params):
                    # Not the segment's last parameter: it ends at the first occurrence of
                    # the text after it, atomically. A later occurrence only leaves the rest
                    # less room, so what matches and what is captured are unchanged, but the
                    # engine cannot retry every split: with two or three parameters in one
                    # segment that was quadratic or cubic in the path (4 KB took a minute).
                    after = segment[m.end():params[i + 1].start()]
                    pieces.append(f"(?>([^/]+?){re.escape(quote(after, safe=_PCHAR_SAFE))})")
                    last = params[i + 1].start()
                else:
                    pieces.append("([^/]+?)")
                    last = m.end()
            pieces.append(re.escape(quote(segment[last:], safe=_PCHAR_SAFE)))
            parts.append("".join(pieces))
            rank.append(0 if last == 0 else 2 if not literal else 1)
            skeleton.append(_TEMPLATE_PARAM.sub("{}", segment))
        return (re.compile("/" + "/".join(parts)), tuple(names), tuple(rank), tuple(skeleton))

    def parameters(self, raw: Json, ptr: str) -> dict[tuple[str, str], Param]:
        if raw is None:
            return {}
        if not isinstance(raw, list):
            raise self.fail(ptr, "parameters must be a list")
        out: dict[tuple[str, str], Param] = {}
        for i, entry in enumerate(raw):
            node, at = self.deref(entry, pointer(ptr, i))
            if not isinstance(node, dict):
                raise self.fail(at, "a parameter must be a mapping")
            name, where = node.get("name"), node.get("in")
            if not isinstance(name, str) or not name:
                raise self.fail(at, "a parameter needs a name")
            if where not in LOCATIONS:
                raise self.fail(pointer(at, "in"), f"'in' must be one of {', '.join(LOCATIONS)}")
            if where == "header":
                name = name.lower()
            if (name, where) in out:
                raise self.fail(at, f"parameter {name!r} in {where} is declared twice")
            if "content" in node:
                raise self.fail(pointer(at, "content"), "parameters described by 'content' "
                                "are not supported; describe them with 'schema'")
            style = node.get("style", "form" if where in ("query", "cookie") else "simple")
            if style not in _STYLES[where]:
                raise self.fail(pointer(at, "style"), f"style {style!r} is not supported for "
                                f"{where} parameters ({', '.join(sorted(_STYLES[where]))})")
            schema = self.schema(pointer(at, "schema")) if "schema" in node else None
            if schema is not None and "object" in schema.shape.types and where != "cookie":
                raise self.fail(pointer(at, "schema"), "object-valued parameters are not "
                                "supported (tether cannot judge how the upstream spreads them)")
            required = node.get("required", False)
            if where == "path" and required is not True:
                raise self.fail(at, "path parameters must be required: true")
            out[(name, where)] = Param(name, where, bool(required), schema, style,
                                       bool(node.get("explode", style == "form")))
        return out

    def operation(self, template: str, method: str, op: Json, ptr: str,
                  shared: dict[tuple[str, str], Param], pattern: re.Pattern[str],
                  names: tuple[str, ...], rank: tuple[int, ...]) -> Operation:
        oid = op.get("operationId")
        if not isinstance(oid, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", oid):
            raise self.fail(ptr, "every operation needs an operationId (letters, digits, "
                                 "_ . -): rules and tools name operations by it")
        params = {**shared, **self.parameters(op.get("parameters"), pointer(ptr, "parameters"))}
        declared = {n for n, where in params if where == "path"}
        if declared != set(names):
            missing, extra = set(names) - declared, declared - set(names)
            why = [f"not declared: {', '.join(sorted(missing))}"] if missing else []
            why += [f"not in {template}: {', '.join(sorted(extra))}"] if extra else []
            raise self.fail(ptr, "path parameters must match the template: " + "; ".join(why))
        body = self.body(op["requestBody"], pointer(ptr, "requestBody")) \
            if "requestBody" in op else None
        if body is not None and body.flat:
            schema = body.argument_schema
            clash = set(schema.shape.properties) if schema else set()
            if clash & {p.name for p in params.values()}:
                body = Body(body.required, body.media, body.schemas, flat=False)
        if body is not None and not body.flat and "body" in {p.name for p in params.values()}:
            raise self.fail(ptr, "a parameter named 'body' clashes with the request body, "
                                 "which tool-call arguments carry as 'body'")
        effect = self.effects.get(oid, effect_of_method(method))
        return Operation(self.name, oid, method.upper(), template, tuple(params.values()), body,
                         effect, ptr, pattern, names, rank)

    def body(self, raw: Json, ptr: str) -> Body:
        node, at = self.deref(raw, ptr)
        if not isinstance(node, dict) or not isinstance(node.get("content"), dict) \
                or not node["content"]:
            raise self.fail(at, "a requestBody needs a non-empty 'content' mapping")
        schemas: dict[str, Schema] = {}
        for media, entry in node["content"].items():
            if not isinstance(entry, dict):
                raise self.fail(pointer(at, "content", media), "a media type must be a mapping")
            if (is_json(media) or media.lower() == FORM) and "schema" in entry:
                schemas[media.lower()] = self.schema(pointer(at, "content", media, "schema"))
        media = tuple(m.lower() for m in node["content"])
        first = next((s for m, s in schemas.items() if is_json(m)), None) \
            or next(iter(schemas.values()), None)
        # An object body with declared properties is spread into the arguments (what
        # tool definitions made from a spec look like); anything else is `body`.
        flat = first is not None and set(first.shape.types) <= {"object"} \
            and bool(first.shape.properties)
        return Body(bool(node.get("required", False)), media, schemas, flat)


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


def compile_spec(doc: object, *, name: str, file: str,
                 effects: Mapping[str, Effect] | None = None) -> Spec:
    """A parsed OpenAPI document (mapping) into a `Spec`; `ConfigError` on anything wrong.

    `effects` overrides read/write per operationId (a POST that only searches); the
    caller checks that it names operations of the spec."""
    if not isinstance(doc, dict):
        raise ConfigError("an OpenAPI spec must be a mapping", file=file, line=1)
    return _Compiler(doc, name, file, effects or {}).compile()

