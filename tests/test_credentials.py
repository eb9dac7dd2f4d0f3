"""tether's own upstream keys (env or a mounted Secret file, rotated without restart)
and the agent's own credentials, stripped unless `agent_credentials: pass`."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from multidict import CIMultiDict

from proxy import config as config_mod
from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_bedrock import FakeBedrock
from proxy.demo.fake_gemini import FakeGemini
from proxy.errors import ConfigError
from proxy.server.upstream import forward_headers, forward_query
from proxy.upstream_auth.keys import CredentialsUnavailable, KeyFile, usable
from proxy.upstreams import Upstream
from tests.conftest import MakeStack, Stack
from tests.fakes import Reply

AGENT_KEY = "agent-own-key"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def write_secret(root: Path, key: str, generation: int) -> Path:
    """The kubelet's way: a new timestamped directory, then an atomic swap of the
    `..data` symlink; the visible file is a symlink through `..data`."""
    stamp = root / f"..2025_01_01_00_00_{generation:02d}.{generation}"
    stamp.mkdir()
    (stamp / "openai").write_text(key + "\n")
    tmp = root / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, root / "..data")
    link = root / "openai"
    if not link.is_symlink():
        link.symlink_to("..data/openai")
    return link


# --- the key file ------------------------------------------------------------------------


def test_key_file_rotations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "key"
    path.write_text("  first-key\n")
    keys = KeyFile(str(path))
    assert keys.key() == "first-key"
    path.write_text("second-key-longer\n")  # plain overwrite, new size
    assert keys.key() == "second-key-longer"
    path.write_text("third-key-longer!\n")  # same size: mtime/ctime tell
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert keys.key() == "third-key-longer!"
    path.unlink()  # gone mid-rotation: the last good key stays
    assert keys.key() == "third-key-longer!"
    assert keys.key() == "third-key-longer!"
    path.write_text("")  # half-written: still the last good
    assert keys.key() == "third-key-longer!"
    path.write_text("fourth")
    assert keys.key() == "fourth"
    assert "fourth" not in repr(keys)
    warnings = [r for r in caplog.records if "keeping the last key" in r.getMessage()]
    assert len(warnings) == 1  # one incident (gone, then empty), logged once
    text = " ".join(r.getMessage() for r in caplog.records)
    assert not any(k in text for k in ("first-key", "second-key", "third-key", "fourth"))


def test_key_file_kubernetes_symlink_swap(tmp_path: Path) -> None:
    link = write_secret(tmp_path, "k8s-one", 1)
    keys = KeyFile(str(link))
    assert keys.key() == "k8s-one"
    write_secret(tmp_path, "k8s-two", 2)  # same size: the inode differs
    assert keys.key() == "k8s-two"


def test_key_file_never_read(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert KeyFile(str(empty)).key() is None
    assert KeyFile(str(tmp_path / "missing")).key() is None


@pytest.mark.parametrize(("text", "key"), [
    ("k\n", "k"), (" \tk \r\n", "k"), ("", None), ("\n", None), ("a\nb", None), ("a b", None),
    ("a\x00b", None), ("a\x7fb", None),
])
def test_usable(text: str, key: str | None) -> None:
    assert usable(text) == key


# --- config ------------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config_mod.load(path, env={})


def test_config_names_the_file_never_the_key(tmp_path: Path) -> None:
    (tmp_path / "openai.key").write_text("sk-secret-value\n")
    cfg = load(tmp_path, "upstreams:\n  openai: {url: 'https://api.openai.com', "
                         "api_key_file: openai.key, agent_credentials: pass}\n")
    up = cfg.upstreams["openai"]
    assert up.api_key_file == str(tmp_path / "openai.key") and up.pass_agent_credentials
    assert "sk-secret-value" not in repr(up) and "sk-secret-value" not in repr(cfg)


@pytest.mark.parametrize(("spec", "message"), [
    ("api_key_file: /nonexistent/tether/openai", "c.yaml:2: upstreams.openai.api_key_file: "
     "no such file: /nonexistent/tether/openai"),
    ("api_key_file: k, api_key_env: X", "give api_key_env or api_key_file, not both"),
    ("agent_credentials: keep", "upstreams.openai.agent_credentials: must be strip"),
    ("aws_credentials_file: k", "AWS credentials sign Bedrock requests only"),
    ("api_key_file: ''", "api_key_file is a path"),
])
def test_config_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "k").write_text("x")
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"upstreams:\n  openai: {{url: 'https://api.openai.com', {spec}}}\n")
    assert message in str(e.value)


# --- headers and query -------------------------------------------------------------------

AGENT_HEADERS = {"Authorization": "Bearer agent", "x-api-key": "a", "api-key": "b",
                 "x-goog-api-key": "c", "Proxy-Authorization": "Basic d", "X-Custom": "keep",
                 "X-Tether-Agent": "janitor"}


def sent(up: Upstream, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()
         ) -> dict[str, str]:
    out: CIMultiDict[str] = forward_headers(AGENT_HEADERS, up, env or {}, drop=drop)
    return {k.lower(): v for k, v in out.items()}


def test_strip_is_the_default_and_holds_without_a_key() -> None:
    out = sent(Upstream("openai", "http://x"))
    assert out == {"x-custom": "keep", "accept-encoding": "gzip, deflate"}


@pytest.mark.parametrize(("name", "header", "value"), [
    ("openai", "authorization", "Bearer tk"), ("azure", "api-key", "tk"),
    ("anthropic", "x-api-key", "tk"), ("gemini", "x-goog-api-key", "tk"),
])
def test_tethers_key_in_each_style(name: str, header: str, value: str) -> None:
    for mode in (False, True):
        out = sent(Upstream(name, "http://x", "K", pass_agent_credentials=mode), {"K": " tk\n"})
        creds = {h: out[h] for h in ("authorization", "x-api-key", "api-key", "x-goog-api-key",
                                     "proxy-authorization") if h in out}
        assert creds == {header: value}


def test_pass_forwards_the_agents_own_but_never_dropped_or_proxy_headers() -> None:
    out = sent(Upstream("openai", "http://x", pass_agent_credentials=True), drop=("X-API-KEY",))
    assert out["authorization"] == "Bearer agent" and out["api-key"] == "b"
    assert "x-api-key" not in out and "proxy-authorization" not in out
    assert "x-tether-agent" not in out


def test_configured_key_missing_is_refused_under_strip_not_under_pass(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    for up in (Upstream("openai", "http://x", "UNSET"),
               Upstream("openai", "http://x", api_key_file=str(empty))):
        with pytest.raises(CredentialsUnavailable) as e:
            sent(up)
        assert e.value.status == 503
        passed = Upstream(up.name, up.url, up.api_key_env, api_key_file=up.api_key_file,
                          pass_agent_credentials=True)
        assert sent(passed)["authorization"] == "Bearer agent"


@pytest.mark.parametrize(("mode", "env", "query", "out"), [
    (False, {}, "alt=sse&key=k1&%6Bey=k2&access_token=t", "alt=sse"),
    (True, {}, "alt=sse&key=k1", "alt=sse&key=k1"),
    (True, {"K": "tk"}, "alt=sse&key=k1", "alt=sse"),
])
def test_gemini_query_credentials(mode: bool, env: dict[str, str], query: str, out: str) -> None:
    up = Upstream("gemini", "http://x", "K", pass_agent_credentials=mode)
    assert forward_query(query, up, env) == out


# --- end to end: the official SDKs through a real tether ---------------------------------


async def openai_stack(make_stack: MakeStack, spec: str) -> tuple[Stack, openai.AsyncOpenAI]:
    stack = await make_stack(extra=f"upstreams:\n  openai: {{url: 'http://unused', {spec}}}\n")
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=AGENT_KEY, max_retries=0)
    stack.clients.append(client)
    return stack, client


def authorizations(stack: Stack) -> list[str]:
    return [h.get("Authorization", "") for h in stack.fake.headers]


async def test_openai_key_file_rotates_without_restart(make_stack: MakeStack, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    link = write_secret(secrets, "sk-file-one", 1)
    stack, client = await openai_stack(make_stack, f"api_key_file: '{link}'")
    for _ in range(3):
        stack.fake.push(Reply(content="ok"))
    await client.chat.completions.create(model="m", messages=MESSAGES)
    write_secret(secrets, "sk-file-two", 2)  # the kubelet's swap
    await client.chat.completions.create(model="m", messages=MESSAGES)
    (secrets / "..data" / "openai").write_text("sk-file-three-overwritten\n")  # plain overwrite
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    assert authorizations(stack) == ["Bearer sk-file-one", "Bearer sk-file-two",
                                     "Bearer sk-file-three-overwritten"]
    assert not any(AGENT_KEY in str(h) for h in stack.fake.headers)
    logged = " ".join(r.getMessage() for r in caplog.records) + stack.audit_path.read_text()
    assert "sk-file" not in logged and AGENT_KEY not in logged


async def test_openai_vanished_key_keeps_the_last_good(make_stack: MakeStack,
                                                       tmp_path: Path) -> None:
    key = tmp_path / "openai"
    key.write_text("sk-last-good")
    stack, client = await openai_stack(make_stack, f"api_key_file: '{key}'")
    stack.fake.push(Reply(content="ok"), Reply(content="ok"))
    await client.chat.completions.create(model="m", messages=MESSAGES)
    key.unlink()
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert authorizations(stack) == ["Bearer sk-last-good"] * 2


async def test_openai_key_never_read_fails_closed(make_stack: MakeStack, tmp_path: Path) -> None:
    key = tmp_path / "openai"
    key.write_text("")  # the Secret is mounted but empty
    stack, client = await openai_stack(make_stack, f"api_key_file: '{key}'")
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 503
    assert e.value.code == "upstream_credentials_unavailable"
    assert stack.fake.requests == []
    [record] = [r for r in stack.audit() if r["kind"] == "request"]
    assert (record["status"], record["code"]) == (503, "upstream_credentials_unavailable")
    assert str(key) in record["message"]


async def test_openai_pass_forwards_the_agents_key(make_stack: MakeStack) -> None:
    stack, client = await openai_stack(make_stack, "agent_credentials: pass")
    stack.fake.push(Reply(content="ok"))
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert authorizations(stack) == [f"Bearer {AGENT_KEY}"]


async def test_openai_strip_without_a_key_sends_no_credentials(make_stack: MakeStack) -> None:
    stack, client = await openai_stack(make_stack, "region: x")
    stack.fake.push(Reply(content="ok"))
    models = await client.models.list()  # a pass-through route strips too
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert [m.id for m in models.data] == ["gpt-fake"]
    assert authorizations(stack) == ["", ""]


async def test_anthropic_key_file(make_stack: MakeStack, tmp_path: Path) -> None:
    key = tmp_path / "anthropic"
    key.write_text("sk-ant-file\n")
    fake = FakeAnthropic()
    stack = await make_stack(upstreams={"anthropic": fake}, extra=(
        f"upstreams:\n  anthropic: {{url: 'http://unused', api_key_file: '{key}'}}\n"))
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic",
                                      api_key=AGENT_KEY, max_retries=0)
    fake.push(Reply(content="hi"), Reply(content="hi"))
    await client.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES)
    key.write_text("sk-ant-rotated-key\n")
    await client.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES)
    await client.close()
    seen = [{k.lower(): v for k, v in h.items()} for h in fake.headers]
    assert [h.get("x-api-key") for h in seen] == ["sk-ant-file", "sk-ant-rotated-key"]
    assert not any(AGENT_KEY in str(h) for h in seen)


@pytest.mark.parametrize("mode", ["strip", "pass"])
async def test_gemini_header_and_query_key(make_stack: MakeStack, mode: str) -> None:
    from tests.test_e2e_gemini import MODEL, REQUEST, raw_post

    fake = FakeGemini()
    stack = await make_stack(upstreams={"gemini": fake}, extra=(
        f"upstreams:\n  gemini: {{url: 'http://unused', agent_credentials: {mode}}}\n"))
    fake.push(Reply(content="hi"))
    status, _, _ = await raw_post(stack, f"/gemini/v1beta/models/{MODEL}:generateContent"
                                         "?key=k-agent-secret&alt=json", REQUEST)
    assert status == 200
    headers = {k.lower(): v for k, v in fake.headers[-1].items()}
    if mode == "strip":
        assert "k-agent-secret" not in fake.paths[-1] and "x-goog-api-key" not in headers
    else:
        assert "key=k-agent-secret" in fake.paths[-1] and headers["x-goog-api-key"] == "k-agent"


async def test_bedrock_credentials_file_rotates(make_stack: MakeStack, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_e2e_bedrock import MESSAGES as CONVERSE
    from tests.test_e2e_bedrock import MODEL, TOOL_CONFIG, runtime

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    creds = tmp_path / "aws"
    creds.write_text("[tether]\naws_access_key_id = AKIDFILEONE\n"
                     "aws_secret_access_key = secret-one\n")
    fake = FakeBedrock("AKIDFILEONE", "secret-one")
    stack = await make_stack(upstreams={"bedrock": fake}, extra=(
        "upstreams:\n  bedrock: {url: 'http://unused', region: us-east-1, "
        f"aws_credentials_file: '{creds}', aws_profile: tether}}\n"))
    client = runtime(stack.proxy_url + "/bedrock")
    try:
        fake.push(Reply(content="hi"), Reply(content="hi"))
        await asyncio.to_thread(client.converse, modelId=MODEL, messages=CONVERSE,
                                toolConfig=TOOL_CONFIG)
        creds.write_text("[tether]\naws_access_key_id = AKIDFILETWOXX\n"
                         "aws_secret_access_key = secret-two\n")
        fake.access_key, fake.secret_key = "AKIDFILETWOXX", "secret-two"
        await asyncio.to_thread(client.converse, modelId=MODEL, messages=CONVERSE,
                                toolConfig=TOOL_CONFIG)
    finally:
        client.close()
    assert fake.rejected == []
    assert [h["Authorization"].split("Credential=")[1].split("/")[0] for h in fake.headers] == [
        "AKIDFILEONE", "AKIDFILETWOXX"]
