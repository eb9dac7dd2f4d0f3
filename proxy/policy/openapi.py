"""OpenAPI 3.0 / 3.1 specs compiled, once at load, into an allow-list of operations.

An operation is a method plus a path template (`/issue/{issueIdOrKey}`); each
`{param}` matches exactly one path segment, never a `/`. Templates are matched
against the *raw* (still percent-encoded, already canonical) path, so what is
judged is what the upstream receives. When several templates match, the more
literal one wins, segment by segment from the left (`/issue/picker` over
`/issue/{id}`), as the OpenAPI spec asks; two templates that differ only in
their parameter names are an error.

The document under the operations (version, `$ref`s, lines for errors, schemas)
is openapi_document.py. The caller parses the file (YAML or JSON) and hands over
the data: no I/O here. Requests are judged in openapi_judge.py, tool-call
arguments in openapi_arguments.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote

from ..errors import ConfigError
from ..model import Effect
from .openapi_document import SpecDocument
from .openapi_model import (
    FORM,
    Body,
    Json,
    Operation,
    Param,
    Schema,
    Spec,
    effect_of_method,
    is_json,
    pointer,
)
from .openapi_patterns import unevaluated_with_patterns

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
LOCATIONS = ("path", "query", "header", "cookie")
# Characters that may stand unescaped in a path segment (RFC 3986 pchar).
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"
_TEMPLATE_PARAM = re.compile(r"\{([^{}/]+)\}")
_STYLES = {"query": {"form", "spaceDelimited", "pipeDelimited"}, "path": {"simple"},
           "header": {"simple"}, "cookie": {"form"}}


class _Compiler(SpecDocument):
    def __init__(self, doc: Mapping[str, Json], name: str, file: str,
                 effects: Mapping[str, Effect]) -> None:
        super().__init__(doc, name, file)
        self.effects = effects

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


def compile_spec(doc: object, *, name: str, file: str,
                 effects: Mapping[str, Effect] | None = None) -> Spec:
    """A parsed OpenAPI document (mapping) into a `Spec`; `ConfigError` on anything wrong.

    `effects` overrides read/write per operationId (a POST that only searches); the
    caller checks that it names operations of the spec."""
    if not isinstance(doc, dict):
        raise ConfigError("an OpenAPI spec must be a mapping", file=file, line=1)
    return _Compiler(doc, name, file, effects or {}).compile()
