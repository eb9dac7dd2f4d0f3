"""Governed requests at up to 200 a second through a running tether while its config is
reloaded 50 times: no request fails, and every decision's audit record names the revision
in force where the record sits in the log, with that revision's verdict
(tests/reload_load.py). The rate itself is the benchmark's to measure (bench/reload.py,
bench/README.md): on a busy CI machine the suite checks correctness, not capacity."""

from __future__ import annotations

from pathlib import Path

from tests.reload_load import run


async def test_requests_through_50_reloads_all_answered_each_decision_naming_its_revision(
        tmp_path: Path) -> None:
    report = await run(tmp_path, rate=200, reloads=50, interval_s=0.1)
    assert report.failed == []
    assert report.problems == []
    assert report.reloads_ok == 50 and report.revisions_seen == 51
    assert report.decisions == report.sent  # one delete_volume call each
    # Decisions were made all through the reloads, by most of the 51 revisions.
    assert report.sent >= 250 and report.revisions_deciding >= 40, (
        report.sent, report.revisions_deciding)
