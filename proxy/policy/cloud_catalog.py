"""The cloud catalog: what tether knows about cloud APIs that have no usable spec.

Loaded once from `cloud_catalog.yaml` (package data) and compiled; a config may
lay its own effect overrides on top (`with_overrides`). Three things live here:

* **Effects.** An operation is a read when its verb (the first word of
  `DescribeVolumes`, `getIamPolicy`; for `BatchGetItem` the word after Batch)
  is a read verb, a write when it is a write verb, and a write when the verb is
  unknown (fail closed). Azure operations are judged by method instead (GET and
  HEAD read, anything else write), as ARM names them by method. Overrides,
  api-glob -> effect, come first: the config's, then the catalog's own (the
  read-looking operations that hand out secrets). Within one layer an exact
  name beats globs, and among matching globs a write beats a read.
* **REST tables** for AWS services whose operation shows only in method + path
  (S3, Lambda, ...), generated from botocore's models (the test suite checks
  them against the installed botocore).
* **Host data**: AWS endpoint aliases and customer-content domains, ARM hosts,
  GCP collection aliases and path verbs, ARM's canonical spellings.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources

from ..errors import ConfigError
from ..model import Effect
from .cloud_common import METHODS, CloudOperation, Draft
from .source import load_yaml

CATALOG_FILE = "cloud_catalog.yaml"
_VERB = re.compile(r"[A-Za-z][a-z]*")
_TEMPLATE_VAR = re.compile(r"\{([A-Za-z0-9_]+)(\+?)\}")


@dataclass(frozen=True, slots=True)
class Override:
    pattern: str
    effect: Effect
    why: str = ""
    when: Mapping[str, object] = field(default_factory=dict)
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(fnmatch.translate(self.pattern.casefold())))

    @property
    def exact(self) -> bool:
        return not any(c in self.pattern for c in "*?[")

    def applies(self, api: str, arguments: Mapping[str, object]) -> bool:
        if not self.regex.fullmatch(api.casefold()):
            return False
        # Any spelling of the argument counts: {"WithDecryption": true, "withDecryption": false}
        # must not read as "no decryption" when the cloud reads the first.
        return all(any(k.casefold() == key.casefold() and _same(v, want) for k, v in arguments.items())
                   for key, want in self.when.items())


def _same(got: object, want: object) -> bool:
    if isinstance(want, bool) and isinstance(got, str):
        return got.strip().lower() == str(want).lower()
    return got == want


@dataclass(frozen=True, slots=True)
class RestOp:
    """One REST operation: method, path template, and what tells it from its neighbours."""

    name: str
    method: str
    path: tuple[str, ...]            # literal segment, "{Name}" or "{Name+}" (last only)
    markers: Mapping[str, str | None]  # query keys in the URI; None: any value
    required_query: frozenset[str] = frozenset()
    required_headers: frozenset[str] = frozenset()
    payload: str | None = None

    @property
    def specificity(self) -> tuple[int, int]:
        literal = sum(1 for s in self.path if not s.startswith("{"))
        return literal, len(self.markers) + len(self.required_query) + len(self.required_headers)


@dataclass(frozen=True, slots=True)
class RestService:
    protocol: str                    # rest-json | rest-xml
    ops: tuple[RestOp, ...]
    markers: frozenset[str]          # every query key some operation's URI names


@dataclass(frozen=True, slots=True)
class CloudCatalog:
    read_verbs: frozenset[str]
    write_verbs: frozenset[str]
    builtin: tuple[Override, ...] = ()
    config: tuple[Override, ...] = ()
    aws_aliases: Mapping[str, str] = field(default_factory=dict)
    aws_customer: frozenset[str] = frozenset()
    aws_rest: Mapping[str, RestService] = field(default_factory=dict)
    azure_hosts: frozenset[str] = frozenset()
    azure_spellings: Mapping[str, str] = field(default_factory=dict)
    gcp_aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    gcp_path_verbs: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def with_overrides(self, overrides: Mapping[str, Effect | str]) -> CloudCatalog:
        """A copy with the config's api-glob -> effect overrides, which beat the catalog's."""
        compiled: list[Override] = []
        for pattern, effect in overrides.items():
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError("an override needs an api name or glob", key="cloud.overrides")
            compiled.append(Override(pattern.strip(), _effect(effect, f"cloud.overrides.{pattern}"),
                                     why="config"))
        return replace(self, config=tuple(compiled))

    def judge(self, draft: Draft) -> CloudOperation:
        effect, reason = self.effect(draft)
        return CloudOperation(cloud=draft.cloud, service=draft.service, operation=draft.operation,
                              effect=effect, api=draft.api, arguments=draft.arguments,
                              region=draft.region, effect_reason=reason)

    def effect(self, draft: Draft) -> tuple[Effect, str]:
        for layer, source in ((self.config, "config"), (self.builtin, "catalog")):
            hit = _pick(layer, draft.api, draft.arguments)
            if hit is not None:
                why = f": {hit.why}" if hit.why and source == "catalog" else ""
                return hit.effect, f"{source} override {hit.pattern}{why}"
        if draft.verb is None:
            if draft.method in ("GET", "HEAD"):
                return Effect.READ, f"method {draft.method}"
            return Effect.WRITE, f"method {draft.method}"
        verb = verb_of(draft.verb)
        if verb.casefold() in self.read_verbs:
            return Effect.READ, f"read verb {verb}"
        if verb.casefold() in self.write_verbs:
            return Effect.WRITE, f"write verb {verb}"
        return Effect.WRITE, f"unknown verb {verb or draft.verb!r}, counted as a write"


def verb_of(operation: str) -> str:
    """`DescribeVolumes` -> Describe, `getIamPolicy` -> get, `BatchGetItem` -> Get."""
    m = _VERB.match(operation)
    if m is None:
        return ""
    if m.group() == "Batch":
        rest = _VERB.match(operation, m.end())
        return rest.group() if rest else ""
    return m.group()


def _pick(layer: tuple[Override, ...], api: str, arguments: Mapping[str, object]) -> Override | None:
    hits = [o for o in layer if o.applies(api, arguments)]
    pool = [o for o in hits if o.exact] or hits
    return next((o for o in pool if o.effect is Effect.WRITE), pool[0] if pool else None)


def _effect(value: object, key: str, file: str | None = None) -> Effect:
    if isinstance(value, Effect):
        return value
    if isinstance(value, str) and value.strip().lower() in ("read", "write"):
        return Effect(value.strip().lower())
    raise ConfigError(f"effect must be read or write, not {value!r}", file=file, key=key)


def compile_rest_op(name: str, method: str, uri: str, query: list[str], headers: list[str],
                    payload: str | None) -> RestOp:
    path_text, _, query_text = uri.partition("?")
    if method not in METHODS or not path_text.startswith("/"):
        raise ValueError(f"{name}: bad method or URI {method} {uri}")
    path = tuple(s for s in path_text[1:].split("/") if s)
    for i, segment in enumerate(path):
        var = _TEMPLATE_VAR.fullmatch(segment)
        if "{" in segment and var is None:
            raise ValueError(f"{name}: only whole-segment labels are supported in {uri}")
        if var is not None and var.group(2) and i != len(path) - 1:
            raise ValueError(f"{name}: a greedy label must come last in {uri}")
    markers: dict[str, str | None] = {}
    for piece in filter(None, query_text.split("&")):
        key, eq, value = piece.partition("=")
        markers[key] = value if eq else None
    return RestOp(name, method, path, markers, frozenset(query), frozenset(h.lower() for h in headers),
                  payload)


def _rest(data: object, file: str | None) -> dict[str, RestService]:
    out: dict[str, RestService] = {}
    for service, entry in _mapping(data, "aws.rest", file).items():
        table = _mapping(entry, f"aws.rest.{service}", file)
        protocol = table.get("protocol")
        if protocol not in ("rest-json", "rest-xml"):
            raise ConfigError("protocol must be rest-json or rest-xml", file=file,
                              key=f"aws.rest.{service}.protocol")
        ops: list[RestOp] = []
        seen: dict[tuple[object, ...], str] = {}
        operations = _mapping(table.get("operations"), f"aws.rest.{service}.operations", file)
        for name, spec in operations.items():
            where = f"aws.rest.{service}.{name}"
            s = _mapping(spec, where, file)
            try:
                op = compile_rest_op(name, str(s.get("method")), str(s.get("uri")),
                                     _strings(s.get("query", []), f"{where}.query", file),
                                     _strings(s.get("headers", []), f"{where}.headers", file),
                                     str(s["payload"]) if s.get("payload") else None)
            except ValueError as e:
                raise ConfigError(str(e), file=file, key=f"aws.rest.{service}.{name}") from e
            signature = (op.method, op.path, tuple(sorted(op.markers.items(), key=str)),
                         op.required_query, op.required_headers)
            if signature in seen:
                raise ConfigError(f"{name} cannot be told from {seen[signature]}", file=file,
                                  key=f"aws.rest.{service}.{name}")
            seen[signature] = name
            ops.append(op)
        markers = frozenset(k for op in ops for k in op.markers)
        out[service] = RestService(str(protocol), tuple(ops), markers)
    return out


def _mapping(value: object, key: str, file: str | None) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping", file=file, key=key)
    return value


def _strings(value: object, key: str, file: str | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("must be a list of strings", file=file, key=key)
    return list(value)


def load_catalog(text: str, file: str | None = None) -> CloudCatalog:
    """Compile catalog YAML (the built-in one, or a replacement a test supplies)."""
    root = _mapping(load_yaml(text, file), "<root>", file)
    verbs = _mapping(root.get("verbs"), "verbs", file)
    builtin: list[Override] = []
    entries = root.get("overrides") or []
    if not isinstance(entries, list):
        raise ConfigError("must be a list", file=file, key="overrides")
    for i, entry in enumerate(entries):
        e = _mapping(entry, f"overrides[{i}]", file)
        api = e.get("api")
        if not isinstance(api, str) or not api.strip():
            raise ConfigError("needs an api name or glob", file=file, key=f"overrides[{i}].api")
        builtin.append(Override(api.strip(), _effect(e.get("effect"), f"overrides[{i}]", file),
                                why=str(e.get("why", "")),
                                when=dict(_mapping(e.get("when") or {}, f"overrides[{i}].when", file))))
    aws = _mapping(root.get("aws"), "aws", file)
    azure = _mapping(root.get("azure"), "azure", file)
    gcp = _mapping(root.get("gcp"), "gcp", file)
    return CloudCatalog(
        read_verbs=frozenset(v.casefold() for v in _strings(verbs.get("read"), "verbs.read", file)),
        write_verbs=frozenset(v.casefold() for v in _strings(verbs.get("write"), "verbs.write", file)),
        builtin=tuple(builtin),
        aws_aliases={str(k): str(v) for k, v in _mapping(aws.get("aliases"), "aws.aliases", file).items()},
        aws_customer=frozenset(_strings(aws.get("customer_domains"), "aws.customer_domains", file)),
        aws_rest=_rest(aws.get("rest"), file),
        azure_hosts=frozenset(_strings(azure.get("hosts"), "azure.hosts", file)),
        azure_spellings={s.casefold(): s for s in _strings(azure.get("spellings"), "azure.spellings", file)},
        gcp_aliases={str(svc): {str(k): str(v) for k, v in _mapping(m, f"gcp.aliases.{svc}", file).items()}
                     for svc, m in _mapping(gcp.get("aliases"), "gcp.aliases", file).items()},
        gcp_path_verbs={str(svc): frozenset(_strings(v, f"gcp.path_verbs.{svc}", file))
                        for svc, v in _mapping(gcp.get("path_verbs"), "gcp.path_verbs", file).items()},
    )


@functools.cache
def builtin_catalog() -> CloudCatalog:
    """The catalog shipped with tether, read once (at load, not per request)."""
    text = resources.files("proxy.policy").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    return load_catalog(text, CATALOG_FILE)
