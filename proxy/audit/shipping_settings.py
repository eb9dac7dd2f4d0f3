"""`audit.sinks` and `audit.spool`: where the audit log is shipped, parsed with file:line errors.

```yaml
audit:
  path: /var/lib/tether/audit.jsonl      # the local log is the spool
  spool: {max_bytes: 536870912, drain_timeout: 20s}
  sinks:
    - {name: collector, type: syslog, host: rsyslog.logging, port: 6514, tls: {ca_file: ca.pem},
       required: true, max_outage: 5m}
    - {name: otel, type: otlp, endpoint: http://otel-collector:4318/v1/logs}
    - {name: siem, type: http, url: https://siem.example/ingest, bearer_token_env: SIEM_TOKEN}
    - {name: console, type: stdout}
    - {name: pv, type: file, path: /mnt/audit-copy/audit.jsonl}
```

Every sink ships every record; each has its own cursor over the local files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config_nodes import as_map, check_keys, err
from ..config_tables_run import BACKOFF, BATCH, SINK, SPOOL, TLS
from ..errors import ConfigError
from ..policy.rules import parse_duration
from ..policy.source import YMap

SINK_TYPES = ("stdout", "file", "syslog", "otlp", "http")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # a cursor file name and a metric label
COMMON_KEYS = {"name", "type", "required", "max_outage", "batch", "backoff", "timeout"}
TYPE_KEYS: dict[str, set[str]] = {
    "stdout": set(),
    "file": {"path", "fsync"},
    "syslog": {"host", "port", "tls", "facility", "hostname", "app_name"},
    "otlp": {"endpoint", "headers", "headers_env"},
    "http": {"url", "headers", "headers_env", "bearer_token_env"},
}
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "authpriv": 10, **{
    f"local{i}": 16 + i for i in range(8)}}


@dataclass(frozen=True, slots=True)
class TlsSettings:
    ca_file: str | None = None        # None: the system's trust store
    cert_file: str | None = None      # a client certificate, for receivers that ask for one
    key_file: str | None = None
    server_name: str | None = None    # the name the certificate must carry (default: host)
    verify: bool = True


@dataclass(frozen=True, slots=True)
class SinkSettings:
    name: str
    type: str
    required: bool = False            # fail closed once it has been down longer than max_outage
    max_outage_s: float = 300.0
    batch_records: int = 500
    batch_bytes: int = 1024 * 1024
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 10.0
    # type options
    path: str | None = None           # file
    fsync: bool = True                # file
    host: str = "127.0.0.1"           # syslog
    port: int = 514                   # syslog (6514 is syslog over TLS)
    tls: TlsSettings | None = None    # syslog; otlp/http take TLS from their https:// URL
    facility: int = 16                # syslog: local0
    hostname: str | None = None       # syslog HOSTNAME (default: this host's name)
    app_name: str = "tether"          # syslog APP-NAME
    url: str | None = None            # http; otlp's `endpoint`
    headers: Mapping[str, str] = field(default_factory=dict)
    headers_env: Mapping[str, str] = field(default_factory=dict)  # header -> env variable
    bearer_token_env: str | None = None


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    max_bytes: int = 512 * 1024 * 1024  # unshipped bytes (slowest sink) before writes are refused
    drain_timeout_s: float = 20.0       # how long shutdown waits for the sinks to catch up
    poll_interval_s: float = 0.1        # how often an idle sink looks for new records


@dataclass(frozen=True, slots=True)
class ShippingSettings:
    sinks: tuple[SinkSettings, ...] = ()
    spool: SpoolSettings = SpoolSettings()


def _duration(node: YMap, key: str, default: float, where: str) -> float:
    if key not in node:
        return default

    def fail(message: str) -> ConfigError:
        return err(message, node, key, where)

    return parse_duration(node[key], fail)


def _positive_int(node: YMap, key: str, default: int, where: str) -> int:
    value = node.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise err("must be a positive whole number", node, key, where)
    return value


def _text(node: YMap, key: str, where: str, default: str | None = None) -> str | None:
    value = node.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise err("must be a non-empty string", node, key, where)
    return value


def _string_map(node: YMap, key: str, where: str) -> dict[str, str]:
    value = node.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise err("must be a mapping of header names to strings", node, key, where)
    return dict(value)


def _path(text: str | None, base: Path) -> str | None:
    return text if text is None or os.path.isabs(text) else os.path.normpath(base / text)


def _tls(node: YMap, where: str, base: Path) -> TlsSettings | None:
    value = node.get("tls")
    if value is None or value is False:
        return None
    if value is True:
        return TlsSettings()
    if not isinstance(value, YMap):
        raise err("must be true, or a mapping (ca_file, cert_file, key_file, server_name, "
                  "verify)", node, "tls", where)
    here = f"{where}.tls"
    check_keys(value, TLS, here)
    verify = value.get("verify", True)
    if not isinstance(verify, bool):
        raise err("must be true or false", value, "verify", here)
    if (value.get("cert_file") is None) != (value.get("key_file") is None):
        raise err("cert_file and key_file go together", value, "cert_file", here)
    return TlsSettings(ca_file=_path(_text(value, "ca_file", here), base),
                       cert_file=_path(_text(value, "cert_file", here), base),
                       key_file=_path(_text(value, "key_file", here), base),
                       server_name=_text(value, "server_name", here), verify=verify)


def parse_sink(node: object, parent: YMap, index: int, base: Path) -> SinkSettings:
    if not isinstance(node, YMap):
        raise err("each sink must be a mapping with a name and a type", parent, "sinks", "audit")
    kind = node.get("type")
    where = f"audit.sinks[{index}]"
    if kind not in SINK_TYPES:
        raise err(f"must be one of {', '.join(SINK_TYPES)}", node, "type", where)
    check_keys(node, SINK, where)  # every sink key, then those of its type
    check_keys(node, COMMON_KEYS | TYPE_KEYS[kind], where)
    name = node.get("name", kind)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise err("must be a short name of a-z, 0-9, _ and - (it names the sink's cursor file "
                  "and metric label)", node, "name", where)
    required = node.get("required", False)
    if not isinstance(required, bool):
        raise err("must be true or false", node, "required", where)
    batch = as_map(node.get("batch"), node, "batch")
    check_keys(batch, BATCH, f"{where}.batch")
    backoff = as_map(node.get("backoff"), node, "backoff")
    check_keys(backoff, BACKOFF, f"{where}.backoff")
    values: dict[str, object] = {
        "name": name, "type": kind, "required": required,
        "max_outage_s": _duration(node, "max_outage", 300.0, where),
        "batch_records": _positive_int(batch, "records", 500, f"{where}.batch"),
        "batch_bytes": _positive_int(batch, "bytes", 1024 * 1024, f"{where}.batch"),
        "backoff_min_s": _duration(backoff, "min", 0.5, f"{where}.backoff"),
        "backoff_max_s": _duration(backoff, "max", 30.0, f"{where}.backoff"),
        "timeout_s": _duration(node, "timeout", 10.0, where),
    }
    if kind == "file":
        path = _text(node, "path", where)
        if path is None:
            raise err("a file sink needs a path", node, "type", where)
        fsync = node.get("fsync", True)
        if not isinstance(fsync, bool):
            raise err("must be true or false", node, "fsync", where)
        values.update(path=_path(path, base), fsync=fsync)
    elif kind == "syslog":
        host = _text(node, "host", where)
        if host is None:
            raise err("a syslog sink needs a host", node, "type", where)
        tls = _tls(node, where, base)
        port = node.get("port", 6514 if tls else 514)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise err("must be a port number", node, "port", where)
        facility = node.get("facility", "local0")
        if facility not in FACILITIES:
            raise err(f"must be one of {', '.join(FACILITIES)}", node, "facility", where)
        hostname = _text(node, "hostname", where)
        app_name = _text(node, "app_name", where, "tether")
        for key, text, limit in (("hostname", hostname, 255), ("app_name", app_name, 48)):
            if text is not None and (len(text) > limit or not all(33 <= ord(c) <= 126 for c in text)):
                raise err(f"must be at most {limit} printable ASCII characters, no spaces",
                          node, key, where)
        values.update(host=host, port=port, tls=tls, facility=FACILITIES[facility],
                      hostname=hostname, app_name=app_name)
    elif kind in ("otlp", "http"):
        key = "endpoint" if kind == "otlp" else "url"
        default = "http://127.0.0.1:4318/v1/logs" if kind == "otlp" else None
        url = _text(node, key, where, default)
        if url is None or not re.match(r"https?://[^/\s]+", url):
            raise err("must be an http:// or https:// URL", node, key if key in node else "type",
                      where)
        values.update(url=url, headers=_string_map(node, "headers", where),
                      headers_env=_string_map(node, "headers_env", where))
        if kind == "http":
            values["bearer_token_env"] = _text(node, "bearer_token_env", where)
    return SinkSettings(**values)  # type: ignore[arg-type]


def parse_shipping(audit: YMap, base: Path) -> ShippingSettings:
    """`audit.sinks` and `audit.spool` (the rest of `audit:` is settings.py's); relative
    paths are relative to `base`, the config file's directory."""
    raw = audit.get("sinks", [])
    if not isinstance(raw, list):
        raise err("must be a list of sinks", audit, "sinks", "audit")
    sinks = tuple(parse_sink(node, audit, i, base) for i, node in enumerate(raw))
    seen: set[str] = set()
    for i, sink in enumerate(sinks):
        if sink.name in seen:
            node = raw[i]
            raise err(f"two sinks are named {sink.name!r}; give each its own name", node, "name"
                      if "name" in node else "type", f"audit.sinks[{i}]")
        seen.add(sink.name)
    spool_node = as_map(audit.get("spool"), audit, "spool")
    check_keys(spool_node, SPOOL, "audit.spool")
    default = SpoolSettings()
    spool = SpoolSettings(
        max_bytes=_positive_int(spool_node, "max_bytes", default.max_bytes, "audit.spool"),
        drain_timeout_s=_duration(spool_node, "drain_timeout", default.drain_timeout_s, "audit.spool"),
        poll_interval_s=_duration(spool_node, "poll_interval", default.poll_interval_s, "audit.spool"))
    return ShippingSettings(sinks=sinks, spool=spool)
