"""`tether audit verify --merged`: check a central copy of many instances' audit logs.

A central copy holds the records of several instances interleaved, in whatever
order they arrived, some more than once (shippers deliver at least once). The
records are grouped by `instance` and ordered by `seq`, so arrival order and
identical duplicates do not matter. Then, per instance:

  gap             a seq between the first (1, unless `partial`) and the last
                  that no record has: removed, or never shipped
  altered         a record whose hash the next record's `prev` does not match,
                  one not in canonical form, or two different records at one seq
  bad signature   a chain head no given key verifies, or a malformed one
  unsigned tail   records after the last valid signed head: nothing but their
                  own hashes vouches for them (a forger can append records with a
                  valid-looking chain; only the key can sign them). A warning
                  unless `require_signed_tail`; heads come every
                  `audit.sign.interval` and at shutdown, so a live or killed
                  instance has one.

Gaps, alterations, bad signatures and malformed records of an instance are
errors. Lines that are no tether record at all, and v3 records (no instance),
are warnings: whatever they hid shows as a gap in the instance it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .central_read import SourceLine
from .chain import GENESIS_HASH, canonical
from .signing import HEAD_KIND, HeadCheck, Keyring

_HEX64 = re.compile(r"[0-9a-f]{64}")
_GENESIS = bytes.fromhex(GENESIS_HASH)
SHOWN = 20  # items listed per kind and instance in the text report; the JSON has all


def _show(value: object, limit: int = 60) -> str:
    """A hostile value as short, printable text."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(slots=True)
class Entry:
    """One record, kept small: a central copy can hold millions (about 400 bytes each)."""

    digest: bytes          # SHA-256 of the line
    prev: bytes | None     # its `prev`, None if that is no hash
    file: str
    line: int
    head: HeadCheck | None = None  # a chain_head: how its signature checked
    altered: str | None = None     # what is wrong with the record on its own

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class Chain:
    instance: str
    entries: dict[int, Entry] = field(default_factory=dict)  # seq -> the first record seen
    others: dict[int, list[Entry]] = field(default_factory=dict)  # different ones at that seq
    duplicates: int = 0
    malformed: list[str] = field(default_factory=list)

    def add(self, seq: int, entry: Entry) -> None:
        first = self.entries.get(seq)
        if first is None:
            self.entries[seq] = entry
        elif entry.digest in (first.digest, *(o.digest for o in self.others.get(seq, ()))):
            self.duplicates += 1
        else:
            self.others.setdefault(seq, []).append(entry)

    def variants(self, seq: int) -> list[Entry]:
        first = self.entries.get(seq)
        return [] if first is None else [first, *self.others.get(seq, ())]


@dataclass(slots=True)
class Notes:
    """What is in the files but in no instance's chain."""

    not_records: int = 0
    no_instance: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < SHOWN:
            self.examples.append(text)


