"""Instance ids and signed chain heads: config, AuditLog, and a running `tether serve`
(a head at SIGTERM, periodic heads only when records were written, a kill -9 and a
restart that continue the same instance's chain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from proxy import config as config_mod
from proxy.audit import AuditLog, AuditSettings, AuditWriteError, Fsync
from proxy.audit.chain import verify
from proxy.audit.signing import Alg, Keyring, SignSettings
from proxy.errors import ConfigError
from proxy.telemetry import Metrics
from tests.fakes import FakeOpenAI
from tests.redis_server import free_port
from tests.test_audit_verify_merged import ed25519_keys, hmac_key, tether

ROOT = Path(__file__).resolve().parent.parent


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_sign_config(tmp_path: Path) -> None:
    private, _ = ed25519_keys(tmp_path)
    secret = hmac_key(tmp_path)
    cfg = tmp_path / "t.yaml"
    cfg.write_text("audit:\n  path: a.jsonl\n  instance: checkout-agent\n"
                   "  sign: {alg: ed25519, key_file: key.pem, interval: 30s}\n")
    private.rename(tmp_path / "key.pem")
    loaded = config_mod.load(cfg, env={})
    assert loaded.audit.instance == "checkout-agent"
    assert loaded.audit.sign is not None and loaded.audit.sign.interval_s == 30.0
    assert loaded.audit.sign.key_file == str(tmp_path / "key.pem")  # relative to the config
    assert loaded.audit.sign.signer is not None
    assert loaded.audit.sign.signer.key_id.startswith("ed25519:")
    cfg.write_text(f"audit:\n  sign: {{alg: hmac-sha256, key_file: {secret}}}\n")
    hmac = config_mod.load(cfg, env={}).audit.sign
    assert hmac is not None and hmac.interval_s == 60.0 and "hunter" not in repr(hmac)
    assert "_secret" not in repr(hmac)


@pytest.mark.parametrize(("sign", "line", "message"), [
    ("{alg: rsa, key_file: k}", 3, "must be ed25519 or hmac-sha256"),
    ("{alg: ed25519}", 3, "must be the path of the signing key"),
    ("{alg: ed25519, key_file: /nonexistent/tether.pem}", 3,
     "/nonexistent/tether.pem: cannot read the key file"),
    ("{alg: ed25519, key_file: SECRET}", 3, "not an unencrypted PEM private key"),
    ("{alg: hmac-sha256, key_file: SHORT}", 3, "an HMAC secret needs at least 16 bytes"),
    ("{alg: ed25519, key_file: SECRET, interval: soon}", 3, "is not a duration"),
    ("{alg: ed25519, key_file: SECRET, color: red}", 3, "unknown key"),
])
def test_sign_config_errors_name_the_file(tmp_path: Path, sign: str, line: int,
                                          message: str) -> None:
    secret, short = hmac_key(tmp_path), tmp_path / "short.key"
    short.write_text("abc\n")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("audit:\n  path: a.jsonl\n  sign: "
                   + sign.replace("SECRET", str(secret)).replace("SHORT", str(short)) + "\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.file == str(cfg) and e.value.line == line, e.value
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 201, "\u202eevil", 42])
def test_instance_names_are_checked(tmp_path: Path, name: object) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"audit:\n  instance: {json.dumps(name)}\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.line == 2 and "audit.instance" in str(e.value)


def test_instance_from_env_kept_on_restart_new_with_a_new_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_INSTANCE", raising=False)
    monkeypatch.setenv("POD_NAME", "tether-7d9f8-x2k4p")
    settings = AuditSettings(fsync=Fsync.NEVER)
    first = AuditLog(str(tmp_path / "a.jsonl"), settings)
    assert first.instance.startswith("tether-7d9f8-x2k4p-") and len(first.instance) == 27
    first.write({"kind": "decision"})
    first.close()
    again = AuditLog(str(tmp_path / "a.jsonl"), settings)
    assert again.instance == first.instance  # the same chain, the same id
    again.write({"kind": "decision"})
    again.close()
    monkeypatch.setenv("TETHER_INSTANCE", "named")
    other = AuditLog(str(tmp_path / "b.jsonl"), settings)
    other.close()
    assert other.instance.startswith("named-") and other.instance != first.instance
    assert [(r["instance"], r["seq"], r["v"]) for r in records(tmp_path / "a.jsonl")] == [
        (first.instance, 1, 4), (first.instance, 2, 4)]


def test_a_v3_log_continues_under_a_new_instance(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path), AuditSettings(fsync=Fsync.NEVER, instance="pod"))
    log.write({"kind": "decision"})
    log.close()
    lines = path.read_bytes().splitlines()
    v3 = json.loads(lines[0])
    del v3["instance"]
    v3["v"] = 3
    from proxy.audit.chain import canonical

    path.write_bytes(canonical(v3) + b"\n")
    upgraded = AuditLog(str(path), AuditSettings(fsync=Fsync.NEVER, instance="pod"))
    upgraded.write({"kind": "decision"})
    upgraded.close()
    assert upgraded.instance != log.instance
    assert [r.get("instance") for r in records(path)] == [None, upgraded.instance]
    assert verify([path]) == []  # the file's chain goes on across the upgrade


def test_heads_only_when_records_were_written(tmp_path: Path) -> None:
    private, public = ed25519_keys(tmp_path)
    settings = AuditSettings(fsync=Fsync.NEVER, sign=SignSettings.load(Alg.ED25519, str(private)))
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path), settings)
    assert not log.write_head()  # nothing to sign yet
    log.write({"kind": "decision"})
    assert log.write_head() and not log.write_head()
    log.close()  # nothing since the last head: no second one
    assert [r["kind"] for r in records(path)] == ["decision", "chain_head"]
    reopened = AuditLog(str(path), settings)
    assert not reopened.write_head()  # the log ends in a head already
    reopened.close()
    keys = Keyring()
    keys.add_public_key(str(public))
    head = records(path)[1]
    assert keys.check(head).value == "valid"
    assert head["head"] == head["prev"] and head["seq"] == 2 and head["alg"] == "ed25519"


def test_a_head_that_cannot_be_written_is_counted_not_raised(tmp_path: Path) -> None:
    metrics = Metrics()
    settings = AuditSettings(fsync=Fsync.NEVER,
                             sign=SignSettings.load(Alg.HMAC_SHA256, str(hmac_key(tmp_path))))
    log = AuditLog(str(tmp_path / "a.jsonl"), settings, metrics)
    log.write({"kind": "decision"})
    assert log._file is not None
    log._file.close()  # the next write fails like a vanished disk
    assert log.write_head() is False
    assert log.heads_failed == 1 and not log.healthy
    assert metrics.audit_chain_heads.labels("failed")._value.get() == 1
    log.write({"kind": "decision"})  # the handle is reopened; the next head covers both
    assert log.write_head() and log.healthy
    log.close()
    kinds = [r["kind"] for r in records(tmp_path / "a.jsonl")]
    assert kinds == ["decision", "decision", "chain_head"]
    bad = AuditLog(str(tmp_path / "b.jsonl"), AuditSettings(fsync=Fsync.NEVER))
    with pytest.raises(AuditWriteError):
        bad.write({"kind": "chain_head"})  # a head without a key is refused, not unsigned
    bad.close()


# --- through a running `tether serve` ---------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[int]:
    from tests.fakes import Call, Reply
    from tests.fakes.threaded import ThreadedServer

    fake = FakeOpenAI(script=lambda body: Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    with ThreadedServer(fake.app()) as port:
        yield port


@contextmanager
def serving(tmp_path: Path, upstream: int, audit: Path, sign: str,
            env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], openai.OpenAI]]:
    port, admin = free_port(), free_port()
    config = tmp_path / "tether.yaml"
    config.write_text(f"include: [{ROOT / 'rules/janitor.yaml'}]\n"
                      f"audit: {{path: {audit}, fsync: always, instance: web, sign: {sign}}}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
         "--admin-port", str(admin)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}",
                        **(env or {})})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="sk-x",
                           max_retries=0)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "proxy on" in banner, proc.stderr.read() if proc.stderr else banner
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def call(client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}],
        tools=[{"type": "function", "function": {"name": "get_weather"}}])


def kinds(path: Path) -> list[str]:
    return [str(r["kind"]) for r in records(path)]


def test_sigterm_writes_a_head_and_a_restart_after_kill_continues_the_chain(
        tmp_path: Path, upstream: int) -> None:
    private, public = ed25519_keys(tmp_path)
    audit = tmp_path / "audit.jsonl"
    sign = f"{{alg: ed25519, key_file: {private}, interval: 1h}}"
    with serving(tmp_path, upstream, audit, sign) as (proc, client):
        call(client)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert kinds(audit) == ["decision", "chain_head"]
    instance = records(audit)[0]["instance"]
    assert isinstance(instance, str) and instance.startswith("web-")

    with serving(tmp_path, upstream, audit, sign) as (proc, client):
        call(client)
        proc.kill()  # kill -9: no head for this record
        proc.wait(10)
    assert kinds(audit)[-1] == "decision"
    tail = tether("audit", "verify", "--merged", str(audit), "--public-key", str(public))
    assert tail.returncode == 0 and "warning: unsigned tail: seq 3 (1 record(s)" in tail.stdout

    with serving(tmp_path, upstream, audit, sign) as (proc, client):
        call(client)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert kinds(audit) == ["decision", "chain_head", "decision", "decision", "chain_head"]
    assert {r["instance"] for r in records(audit)} == {instance}
    result = tether("audit", "verify", "--merged", str(audit), "--public-key", str(public),
                    "--require-signed-tail")
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"instance {instance}: complete: seq 1-5, 5 records, "
                                    "signed through seq 5")
    assert tether("audit", "verify", str(audit)).returncode == 0


def test_periodic_heads_only_while_records_come(tmp_path: Path, upstream: int) -> None:
    secret = hmac_key(tmp_path)
    audit = tmp_path / "audit.jsonl"
    sign = f"{{alg: hmac-sha256, key_file: {secret}, interval: 200ms}}"
    with serving(tmp_path, upstream, audit, sign) as (proc, client):
        call(client)
        deadline = time.monotonic() + 10
        while kinds(audit)[-1:] != ["chain_head"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kinds(audit) == ["decision", "chain_head"]
        time.sleep(1.0)  # five intervals idle: no new head
        assert kinds(audit) == ["decision", "chain_head"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert kinds(audit) == ["decision", "chain_head"]  # nothing since: no shutdown head
    result = tether("audit", "verify", "--merged", str(audit), "--hmac-key-file", str(secret))
    assert result.returncode == 0 and "1 complete" in result.stdout


def test_serve_refuses_an_unreadable_key(tmp_path: Path) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text(f"audit: {{path: {tmp_path / 'a.jsonl'}, "
                      "sign: {alg: ed25519, key_file: /run/secrets/missing.pem}}\n")
    result = tether("serve", "--config", str(config), "--port", "0", "--admin-port", "0")
    assert result.returncode == 1
    assert "/run/secrets/missing.pem: cannot read the key file" in result.stderr
    assert f"{config}:1" in result.stderr


def test_the_documented_openssl_key_works(tmp_path: Path) -> None:
    key, pub = tmp_path / "audit-signing.pem", tmp_path / "audit-signing.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                   capture_output=True)
    log = AuditLog(str(tmp_path / "a.jsonl"), AuditSettings(
        fsync=Fsync.NEVER, sign=SignSettings.load(Alg.ED25519, str(key))))
    log.write({"kind": "decision"})
    log.close()
    result = tether("audit", "verify", "--merged", str(tmp_path / "a.jsonl"), "--public-key",
                    str(pub), "--require-signed-tail")
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("kept", ["x" * 300, "a b", 7, "\ud800"])
def test_a_log_whose_last_instance_tether_would_not_write_gets_a_new_one(
        tmp_path: Path, kept: object) -> None:
    from proxy.audit.chain import canonical

    path = tmp_path / "a.jsonl"
    path.write_bytes(canonical({"v": 4, "kind": "decision", "instance": kept, "seq": 1,
                                "prev": "0" * 64}) + b"\n")
    log = AuditLog(str(path), AuditSettings(fsync=Fsync.NEVER, instance="pod"))
    log.write({"kind": "decision"})
    log.close()
    assert log.instance.startswith("pod-") and records(path)[1]["seq"] == 2
