"""The spool and the shipper with the local sinks (file, stdout): cursors, rotation, keep,
restart, fail closed, drain. The wire sinks against real receivers: test_audit_sinks.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.audit import AuditWriteError
from proxy.audit.shipping_settings import SinkSettings, TlsSettings
from proxy.audit.spool import Position, SpoolReader, cursor_path, load_cursor, log_files
from proxy.errors import ConfigError
from tests.audit_shipping_helpers import (
    assert_at_least_once_in_order,
    make_shipping,
    until,
)


def _copy(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1] if path.exists() else []


def file_sink(target: Path, extra: str = "") -> str:
    return (f"  spool: {{poll_interval: 20ms}}\n  sinks:\n"
            f"    - {{name: copy, type: file, path: '{target}', backoff: {{min: 20ms, max: 100ms}}"
            f"{extra}}}\n")


def test_config(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    (tmp_path / "ca.pem").write_text("")
    cfg.write_text("""audit:
  path: a.jsonl
  spool: {max_bytes: 1000000, drain_timeout: 15s}
  sinks:
    - {name: rs, type: syslog, host: logs.example, tls: {ca_file: ca.pem}, required: true,
       max_outage: 2m, facility: local3}
    - {type: otlp}
    - {name: siem, type: http, url: 'https://siem.example/in', bearer_token_env: SIEM_TOKEN,
       batch: {records: 100}, backoff: {min: 1s, max: 1m}, timeout: 5s}
    - {type: stdout}
