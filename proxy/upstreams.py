"""The `upstreams:` section: where each provider's requests go and how tether
authenticates there. TETHER_UPSTREAM_<NAME> overrides a URL (tests, air gaps).

Keys are only *named* here (an environment variable, a file such as a mounted
Kubernetes Secret); they are read per request by upstream_auth/keys.py, so a
rotated key takes effect without a restart and no key ever sits in the config,
its repr, or an error message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from .config_nodes import as_map, check_keys, err
from .config_tables_run import UPSTREAM
from .policy.source import YMap

# Every provider's upstream, by name. Azure has no default: its URL names the
# customer's resource, so the azure routes answer 404 until one is configured.
DEFAULT_UPSTREAMS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "bedrock": "https://bedrock-runtime.us-east-1.amazonaws.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
KNOWN_UPSTREAMS = {*DEFAULT_UPSTREAMS, "azure"}
KEYS = UPSTREAM.names  # documented in config_tables_run.py
AGENT_CREDENTIALS = ("strip", "pass")


class BatchMode(enum.Enum):
    """How a provider's batch API is met (`upstreams.NAME.batches`; docs/hardening.md).
    A batch runs at the provider and its output file is not read, so neither mode lets
    a batch that declares tools through."""

    REFUSE = "refuse"              # every batch endpoint and batch input upload: 501
    REFUSE_TOOLS = "refuse_tools"  # a batch, or its input upload, declaring tools: 501


# The providers whose batch APIs tether reads; Gemini's and Bedrock's are always refused.
BATCH_UPSTREAMS = ("openai", "azure", "anthropic")


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    api_key_env: str | None = None
    region: str | None = None  # AWS region for SigV4 (bedrock); from the URL when absent
    ca_file: str | None = None  # an extra CA to trust for this upstream's TLS (private gateways)
    api_key_file: str | None = None  # a file holding the key (a mounted Secret), re-read on change
    # The agent's own credentials (Authorization, x-api-key ...) go upstream only when
    # True (`agent_credentials: pass`, for legacy scripts); tether's key still wins.
    pass_agent_credentials: bool = False
    aws_credentials_file: str | None = None  # bedrock: botocore's shared-credentials format
    aws_profile: str | None = None
    batches: BatchMode = BatchMode.REFUSE_TOOLS

    @property
    def has_key_source(self) -> bool:
        return bool(self.api_key_env or self.api_key_file)


def _path(spec: YMap, key: str, name: str, base: Path, what: str) -> str | None:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise err(f"{key} is a path to {what}", spec, key, f"upstreams.{name}")
    path = Path(value) if Path(value).is_absolute() else base / value
    # A Secret volume is mounted before the container starts, so a missing file is a
    # wrong path or mount: refused now, with its line, rather than a 503 per request.
    if not path.is_file():
        raise err(f"no such file: {path}", spec, key, f"upstreams.{name}")
    return str(path)


def _name(spec: YMap, key: str, what: str) -> str | None:
    value = spec.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise err(f"{key} {what}", spec, key)
    return value


def _parse_one(name: str, spec: YMap, base: Path) -> Upstream:
    where = f"upstreams.{name}"
    check_keys(spec, KEYS, where)
    url = spec.get("url")
    if not isinstance(url, str):
        raise err("url is required", spec, "url")
    key_env = _name(spec, "api_key_env", "names an environment variable")
    region = _name(spec, "region", "is an AWS region name")
    profile = _name(spec, "aws_profile", "names a profile of aws_credentials_file")
    key_file = _path(spec, "api_key_file", name, base, "a file holding the API key")
    if key_env and key_file:
        raise err("give api_key_env or api_key_file, not both", spec, "api_key_file", where)
    aws_file = _path(spec, "aws_credentials_file", name, base, "an AWS shared-credentials file")
    if (aws_file or profile) and name != "bedrock":
        raise err("AWS credentials sign Bedrock requests only", spec,
                  "aws_credentials_file" if aws_file else "aws_profile", where)
    mode = spec.get("agent_credentials", "strip")
    if mode not in AGENT_CREDENTIALS:
        raise err("must be strip (the default: the agent's own credentials never go "
                  "upstream) or pass", spec, "agent_credentials", where)
    return Upstream(name, url, key_env, region, _path(spec, "ca_file", name, base, "a PEM file"),
                    api_key_file=key_file, pass_agent_credentials=mode == "pass",
                    aws_credentials_file=aws_file, aws_profile=profile,
                    batches=_batches(name, spec, where))


def _batches(name: str, spec: YMap, where: str) -> BatchMode:
    value = spec.get("batches")
    if value is None:
        return BatchMode.REFUSE_TOOLS
    if name not in BATCH_UPSTREAMS:
        raise err(f"batches applies to {', '.join(BATCH_UPSTREAMS)}; the batch APIs of other "
                  "providers are always refused", spec, "batches", where)
    modes = {m.value: m for m in BatchMode}
    if not isinstance(value, str) or value not in modes:
        raise err("must be refuse_tools (the default: a batch that declares tools is refused) "
                  "or refuse (every batch is refused)", spec, "batches", where)
    return modes[value]


def parse_upstreams(doc: YMap, env: Mapping[str, str], base: Path) -> dict[str, Upstream]:
    node = as_map(doc.get("upstreams"), doc, "upstreams")
    specs = {k: Upstream(k, v) for k, v in DEFAULT_UPSTREAMS.items()}
    for name, spec in node.items():
        specs[name] = _parse_one(name, as_map(spec, node, name), base)
    for name in KNOWN_UPSTREAMS - specs.keys():
        override = env.get(f"TETHER_UPSTREAM_{name.upper()}")
        if override:
            specs[name] = Upstream(name, override)
    out: dict[str, Upstream] = {}
    for name, up in specs.items():
        override = env.get(f"TETHER_UPSTREAM_{name.upper()}")
        url = (override or up.url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise err(f"upstream {name}: {url!r} is not an http(s) URL", node, name)
        out[name] = replace(up, url=url)
    return out
