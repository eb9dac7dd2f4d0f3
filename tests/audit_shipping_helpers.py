"""Shared by the audit shipping tests: an AuditLog with its Shipper, built from config text
as `tether serve` builds them, and a poll-until helper."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy import config as config_mod
from proxy.audit import AuditLog
from proxy.audit.shipper import Shipper
from proxy.telemetry import Metrics


@dataclass
class Shipping:
    audit: AuditLog
    shipper: Shipper
    metrics: Metrics
    path: Path

    def write(self, n: int, **fields: object) -> None:
        for i in range(n):
            self.audit.write({"kind": "decision", "tool": "get_weather", "action": "allow",
                              "i": i, **fields})

    def lines(self) -> list[bytes]:
        """Every line of the local log, oldest first (rotated files included)."""
        from proxy.audit.spool import log_files

        out: list[bytes] = []
        for p in log_files(self.path):
            out.extend(p.read_bytes().split(b"\n")[:-1])
        return out

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        """As `tether serve` stops: the log's last record, then a drain."""
        self.audit.close()
        await self.shipper.drain(5.0)


def make_shipping(tmp_path: Path, audit_yaml: str, *, start: bool = True,
                  name: str = "audit.jsonl") -> Shipping:
    """`audit_yaml`: the keys under `audit:` besides `path`, as YAML text (indented 2)."""
    path = tmp_path / name
    cfg_file = tmp_path / "tether.yaml"
    cfg_file.write_text(f"audit:\n  path: {path}\n{audit_yaml}")
    cfg = config_mod.load(cfg_file, env={})
    metrics = Metrics()
    audit = AuditLog(str(path), cfg.audit, metrics)
    shipper = Shipper(path, cfg.audit_shipping, metrics)
    audit.spool = shipper
    if start:
        shipper.start()
    return Shipping(audit, shipper, metrics, path)


async def until(check: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def seqs(lines: list[bytes]) -> list[int]:
    return [json.loads(line)["seq"] for line in lines]


def assert_at_least_once_in_order(sent: list[bytes], received: list[bytes]) -> None:
    """Every line arrived, byte for byte; a duplicate is only ever the same line again
    (same instance and seq) and the first arrivals are in the log's order."""
    assert set(received) == set(sent), (len(set(sent) - set(received)), "lines missing")
    first: list[bytes] = []
    seen: set[bytes] = set()
    for line in received:
        if line not in seen:
            seen.add(line)
            first.append(line)
    assert first == sent
    by_key: dict[tuple[str, int], bytes] = {}
    for line in received:
        record = json.loads(line)
        key = (record.get("instance", ""), record["seq"])
        assert by_key.setdefault(key, line) == line  # same id, same bytes
