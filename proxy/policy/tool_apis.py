"""LLM tools carried out by API operations, and the arguments that bind the two.

    tools:
      delete_volume:
        api: aws.ec2.DeleteVolume          # a cloud operation, or an `apis:` one (jira.createIssue)
        args: {VolumeId: volume_id}        # API parameter <- tool argument (a dotted path)
    egress:
      require_decided_call: true           # a governed write no tool call asked for is denied
      decided_call_ttl: 10m                # how long an allowed or approved call may be redeemed

A tool linked to an operation of an `apis:` entry without `args` takes its arguments as
the operation's (openapi_arguments.py checks they fit), so the mapping is the identity.
A cloud operation is named as the egress plane names it (`aws.<service>.<Operation>`);
only AWS operations can be checked at load (against botocore's service models), so only
they are accepted: a name botocore does not know is a config error, not a link that
never matches.

`expected(link, arguments)` is what the API request must carry for the call to be
redeemed, `observed(operation, arguments)` what it did carry; `canonical_text` puts both
in one canonical form (see `canonical`), compared exactly: no type coercion, no Unicode
normalisation, no case folding.

Sans-IO at decision time; the botocore models are read at load only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..config_tables import EGRESS
from ..errors import ConfigError
from ..model import Effect
from .apis_config import Apis
from .cloud_catalog import CloudCatalog, builtin_catalog
from .cloud_common import Draft
from .names import normalize
from .rules import parse_duration
from .source import YMap

NO_DECIDED_CALL = "tether:no-decided-call"
DEFAULT_TTL_S = 600.0
_AWS_OP = re.compile(r"aws\.([a-z0-9-]{1,64})\.([A-Z][A-Za-z0-9]{0,127})")
_PARAM = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# The Query protocol's API version travels as a parameter on every request; it is the
# SDK's, not the tool call's. Dropped before comparing only when it looks like one.
_QUERY_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
MAX_SAFE_INT = 2 ** 53


class Uncomparable(ValueError):
    """A value that has no canonical form (NaN, infinity, a type JSON does not have)."""


@dataclass(frozen=True, slots=True)
class ToolApiLink:
    """One tool's link: `operation` as the egress plane names it; `args` pairs each API
    parameter with the tool argument's path (None: the tool's arguments are the API's)."""

    tool: str
    operation: str
    args: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    file: str | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class EgressSettings:
    require_decided_call: bool = False
    decided_call_ttl_s: float = DEFAULT_TTL_S


@dataclass(frozen=True, slots=True)
class ToolApis:
    links: Mapping[str, ToolApiLink] = field(default_factory=dict)   # normalised tool name
    settings: EgressSettings = field(default_factory=EgressSettings)
    effects: Mapping[str, Effect] = field(default_factory=dict)      # of AWS-linked tools

    def for_tool(self, name: str) -> ToolApiLink | None:
        return self.links.get(normalize(name)) if self.links else None

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(link.operation for link in self.links.values())


# ---------------------------------------------------------------- canonical values

