"""The local audit files as the spool: a cursor per sink, and a reader that follows rotation.

There is no second copy of the data. A sink's cursor is the position just after the
last line that sink acknowledged: the `seq` of that line, and the file (inode) and
byte offset where the next one starts. The inode survives rotation's renames
(`audit.jsonl` -> `.1` -> `.2`), so a cursor stays valid while files move; if its
file is gone (pruned, or the log was replaced), the reader finds the next `seq`
by reading the files instead. Cursors live in `<audit>.cursors/<sink>.json`, a
directory (not `<audit>.cursor.<sink>` files) so that `tether audit verify DIR`,
which reads every file beside the log, never mistakes a cursor for a log.

A reader only ever hands out whole lines: the writer appends `line + "\\n"`, so a
line is complete once its newline is on disk, and bytes after the last newline
(a write in progress, or torn by a crash and cut at the next start) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from .chain import chain_files

log = logging.getLogger("tether.audit.spool")


class SpoolGate(Protocol):
    """What AuditLog asks of the shipper (None when nothing is shipped). Called under
    the log's lock, possibly from another thread than the shipper's: cheap reads only."""

    def admit(self) -> str | None:
        """Why the next record must be refused (spool full, a required sink down), or None;
        counts the refusal."""
        ...

    def refusal(self) -> tuple[str, str] | None:
        """(cause, message) while records are refused, else None; counts nothing (/readyz)."""
        ...

    def written(self, size: int) -> None:
        """`size` more bytes are in the spool."""
        ...

    def holds(self, path: Path) -> bool:
        """Whether a rotated file still has records some sink has not acknowledged
        (`keep` must not prune it)."""
        ...


class Line:
    """One line of the log: its exact bytes, and the fields sinks label it with, parsed on
    first use. The HTTP, file and stdout sinks never parse a line but the last of a batch
    (its seq is the cursor), so reading the spool costs the event loop next to nothing."""

    __slots__ = ("_fields", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw  # the exact line as written, without its newline
        self._fields: tuple[int | None, str, str | None, str | None] | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Line:
        return cls(raw)

    def _parse(self) -> tuple[int | None, str, str | None, str | None]:
        if self._fields is None:
            try:
                record = json.loads(self.raw)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self._fields = (None, "unknown", None, None)
            else:
                seq, kind, instance = record.get("seq"), record.get("kind"), record.get("instance")
                when = record.get("time")
                self._fields = (seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                                kind if isinstance(kind, str) else "unknown",
                                instance if isinstance(instance, str) else None,
                                when if isinstance(when, str) else None)
        return self._fields

    @property
    def seq(self) -> int | None:
        return self._parse()[0]

    @property
    def kind(self) -> str:
        return self._parse()[1]

    @property
    def instance(self) -> str | None:
        return self._parse()[2]

    @property
    def time(self) -> str | None:
        """The record's `time` as written (RFC 3339, UTC)."""
        return self._parse()[3]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Line) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def epoch(self) -> float | None:
        if self.time is None:
            return None
        try:
            return datetime.fromisoformat(self.time).timestamp()
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Position:
    seq: int = 0      # the last acknowledged seq; 0: none yet
    ino: int = 0      # the file the next line is read from; 0: unknown (find it by seq)
    offset: int = 0   # where in that file


def cursor_path(base: Path, sink: str) -> Path:
    return base.with_name(base.name + ".cursors") / f"{sink}.json"


def load_cursor(path: Path) -> Position:
    try:
        data = json.loads(path.read_bytes())
        return Position(int(data["seq"]), int(data["ino"]), int(data["offset"]))
    except FileNotFoundError:
        return Position()
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("audit cursor %s is unreadable (%s): shipping that sink from the oldest "
                    "record on disk (a receiver deduplicates by instance and seq)", path, e)
        return Position()


def save_cursor(path: Path, pos: Position) -> None:
    """Atomically: a crash leaves the old cursor or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"seq": pos.seq, "ino": pos.ino, "offset": pos.offset}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def log_files(base: Path) -> list[Path]:
    """The log's files oldest first; [] before the first record."""
    try:
        return chain_files(base)
    except (ValueError, OSError):
        return []


