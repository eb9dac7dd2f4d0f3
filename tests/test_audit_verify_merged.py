"""`tether audit verify --merged` over a central copy of three instances' logs.

The logs are written by the real AuditLog with signed chain heads (Ed25519 and
HMAC), merged as a shipper would deliver them (interleaved, shuffled, some lines
twice), tampered with, and checked by the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from proxy.audit import AuditLog, AuditSettings, Fsync
from proxy.audit.chain import canonical, digest
from proxy.audit.signing import Alg, SignSettings

ROOT = Path(__file__).resolve().parent.parent
Lines = dict[str, list[bytes]]  # instance -> its lines in seq order


def tether(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                            timeout=120, cwd=ROOT, input=stdin)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def ed25519_keys(tmp: Path, name: str = "ed") -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = tmp / f"{name}.pem", tmp / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def hmac_key(tmp: Path, name: str = "hmac") -> Path:
    path = tmp / f"{name}.key"
    path.write_text(random.Random(name).randbytes(32).hex() + "\n")
    return path


class Keys:
    def __init__(self, tmp: Path, alg: Alg, name: str = "key") -> None:
        self.alg = alg
        if alg is Alg.ED25519:
            self.sign_file, self.verify_file = ed25519_keys(tmp, name)
            self.flag = "--public-key"
        else:
            self.sign_file = self.verify_file = hmac_key(tmp, name)
            self.flag = "--hmac-key-file"

    def settings(self, name: str) -> AuditSettings:
        return AuditSettings(fsync=Fsync.NEVER, instance=name,
                             sign=SignSettings.load(self.alg, str(self.sign_file)))

    def verify(self, *files: Path | str, extra: tuple[str, ...] = (),
               stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return tether("audit", "verify", "--merged", *map(str, files), self.flag,
                      str(self.verify_file), *extra, stdin=stdin)


def write_instance(path: Path, settings: AuditSettings, n: int, head_every: int = 4) -> AuditLog:
    """n decisions with a periodic head every `head_every` records and one at close."""
    log = AuditLog(str(path), settings)
    for i in range(n):
        log.write({"kind": "decision", "tool": f"t{i}", "arguments": {"i": i}})
        if (i + 1) % head_every == 0:
            assert log.write_head()
    log.close()
    return log


@pytest.fixture(params=[Alg.ED25519, Alg.HMAC_SHA256], ids=["ed25519", "hmac"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> Keys:
    return Keys(tmp_path, request.param)


@pytest.fixture
def three(tmp_path: Path, keys: Keys) -> Lines:
    out: Lines = {}
    for name, n in (("web-a", 10), ("web-b", 13), ("web-c", 9)):
        log = write_instance(tmp_path / f"{name}.jsonl", keys.settings(name), n)
        out[log.instance] = (tmp_path / f"{name}.jsonl").read_bytes().splitlines()
    return out


def central(tmp: Path, lines: Lines, *, seed: int = 1, duplicates: float = 0.0,
            shuffle: bool = False) -> Path:
    """Interleaved as three shippers deliver: each instance in order, instances mixed."""
    rng = random.Random(seed)
    queues = [list(v) for v in lines.values()]
    merged: list[bytes] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop(0))
        if rng.random() < duplicates:
            merged.append(merged[rng.randrange(len(merged))])
    if shuffle:
        rng.shuffle(merged)
    path = tmp / "central.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in merged))
    return path


def instance(lines: Lines, prefix: str) -> str:
    return next(name for name in lines if name.startswith(prefix + "-"))


def record(line: bytes) -> dict[str, object]:
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def status_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"instance {name}: "))


def test_untouched_central_copy_is_complete(tmp_path: Path, keys: Keys, three: Lines) -> None:
    path = central(tmp_path, three)
    result = keys.verify(path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, lines in three.items():
        last, n = record(lines[-1]), len(lines)
        assert last["kind"] == "chain_head" and last["instance"] == name
        assert re.fullmatch(rf"instance {name}: complete: seq 1-{n}, {n} records, signed "
                            rf"through seq {n} \({re.escape(str(path))}:\d+\)",
                            status_line(result.stdout, name))
    assert result.stdout.splitlines()[-1] == (
        "3 instance(s): 3 complete, 0 with an unsigned tail, 0 failed")


def test_reordered_and_duplicated_is_not_an_error(tmp_path: Path, keys: Keys, three: Lines) -> None:
    result = keys.verify(central(tmp_path, three, shuffle=True, duplicates=0.3, seed=7))
    assert result.returncode == 0, result.stdout
    assert "duplicate(s) dropped" in result.stdout
    assert "3 complete" in result.stdout


def test_split_over_several_files_and_stdin(tmp_path: Path, keys: Keys, three: Lines) -> None:
    names = list(three)
    first, second = tmp_path / "part1.jsonl", tmp_path / "part2.jsonl"
    first.write_bytes(b"".join(x + b"\n" for x in three[names[0]] + three[names[1]][:5]))
    second.write_bytes(b"".join(x + b"\n" for x in three[names[1]][3:]))
    rest = b"".join(x + b"\n" for x in three[names[2]])
    result = keys.verify(second, first, "-", stdin=rest)
    assert result.returncode == 0, result.stdout
    assert "3 complete" in result.stdout


def _drop(lines: Lines, name: str, seq: int) -> None:
    del lines[name][seq - 1]


def _alter(lines: Lines, name: str, seq: int) -> None:
    r = record(lines[name][seq - 1])
    r["tool"] = "something_else"
    lines[name][seq - 1] = canonical(r)


def test_a_removed_record_is_a_gap(tmp_path: Path, keys: Keys, three: Lines) -> None:
    b = instance(three, "web-b")
    _drop(three, b, 6)
    result = keys.verify(central(tmp_path, three, duplicates=0.2))
    assert result.returncode == 1
    assert status_line(result.stdout, b).startswith(f"instance {b}: FAILED: seq 1-")
    assert "  gap: seq 6 missing" in result.stdout
    assert "2 complete, 0 with an unsigned tail, 1 failed" in result.stdout


def test_removed_range_is_one_gap(tmp_path: Path, keys: Keys, three: Lines) -> None:
    a = instance(three, "web-a")
    del three[a][2:6]
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    assert "  gap: seq 3-6 missing (4 records)" in result.stdout


def test_an_altered_record_breaks_the_chain_at_its_seq(tmp_path: Path, keys: Keys,
                                                       three: Lines) -> None:
    c = instance(three, "web-c")
    _alter(three, c, 3)
    result = keys.verify(central(tmp_path, three, shuffle=True))
    assert result.returncode == 1
    altered = [x for x in result.stdout.splitlines() if "altered:" in x]
    assert len(altered) == 1 and altered[0].startswith("  altered: seq 3: ")
    assert "the record at seq 4" in altered[0] and "does not chain to it" in altered[0]


def test_an_edit_that_is_not_canonical(tmp_path: Path, keys: Keys, three: Lines) -> None:
    a = instance(three, "web-a")
    three[a][1] = three[a][1].replace(b'"tool":', b'"tool": ')
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    assert "altered: seq 2: " in result.stdout and "not in canonical form" in result.stdout


def test_two_different_records_at_one_seq(tmp_path: Path, keys: Keys, three: Lines) -> None:
    a = instance(three, "web-a")
    r = record(three[a][4])
    r["tool"] = "forged"
    three[a].append(canonical(r))  # same (instance, seq 5), other content
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    assert "altered: seq 5: different records at this seq: " in result.stdout


def test_a_missing_signed_head_leaves_an_unsigned_tail(tmp_path: Path, keys: Keys,
                                                       three: Lines) -> None:
    b = instance(three, "web-b")
    n = len(three[b])
    assert record(three[b][-1])["kind"] == "chain_head"
    three[b].pop()  # the head written at shutdown never arrived
    path = central(tmp_path, three)
    result = keys.verify(path)
    assert result.returncode == 0, result.stdout  # a warning by default
    assert status_line(result.stdout, b).startswith(f"instance {b}: unsigned tail: seq 1-{n - 1}")
    assert (f"  warning: unsigned tail: seq {n - 1} (1 record(s) after the last signed head, "
            f"at seq {n - 2})") in result.stdout
    assert "2 complete, 1 with an unsigned tail, 0 failed" in result.stdout
    strict = keys.verify(path, extra=("--require-signed-tail",))
    assert strict.returncode == 1
    assert f"instance {b}: FAILED: unsigned tail" in strict.stdout
    assert "  error: unsigned tail: " in strict.stdout


def _resign(line: bytes, change: Callable[[dict[str, object]], None]) -> bytes:
    r = record(line)
    change(r)
    return canonical(r)


def test_a_bad_signature(tmp_path: Path, keys: Keys, three: Lines) -> None:
    a = instance(three, "web-a")
    head = next(i for i, x in enumerate(three[a]) if record(x)["kind"] == "chain_head")

    def flip(r: dict[str, object]) -> None:
        sig = str(r["sig"])
        r["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]

    three[a][head] = _resign(three[a][head], flip)
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    assert f"  bad signature: head at seq {head + 1}: {tmp_path / 'central.jsonl'}:" in result.stdout
    bad = next(x for x in result.stdout.splitlines() if "  bad signature: " in x)
    assert bad.endswith(": bad signature")


def test_a_head_signed_with_another_key(tmp_path: Path, keys: Keys, three: Lines) -> None:
    """A forger with a key of their own: a valid-looking chain, heads that do not verify."""
    other = Keys(tmp_path, keys.alg, "forger")
    forged_path = tmp_path / "forged.jsonl"
    log = write_instance(forged_path, other.settings("web-a"), 6)
    three[log.instance] = forged_path.read_bytes().splitlines()
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    report = result.stdout.split(f"instance {log.instance}: ")[1]
    assert report.startswith("FAILED: seq 1-")
    assert "bad signature: head at seq 5: " in report
    assert "unsigned tail: seq 1-" in report  # nothing of it is signed by a known key


def test_records_forged_after_the_last_head(tmp_path: Path, keys: Keys, three: Lines) -> None:
    """A valid chain (prev is the hash of the last line) with no key: an unsigned tail."""
    c = instance(three, "web-c")
    n = len(three[c])
    for i in range(2):
        last = three[c][-1]
        three[c].append(canonical({"v": 4, "kind": "decision", "tool": "forged", "instance": c,
                                   "seq": n + 1 + i, "prev": digest(last),
                                   "time": "2026-12-07T00:00:00Z"}))
    path = central(tmp_path, three)
    result = keys.verify(path)
    assert result.returncode == 0
    assert f"  warning: unsigned tail: seq {n + 1}-{n + 2} (2 record(s) after the last signed " \
           f"head, at seq {n})" in result.stdout
    assert keys.verify(path, extra=("--require-signed-tail",)).returncode == 1
    # A forged head on top does not help: it does not verify.
    three[c].append(canonical({"v": 4, "kind": "chain_head", "instance": c, "seq": n + 3,
                               "prev": digest(three[c][-1]), "head": digest(three[c][-1]),
                               "alg": str(keys.alg), "key_id": "x", "sig": "AAAA",
                               "time": "2026-12-07T00:00:00Z"}))
    result = keys.verify(central(tmp_path, three))
    assert result.returncode == 1
    assert f"bad signature: head at seq {n + 3}" in result.stdout


def test_without_a_key_signatures_are_not_checked(tmp_path: Path, keys: Keys,
                                                  three: Lines) -> None:
    path = central(tmp_path, three)
    result = tether("audit", "verify", "--merged", str(path))
    assert result.returncode == 0
    assert "warning: no key given" in result.stdout
    assert "3 with an unsigned tail" in result.stdout
    assert tether("audit", "verify", "--merged", "--require-signed-tail", str(path)).returncode == 1


def test_json_report(tmp_path: Path, keys: Keys, three: Lines) -> None:
    b = instance(three, "web-b")
    _drop(three, b, 2)
    result = keys.verify(central(tmp_path, three), extra=("--json",))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    by_name = {i["instance"]: i for i in report["instances"]}
    assert by_name[b]["gaps"] == [[2, 2]] and by_name[b]["status"] == "FAILED"
    assert all(i["status"] == "complete" for n, i in by_name.items() if n != b)


def test_syslog_lines_carry_the_records(tmp_path: Path, keys: Keys, three: Lines) -> None:
    """RFC 5424 lines (as rsyslog writes them with RSYSLOG_SyslogProtocol23Format), with
    structured data that holds braces and quotes, a BOM before the MSG, and CRLF ends."""
    out: list[bytes] = []
    for i, line in enumerate(x for lines in three.values() for x in lines):
        sd = b'[tether@32473 note="a \\"{quoted}\\" ]value\\\\"][x@1 k="v"]' if i % 2 else b"-"
        bom = b"\xef\xbb\xbf" if i % 3 == 0 else b""
        out.append(b"<134>1 2026-12-07T06:00:00.000Z pod-1 tether 1 audit " + sd + b" "
                   + bom + line + (b"\r" if i % 5 == 0 else b""))
    out.append(b"<13>1 2026-12-07T06:00:00Z host other - - - an unrelated message")
    path = tmp_path / "syslog.log"
    path.write_bytes(b"\n".join(out) + b"\n")
    result = keys.verify(path)
    assert result.returncode == 0, result.stdout
    assert "3 complete" in result.stdout
    assert "1 line(s) are not audit records" in result.stdout


def test_hostile_lines_in_the_central_copy(tmp_path: Path, keys: Keys, three: Lines) -> None:
    a = instance(three, "web-a")
    good = central(tmp_path, three).read_bytes()
    base = {"v": 4, "kind": "decision", "prev": "0" * 64, "time": "x"}
    hostile = [
        b"not json at all",
        b"\xff\xfe\x00 invalid utf-8 \xc3\x28",
        b"{" * 5,
        b"[" * 200_000 + b"]" * 200_000,  # deeper than any parser recursion
        b'{"instance": "' + b"x" * (5 * 1024 * 1024) + b'"',  # 5 MB, unterminated
        b"x" * (3 * 1024 * 1024),
        b"[1, 2, 3]",
        b'"a string"',
        b"{}",
        b'{"seq": 1, "prev": "abc"}',                             # v3-like, no instance
        canonical({**base, "instance": 42, "seq": 1}),
        canonical({**base, "instance": "", "seq": 1}),
        canonical({**base, "instance": "\ud800\u202e", "seq": "1"}),
        canonical({**base, "instance": a, "seq": "3"}),
        canonical({**base, "instance": a, "seq": True}),
        canonical({**base, "instance": a, "seq": -4}),
        canonical({**base, "instance": a, "seq": 0}),
        canonical({**base, "instance": a}),                      # no seq
        b'{"instance": "web-z", "seq": 1e400, "prev": NaN}',
        b'{"instance": "web-z", "seq": ' + b"9" * 5000 + b"}",  # past int parsing limits
        b'{"instance": "web-z", "instance": "web-y", "seq": 1, "prev": "' + b"0" * 64 + b'"}',
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(hostile) + b"\n" + good)
    result = keys.verify(path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1  # the malformed records attributed to web-a
    report = result.stdout
    assert f"instance {a}: FAILED" in report
    for shown in ('malformed: ', 'seq "3" is not a positive whole number',
                  "seq true is not", "seq -4 is not", "seq 0 is not", "seq null is not"):
        assert shown in report, shown
    for name in three:
        if name != a:
            assert status_line(report, name).startswith(f"instance {name}: complete")
    assert "line(s) are not audit records" in report
    assert '"\\ud800\\u202e"' in report  # the hostile name, escaped
    as_json = keys.verify(path, extra=("--json",))
    assert json.loads(as_json.stdout)["ok"] is False


def test_a_line_over_the_limit_is_skipped_in_bounded_memory() -> None:
    import io

    from proxy.audit.central_read import read_source

    data = b'{"a":1}\n' + b"y" * 10_000 + b"\n" + b"z" * 100 + b"\n" + b'{"b":2}'
    got = list(read_source("f", io.BytesIO(data), max_line=100))
    assert [(x.number, x.data, x.why[:11]) for x in got] == [
        (1, b'{"a":1}', ""), (2, None, "longer than"), (3, None, "neither a J"),
        (4, b'{"b":2}', "")]


def test_unreadable_file_or_key_is_exit_2(tmp_path: Path, keys: Keys) -> None:
    result = keys.verify(tmp_path / "nope.jsonl")
    assert result.returncode == 2 and "error: " in result.stderr
    path = tmp_path / "x.jsonl"
    path.write_text("")
    result = tether("audit", "verify", "--merged", str(path), "--public-key",
                    str(tmp_path / "missing.pub"))
    assert result.returncode == 2 and "missing.pub: cannot read the key file" in result.stderr
    result = tether("audit", "verify", str(path), "--public-key", str(keys.verify_file))
    assert result.returncode == 2 and "add --merged" in result.stderr


def test_a_local_rotated_log_verifies_merged_too(tmp_path: Path, keys: Keys) -> None:
    settings = AuditSettings(max_bytes=1500, fsync=Fsync.NEVER, instance="pod",
                             sign=SignSettings.load(keys.alg, str(keys.sign_file)))
    write_instance(tmp_path / "audit.jsonl", settings, 20)
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 2
    result = keys.verify(tmp_path / "audit.jsonl")
    assert result.returncode == 0, result.stdout
    assert "1 complete" in result.stdout
    assert tether("audit", "verify", str(tmp_path / "audit.jsonl")).returncode == 0


async def test_three_instances_through_a_real_rsyslog(tmp_path: Path, keys: Keys) -> None:
    """Signed instances ship to Debian's rsyslogd (RFC 5424 over TCP); the file it writes
    (%rawmsg%, every instance in one file) verifies, and a line cut from it is found."""
    from tests.audit_shipping_helpers import make_shipping, until
    from tests.rsyslog_server import Rsyslog

    server = Rsyslog(tmp_path / "rsyslog")
    server.start()
    try:
        sign = f"  sign: {{alg: {keys.alg}, key_file: {keys.sign_file}, interval: 1h}}\n"
        sinks = (f"  spool: {{poll_interval: 20ms}}\n  sinks:\n    - {{name: rs, type: syslog, "
                 f"host: 127.0.0.1, port: {server.port}, timeout: 5s, "
                 f"backoff: {{min: 50ms, max: 200ms}}}}\n")
        shippers = []
        for name in ("web-a", "web-b", "web-c"):
            (tmp_path / name).mkdir()
            shippers.append(make_shipping(tmp_path / name, f"  instance: {name}\n{sign}{sinks}",
                                          start=False))
        for round_ in range(3):
            for s in shippers:
                s.write(3, round=round_)
                assert s.audit.write_head()
        for s in shippers:
            s.write(2)
        for s in shippers:  # one after the other: one shipper per process, as in tether serve
            s.shipper.start()
            await s.close()  # the head at shutdown, then the drain
        total = sum(len(s.lines()) for s in shippers)
        await until(lambda: len(server.raw()) >= total, what="rsyslog to write every record")
    finally:
        server.stop()
    result = keys.verify(server.raw_file, extra=("--require-signed-tail",))
    assert result.returncode == 0, result.stdout
    assert "3 instance(s): 3 complete" in result.stdout
    raw = server.raw()
    assert raw[0].startswith(b"<") and b'[tether@32473 instance="' in raw[0]
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"\n".join(raw[:7] + raw[8:]) + b"\n")
    result = keys.verify(cut)
    assert result.returncode == 1 and "  gap: seq " in result.stdout


# --- the reader on its own: total on any bytes, exact on syslog framing -----------------

_SD_VALUE = st.binary(max_size=40).map(
    lambda b: b.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"]", b"\\]")
    .replace(b"\n", b""))
_SD = st.one_of(st.just(b"-"), st.lists(
    st.tuples(st.from_regex(rb"\A[a-z@0-9]{1,12}\Z"), st.from_regex(rb"\A[a-z]{1,8}\Z"),
              _SD_VALUE).map(lambda t: b"[" + t[0] + b" " + t[1] + b'="' + t[2] + b'"]'),
    min_size=1, max_size=3).map(b"".join))


@given(sd=_SD, bom=st.booleans(), record=st.dictionaries(
    st.text(max_size=8), st.one_of(st.text(max_size=20), st.integers()), max_size=5))
def test_syslog_msg_is_the_exact_line(sd: bytes, bom: bool, record: dict[str, object]) -> None:
    from proxy.audit.central_read import audit_line

    line = canonical(record)
    raw = (b"<134>1 2026-12-07T06:00:00Z host tether 1 decision " + sd + b" "
           + (b"\xef\xbb\xbf" if bom else b"") + line)
    assert audit_line(raw) == line


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_give_a_report_not_an_exception(chunks: list[bytes]) -> None:
    import io

    from proxy.audit.central_read import read_source
    from proxy.audit.signing import Keyring
    from proxy.audit.verify_merged import Collector, render_json, render_text

    collector = Collector(Keyring())
    collector.add_all(read_source("f", io.BytesIO(b"\n".join(chunks)), max_line=200))
    reports = collector.reports()
    render_text(reports, collector.notes, require_signed_tail=True, keys_given=False)
    render_json(reports, collector.notes, require_signed_tail=False)
