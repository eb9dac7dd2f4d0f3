"""The `apis:` section: tool APIs governed by OpenAPI allow-lists, and LLM tools
linked to their operations.

    apis:
      jira:
        url: https://jira.example.com      # TETHER_UPSTREAM_JIRA overrides it; may hold a base path
        spec: openapi/jira.yaml            # relative to the config file; YAML or JSON
        api_key_env: JIRA_TOKEN            # sent upstream as Authorization: Bearer <value>
        effects: {searchIssues: read}      # read/write per operationId, over the method's
    tools:
      create_issue: {api: jira.createIssue}   # its arguments are checked against the operation

Rules name operations as `api: jira.createIssue`; a rule naming an operation
of a configured API that its spec does not have is an error here, not a rule
that silently never matches. The files are read by the caller (`read`), so
this module stays free of I/O.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..config_tables import API
from ..errors import ConfigError
from ..model import Effect
from .names import normalize
from .openapi import compile_spec
from .openapi_model import Operation, Spec
from .rules import Rule
from .source import YMap, load_yaml

API_KEYS = API.names  # documented in config_tables.py
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

Reader = Callable[[Path], str]


@dataclass(frozen=True, slots=True)
class ToolApi:
    name: str
    url: str                       # base URL, no trailing slash
    spec: Spec
    api_key_env: str | None = None
    hosts: tuple[str, ...] = ()    # anchored globs: the forward proxy judges these hosts

    def serves(self, host: str) -> bool:
        """Whether a forward-proxied request to `host` is this API's (see `hosts`)."""
        name = host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.hosts)

    def names(self, host: str) -> bool:
        """Whether `hosts` names `host` exactly, not by a glob. Only such a host may lead
        to a private address without `forward.allow_private`: the operator wrote that
        name, while the names a glob covers resolve where someone else decides."""
        name = host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        return any("*" not in pattern and pattern == name for pattern in self.hosts)

    @property
    def provider(self) -> str:
        """The provider name in audit records and metrics."""
        return f"api:{self.name}"

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")


@dataclass(frozen=True, slots=True)
class ToolLink:
    """`tools: {NAME: {api: jira.createIssue}}`, where it was written."""

    tool: str
    ref: str
    file: str | None
    line: int


@dataclass(frozen=True, slots=True)
class Apis:
    apis: Mapping[str, ToolApi] = field(default_factory=dict)
    tools: Mapping[str, Operation] = field(default_factory=dict)   # normalised tool name
    texts: tuple[str, ...] = ()    # the spec files' text, for the policy revision

    def get(self, name: str) -> ToolApi | None:
        return self.apis.get(name)

    def for_tool(self, name: str) -> Operation | None:
        return self.tools.get(normalize(name)) if self.tools else None

    def operation(self, ref: str) -> Operation | None:
        api, _, oid = ref.partition(".")
        found = self.apis.get(api)
        return found.spec.operation(oid) if found else None

    @property
    def effects(self) -> dict[str, Effect]:
        """Linked tools take their operation's effect (unless `tools` declares one)."""
        return {name: op.effect for name, op in self.tools.items()}


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def parse_apis(doc: YMap, base: Path, env: Mapping[str, str], read: Reader,
               links: Sequence[ToolLink] = (), rules: Sequence[Rule] = ()) -> Apis:
    node = doc.get("apis")
    if node is None:
        node = YMap()
        node.line, node.key_lines, node.file = doc.line_of("apis"), {}, doc.file
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping of API names to {url, spec}", file=doc.file,
                          line=doc.line_of("apis"), key="apis")
    apis: dict[str, ToolApi] = {}
    texts: list[str] = []
    for name, spec in node.items():
        where = f"apis.{name}"
        if not _NAME.fullmatch(name):
            raise _err("an API name is letters, digits, _ and - (rules write it before a "
                       "'.', as in jira.createIssue)", node, name, "apis")
        if not isinstance(spec, YMap):
            raise _err("must be a mapping with url and spec", node, name, "apis")
        for key in spec:
            if key not in API_KEYS:
                raise _err(f"unknown key (expected one of {', '.join(sorted(API_KEYS))})",
                           spec, key, where)
        url = spec.get("url")
        if not isinstance(url, str):
            raise _err("url is required", spec, "url", where)
        url = (env.get(f"TETHER_UPSTREAM_{name.upper().replace('-', '_')}") or url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise _err(f"{url!r} is not an http(s) base URL", spec, "url", where)
        key_env = spec.get("api_key_env")
        if key_env is not None and not isinstance(key_env, str):
            raise _err("names an environment variable", spec, "api_key_env", where)
        file = spec.get("spec")
        if not isinstance(file, str) or not file:
            raise _err("spec names the OpenAPI file (YAML or JSON)", spec, "spec", where)
        path = base / file
        text = read(path)
        texts.append(text)
        effects = _effects(spec, where)
        compiled = compile_spec(_parse(text, str(path)), name=name, file=str(path),
                                effects=effects)
        unknown = sorted(set(effects) - {op.operation_id for op in compiled.operations})
        if unknown:
            raise _err(f"names operations the spec does not have: {', '.join(unknown)}", spec,
                       "effects", where)
        apis[name] = ToolApi(name, url, compiled, key_env, _hosts(spec, where, url))
    found = Apis(apis, texts=tuple(texts))
    tools = {link.tool: _link(found, link) for link in links}
    for rule in rules:
        _check_rule(found, rule)
    return Apis(apis, tools, tuple(texts))


def _parse(text: str, file: str) -> object:
    """JSON specs with the JSON parser (large vendor specs load fast), the rest as YAML;
    duplicate keys are an error either way."""
    if not file.lower().endswith(".json"):
        return load_yaml(text, file)

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"invalid JSON: {e}", file=file) from None