def _first_seq(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            return Line.parse(f.readline().rstrip(b"\n")).seq
    except OSError:
        return None


def unshipped_bytes(base: Path, pos: Position) -> int:
    """Bytes on disk after `pos`: the rest of its file and every newer file."""
    total, seen = 0, False
    for path in log_files(base):
        try:
            st = path.stat()
        except OSError:
            continue
        if seen:
            total += st.st_size
        elif st.st_ino == pos.ino:
            seen, total = True, max(0, st.st_size - pos.offset)
    if not seen:  # the cursor's file is unknown: count everything (conservative)
        total = sum(p.stat().st_size for p in log_files(base) if p.exists())
    return total


class SpoolReader:
    """Reads whole lines after a position, file by file, oldest first. Not thread-safe;
    one per sink. A batch never spans two files, so its end is one (file, offset)."""

    def __init__(self, base: Path, start: Position) -> None:
        self.base = base
        self.pos = start                   # after the last line handed out
        self._fd: int | None = None
        self._ino = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, path: Path, offset: int, seq: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        self.close()
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        self.pos = Position(seq, self._ino, offset)
        return True

    def _locate(self) -> bool:
        """Open the file holding the line after `pos`: by inode, else by seq."""
        files = log_files(self.base)
        if not files:
            return False
        if self.pos.ino:
            for path in files:
                try:
                    st = path.stat()
                except OSError:
                    continue
                if st.st_ino == self.pos.ino and st.st_size >= self.pos.offset:
                    return self._open(path, self.pos.offset, self.pos.seq)
        want = self.pos.seq + 1
        firsts = [(p, _first_seq(p)) for p in files]
        chosen = 0
        for i, (_, first) in enumerate(firsts):
            if first is not None and first <= want:
                chosen = i
        path = firsts[chosen][0]
        first = firsts[chosen][1]
        if first is not None and first > want and self.pos.seq:
            log.warning("audit spool %s: records %d-%d are no longer on disk; shipping from %d",
                        self.base, want, first - 1, first)
        if not self._open(path, 0, self.pos.seq):
            return False
        return self._skip_to(want)

    def _skip_to(self, want: int) -> bool:
        """Move past the lines before seq `want` in the open file. If the newest line of
        the whole log is older than the cursor, the log was replaced: start it over."""
        assert self._fd is not None
        offset = 0
        while True:
            chunk = os.pread(self._fd, 1024 * 1024, offset)
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                break
            for raw in chunk[:cut].split(b"\n")[:-1]:
                seq = Line.parse(raw).seq
                if seq is not None and seq >= want:
                    self.pos = Position(self.pos.seq, self._ino, offset)
                    return True
                offset += len(raw) + 1
            if len(chunk) < 1024 * 1024 and cut == len(chunk):
                break
        self.pos = Position(self.pos.seq, self._ino, offset)
        if self._is_current() and self.pos.seq and offset:
            newest = _newest_seq(self.base)
            if newest is not None and newest < self.pos.seq:
                log.warning("audit spool %s: the log restarts below the cursor (seq %d < %d): "
                            "it was replaced; shipping it from its start", self.base, newest,
                            self.pos.seq)
                files = log_files(self.base)
                return bool(files) and self._open(files[0], 0, 0)
        return True

    def _is_current(self) -> bool:
        try:
            return os.stat(self.base).st_ino == self._ino
        except OSError:
            return False

    def _read(self, max_records: int, max_bytes: int) -> list[Line]:
        assert self._fd is not None
        size = max_bytes
        while True:
            chunk = os.pread(self._fd, size, self.pos.offset)
            cut = chunk.rfind(b"\n") + 1
            if cut or len(chunk) < size:
                break
            size *= 2  # one line longer than the batch: read until its end
        raws = chunk[:cut].split(b"\n")[:-1][:max_records]
        lines = [Line.parse(r) for r in raws]
        offset = self.pos.offset + sum(len(r) + 1 for r in raws)
        seq = next((ln.seq for ln in reversed(lines) if ln.seq is not None), self.pos.seq)
        self.pos = Position(seq, self._ino, offset)
        return lines

    def read_batch(self, max_records: int, max_bytes: int) -> list[Line]:
        """The next whole lines (at most `max_records`, about `max_bytes`), [] if none yet."""
        if self._fd is None and not self._locate():
            return []
        for _ in range(8):  # files rotated since the last call: walk to the newest
            rotated = not self._is_current()
            lines = self._read(max_records, max_bytes)
            if lines:
                return lines
            if not rotated:
                return []
            # The file was rotated, and was read to its end after that (it is final):
            # the next line is in a newer file.
            self.pos = Position(self.pos.seq, 0, 0)
            self.close()
            if not self._locate():
                return []
        return []


def _newest_seq(base: Path) -> int | None:
    from .log import _last_line

    for path in reversed(log_files(base)):
        line = _last_line(path)
        if line is not None:
            return Line.parse(line).seq
    return None
