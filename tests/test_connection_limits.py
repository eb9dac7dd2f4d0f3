"""`server:` connection limits on a real `tether serve`, from raw sockets: silent and
slow-header connections are closed within `header_timeout`, idle kept-alive ones within
`idle_timeout`, a body that does not arrive within `body_timeout`, while an SDK call is
served promptly; past `max_connections` a new connection gets a 503 (proxy, admin and
forward ports each count their own) and the proxy goes on serving."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes import FakeOpenAI, Reply
from tests.fakes.threaded import ThreadedServer
from tests.installed import Ports, read_banner, wait_ready

ROOT = Path(__file__).resolve().parent.parent
HEADER_S, IDLE_S, BODY_S = 2.0, 3.0, 2.0
SLACK_S = 1.5   # timers fire on the loop; the test reads EOF on its own loop
REQUEST = b"GET /openai/v1/models HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def tether(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(max_connections: int, forward: bool = False) -> Ports:
        fake = FakeOpenAI(script=lambda body: Reply(content="fine"))
        server = ThreadedServer(fake.app())
        port = server.__enter__()
        config = tmp_path / "tether.yaml"
        config.write_text(
            f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
            f"forward: {{ca_dir: {tmp_path / 'ca'}}}\n"
            f"server: {{header_timeout: {HEADER_S}s, idle_timeout: {IDLE_S}s, "
            f"body_timeout: {BODY_S}s, max_connections: {max_connections}}}\n")
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
                "--admin-port", "0"] + (["--forward-port", "0"] if forward else [])
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ,
                                                "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{port}"})
        procs.append(proc)
        ports = read_banner(proc)
        wait_ready(f"http://127.0.0.1:{ports.admin}")
        return ports

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)


def metric(ports: Ports, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(want + " ")), 0.0)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, time.monotonic()


async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sent, and when it closed."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:
        pass
    return data, time.monotonic()


async def silent(port: int) -> tuple[float, bytes]:
    reader, writer, opened = await connect(port)
    data, closed = await until_closed(reader)
    writer.close()
    return closed - opened, data


async def trickle(port: int) -> tuple[float, bytes]:
    """A request head one byte every 0.3 s: it would take a minute to finish."""
    reader, writer, opened = await connect(port)
    head = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200

    async def feed() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.3)

    feeding = asyncio.ensure_future(feed())
    data, closed = await until_closed(reader)
    feeding.cancel()
    writer.close()
    return closed - opened, data


async def idle_after_a_request(port: int) -> tuple[float, bytes]:
    reader, writer, _ = await connect(port)
    writer.write(REQUEST)
    await writer.drain()
    answered = b""
    while b"\r\n\r\n" not in answered:
        answered += await reader.read(65536)
    head, _, rest = answered.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length")]
    while (len(rest) < lengths[0]) if lengths else not rest.endswith(b"0\r\n\r\n"):
        rest += await reader.read(65536)   # a length, or chunked to its last chunk
    done = time.monotonic()
    data, closed = await until_closed(reader)
    writer.close()
    return closed - done, data


async def slow_body(port: int) -> tuple[float, bytes]:
    reader, writer, _ = await connect(port)
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    await writer.drain()
    sent = time.monotonic()
    data, closed = await until_closed(reader)
    writer.close()
    return closed - sent, data


async def test_idle_and_slow_sockets_are_closed_in_time_while_a_call_is_served(
        tether: Any) -> None:
    ports = tether(max_connections=1200)
    tasks: list[asyncio.Future[tuple[float, bytes]]] = []
    for kind in (silent, trickle):
        for _ in range(5):   # in bursts, within the listen backlog
            tasks += [asyncio.ensure_future(kind(ports.proxy)) for _ in range(50)]
            await asyncio.sleep(0.05)
    idle = [asyncio.ensure_future(idle_after_a_request(ports.proxy)) for _ in range(20)]
    bodies = [asyncio.ensure_future(slow_body(ports.proxy)) for _ in range(20)]
    await asyncio.sleep(0.3)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports.proxy}/openai/v1",
                                api_key="k", max_retries=0)
    started = time.monotonic()
    answer = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    served = time.monotonic() - started
    await client.close()
    assert answer.choices[0].message.content == "fine"
    heads = await asyncio.wait_for(asyncio.gather(*tasks), HEADER_S + 20)
    idles = await asyncio.wait_for(asyncio.gather(*idle), IDLE_S + 20)
    slows = await asyncio.wait_for(asyncio.gather(*bodies), BODY_S + 20)
    print(f"\nserved in {served:.3f} s with {len(tasks)} slow sockets open; closed after "
          f"header: {min(t for t, _ in heads):.2f}-{max(t for t, _ in heads):.2f} s, "
          f"idle: {min(t for t, _ in idles):.2f}-{max(t for t, _ in idles):.2f} s, "
          f"body: {min(t for t, _ in slows):.2f}-{max(t for t, _ in slows):.2f} s")
    assert served < 2.0   # promptly: the sockets around it cost it nothing
    for (took, _), expected in ([(h, HEADER_S) for h in heads] + [(i, IDLE_S) for i in idles]
                                   + [(b, BODY_S) for b in slows]):
        assert expected - 0.2 <= took <= expected + SLACK_S, (took, expected)
    assert all(data.startswith(b"HTTP/1.1 408") and b"server.header_timeout" in data
               for _, data in heads)
    assert all(data == b"" for _, data in idles)
    assert all(data.startswith(b"HTTP/1.1 408") and b"server.body_timeout" in data
               for _, data in slows)
    assert metric(ports, "tether_connections_timed_out_total", port="proxy",
                  timeout="header") == len(heads)
    assert metric(ports, "tether_connections_timed_out_total", port="proxy",
                  timeout="idle") == len(idles)
    assert metric(ports, "tether_connections_timed_out_total", port="proxy",
                  timeout="body") == len(slows)


async def test_over_max_connections_is_a_clean_refusal_on_every_port(tether: Any) -> None:
    ports = tether(max_connections=30, forward=True)
    assert ports.forward is not None
    held = [await connect(ports.proxy) for _ in range(30)]
    held_forward = [await connect(ports.forward) for _ in range(30)]
    await asyncio.sleep(0.2)
    reader, writer, _ = await connect(ports.proxy)
    writer.write(REQUEST)
    data, _ = await until_closed(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 503"), data[:200]
    assert b"retry-after: 1" in data.lower() and b"server.max_connections" in data
    reader, writer, _ = await connect(ports.forward)
    writer.write(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
    data, _ = await until_closed(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 503"), data[:200]
    assert b"too_many_connections" in data
    # The admin port counts its own: /metrics answers while the proxy port is full.
    assert metric(ports, "tether_connections_refused_total", port="proxy") == 1.0
    assert metric(ports, "tether_connections_refused_total", port="forward") == 1.0
    assert metric(ports, "tether_connections_open", port="proxy") == 30.0
    # The silent ones time out (the forward port's too), then calls are served again.
    closed = await asyncio.wait_for(asyncio.gather(*(until_closed(r) for r, _, _ in held),
                                                   *(until_closed(r) for r, _, _ in
                                                     held_forward)), HEADER_S + 10)
    assert all(at - held[0][2] <= HEADER_S + SLACK_S + 1 for _, at in closed)
    for _, w, _ in held + held_forward:
        w.close()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports.proxy}/openai/v1",
                                api_key="k", max_retries=0)
    answer = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert answer.choices[0].message.content == "fine"
    assert metric(ports, "tether_connections_timed_out_total", port="forward",
                  timeout="header") == 30.0


@pytest.mark.parametrize(("yaml", "key", "words"), [
    ("server: {header_timeout: soon}", "server.header_timeout", "not a duration"),
    ("server: {idle_timeout: -1}", "server.idle_timeout", "not a duration"),
    ("server: {max_connections: 0}", "server.max_connections", "whole number"),
    ("server: {max_connections: true}", "server.max_connections", "whole number"),
    ("server:\n  port: 1\n  drain_timeuot: 5s", "server.drain_timeuot", "unknown key"),
    ("approvals: {lease: 500ms}", "approvals.lease", "at least 1s"),
])
def test_bad_limits_are_refused_with_file_and_line(tmp_path: Path, yaml: str, key: str,
                                                   words: str) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(f"defaults: {{action: allow}}\n{yaml}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "check", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{config}:" in done.stderr and key in done.stderr and words in done.stderr, \
        done.stderr


def test_the_defaults_are_safe(tmp_path: Path) -> None:
    from proxy import config as config_mod

    config = tmp_path / "t.yaml"
    config.write_text("defaults: {action: allow}\n")
    limits = config_mod.load(config, env={}).connections
    assert (limits.header_timeout_s, limits.idle_timeout_s, limits.body_timeout_s,
            limits.max_connections, limits.drain_timeout_s) == (10.0, 60.0, 60.0, 1024, 10.0)
    assert config_mod.load(config, env={}).approvals.lease_s == 15.0