""")
    loaded = config_mod.load(cfg, env={})
    ship = loaded.audit_shipping
    assert ship.spool.max_bytes == 1000000 and ship.spool.drain_timeout_s == 15
    rs, otlp, siem, out = ship.sinks
    assert rs == SinkSettings(name="rs", type="syslog", required=True, max_outage_s=120,
                              host="logs.example", port=6514, facility=19,
                              tls=TlsSettings(ca_file=str(tmp_path / "ca.pem")))
    assert otlp.name == "otlp" and otlp.url == "http://127.0.0.1:4318/v1/logs"
    assert (siem.batch_records, siem.backoff_min_s, siem.backoff_max_s, siem.timeout_s) == \
        (100, 1, 60, 5)
    assert siem.bearer_token_env == "SIEM_TOKEN" and out.type == "stdout"


@pytest.mark.parametrize(("sinks", "message"), [
    ("[{type: kafka}]", "must be one of stdout, file, syslog, otlp, http"),
    ("[{type: syslog}]", "needs a host"),
    ("[{type: syslog, host: h, port: 0}]", "port number"),
    ("[{type: http, url: 'ftp://x'}]", "http:// or https://"),
    ("[{type: stdout, url: x}]", "unknown key"),
    ("[{type: stdout}, {type: stdout}]", "two sinks are named 'stdout'"),
    ("[{type: stdout, name: 'Bad Name'}]", "short name"),
    ("[{type: stdout, max_outage: soon}]", "not a duration"),
    ("{type: stdout}", "must be a list"),
])
def test_config_errors_name_the_line(tmp_path: Path, sinks: str, message: str) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"audit:\n  path: a.jsonl\n  sinks: {sinks}\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert message in str(e.value)
    assert e.value.line == 3


async def test_every_line_ships_once_across_rotation_and_restart(tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    s = make_shipping(tmp_path, "  max_bytes: 3000\n" + file_sink(copy))
    s.write(60)
    assert len(log_files(s.path)) > 3  # rotated several times
    await until(lambda: _copy(copy) == s.lines(), what="the copy to catch up")
    await s.close()
    # A new process: the cursor says where to go on; nothing is sent twice.
    s = make_shipping(tmp_path, "  max_bytes: 3000\n" + file_sink(copy))
    s.write(25)
    await until(lambda: len(_copy(copy)) == len(s.lines()))
    assert _copy(copy) == s.lines()
    await until(lambda: s.sample("tether_audit_records_shipped_total", sink="copy") == 25)
    assert load_cursor(cursor_path(s.path, "copy")).seq == 85
    await s.close()


async def test_a_sink_that_fails_and_comes_back_loses_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.jsonl"  # its directory does not exist yet: ENOENT
    s = make_shipping(tmp_path, "  max_bytes: 2000\n" + file_sink(target))
    s.write(30)
    await until(lambda: s.sample("tether_audit_records_failed_total", sink="copy") > 0)
    await until(lambda: s.sample("tether_audit_spool_bytes", sink="copy") > 0)
    assert s.sample("tether_audit_sink_up", sink="copy") == 0
    target.parent.mkdir()
    s.write(10)
    await until(lambda: _copy(target) == s.lines())
    await until(lambda: s.sample("tether_audit_spool_bytes", sink="copy") == 0)
    assert s.sample("tether_audit_sink_up", sink="copy") == 1
    await s.close()


async def test_keep_never_prunes_a_file_a_sink_has_not_shipped(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.jsonl"
    s = make_shipping(tmp_path, "  max_bytes: 1500\n  keep: 1\n" + file_sink(target))
    s.write(40)
    held = log_files(s.path)
    assert len(held) > 3  # keep: 1, but nothing was shipped yet
    target.parent.mkdir()
    await until(lambda: len(_copy(target)) == 40)
    assert_at_least_once_in_order(_copy(target)[:40], _copy(target))
    for n in range(41, 81):  # shipped as they come now: rotation prunes again
        s.write(1)
        await until(lambda n=n: len(_copy(target)) == n)  # type: ignore[misc]
    assert len(log_files(s.path)) <= 3
    await s.close()


async def test_spool_full_refuses_records_then_recovers(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.jsonl"
    s = make_shipping(tmp_path, file_sink(target).replace("poll_interval: 20ms",
                                                          "poll_interval: 20ms, max_bytes: 4000"))
    with pytest.raises(AuditWriteError, match="audit spool is full"):
        for _ in range(100):
            s.write(1)
    assert s.shipper.refusal() is not None and s.audit.healthy  # the file itself is fine
    assert s.sample("tether_audit_refused_total", cause="spool_full") >= 1
    assert s.sample("tether_audit_write_errors_total") >= 1
    written = s.lines()
    target.parent.mkdir()
    await until(lambda: s.shipper.refusal() is None, what="the spool to drain")
    s.write(3)
    await until(lambda: _copy(target) == s.lines())
    assert s.lines()[:len(written)] == written
    await s.close()


async def test_a_required_sink_down_past_its_limit_refuses_records(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.jsonl"
    s = make_shipping(tmp_path, file_sink(target, ", required: true, max_outage: 300ms"))
    s.write(1)
    await until(lambda: s.shipper.refusal() is not None, what="the outage to pass its limit")
    with pytest.raises(AuditWriteError, match="required audit sink copy has been down"):
        s.write(1)
    assert s.sample("tether_audit_refused_total", cause="sink_down") == 1
    target.parent.mkdir()
    await until(lambda: s.shipper.refusal() is None)
    s.write(1)
    await until(lambda: len(_copy(target)) == 2)
    await s.close()


def test_the_reader_hands_out_whole_lines_only(tmp_path: Path) -> None:
    s = make_shipping(tmp_path, file_sink(tmp_path / "c"), start=False)
    s.write(3)
    with open(s.path, "ab") as f:
        f.write(b'{"kind":"decision","seq":4,"tor')  # a write in progress (or torn)
    reader = SpoolReader(s.path, Position())
    assert [ln.seq for ln in reader.read_batch(100, 1 << 20)] == [1, 2, 3]
    assert reader.read_batch(100, 1 << 20) == []
    with open(s.path, "ab") as f:
        f.write(b'n":1}\n')
    assert [ln.seq for ln in reader.read_batch(100, 1 << 20)] == [4]
    reader.close()
    s.audit.close()


def test_a_cursor_finds_its_place_by_seq_when_its_file_is_gone(tmp_path: Path) -> None:
    s = make_shipping(tmp_path, "  max_bytes: 1500\n" + file_sink(tmp_path / "c"), start=False)
    s.write(30)
    reader = SpoolReader(s.path, Position(seq=17, ino=1, offset=5))  # no such inode
    assert reader.read_batch(1, 1 << 20)[0].seq == 18
    reader.close()
    # A log that was replaced (its seqs restart below the cursor) ships from its start.
    reader = SpoolReader(s.path, Position(seq=5000, ino=0, offset=0))
    assert reader.read_batch(1, 1 << 20)[0].seq == 1
    reader.close()
    s.audit.close()


async def test_shutdown_drains_the_spool(tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    s = make_shipping(tmp_path, file_sink(copy).replace("poll_interval: 20ms",
                                                        "poll_interval: 60s"))
    await until(lambda: all(w.task is not None for w in s.shipper.workers))
    s.write(50)  # the sink polls once a minute: nothing ships before the drain
    s.audit.close()
    assert await s.shipper.drain(5.0)
    assert _copy(copy) == s.lines()


async def test_a_drain_that_runs_out_of_time_leaves_the_rest_for_the_next_start(
        tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.jsonl"
    s = make_shipping(tmp_path, file_sink(target))
    s.write(10)
    s.audit.close()
    assert not await s.shipper.drain(0.3)
    target.parent.mkdir()
    s = make_shipping(tmp_path, file_sink(target))
    await until(lambda: _copy(target) == s.lines())
    await s.close()


async def test_stdout_sink_prints_each_line(tmp_path: Path,
                                            capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    s = make_shipping(tmp_path, "  spool: {poll_interval: 20ms}\n  sinks: [{type: stdout}]\n")
    s.write(3, arguments={"note": "\ud800 lone surrogate, é, \u202e bidi"})
    await until(lambda: s.sample("tether_audit_records_shipped_total", sink="stdout") == 3)
    out = capfdbinary.readouterr().out.split(b"\n")[:-1]
    assert out == s.lines()
    assert [json.loads(line)["seq"] for line in out] == [1, 2, 3]
    await s.close()


def test_cursor_files_stay_out_of_the_way_of_verify(tmp_path: Path) -> None:
    from proxy.audit.chain import verify_targets

    s = make_shipping(tmp_path, file_sink(tmp_path / "elsewhere" / "c"), start=False)
    s.write(2)
    os.makedirs(cursor_path(s.path, "x").parent)
    cursor_path(s.path, "x").write_text('{"seq": 1, "ino": 1, "offset": 1}')
    (tmp_path / "tether.yaml").unlink()
    assert verify_targets([str(tmp_path)]) == []
    s.audit.close()
