"""`cloud.lookups`: facts tether fetches itself before judging a cloud call.

```yaml
cloud:
  lookups:
    aws:
      tags: true        # EC2: look up the tags of the resources a call names (default false)
      timeout: 5s       # per lookup; a lookup that fails or times out denies the call
```

A call like `DeleteVolume` carries only `VolumeId`, while the policy that
matters ("never delete production volumes") is about the volume's tags. With
`tags: true` the forward proxy asks EC2 (`DescribeTags`, signed with tether's
own AWS credentials) before judging, and rules see the answer as `args.Tags`.
Off by default: it costs a round trip and needs `ec2:DescribeTags` for
tether's role. Compiled once at load; errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config_tables import LOOKUPS, LOOKUPS_AWS
from ..errors import ConfigError
from ..policy.rules import parse_duration
from ..policy.source import YMap

KEYS = LOOKUPS.names  # documented in config_tables.py
AWS_KEYS = LOOKUPS_AWS.names
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class LookupSettings:
    aws_tags: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


def _map(node: object, parent: YMap, key: str, label: str) -> YMap:
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of(key), key=label)
    return node


def _keys(node: YMap, allowed: frozenset[str], label: str) -> None:
    for key in node:
        if key not in allowed:
            raise ConfigError(f"unknown key (expected one of {', '.join(sorted(allowed))})",
                              file=node.file, line=node.line_of(key), key=f"{label}.{key}")


def parse_lookups(cloud: object) -> LookupSettings:
    """`cloud`: the whole `cloud:` node (parse_cloud checks its shape and other keys)."""
    if not isinstance(cloud, YMap) or cloud.get("lookups") is None:
        return LookupSettings()
    lookups = _map(cloud.get("lookups"), cloud, "lookups", "cloud.lookups")
    _keys(lookups, KEYS, "cloud.lookups")
    if lookups.get("aws") is None:
        return LookupSettings()
    aws = _map(lookups.get("aws"), lookups, "aws", "cloud.lookups.aws")
    _keys(aws, AWS_KEYS, "cloud.lookups.aws")
    tags = aws.get("tags", False)
    if not isinstance(tags, bool):
        raise ConfigError("must be true or false", file=aws.file, line=aws.line_of("tags"),
                          key="cloud.lookups.aws.tags")
    timeout = DEFAULT_TIMEOUT_S
    if "timeout" in aws:
        timeout = parse_duration(aws.get("timeout"), lambda m: ConfigError(
            m, file=aws.file, line=aws.line_of("timeout"), key="cloud.lookups.aws.timeout"))
    return LookupSettings(aws_tags=tags, timeout_s=timeout)