class Collector:
    """Takes the lines of every file, in any order; `reports()` once all are in."""

    def __init__(self, keys: Keyring) -> None:
        self.keys = keys
        self.chains: dict[str, Chain] = {}
        self.notes = Notes()

    def add_all(self, lines: Iterable[SourceLine]) -> None:
        for line in lines:
            self.add(line)

    def add(self, src: SourceLine) -> None:
        where = f"{src.file}:{src.number}"
        if src.data is None:
            self.notes.not_records += 1
            self.notes.note(f"{where}: {src.why}")
            return
        try:
            record = json.loads(src.data)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict):
            self.notes.not_records += 1
            self.notes.note(f"{where}: not a JSON object")
            return
        instance = record.get("instance")
        if not isinstance(instance, str) or not instance:
            if instance is None and "seq" in record and "prev" in record:
                self.notes.no_instance += 1
                self.notes.note(f"{where}: a record without instance (schema v3): not verified")
            else:
                self.notes.not_records += 1
                self.notes.note(f"{where}: no instance name (instance {_show(instance)}): "
                                "not an audit record")
            return
        chain = self.chains.get(instance)
        if chain is None:
            chain = self.chains[instance] = Chain(instance)
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            chain.malformed.append(f"{where}: seq {_show(seq)} is not a positive whole number")
            return
        try:
            entry = self._entry(record, src)
        except (ValueError, RecursionError):
            chain.malformed.append(f"{where}: seq {seq}: cannot be re-encoded")
            return
        chain.add(seq, entry)

    def _entry(self, record: dict[str, object], src: SourceLine) -> Entry:
        assert src.data is not None
        prev = record.get("prev")
        altered, prev_hash = None, None
        if not isinstance(prev, str) or _HEX64.fullmatch(prev) is None:
            altered = f"its prev {_show(prev)} is not a SHA-256 hash"
        else:
            prev_hash = bytes.fromhex(prev)
            if canonical(record) != src.data:
                altered = "not in canonical form: edited after it was written"
        head = self.keys.check(record) if record.get("kind") == HEAD_KIND else None
        return Entry(hashlib.sha256(src.data).digest(), prev_hash, src.file, src.number, head,
                     altered)

    def reports(self, *, partial: bool = False) -> list[InstanceReport]:
        return [analyse(self.chains[name], partial=partial) for name in sorted(self.chains)]


