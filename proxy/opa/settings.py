"""The `opa:` config section, read and checked at load.

```yaml
opa:
  url: http://127.0.0.1:8181     # OPA's Data API; or instead:
  embedded: opa/                 # .rego files (+ optional data.json), evaluated in-process
  path: tether/decision          # POST {url}/v1/data/tether/decision with {"input": ...}
  timeout: 0.25                  # seconds, per query (remote and embedded alike)
  cache: {ttl: 5, size: 10000}   # verdicts by input hash; ttl: 0 turns the cache off
  token_env: OPA_TOKEN           # optional: sent as Authorization: Bearer (remote)
# TETHER_UPSTREAM_OPA overrides url (tests, air gaps), like the upstreams' overrides.
```

An embedded policy is read and compiled here, so a Rego syntax error is a
load-time error naming the file (`tether check` catches it). `*_test.rego`
files are not loaded for decisions (`tether opa-test` runs them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config_nodes import as_map, check_keys, err
from ..config_tables_run import OPA, OPA_CACHE
from ..errors import ConfigError
from ..policy.opa import check_path
from ..policy.source import YMap

KEYS = OPA.names  # documented in config_tables_run.py


@dataclass(frozen=True, slots=True)
class OpaSettings:
    path: str = "tether/decision"
    url: str | None = None
    modules: tuple[tuple[str, str], ...] = ()    # embedded: (file name, Rego text)
    data: str | None = None                      # embedded: data.json text
    timeout_s: float = 0.25
    cache_ttl_s: float = 5.0
    cache_size: int = 10000
    token_env: str | None = None
    source: str = ""                             # the embedded directory, for messages

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def texts(self) -> tuple[str, ...]:
        """What the policy revision hashes: an edited Rego file is a new revision."""
        return tuple(t for _, t in self.modules) + ((self.data,) if self.data else ())


def _number(node: YMap, key: str, default: float, *, zero_ok: bool) -> float:
    value = node.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0 or (
            value == 0 and not zero_ok):
        raise err("must be a positive number of seconds" if not zero_ok
                  else "must be a number of seconds, 0 or more", node, key, "opa")
    return float(value)


def read_policy_dir(directory: Path, *, tests: bool = False) -> tuple[tuple[tuple[str, str], ...],
                                                                     str | None]:
    """The .rego files of a directory (sorted, not recursive) and its data.json.
    `tests`: include `*_test.rego` (only `tether opa-test` does)."""
    modules = []
    for file in sorted(directory.glob("*.rego")):
        if file.name.endswith("_test.rego") and not tests:
            continue
        try:
            modules.append((file.name, file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read: {e}", file=str(file)) from e
    data_file = directory / "data.json"
    data = None
    if data_file.is_file():
        try:
            data = data_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read: {e}", file=str(data_file)) from e
    return tuple(modules), data


def parse_opa(node: object, doc: YMap, base: Path, env: Mapping[str, str]) -> OpaSettings | None:
    if node is None and "opa" not in doc:
        return None
    opa = as_map(node, doc, "opa")
    check_keys(opa, KEYS, "opa")
    url, embedded = opa.get("url"), opa.get("embedded")
    if (url is None) == (embedded is None):
        raise err("give exactly one of url (a remote OPA) or embedded (a directory of .rego "
                  "files)", doc, "opa")
    path = opa.get("path", "tether/decision")
    if not isinstance(path, str) or check_path(path.strip("/")):
        raise err(check_path(str(path).strip("/")) or "must be a path like tether/decision",
                  opa, "path", "opa")
    path = path.strip("/")
    timeout = _number(opa, "timeout", 0.25, zero_ok=False)
    cache = as_map(opa.get("cache"), opa, "cache")
    check_keys(cache, OPA_CACHE, "opa.cache")
    ttl = _number(cache, "ttl", 5.0, zero_ok=True)
    size = cache.get("size", 10000)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise err("must be a positive whole number", cache, "size", "opa.cache")
    token_env = opa.get("token_env")
    if token_env is not None and not isinstance(token_env, str):
        raise err("names an environment variable", opa, "token_env", "opa")
    if url is not None:
        if not isinstance(url, str):
            raise err("must be OPA's base URL, like http://127.0.0.1:8181", opa, "url", "opa")
        url = env.get("TETHER_UPSTREAM_OPA", url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise err(f"{url!r} is not an http(s) URL", opa, "url", "opa")
        return OpaSettings(path, url=url, timeout_s=timeout, cache_ttl_s=ttl, cache_size=size,
                           token_env=token_env)
    if not isinstance(embedded, str):
        raise err("must be a directory of .rego files", opa, "embedded", "opa")
    directory = Path(embedded) if Path(embedded).is_absolute() else base / embedded
    if not directory.is_dir():
        raise err(f"no such directory: {directory}", opa, "embedded", "opa")
    modules, data = read_policy_dir(directory)
    if not modules:
        raise err(f"{directory} holds no .rego file (other than *_test.rego)", opa, "embedded",
                  "opa")
    settings = OpaSettings(path, modules=modules, data=data, timeout_s=timeout, cache_ttl_s=ttl,
                           cache_size=size, token_env=token_env, source=str(directory))
    from .embedded import EmbeddedOpa, RegoLoadError

    try:
        EmbeddedOpa(settings.modules, settings.data, settings.path).close()
    except RegoLoadError as e:
        raise ConfigError(str(e), file=str(directory), line=None, key="opa.embedded") from e
    return settings
