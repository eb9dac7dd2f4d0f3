"""The `audit:` section: its values, and its parsing with file:line errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config_nodes import err
from ..policy.source import YMap
from .instance import parse_instance
from .redact import Path, parse_paths
from .signing import SignSettings, parse_sign


class Fsync(enum.StrEnum):
    NEVER = "never"        # flushed to the OS per record: survives a tether crash, not a power cut
    ALWAYS = "always"      # fsync per record: survives a power cut, costs a disk round trip
    INTERVAL = "interval"  # fsync when `fsync_interval` seconds have passed since the last one


@dataclass(frozen=True, slots=True)
class AuditSettings:
    max_bytes: int | None = 100 * 1024 * 1024  # rotate before a file would exceed this; None: never
    keep: int | None = None                    # rotated files kept; None: all (evidence is not pruned)
    fsync: Fsync = Fsync.INTERVAL
    fsync_interval_s: float = 1.0
    redact: tuple[Path, ...] = ()              # dotted paths inside tool arguments
    instance: str | None = None                # the instance's name; None: env or host name
    sign: SignSettings | None = None           # signed chain heads (signing.py); None: none


def parse_audit(node: YMap) -> AuditSettings:
    def count(key: str, default: int | None) -> int | None:
        value = node.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise err("must be a positive whole number (or null: unbounded)", node, key, "audit")
        return value

    try:
        fsync = Fsync(node.get("fsync", "interval"))
    except ValueError:
        raise err("must be one of never, always, interval", node, "fsync", "audit") from None
    interval = node.get("fsync_interval", 1.0)
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
        raise err("must be a number of seconds", node, "fsync_interval", "audit")
    paths = node.get("redact", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "" not in p.split(".")
                                             for p in paths):
        raise err("must be a list of dotted paths inside tool arguments (db.dsn, headers.*)",
                   node, "redact", "audit")
    return AuditSettings(max_bytes=count("max_bytes", AuditSettings().max_bytes),
                         keep=count("keep", None), fsync=fsync, fsync_interval_s=float(interval),
                         redact=parse_paths(paths), instance=parse_instance(node),
                         sign=parse_sign(node))
