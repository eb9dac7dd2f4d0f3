"""The `cloud:` config section: effect overrides over the built-in cloud catalog.

```yaml
cloud:
  effects:
    "aws.ec2.Describe*": read          # api globs, as rules write them
    "aws.lambda.Invoke": write
  lookups: {aws: {tags: true}}         # see proxy/forward/lookup_settings.py
```

Compiled once at load (the catalog is never read per request); errors name the
file and line.
"""

from __future__ import annotations

from ..config_tables import CLOUD
from ..errors import ConfigError
from ..model import Effect
from .cloud import CloudCatalog, builtin_catalog
from .source import YMap

KEYS = CLOUD.names  # lookups: parsed by proxy.forward.lookup_settings


def parse_cloud(node: object, parent: YMap) -> CloudCatalog:
    if node is None:
        return builtin_catalog()
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of("cloud"),
                          key="cloud")
    for key in node:
        if key not in KEYS:
            raise ConfigError(f"unknown key (expected one of {', '.join(sorted(KEYS))})",
                              file=node.file, line=node.line_of(key), key=f"cloud.{key}")
    effects = node.get("effects")
    if effects is None:  # only other keys (lookups)
        return builtin_catalog()
    if not isinstance(effects, YMap):
        raise ConfigError("maps api names or globs to read or write", file=node.file,
                          line=node.line_of("effects"), key="cloud.effects")
    overrides: dict[str, Effect] = {}
    for pattern, value in effects.items():
        try:
            overrides[str(pattern)] = Effect(value)
        except ValueError:
            raise ConfigError(f"{pattern}: must be read or write, not {value!r}",
                              file=effects.file, line=effects.line_of(pattern),
                              key=f"cloud.effects.{pattern}") from None
        if not str(pattern).strip():
            raise ConfigError("an override needs an api name or glob", file=effects.file,
                              line=effects.line_of(pattern), key="cloud.effects")
    return builtin_catalog().with_overrides(overrides)