def _hosts(spec: YMap, where: str, url: str) -> tuple[str, ...]:
    """`hosts: [jira.example.com, "*.atlassian.net"]`: anchored, case-insensitive globs
    (`*` matches any run of characters, dots included, never a whole name); default: the url's host."""
    node = spec.get("hosts")
    if node is None:
        return ((urlsplit(url).hostname or "").lower(),)
    if not isinstance(node, list) or not node or not all(isinstance(h, str) and h.strip()
                                                          for h in node):
        raise _err("must be a list of host names or globs", spec, "hosts", where)
    out: list[str] = []
    for entry in node:
        host = str(entry).strip().lower().rstrip(".")
        if host.strip("*.") == "" or "[" in host or "?" in host or "/" in host or ":" in host:
            raise _err(f"{entry!r} is not a host name or glob (like \"*.atlassian.net\")",
                       spec, "hosts", where)
        out.append(host)
    return tuple(out)


def _effects(spec: YMap, where: str) -> dict[str, Effect]:
    node = spec.get("effects", {})
    if not isinstance(node, dict):
        raise _err("maps operationIds to read or write", spec, "effects", where)
    out: dict[str, Effect] = {}
    for oid, value in node.items():
        try:
            out[oid] = Effect(value)
        except ValueError:
            raise _err(f"{oid}: must be read or write", spec, "effects", where) from None
    return out


def _known(apis: Apis, api: str) -> str:
    found = apis.get(api)
    ops = ", ".join(op.operation_id for op in found.spec.operations) if found else ""
    return f"{api} has: {ops}" if found else \
        f"configured APIs: {', '.join(apis.apis) or 'none'}"


def _link(apis: Apis, link: ToolLink) -> Operation:
    op = apis.operation(link.ref)
    if op is None:
        api = link.ref.partition(".")[0]
        raise ConfigError(f"no operation {link.ref!r} ({_known(apis, api)})", file=link.file,
                          line=link.line, key=f"tools.{link.tool}.api")
    return op


def _check_rule(apis: Apis, rule: Rule) -> None:
    """A rule naming an operation of a configured API must name a real one. Names
    whose prefix is no configured API (cloud catalogs, other front ends) pass."""
    for name in rule.api or ():
        if any(c in name for c in "*?["):
            continue  # a glob names a family of operations, not one
        api, _, oid = name.partition(".")
        if apis.get(api) is not None and apis.operation(name) is None:
            raise ConfigError(f"no operation {oid!r} in the {api} API ({_known(apis, api)})",
                              file=rule.file, line=rule.line, rule_id=rule.id, key="match.api")
