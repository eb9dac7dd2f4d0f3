"""The `forward:` config section, compiled once at load with file:line errors.

```yaml
forward:
  ca_dir: .tether/ca            # relative to the config file, or absolute
  allow_private: [127.0.0.1, 10.0.0.0/8, db.internal]   # SSRF exceptions
  pass_hosts: ["*.github.com"]  # tool hosts forwarded with no policy (apis: and cloud hosts are judged first)
  upstream_ca: certs/corp.pem   # extra CA bundle trusted for upstream TLS
  transparent_port: 15001       # the transparent listener (iptables REDIRECT target); off if unset
  transparent_agent: db-agent   # the agent all transparent traffic is (the pod is the agent)
```
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..config_tables_run import FORWARD
from ..errors import ConfigError
from ..policy.source import YMap

KEYS = FORWARD.names  # documented in config_tables_run.py
MAX_AGENT = 200

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    ca_dir: str = ".tether/ca"
    allow_networks: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()       # lower-case names (exact, or "*.suffix" globs)
    pass_hosts: tuple[str, ...] = ()        # lower-case globs
    upstream_ca: str | None = None
    transparent_port: int | None = None     # `tether serve --transparent-port` overrides it
    # Transparent clients cannot authenticate to a proxy they do not know of: under
    # auth.mode required, their tool/cloud traffic is refused unless this names them.
    transparent_agent: str | None = None


def _err(message: str, node: YMap, key: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"forward.{key}")


def _path(value: object, node: YMap, key: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _err("must be a path", node, key)
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _names(value: object, node: YMap, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _err("must be a list of host names", node, key)
    return [str(v).strip().lower().rstrip(".") for v in value]


def parse_forward(node: object, parent: YMap, base: Path) -> ForwardSettings:
    """`base`: the config file's directory, which relative paths are read from."""
    if node is None:
        return ForwardSettings(ca_dir=str((base / ".tether/ca").resolve()))
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of("forward"),
                          key="forward")
    for key in node:
        if key not in KEYS:
            raise _err(f"unknown key (expected one of {', '.join(sorted(KEYS))})", node, key)
    networks: list[Network] = []
    hosts: list[str] = []
    for entry in _names(node.get("allow_private", []), node, "allow_private"):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if "/" in entry or ":" in entry:
                raise _err(f"{entry!r} is neither a host name nor an address/CIDR",
                           node, "allow_private") from None
            hosts.append(entry)
    passes = _names(node.get("pass_hosts", []), node, "pass_hosts")
    for entry in passes:
        wild = entry[2:] if entry.startswith("*.") else "" if entry == "*" else entry
        if "*" in wild or "?" in wild or "[" in wild:
            raise _err(f"{entry!r}: only a leading '*.' wildcard is allowed", node, "pass_hosts")
    upstream_ca = node.get("upstream_ca")
    transparent = node.get("transparent_port")
    if transparent is not None and (isinstance(transparent, bool) or not isinstance(transparent, int)
                                    or not 0 < transparent < 65536):
        raise _err("must be a TCP port (1-65535)", node, "transparent_port")
    agent = node.get("transparent_agent")
    if agent is not None and (not isinstance(agent, str) or not agent.strip()
                              or len(agent) > MAX_AGENT):
        raise _err("must be an agent name", node, "transparent_agent")
    return ForwardSettings(
        ca_dir=_path(node.get("ca_dir", ".tether/ca"), node, "ca_dir", base),
        allow_networks=tuple(networks),
        allow_hosts=tuple(hosts),
        pass_hosts=tuple(passes),
        upstream_ca=None if upstream_ca is None else _path(upstream_ca, node, "upstream_ca", base),
        transparent_port=transparent,
        transparent_agent=agent.strip() if isinstance(agent, str) else None,
    )
