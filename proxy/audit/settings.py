"""The `audit:` section as plain values (parsed, with file:line errors, in config.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .redact import Path


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