@dataclass(slots=True)
class InstanceReport:
    instance: str
    records: int = 0  # distinct seqs present
    duplicates: int = 0
    first: int | None = None
    last: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    altered: list[tuple[int, str]] = field(default_factory=list)
    bad_heads: list[tuple[int, str]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    unchecked_heads: int = 0  # heads of an alg no key was given for
    signed_through: int | None = None  # seq of the last head that verifies
    signed_at: str | None = None
    tail: tuple[int, int, int] | None = None  # first seq, last seq, records after that head

    @property
    def errors(self) -> bool:
        return bool(self.gaps or self.altered or self.bad_heads or self.malformed)

    def status(self, require_signed_tail: bool) -> str:
        if self.errors:
            return "FAILED"
        if self.tail is not None:
            return "FAILED: unsigned tail" if require_signed_tail else "unsigned tail"
        return "complete"

    def as_json(self, require_signed_tail: bool) -> dict[str, object]:
        return {"instance": self.instance, "status": self.status(require_signed_tail),
                "records": self.records, "duplicates": self.duplicates,
                "first": self.first, "last": self.last,
                "gaps": [list(g) for g in self.gaps],
                "altered": [{"seq": s, "why": w} for s, w in self.altered],
                "bad_signatures": [{"seq": s, "why": w} for s, w in self.bad_heads],
                "malformed": self.malformed, "unchecked_heads": self.unchecked_heads,
                "signed_through": self.signed_through, "signed_at": self.signed_at,
                "unsigned_tail": None if self.tail is None else
                {"first": self.tail[0], "last": self.tail[1], "records": self.tail[2]}}


def analyse(chain: Chain, *, partial: bool) -> InstanceReport:
    report = InstanceReport(chain.instance, duplicates=chain.duplicates,
                            malformed=list(chain.malformed))
    seqs = sorted(chain.entries)
    if not seqs:
        return report
    report.records, report.first, report.last = len(seqs), seqs[0], seqs[-1]
    expected = seqs[0] if partial else 1
    for seq in seqs:
        if seq > expected:
            report.gaps.append((expected, seq - 1))
        expected = seq + 1
        variants = chain.variants(seq)
        if len(variants) > 1:
            report.altered.append((seq, "different records at this seq: "
                                        + ", ".join(v.where for v in variants)))
        for v in variants:
            if v.altered is not None:
                report.altered.append((seq, f"{v.where}: {v.altered}"))
        _check_link(chain, seq, variants, report)
        for v in variants:
            if v.head is HeadCheck.VALID:
                report.signed_through, report.signed_at = seq, v.where
            elif v.head is HeadCheck.NO_KEY:
                report.unchecked_heads += 1
            elif v.head is not None:
                report.bad_heads.append((seq, f"{v.where}: {v.head.value}"))
    after = [s for s in seqs if report.signed_through is None or s > report.signed_through]
    if after:
        report.tail = (after[0], after[-1], len(after))
    return report


def _check_link(chain: Chain, seq: int, variants: list[Entry], report: InstanceReport) -> None:
    prevs = {v.prev for v in variants if v.prev is not None}
    if not prevs:
        return  # each variant is reported as altered already
    if seq == 1:
        if _GENESIS not in prevs:
            report.altered.append((1, f"{variants[0].where}: the chain does not start at the "
                                      "genesis hash"))
        return
    before = chain.variants(seq - 1)
    if before and not prevs & {b.digest for b in before}:
        report.altered.append((seq - 1, f"{before[0].where}: the record at seq {seq} "
                                        f"({variants[0].where}) does not chain to it"))


def _range(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


def _capped(items: list[str]) -> list[str]:
    if len(items) <= SHOWN:
        return items
    return [*items[:SHOWN], f"... and {len(items) - SHOWN} more (--json lists all)"]


def render_text(reports: list[InstanceReport], notes: Notes, *, require_signed_tail: bool,
                keys_given: bool) -> str:
    out: list[str] = []
    for r in reports:
        name = r.instance if r.instance.isprintable() and len(r.instance) <= 200 else \
            _show(r.instance, 200)
        span = "no records" if r.first is None or r.last is None else _range(r.first, r.last)
        signed = (f"signed through seq {r.signed_through} ({r.signed_at})"
                  if r.signed_through is not None else "no valid signed head")
        out.append(f"instance {name}: {r.status(require_signed_tail)}: {span}, "
                   f"{r.records} records, {signed}"
                   + (f", {r.duplicates} duplicate(s) dropped" if r.duplicates else ""))
        lines = [f"gap: {_range(a, b)} missing" + (f" ({b - a + 1} records)" if b > a else "")
                 for a, b in r.gaps]
        lines += [f"altered: seq {s}: {why}" for s, why in sorted(r.altered)]
        lines += [f"bad signature: head at seq {s}: {why}" for s, why in r.bad_heads]
        lines += [f"malformed: {m}" for m in r.malformed]
        out += [f"  {line}" for line in _capped(lines)]
        if r.unchecked_heads:
            out.append(f"  warning: {r.unchecked_heads} head(s) not checked: no key of their "
                       "algorithm was given")
        if r.tail is not None:
            first, last, count = r.tail
            level = "error" if require_signed_tail else "warning"
            after = (f"after the last signed head, at seq {r.signed_through}"
                     if r.signed_through is not None else "and no signed head at all")
            out.append(f"  {level}: unsigned tail: {_range(first, last)} ({count} record(s) "
                       f"{after})")
    if not keys_given:
        out.append("warning: no key given (--public-key, --hmac-key-file): "
                   "signatures were not checked")
    if notes.not_records or notes.no_instance:
        out.append(f"warning: {notes.not_records} line(s) are not audit records, "
                   f"{notes.no_instance} record(s) have no instance (schema v3)")
        out += [f"  {e}" for e in notes.examples]
    bad = sum(1 for r in reports if r.errors or (require_signed_tail and r.tail is not None))
    tails = sum(1 for r in reports if not r.errors and r.tail is not None) * (
        not require_signed_tail)
    out.append(f"{len(reports)} instance(s): {len(reports) - bad - tails} complete, "
               f"{tails} with an unsigned tail, {bad} failed")
    return "\n".join(out)


def failed(reports: list[InstanceReport], *, require_signed_tail: bool) -> bool:
    return any(r.errors or (require_signed_tail and r.tail is not None) for r in reports)


def render_json(reports: list[InstanceReport], notes: Notes, *,
                require_signed_tail: bool) -> str:
    return json.dumps({
        "ok": not failed(reports, require_signed_tail=require_signed_tail),
        "instances": [r.as_json(require_signed_tail) for r in reports],
        "not_records": notes.not_records, "no_instance": notes.no_instance,
        "examples": notes.examples}, ensure_ascii=True)