def canonical(value: object) -> object:
    """`value` in the one form both planes are compared in: strings exactly as given
    (no normalisation), booleans apart from numbers, a number that is a whole number
    written as one (50 and 50.0 are one number, as in JSON), objects with sorted keys,
    lists in order. Raises Uncomparable for anything else."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Uncomparable("a number that is not finite")
        if value.is_integer() and abs(value) < MAX_SAFE_INT:
            return int(value)
        return value
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise Uncomparable("an object key that is not text")
            out[k] = canonical(v)
        return out
    raise Uncomparable(f"a value of type {type(value).__name__}")


def canonical_text(value: object) -> str:
    """The canonical form as ASCII JSON (lone surrogates escaped, never an encoding error)."""
    return json.dumps(canonical(value), sort_keys=True, ensure_ascii=True, separators=(",", ":"),
                      allow_nan=False)


def fingerprint(agent: str | None, operation: str, arguments_text: str) -> str:
    """The store key of one (agent, operation, arguments): a digest, so agent- and
    model-controlled text never becomes a key as written."""
    text = json.dumps([agent, operation, arguments_text], ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _walk(args: Mapping[str, object], path: tuple[str, ...]) -> tuple[bool, object]:
    node: object = args
    for segment in path:
        if not isinstance(node, Mapping) or segment not in node:
            return False, None
        node = node[segment]
    return True, node


def expected(link: ToolApiLink, arguments: Mapping[str, object]) -> dict[str, object]:
    """The API arguments a tool call with `arguments` stands for. A mapped tool argument
    the call does not have leaves its API parameter out (the request must not have it)."""
    if link.args is None:
        return dict(arguments)
    out: dict[str, object] = {}
    for param, path in link.args:
        present, value = _walk(arguments, path)
        if present:
            out[param] = value
    return out


def observed(operation: str, arguments: Mapping[str, object]) -> dict[str, object]:
    """The API request's arguments as compared: an AWS Query-protocol `Version`
    (the SDK's API version, like 2016-11-15) is left out."""
    out = dict(arguments)
    version = out.get("Version")
    if operation.startswith("aws.") and isinstance(version, str) \
            and _QUERY_VERSION.fullmatch(version):
        del out["Version"]
    return out


# ---------------------------------------------------------------- config

AwsCheck = Callable[[str, str], str | None]


def botocore_check(service: str, operation: str) -> str | None:
    """Why `aws.<service>.<operation>` names nothing botocore knows (None: it is known).
    Reads botocore's bundled models: called at config load only."""
    from botocore.exceptions import DataNotFoundError
    from botocore.loaders import Loader

    loader = Loader()
    try:
        model = loader.load_service_model(service, "service-2")
    except DataNotFoundError:
        return f"botocore knows no AWS service {service!r}"
    ops = model.get("operations", {})
    if operation not in ops:
        near = sorted(o for o in ops if o.lower() == operation.lower())
        hint = f" (did you mean {near[0]}?)" if near else ""
        return f"the AWS {service} service has no operation {operation!r}{hint}"
    return None


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def _args(spec: YMap, where: str) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    node = spec.get("args")
    if node is None:
        return None
    if not isinstance(node, Mapping) or not node:
        raise _err("maps API parameters to tool arguments, like {VolumeId: volume_id}", spec,
                   "args", where)
    out: list[tuple[str, tuple[str, ...]]] = []
    for param, source in node.items():
        if not isinstance(param, str) or not _PARAM.fullmatch(param):
            raise _err(f"{param!r} is not an API parameter name", spec, "args", where)
        if not isinstance(source, str) or not source or any(not p for p in source.split(".")):
            raise _err(f"{param}: names a tool argument (a dotted path like volume_id or "
                       f"target.id), not {source!r}", spec, "args", where)
        out.append((param, tuple(source.split("."))))
    return tuple(out)


def compile_links(specs: Iterable[tuple[str, YMap]], apis_ops: Callable[[str], bool],
                  api_names: Iterable[str], *, check: AwsCheck = botocore_check
                  ) -> dict[str, ToolApiLink]:
    """Each `tools:` entry with `api:`. `apis_ops(ref)`: whether `ref` is an operation of
    an `apis:` entry (that side is checked by apis_config); other references must be
    AWS operations botocore knows."""
    configured = set(api_names)
    links: dict[str, ToolApiLink] = {}
    for name, spec in specs:
        where = f"tools.{name}"
        ref = spec.get("api")
        if not isinstance(ref, str):
            continue  # apis_config reports it
        args = _args(spec, where)
        prefix = ref.partition(".")[0]
        if prefix in configured:
            if not apis_ops(ref):
                continue  # apis_config names the operations the API has
        else:
            m = _AWS_OP.fullmatch(ref)
            if m is None:
                raise _err(f"{ref!r} is neither an operation of a configured API (apis: "
                           f"{', '.join(sorted(configured)) or 'none'}) nor an AWS operation "
                           "named aws.<service>.<Operation> (like aws.ec2.DeleteVolume)",
                           spec, "api", where)
            problem = check(m.group(1), m.group(2))
            if problem is not None:
                raise _err(f"{ref!r}: {problem}", spec, "api", where)
        links[normalize(name)] = ToolApiLink(normalize(name), ref, args, spec.file,
                                             spec.line_of("api"))
    return links


def cloud_effects(links: Mapping[str, ToolApiLink], catalog: CloudCatalog) -> dict[str, Effect]:
    """AWS-linked tools take their operation's effect as the egress plane judges it (the
    catalog's verb rule and overrides), unless `tools` declares one."""
    out: dict[str, Effect] = {}
    for name, link in links.items():
        m = _AWS_OP.fullmatch(link.operation)
        if m is not None:
            draft = Draft("aws", m.group(1), m.group(2), link.operation, m.group(2), "POST", {},
                          None)
            out[name] = catalog.effect(draft)[0]
    return out


def is_cloud_ref(ref: str, api_names: Iterable[str]) -> bool:
    """A `tools.X.api` that names a cloud operation, not an `apis:` entry's."""
    return ref.partition(".")[0] not in set(api_names) and ref.startswith("aws.")


def parse_egress(node: object, parent: YMap) -> EgressSettings:
    if node is None:
        return EgressSettings()
    if not isinstance(node, YMap):
        raise _err("must be a mapping", parent, "egress", "egress")
    for key in node:
        if key not in EGRESS.names:
            raise _err(f"unknown key (expected one of {EGRESS.expected()})",
                       node, key, "egress")
    require = node.get("require_decided_call", False)
    if not isinstance(require, bool):
        raise _err("must be true or false", node, "require_decided_call", "egress")
    ttl = DEFAULT_TTL_S
    if "decided_call_ttl" in node:
        ttl = parse_duration(node["decided_call_ttl"],
                             lambda m: _err(m, node, "decided_call_ttl", "egress"))
    return EgressSettings(require, ttl)


def parse_tool_apis(doc: YMap, specs: Iterable[tuple[str, YMap]], apis: Apis,
                    catalog: CloudCatalog | None, *, check: AwsCheck = botocore_check
                    ) -> ToolApis:
    """The links of every `tools:` entry with `api:` (after `apis:` was parsed), and the
    `egress:` section."""
    links = compile_links(specs, lambda ref: apis.operation(ref) is not None, apis.apis,
                          check=check)
    return ToolApis(links, parse_egress(doc.get("egress"), doc),
                    cloud_effects(links, catalog or builtin_catalog()))
