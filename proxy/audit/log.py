"""The audit log: one JSON object per line, appended, flushed per record.

Record kinds (field `kind`, schema version `v`):
  decision   one tool call and its verdict
  request    a request refused before or instead of any decision (bad input,
             upstream failure), with the status the agent got

Hash chaining, rotation, redaction and fsync policy come with the audit issue;
the fields already follow OPA's decision logs so that change adds, not renames.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from ..errors import TetherError

SCHEMA_VERSION = 1


class AuditWriteError(TetherError):
    pass


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, record: dict[str, object]) -> None:
        if self._file is None:
            return
        line = json.dumps({"v": SCHEMA_VERSION, "time": now_iso(), **record},
                          ensure_ascii=False, default=str)
        try:
            with self._lock:
                self._file.write(line + "\n")
                self._file.flush()
        except (OSError, ValueError) as e:
            raise AuditWriteError(f"cannot write audit record to {self.path}: {e}") from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
