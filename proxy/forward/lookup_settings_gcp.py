"""`cloud.lookups.gcp`: the labels of Google Cloud resources, fetched by tether before it judges.

```yaml
cloud:
  lookups:
    gcp:
      labels: true      # writes on GCE disks, instances, snapshots, images, GKE clusters and
                        # Cloud Storage buckets: look up the resource's labels (default false)
      timeout: 5s       # per lookup, token included; one that fails or times out denies
      endpoints:        # where tether asks (defaults: the public googleapis.com hosts)
        compute: https://compute.googleapis.com
        storage: https://storage.googleapis.com
        container: https://container.googleapis.com
```

The endpoints are tether's own configuration, never the host the agent called
(`www.googleapis.com` and a private endpoint serve the same API): an agent cannot
point a lookup, and tether's token, elsewhere. They are `https://host[:port]` and
nothing more. Compiled once at load; errors name the file, line and key.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config_nodes import as_map, check_keys, err
from ..config_tables import LOOKUPS_GCP, LOOKUPS_GCP_ENDPOINTS
from ..policy.rules import parse_duration
from ..policy.source import YMap

SECTION = "cloud.lookups.gcp"
DEFAULT_TIMEOUT_S = 5.0  # as cloud.lookups.aws (config_tables.py states both)
ENDPOINTS = {"compute": "https://compute.googleapis.com",
             "storage": "https://storage.googleapis.com",
             "container": "https://container.googleapis.com"}


@dataclass(frozen=True, slots=True)
class GcpLookupSettings:
    labels: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    compute: str = ENDPOINTS["compute"]
    storage: str = ENDPOINTS["storage"]
    container: str = ENDPOINTS["container"]

    def endpoint(self, service: str) -> str | None:
        """The base URL tether asks about `service`'s resources (None: not one it looks up)."""
        return {"compute": self.compute, "storage": self.storage,
                "container": self.container}.get(service)


def parse_gcp(node: object, parent: YMap) -> GcpLookupSettings:
    """`node`: the value of `cloud.lookups.gcp` (None: off); `parent`: `cloud.lookups`."""
    if node is None:
        return GcpLookupSettings()
    gcp = as_map(node, parent, "gcp")
    check_keys(gcp, LOOKUPS_GCP, SECTION)
    labels = gcp.get("labels", False)
    if not isinstance(labels, bool):
        raise err("must be true or false", gcp, "labels", SECTION)
    timeout = DEFAULT_TIMEOUT_S
    if "timeout" in gcp:
        timeout = parse_duration(gcp.get("timeout"),
                                 lambda m: err(m, gcp, "timeout", SECTION))
    endpoints = dict(ENDPOINTS)
    if gcp.get("endpoints") is not None:
        given = as_map(gcp.get("endpoints"), gcp, "endpoints")
        where = f"{SECTION}.endpoints"
        check_keys(given, LOOKUPS_GCP_ENDPOINTS, where)
        for service in given:
            endpoints[service] = _endpoint(given.get(service), given, service, where)
    return GcpLookupSettings(labels=labels, timeout_s=timeout, **endpoints)


def _endpoint(value: object, node: YMap, key: str, where: str) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    try:
        port_ok = parts is not None and (parts.port is None or parts.port > 0)
    except ValueError:
        port_ok = False
    if (parts is None or not port_ok or parts.scheme != "https" or not parts.hostname
            or parts.path.strip("/") or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None):
        raise err("must be an https:// URL with a host (and port) and nothing after it "
                  "(like https://compute.googleapis.com)", node, key, where)
    return str(value).rstrip("/")
