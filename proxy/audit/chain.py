"""The hash chain that makes the audit log prove itself, and its verifier.

Every record carries `seq` (one more than the record before, across rotated
files) and `prev`, the SHA-256 (hex) of the previous record's exact line bytes
without the newline; the first record of a log carries the hash of GENESIS.
Lines are canonical JSON (sorted top-level keys, no spaces, UTF-8), so anyone can
recompute a hash from the file alone. A string that is not text (a lone UTF-16
surrogate, which an agent can send as `"\\ud800"`) keeps its `\\uXXXX` escape in the
line (proxy/surrogates.py); everything else is written as itself.

What the chain shows: an edited record (the next record's `prev` no longer
matches it), a deleted one (a `seq` gap), an inserted or reordered one (`seq`
going back or jumping). What it cannot show on its own: records cut from the
very end of the newest file, or a forger who rewrites every later record too -
ship the log elsewhere (or anchor the last hash) for that.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from ..surrogates import holds, joined, json_bytes

GENESIS = b"tether audit log v1"


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


GENESIS_HASH = digest(GENESIS)


def canonical(record: dict[str, object]) -> bytes:
    """Top-level fields sorted, no spaces, UTF-8. Nested values (tool arguments) keep
    the key order they came with, as the model wrote them; `json.loads` keeps that
    order too, so a line re-serialises to the same bytes, lone surrogates included.
    Total: any str a parser produced can be written. Keys sort as they read back
    (`joined`), which for text is plain code point order."""
    if holds("".join(record)):
        ordered = sorted(record.items(), key=lambda kv: joined(kv[0]))
    else:  # plain text keys (tether's own field names): code point order as they are
        ordered = sorted(record.items(), key=itemgetter(0))
    return json_bytes(dict(ordered), separators=(",", ":"), default=str)


def rotated_name(base: Path, n: int) -> Path:
    return base.with_name(f"{base.name}.{n}")


def chain_files(target: Path) -> list[Path]:
    """A base path (`audit.jsonl`) or a directory holding one log: the files oldest
    first (`audit.jsonl.3`, `.2`, `.1`, then `audit.jsonl`)."""
    if target.is_dir():
        bases = sorted({re.sub(r"\.\d+$", "", p.name) for p in target.iterdir() if p.is_file()})
        if len(bases) != 1:
            raise ValueError(f"{target}: holds {len(bases)} logs ({', '.join(bases) or 'none'}); "
                             "name one base file")
        target = target / bases[0]
    numbered: list[tuple[int, Path]] = []
    for p in target.parent.iterdir():
        m = re.fullmatch(re.escape(target.name) + r"\.(\d+)", p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    files = [p for _, p in sorted(numbered, reverse=True)]
    if target.exists():
        files.append(target)
    if not files:
        raise ValueError(f"{target}: no such audit log")
    return files


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def verify(files: Sequence[Path], *, from_genesis: bool = True) -> list[Problem]:
    """Check files given oldest first as one chain. After a problem the check
    picks the chain up again at the next line, so one tampering gives one or two
    problems, not one per remaining record. `from_genesis=False`: the first file
    may start mid-chain (older files were removed on purpose)."""
    problems: list[Problem] = []
    expected_prev: str | None = GENESIS_HASH if from_genesis else None
    expected_seq: int | None = None
    last: tuple[str, int] | None = None  # where the previous record is
    last_bad = False
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            problems.append(Problem(str(path), 0, f"cannot read: {e.strerror}"))
            return problems
        if data and not data.endswith(b"\n"):
            problems.append(Problem(str(path), data.count(b"\n") + 1,
                                    "the last line is incomplete (a torn write)"))
        for number, line in enumerate(data.splitlines(), start=1):
            where = (str(path), number)
            problem = _check(line, expected_prev, expected_seq, last, where, last_bad)
            if problem is not None:
                problems.append(problem)
            last_bad = problem is not None
            expected_prev, last = digest(line), where
            seq = _seq(line)
            expected_seq = seq + 1 if seq is not None else None
    return problems


def _seq(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _check(line: bytes, expected_prev: str | None, expected_seq: int | None,
           last: tuple[str, int] | None, where: tuple[str, int], last_bad: bool) -> Problem | None:
    file, number = where
    try:
        record = json.loads(line)
    except ValueError:
        return Problem(file, number, "not JSON (edited, or a partial write)")
    if not isinstance(record, dict):
        return Problem(file, number, "not a JSON object")
    seq, prev = record.get("seq"), record.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):
        return Problem(file, number, "no seq/prev: not a chained record (inserted?)")
    if canonical(record) != line:
        return Problem(file, number, "not in canonical form: the record was edited")
    if expected_seq is not None and seq != expected_seq:
        if seq < expected_seq:
            return Problem(file, number, f"seq {seq} where {expected_seq} was expected: "
                                         "a record was inserted or records were reordered here")
        return Problem(file, number, f"seq {seq} where {expected_seq} was expected: "
                                     f"{seq - expected_seq} record(s) missing before this line "
                                     "(deleted, reordered, or a rotated file is missing)")
    if expected_prev is None or prev == expected_prev or last_bad:
        return None
    if last is None:
        return Problem(file, number, f"the chain does not start at the genesis hash (seq {seq}): "
                                     "earlier records or rotated files are missing")
    if last[0] != file:
        return Problem(file, number, f"prev does not match the last record of {last[0]} "
                                     f"(line {last[1]}): a file is missing, or that record was "
                                     "edited")
    return Problem(last[0], last[1], "the record was changed after it was written "
                                     "(the next record's prev hash does not match it)")


def verify_targets(targets: Iterable[str], *, from_genesis: bool = True) -> list[Problem]:
    """FILE... as given on the command line: several files are one chain in the order
    given; a single base path or directory is expanded to its rotated files."""
    paths = [Path(t) for t in targets]
    if len(paths) == 1 and (paths[0].is_dir() or any(
            paths[0].parent.glob(paths[0].name + ".[0-9]*"))):
        files = chain_files(paths[0])
    else:
        files = paths
    return verify(files, from_genesis=from_genesis)
