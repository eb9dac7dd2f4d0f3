"""The audit log: one canonical JSON object per line, hash-chained, appended.

Record kinds (field `kind`, schema version `v`):
  decision   one tool call, the policy's verdict (`action`) and, unless it was
             held, its `outcome`
  hold       how a held call ended, under its decision's `decision_id`
             (outcomes.py; v3)
  request    a request refused before or instead of any decision (bad input,
             upstream failure), with the status the agent got
  approval, budget   see approvals/holds.py and sessions/guard.py

Every record is redacted (redact.py) before it is serialised, then gets `seq`
and `prev` (chain.py). A write that fails raises AuditWriteError - callers
deny what they could not record - counts in `tether_audit_write_errors_total`,
and marks the log unhealthy (`/readyz` 503) until a write succeeds again. The
file handle is dropped on failure and reopened on the next write, so a disk
that fills and drains, or a file that is put back, recovers by itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ..errors import TetherError
from ..telemetry import Metrics
from .chain import GENESIS_HASH, canonical, digest, rotated_name
from .redact import redact
from .settings import AuditSettings, Fsync

SCHEMA_VERSION = 3  # 3: decision `outcome`, `hold` records
log = logging.getLogger("tether.audit")


class AuditWriteError(TetherError):
    pass


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a file, read from the end (files can be large)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            chunk, pos = b"", end
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
                lines = chunk.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or pos == 0:
                    return lines[-1] or None
    except FileNotFoundError:
        return None
    return None


class AuditLog:
    def __init__(self, path: str | None, settings: AuditSettings | None = None,
                 metrics: Metrics | None = None) -> None:
        self.path = path
        self.settings = settings or AuditSettings()
        self.metrics = metrics
        self.healthy = True
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._size = 0
        self._prev = GENESIS_HASH
        self._seq = 1
        self._last_fsync = time.monotonic()
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._open()
            self._resume(Path(path))

    def _open(self) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        f = os.fdopen(fd, "a+b")
        try:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":  # a torn write: never confirmed, so never part of the chain
                    f.seek(0)
                    keep = f.read().rfind(b"\n") + 1
                    log.warning("audit log %s: dropping an incomplete last line (%d bytes)",
                                self.path, size - keep)
                    f.truncate(keep)
                    size = keep
        except OSError:
            f.close()
            raise
        self._file, self._size = f, size

    def _resume(self, path: Path) -> None:
        """Continue the chain of what is on disk: after the last line of the file,
        or of the newest rotated file when the current one is empty."""
        line = _last_line(path) if self._size else _last_line(rotated_name(path, 1))
        if line is None:
            return
        self._prev = digest(line)
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            seq = None
        self._seq = seq + 1 if isinstance(seq, int) and not isinstance(seq, bool) else 1

    def write(self, record: dict[str, object]) -> None:
        if self.path is None:
            return
        paths = tuple(("arguments", *p) for p in self.settings.redact)
        redacted = redact(record, paths)
        assert isinstance(redacted.value, dict)
        try:
            with self._lock:
                full: dict[str, object] = {"v": SCHEMA_VERSION, "time": now_iso(), **redacted.value,
                                           "seq": self._seq, "prev": self._prev}
                if redacted.masked:
                    full["masked"] = list(redacted.masked)
                line = canonical(full)
                if self._file is None:
                    self._open()
                self._rotate_if_needed(len(line) + 1)
                assert self._file is not None
                self._file.write(line + b"\n")
                self._file.flush()
                self._sync(self._file)
                self._prev, self._seq = digest(line), self._seq + 1
                self._size += len(line) + 1
                if not self.healthy:
                    log.warning("audit log %s is writable again", self.path)
                self.healthy, self.last_error = True, None
        except (OSError, ValueError) as e:
            self._failed(e)
            raise AuditWriteError(f"cannot write audit record to {self.path}: {e}") from e

    def _failed(self, error: Exception) -> None:
        self.healthy, self.last_error = False, f"audit log {self.path} cannot be written: {error}"
        if self.metrics is not None:
            self.metrics.audit_write_errors.inc()
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except (OSError, ValueError):
                pass

    def _sync(self, f: BinaryIO) -> None:
        mode = self.settings.fsync
        now = time.monotonic()
        if mode is Fsync.ALWAYS or (
                mode is Fsync.INTERVAL and now - self._last_fsync >= self.settings.fsync_interval_s):
            os.fsync(f.fileno())
            self._last_fsync = now

    def _rotate_if_needed(self, incoming: int) -> None:
        limit = self.settings.max_bytes
        if limit is None or self._size == 0 or self._size + incoming <= limit:
            return
        assert self.path is not None and self._file is not None
        base = Path(self.path)
        if self.settings.fsync is not Fsync.NEVER:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        numbers = sorted((int(p.name.rsplit(".", 1)[1]) for p in base.parent.glob(base.name + ".*")
                          if p.name.rsplit(".", 1)[1].isdigit()), reverse=True)
        for n in numbers:
            if self.settings.keep is not None and n >= self.settings.keep:
                rotated_name(base, n).unlink()
            else:
                rotated_name(base, n).rename(rotated_name(base, n + 1))
        base.rename(rotated_name(base, 1))
        self._open()
        if self.settings.fsync is not Fsync.NEVER:
            dir_fd = os.open(base.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                    if self.settings.fsync is not Fsync.NEVER:
                        os.fsync(self._file.fileno())
                finally:
                    self._file.close()
                    self._file = None
