"""An upstream behind TLS signed by a private CA: trusted only when `ca_file` names it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.server.app import Tether, bound_port, build, start
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.tls import make_fake_ca
from tests.test_e2e_openai import MESSAGES, TOOLS, collect


@pytest.fixture
async def tls_fake(tmp_path: Path) -> AsyncIterator[tuple[FakeOpenAI, int, Path]]:
    ca = make_fake_ca(tmp_path / "ca")
    fake = FakeOpenAI()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context()).start()
    yield fake, bound_port(runner), ca.ca_file
    await runner.cleanup()


async def _tether(tmp_path: Path, port: int, ca_line: str
                  ) -> tuple[openai.AsyncOpenAI, list[web.AppRunner], Tether]:
    cfg_file = tmp_path / "tether.yaml"
    cfg_file.write_text(
        f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
        f"upstreams:\n  openai: {{url: 'https://localhost:{port}'{ca_line}}}\n"
        "rules:\n  - {id: no-prod, match: {tool: delete_volume}, action: deny}\n")
    tether = build(config_mod.load(cfg_file, env={}))
    runners = await start(tether, host="127.0.0.1", port=0, admin_port=0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{bound_port(runners[0])}/openai/v1",
                                api_key="k", max_retries=0)
    return client, runners, tether


@pytest.mark.parametrize("stream", [False, True])
async def test_private_ca_upstream_is_governed(tmp_path: Path, stream: bool,
                                               tls_fake: tuple[FakeOpenAI, int, Path]) -> None:
    fake, port, ca_file = tls_fake
    fake.push(Reply(content="ok", calls=(Call("get_weather", '{"a": 1}'),
                                         Call("delete_volume", "{}"))))
    client, runners, tether = await _tether(tmp_path, port, f", ca_file: '{ca_file}'")
    try:
        if stream:
            s = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                     stream=True)
            text, calls, _ = await collect(s)
            names = [c[1] for c in calls.values()]
        else:
            r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
            text = r.choices[0].message.content or ""
            names = [c.function.name for c in r.choices[0].message.tool_calls or []
                     if c.type == "function"]
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
        await tether.close()
    assert names == ["get_weather"] and "no-prod" in text


async def test_untrusted_upstream_certificate_is_a_502(tmp_path: Path,
                                                       tls_fake: tuple[FakeOpenAI, int, Path]
                                                       ) -> None:
    fake, port, _ = tls_fake
    client, runners, tether = await _tether(tmp_path, port, "")
    try:
        with pytest.raises(openai.InternalServerError, match="could not be reached"):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
        await tether.close()
    assert fake.requests == []


def test_ca_file_must_exist(tmp_path: Path) -> None:
    cfg_file = tmp_path / "tether.yaml"
    cfg_file.write_text("upstreams:\n  openai: {url: 'https://x', ca_file: missing.pem}\n")
    with pytest.raises(ConfigError, match=r"tether.yaml:2: upstreams.openai.ca_file"):
        config_mod.load(cfg_file, env={})
