"""The audit log: one canonical JSON object per line, hash-chained, appended.

Record kinds (field `kind`, schema version `v`):
  decision   one tool call, the policy's verdict (`action`) and, unless it was
             held, its `outcome`
  hold       how a held call ended, under its decision's `decision_id`
             (outcomes.py; v3)
  request    a request refused before or instead of any decision (bad input,
             upstream failure), with the status the agent got
  approval, budget   see approvals/holds.py and sessions/guard.py
  chain_head the signed position of the chain (signing.py; v4), written by
             `write_head` periodically (heads.py) and by `close`

Every record is redacted (redact.py) before it is serialised, then gets
`instance` (instance.py), `seq` and `prev` (chain.py). A write that fails raises
AuditWriteError - callers deny what they could not record - counts in `tether_audit_write_errors_total`,
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
from typing import TYPE_CHECKING, BinaryIO

from ..errors import TetherError
from ..telemetry import Metrics
from .chain import GENESIS_HASH, canonical, digest, rotated_name
from .instance import default_name, new_instance, valid_id
from .redact import redact_record
from .settings import AuditSettings, Fsync
from .signing import HEAD_KIND

if TYPE_CHECKING:
    from .spool import SpoolGate

SCHEMA_VERSION = 4  # 3: decision `outcome`, `hold` records; 4: `instance`, `chain_head` records
log = logging.getLogger("tether.audit")


class AuditWriteError(TetherError):
    pass


_SECOND: list[tuple[int, str]] = [(-1, "")]  # the last second formatted, and its text


def now_iso() -> str:
    """UTC to the microsecond, `2026-12-07T19:40:00.123456Z`; the date and time of day
    are formatted once per second (records come many to a second)."""
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    last, text = _SECOND[0]
    if second != last:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _SECOND[0] = (second, text)
    return f"{text}.{micro:06d}Z"


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
        # Kept when the log already has one (`_resume`): the id belongs to the chain.
        self.instance = new_instance(self.settings.instance or default_name())
        self._unsigned = 0  # records written since the last chain head
        self.heads_written = self.heads_failed = 0
        self.spool: SpoolGate | None = None  # the shipper, when sinks are configured (shipper.py)
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
            last = json.loads(line)
            seq = last.get("seq")
        except (ValueError, AttributeError):
            last, seq = {}, None
        self._seq = seq + 1 if isinstance(seq, int) and not isinstance(seq, bool) else 1
        self._resume_instance(last)

    def _resume_instance(self, last: dict[str, object]) -> None:
        """A log written by v4 keeps its instance id; a v3 log gets a new one from here
        on (its chain continues, so a central copy of it starts mid-chain)."""
        instance = last.get("instance")
        self._unsigned = 0 if last.get("kind") == HEAD_KIND else 1
        if not isinstance(instance, str) or not valid_id(instance):
            return  # v3, or a name tether would not have written: a new id
        name = self.settings.instance or default_name()
        if not instance.startswith(name + "-"):
            log.warning("audit log %s continues the chain of instance %s (configured name %s "
                        "names new logs only)", self.path, instance, name)
        self.instance = instance

    def write(self, record: dict[str, object]) -> None:
        if self.path is None:
            return
        paths = tuple(("arguments", *p) for p in self.settings.redact)
        redacted = redact_record(record, paths)
        assert isinstance(redacted.value, dict)
        if self.spool is not None and (refused := self.spool.admit()) is not None:
            # Shipping lags (spool full, a required sink down): refused like a full disk, but
            # the file is fine, so the log stays healthy; /readyz asks the spool itself.
            if self.metrics is not None:
                self.metrics.audit_write_errors.inc()
            raise AuditWriteError(refused)
        try:
            with self._lock:
                full: dict[str, object] = {"v": SCHEMA_VERSION, "time": now_iso(), **redacted.value,
                                           "instance": self.instance,
                                           "seq": self._seq, "prev": self._prev}
                if redacted.masked:
                    full["masked"] = list(redacted.masked)
                head = full.get("kind") == HEAD_KIND
                if head:
                    self._sign(full)
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
                if self.spool is not None:
                    self.spool.written(len(line) + 1)
                self._unsigned = 0 if head else self._unsigned + 1
                if not self.healthy:
                    log.warning("audit log %s is writable again", self.path)
                self.healthy, self.last_error = True, None
        except (OSError, ValueError) as e:
            self._failed(e)
            raise AuditWriteError(f"cannot write audit record to {self.path}: {e}") from e

    def _sign(self, full: dict[str, object]) -> None:
        """Complete a chain head under the write lock, where its seq and prev are final."""
        sign = self.settings.sign
        if sign is None or sign.signer is None:
            raise ValueError("a chain head needs audit.sign")
        full.update(head=self._prev, alg=str(sign.signer.alg), key_id=sign.signer.key_id)
        full["sig"] = sign.signer.sign(full)

    def write_head(self) -> bool:
        """Sign the chain as it stands, if records were written since the last head
        (heads.py calls this every `audit.sign.interval`; `close` once more). A head
        that cannot be written is logged and counted, never raised: no governed call
        waits on a head, and the next one covers what this one would have. The write
        itself fails like any record's (the log is unhealthy until a write succeeds)."""
        if self.path is None or self.settings.sign is None or not self._unsigned:
            return False
        try:
            self.write({"kind": HEAD_KIND})
        except AuditWriteError as e:
            self.heads_failed += 1
            log.error("audit log %s: no signed chain head written: %s", self.path, e)
            if self.metrics is not None:
                self.metrics.audit_chain_heads.labels("failed").inc()
            return False
        self.heads_written += 1
        if self.metrics is not None:
            self.metrics.audit_chain_heads.labels("written").inc()
        return True

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
            if self.settings.keep is not None and n >= self.settings.keep and (
                    self.spool is None or not self.spool.holds(rotated_name(base, n))):
                rotated_name(base, n).unlink()  # a file a sink has not shipped is kept
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
        """Signs the chain's last records (a head at shutdown), then closes the file."""
        self.write_head()
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                    if self.settings.fsync is not Fsync.NEVER:
                        os.fsync(self._file.fileno())
                finally:
                    self._file.close()
                    self._file = None
