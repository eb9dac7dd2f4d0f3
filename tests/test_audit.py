"""The audit log: hash chain, tampering, rotation, redaction, failing writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam

from proxy.audit import AuditLog, AuditSettings, AuditWriteError, Fsync
from proxy.audit.chain import GENESIS_HASH, digest, verify, verify_targets
from proxy.audit.redact import MASK, parse_paths, redact
from proxy.cli import main as cli_main
from tests.conftest import Stack
from tests.fakes import Call, Reply

SECRET_ARGS = {"password": "hunter2", "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "login")
]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "go"}]


def write_log(path: Path, n: int, settings: AuditSettings | None = None) -> AuditLog:
    log = AuditLog(str(path), settings or AuditSettings(fsync=Fsync.NEVER))
    for i in range(n):
        log.write({"kind": "decision", "tool": f"t{i}", "arguments": {"i": i}})
    log.close()
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_untouched_log_verifies_and_chains_from_genesis(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    records = [json.loads(x) for x in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS_HASH
    assert records[3]["prev"] == digest(lines(path)[2].rstrip(b"\n"))
    assert verify([path]) == []
    assert cli_main(["audit", "verify", str(path)]) == 0


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    write_log(path, 2)
    assert [json.loads(x)["seq"] for x in lines(path)] == [1, 2, 3, 4]
    assert verify([path]) == []


def _edit(path: Path, change: Any) -> None:
    data = lines(path)
    change(data)
    path.write_bytes(b"".join(data))


def _retool(data: list[bytes]) -> None:
    record = json.loads(data[2])
    record["tool"] = "something_else"
    data[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _insert(data: list[bytes]) -> None:
    record = json.loads(data[2])  # a plausible forgery: copies seq and prev of line 3
    record["tool"] = "forged"
    data.insert(2, json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")


@pytest.mark.parametrize(("name", "change", "line"), [
    ("edit one field", _retool, 3),
    ("edit with spacing", lambda d: d.__setitem__(1, d[1].replace(b'"tool":', b'"tool": ')), 2),
    ("delete one line", lambda d: d.pop(2), 3),
    ("insert one line", _insert, 4),
    ("swap two lines", lambda d: d.__setitem__(slice(1, 3), [d[2], d[1]]), 2),
])
def test_tampering_is_found_at_the_right_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              name: str, change: Any, line: int) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 6)
    _edit(path, change)
    problems = verify([path])
    assert problems, name
    assert (problems[0].file, problems[0].line) == (str(path), line), problems
    assert cli_main(["audit", "verify", str(path)]) == 1
    assert capsys.readouterr().out.startswith(f"{path}:{line}: ")


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 30, AuditSettings(max_bytes=600, fsync=Fsync.ALWAYS))
    rotated = sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    assert len(rotated) >= 3
    assert all(p.stat().st_size <= 600 for p in [path, *rotated])
    first_of_current = json.loads(lines(path)[0])
    last_of_previous = lines(tmp_path / "audit.jsonl.1")[-1].rstrip(b"\n")
    assert first_of_current["prev"] == digest(last_of_previous)
    assert verify_targets([str(path)]) == []          # base path: ordered by tether
    assert verify_targets([str(tmp_path)]) == []      # directory
    assert cli_main(["audit", "verify", str(path)]) == 0
    seqs = [json.loads(x)["seq"] for p in [*reversed(rotated), path] for x in lines(p)]
    assert seqs == list(range(1, 31))


def test_a_missing_rotated_file_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 30, AuditSettings(max_bytes=600, fsync=Fsync.NEVER))
    (tmp_path / "audit.jsonl.2").unlink()
    problems = verify_targets([str(path)])
    assert problems and problems[0].file == str(tmp_path / "audit.jsonl.1")
    assert problems[0].line == 1 and "missing" in problems[0].message
    oldest = max(tmp_path.glob("audit.jsonl.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    oldest.unlink()  # the start of the chain is gone
    problems = verify_targets([str(path)])
    assert problems and "genesis" in problems[0].message
    assert verify_targets([str(tmp_path / "audit.jsonl.1"), str(path)], from_genesis=False) == []


def test_keep_bounds_the_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 40, AuditSettings(max_bytes=600, keep=2, fsync=Fsync.NEVER))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1",
                                                          "audit.jsonl.2"]
    assert cli_main(["audit", "verify", "--partial", str(path)]) == 0


@pytest.mark.parametrize(("value", "masked"), [
    ({"password": "x", "max_tokens": 5}, ["password"]),
    ({"apiKey": "x", "X-Api-Key": "y", "tokenizer": "z"}, ["apiKey", "X-Api-Key"]),
    ({"headers": {"Authorization": "Basic abc"}, "Cookie": "a=b"}, ["headers.Authorization", "Cookie"]),
    ({"db": {"client_secret": {"nested": 1}}, "credentials": ["a"]}, ["db.client_secret", "credentials"]),
    ({"note": "call with Bearer abc.def"}, ["note"]),
    ({"cmd": "curl -H 'x: sk-abcdefghijklmnopqrstuvwx'"}, ["cmd"]),
    ({"msg": "xoxb-1234567890-abcdef"}, ["msg"]),
    ({"id": "AKIAIOSFODNN7EXAMPLE", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}, ["value"]),
    ({"commit": "0123456789abcdef0123456789abcdef01234567"}, []),
    ({"raw": '{"token": "abc", "n": 1'}, ["raw"]),
])
def test_redaction(value: dict[str, object], masked: list[str]) -> None:
    out = redact(value)
    assert list(out.masked) == masked
    text = json.dumps(out.value)
    for path in masked:
        assert MASK in text, path
    for secret in ("abc.def", "sk-abc", "xoxb-1", "wJalr", "Basic abc", '"abc"'):
        assert secret not in text


def test_configured_paths(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), AuditSettings(fsync=Fsync.NEVER,
                                            redact=parse_paths(["db.dsn", "rows.*.ssn"])))
    log.write({"kind": "decision", "arguments": {"db": {"dsn": "pg://u:p@h"},
                                                 "rows": [{"ssn": "1"}, {"ssn": "2"}]}})
    log.close()
    [record] = [json.loads(x) for x in lines(path)]
    assert record["arguments"] == {"db": {"dsn": MASK}, "rows": [{"ssn": MASK}, {"ssn": MASK}]}
    assert record["masked"] == ["arguments.db.dsn", "arguments.rows.0.ssn", "arguments.rows.1.ssn"]


async def test_secrets_never_reach_the_audit_log(stack: Stack) -> None:
    raw = json.dumps(SECRET_ARGS)
    stack.fake.push(Reply(calls=(Call("login", raw),)))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    calls = r.choices[0].message.tool_calls or []
    assert calls and calls[0].type == "function"
    assert calls[0].function.arguments == raw  # the agent still gets its call
    text = stack.audit_path.read_text()
    assert "hunter2" not in text and "wJalrXUtnFEMI" not in text
    [record] = stack.decisions()
    assert record["arguments"] == {"password": MASK, "aws_secret_access_key": MASK}
    assert record["masked"] == ["arguments.aws_secret_access_key", "arguments.password"] or \
        record["masked"] == ["arguments.password", "arguments.aws_secret_access_key"]


class Broken:
    """A file object whose every operation fails, like a full disk."""

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


async def _ready(stack: Stack) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.admin_url}/readyz") as r:
        return r.status, await r.json()


def _errors(stack: Stack) -> float:
    value = stack.tether.governor.metrics.registry.get_sample_value("tether_audit_write_errors_total")
    return value or 0.0


async def test_failing_writes_deny_and_turn_readyz_red_until_they_recover(stack: Stack) -> None:
    audit = stack.tether.governor.audit
    assert (await _ready(stack))[0] == 200
    # The disk "fills": the open handle fails, and reopening fails too (the path is a directory).
    moved = stack.audit_path.with_name("moved.jsonl")
    stack.audit_path.rename(moved)
    stack.audit_path.mkdir()
    assert audit._file is not None
    audit._file.close()
    audit._file = Broken()  # type: ignore[assignment]
    stack.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert not r.choices[0].message.tool_calls  # denied: it could not be recorded
    assert "audit log cannot be written" in (r.choices[0].message.content or "")
    status, body = await _ready(stack)
    assert status == 503 and any("audit" in p for p in body["problems"])
    assert _errors(stack) >= 1
    with pytest.raises(AuditWriteError):  # still failing: reopening is retried, and fails
        audit.write({"kind": "probe"})
    assert (await _ready(stack))[0] == 503
    # Space comes back.
    stack.audit_path.rmdir()
    moved.rename(stack.audit_path)
    stack.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.tool_calls
    assert (await _ready(stack))[0] == 200
    assert verify([stack.audit_path]) == []


def test_audit_config(tmp_path: Path) -> None:
    from proxy import config as config_mod
    from proxy.errors import ConfigError

    cfg = tmp_path / "t.yaml"
    cfg.write_text("audit:\n  path: a.jsonl\n  max_bytes: 1000\n  keep: 3\n  fsync: always\n"
                   "  redact: [db.dsn, 'headers.*']\n")
    loaded = config_mod.load(cfg, env={})
    assert loaded.audit == AuditSettings(max_bytes=1000, keep=3, fsync=Fsync.ALWAYS,
                                         redact=(("db", "dsn"), ("headers", "*")))
    cfg.write_text("audit:\n  path: a.jsonl\n  fsync: sometimes\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.line == 3 and "never, always, interval" in str(e.value)
    cfg.write_text("audit:\n  max_bytes: 0\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.line == 2
