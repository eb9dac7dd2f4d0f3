"""The `upstreams:` section: where each provider's requests go and how tether
authenticates there. TETHER_UPSTREAM_<NAME> overrides a URL (tests, air gaps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config_nodes import as_map, check_keys, err
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


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    api_key_env: str | None = None
    region: str | None = None  # AWS region for SigV4 (bedrock); from the URL when absent
    ca_file: str | None = None  # an extra CA to trust for this upstream's TLS (private gateways)


def parse_upstreams(doc: YMap, env: Mapping[str, str], base: Path) -> dict[str, Upstream]:
    node = as_map(doc.get("upstreams"), doc, "upstreams")
    specs: dict[str, tuple[str, str | None, str | None]] = {
        k: (v, None, None) for k, v in DEFAULT_UPSTREAMS.items()}
    ca_files: dict[str, str] = {}
    for name, spec in node.items():
        spec = as_map(spec, node, name)
        check_keys(spec, {"url", "api_key_env", "region", "ca_file"}, f"upstreams.{name}")
        if "ca_file" in spec:
            ca = spec["ca_file"]
            if not isinstance(ca, str) or not ca:
                raise err("ca_file is a path to a PEM file", spec, "ca_file", f"upstreams.{name}")
            path = Path(ca) if Path(ca).is_absolute() else base / ca
            if not path.is_file():
                raise err(f"no such file: {path}", spec, "ca_file", f"upstreams.{name}")
            ca_files[name] = str(path)
        url, key_env, region = spec.get("url"), spec.get("api_key_env"), spec.get("region")
        if not isinstance(url, str):
            raise err("url is required", spec, "url")
        if key_env is not None and not isinstance(key_env, str):
            raise err("api_key_env names an environment variable", spec, "api_key_env")
        if region is not None and not isinstance(region, str):
            raise err("region is an AWS region name", spec, "region")
        specs[name] = (url, key_env, region)
    for name in KNOWN_UPSTREAMS - specs.keys():
        override = env.get(f"TETHER_UPSTREAM_{name.upper()}")
        if override:
            specs[name] = (override, None, None)
    out: dict[str, Upstream] = {}
    for name, (url, key_env, region) in specs.items():
        override = env.get(f"TETHER_UPSTREAM_{name.upper()}")
        url = (override or url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise err(f"upstream {name}: {url!r} is not an http(s) URL", node, name)
        out[name] = Upstream(name, url, key_env, region, ca_files.get(name))
    return out
