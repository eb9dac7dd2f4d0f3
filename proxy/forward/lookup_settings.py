"""`cloud.lookups`: facts tether fetches itself before judging a cloud call.

```yaml
cloud:
  lookups:
    aws:
      tags: true        # EC2: look up the tags of the resources a call names (default false)
      timeout: 5s       # per lookup; a lookup that fails or times out denies the call
    azure:
      tags: true        # ARM writes: look up the tags of the resource a call names
      scopes: [resource, resource_group]   # also its resource group's (and subscription)
      apis: ["azure.Microsoft.Compute/*"]  # which writes (default: every ARM write)
      endpoint: https://management.azure.com
      credential: default                  # or environment | workload_identity | managed_identity
      timeout: 5s
```

A call like `DeleteVolume` carries only `VolumeId`, while the policy that
matters ("never delete production volumes") is about the volume's tags. With
`tags: true` the forward proxy asks EC2 (`DescribeTags`, signed with tether's
own AWS credentials) before judging, and rules see the answer as `args.Tags`.
Off by default: it costs a round trip and needs `ec2:DescribeTags` for
tether's role. Azure (lookups_azure.py) asks ARM's Tags API with tether's own
Entra ID identity (`Microsoft.Resources/tags/read`), Google Cloud
(lookup_settings_gcp.py, lookups_gcp.py) the resource's labels. Compiled once at load;
errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config_tables import LOOKUPS, LOOKUPS_AWS, LOOKUPS_AZURE
from ..errors import ConfigError
from ..policy.rules import parse_duration
from ..policy.source import YMap
from .lookup_settings_gcp import GcpLookupSettings, parse_gcp

KEYS = LOOKUPS.names  # documented in config_tables.py
AWS_KEYS = LOOKUPS_AWS.names
AZURE_KEYS = LOOKUPS_AZURE.names
DEFAULT_TIMEOUT_S = 5.0
AZURE_SCOPES = ("resource", "resource_group", "subscription")
AZURE_CREDENTIALS = ("default", "environment", "workload_identity", "managed_identity")
ARM_ENDPOINT = "https://management.azure.com"


@dataclass(frozen=True, slots=True)
class AzureLookupSettings:
    tags: bool = False
    scopes: tuple[str, ...] = ("resource",)
    apis: tuple[str, ...] = ("azure.*",)
    endpoint: str = ARM_ENDPOINT
    credential: str = "default"
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class LookupSettings:
    aws_tags: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S   # AWS's
    azure: AzureLookupSettings | None = None
    gcp: GcpLookupSettings | None = None


def _map(node: object, parent: YMap, key: str, label: str) -> YMap:
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of(key), key=label)
    return node


def _keys(node: YMap, allowed: frozenset[str], label: str) -> None:
    for key in node:
        if key not in allowed:
            raise ConfigError(f"unknown key (expected one of {', '.join(sorted(allowed))})",
                              file=node.file, line=node.line_of(key), key=f"{label}.{key}")


def _flag(node: YMap, key: str, label: str) -> bool:
    value = node.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError("must be true or false", file=node.file, line=node.line_of(key),
                          key=f"{label}.{key}")
    return value


def _timeout(node: YMap, label: str) -> float:
    if "timeout" not in node:
        return DEFAULT_TIMEOUT_S
    return parse_duration(node.get("timeout"), lambda m: ConfigError(
        m, file=node.file, line=node.line_of("timeout"), key=f"{label}.timeout"))


def parse_lookups(cloud: object) -> LookupSettings:
    """`cloud`: the whole `cloud:` node (parse_cloud checks its shape and other keys)."""
    if not isinstance(cloud, YMap) or cloud.get("lookups") is None:
        return LookupSettings()
    lookups = _map(cloud.get("lookups"), cloud, "lookups", "cloud.lookups")
    _keys(lookups, KEYS, "cloud.lookups")
    azure = parse_azure(lookups.get("azure"), lookups) if lookups.get("azure") is not None else None
    gcp = parse_gcp(lookups.get("gcp"), lookups) if lookups.get("gcp") is not None else None
    if lookups.get("aws") is None:
        return LookupSettings(azure=azure, gcp=gcp)
    aws = _map(lookups.get("aws"), lookups, "aws", "cloud.lookups.aws")
    _keys(aws, AWS_KEYS, "cloud.lookups.aws")
    return LookupSettings(aws_tags=_flag(aws, "tags", "cloud.lookups.aws"),
                          timeout_s=_timeout(aws, "cloud.lookups.aws"), azure=azure, gcp=gcp)


def parse_azure(node: object, parent: YMap) -> AzureLookupSettings:
    label = "cloud.lookups.azure"
    azure = _map(node, parent, "azure", label)
    _keys(azure, AZURE_KEYS, label)

    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(message, file=azure.file, line=azure.line_of(key), key=f"{label}.{key}")

    scopes = azure.get("scopes", ["resource"])
    if (not isinstance(scopes, list) or not scopes
            or not all(isinstance(s, str) and s in AZURE_SCOPES for s in scopes)):
        raise bad("scopes", f"must be a list of {', '.join(AZURE_SCOPES)}")
    endpoint = azure.get("endpoint", ARM_ENDPOINT)
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if (parts is None or parts.scheme != "https" or not parts.hostname
            or parts.path.strip("/") or parts.query or parts.username):
        raise bad("endpoint", "must be an https:// URL with a host and nothing after it "
                  "(like https://management.azure.com)")
    apis = azure.get("apis", ["azure.*"])
    if (not isinstance(apis, list) or not apis
            or not all(isinstance(a, str) and a.strip() for a in apis)):
        raise bad("apis", "must be a list of operation names or globs (azure.Microsoft.Compute/*)")
    credential = azure.get("credential", "default")
    if credential not in AZURE_CREDENTIALS:
        raise bad("credential", f"must be one of {', '.join(AZURE_CREDENTIALS)}")
    return AzureLookupSettings(tags=_flag(azure, "tags", label),
                               scopes=tuple(dict.fromkeys(scopes)), apis=tuple(apis),
                               endpoint=str(endpoint).rstrip("/"), credential=str(credential),
                               timeout_s=_timeout(azure, label))
