"""Upstream key files that are not what they should be: a huge file, binary bytes,
control characters, a trailing CRLF; and, swapped in after load (the config
refuses them at load), a directory or a FIFO (whose read would wait for a writer
while the whole event loop waits with it). A file never read well is a 503 in the
provider's shape, audited, nothing forwarded; a bad swap keeps the last good key;
none hangs or crashes the proxy, and a good file put in its place is used at once."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from proxy.small_file import read_small_file
from proxy.upstream_auth.keys import MAX_KEY_FILE
from tests.conftest import MakeStack, Stack
from tests.fakes import Reply

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "hi"}]


async def keyed(make_stack: MakeStack, path: Path) -> tuple[Stack, openai.AsyncOpenAI]:
    stack = await make_stack(
        extra=f"upstreams:\n  openai: {{url: 'http://unused', api_key_file: '{path}'}}\n")
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-agent", max_retries=0,
                                timeout=10)
    stack.clients.append(client)
    return stack, client


async def refused_503(stack: Stack, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 503 and e.value.code == "upstream_credentials_unavailable"
    assert stack.fake.requests == []
    record = [r for r in stack.audit() if r["kind"] == "request"][-1]
    assert (record["status"], record["code"]) == (503, "upstream_credentials_unavailable")


def huge(path: Path) -> None:
    path.write_bytes(b"k" * (MAX_KEY_FILE + 1))


def binary(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00sk-\x80\x81")


def control(path: Path) -> None:
    path.write_bytes(b"sk-one\x00sk-two")


def directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("make_bad", [huge, binary, control], ids=lambda f: f.__name__)
async def test_a_bad_key_file_is_503_and_a_good_one_replaces_it(
        make_stack: MakeStack, tmp_path: Path, make_bad: Callable[[Path], None]) -> None:
    path = tmp_path / "openai.key"
    make_bad(path)
    stack, client = await keyed(make_stack, path)
    await refused_503(stack, client)
    path.write_text("sk-good\r\n")
    stack.fake.push(Reply(content="ok"))
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert stack.fake.headers[-1]["Authorization"] == "Bearer sk-good"


def fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize("make_bad", [fifo, directory, huge, binary],
                         ids=lambda f: f.__name__)
async def test_a_bad_file_swapped_in_keeps_the_last_good_key_without_stalling(
        make_stack: MakeStack, tmp_path: Path, make_bad: Callable[[Path], None]) -> None:
    """Before the fix, opening a FIFO blocked the loop until a writer came. A watchdog
    thread plays that writer every 2 s, so a regression fails on time, not by hanging."""
    path = tmp_path / "openai.key"
    path.write_text("sk-first")
    stack, client = await keyed(make_stack, path)
    stack.fake.push(*[Reply(content="ok")] * 4)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    path.unlink()
    make_bad(path)
    done = threading.Event()

    def watchdog() -> None:  # every 2 s, a writer that comes and goes, unblocking a reader
        while not done.wait(2):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader waiting (ENXIO), or not a FIFO at all

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    ticks = 0

    async def tick() -> None:  # proof that the loop keeps turning meanwhile
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        started = time.monotonic()
        await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started < 3
    finally:
        ticker.cancel()
        done.set()
        thread.join(10)
    assert ticks > 0
    assert [h["Authorization"] for h in stack.fake.headers] == ["Bearer sk-first"] * 3
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink()
    path.write_text("sk-second\n")
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert stack.fake.headers[-1]["Authorization"] == "Bearer sk-second"


async def test_a_trailing_crlf_is_not_part_of_the_key(make_stack: MakeStack,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "openai.key"
    path.write_bytes(b"sk-windows-editor\r\n")
    stack, client = await keyed(make_stack, path)
    stack.fake.push(Reply(content="ok"))
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert stack.fake.headers[-1]["Authorization"] == "Bearer sk-windows-editor"


def test_read_small_file_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * 100)
    for path in (fifo, tmp_path, big):
        with pytest.raises(OSError):
            read_small_file(str(path), 100)
    assert read_small_file(str(ok), 100) == b"x" * 100
    with pytest.raises(OSError):
        read_small_file("/dev/zero", 100)  # a device: endless, never read


def test_aws_credentials_file_swapped_for_a_fifo_keeps_the_last_good(tmp_path: Path) -> None:
    """A FIFO swapped in for the AWS credentials file must not block the loop (botocore
    skips non-regular files itself; tether also refuses them before botocore looks)."""
    import threading

    from proxy.upstream_auth.sigv4 import _CredentialsFile

    creds = tmp_path / "aws"
    creds.write_text("[tether]\naws_access_key_id = AKIAFIRST\naws_secret_access_key = s1\n")
    source = _CredentialsFile(str(creds), "tether")
    assert source.credentials().access_key == "AKIAFIRST"
    creds.unlink()
    os.mkfifo(creds)
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(source.credentials()), daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the open so the test process can exit
        fd = os.open(creds, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not worker.is_alive(), "reading the credentials blocked on a FIFO"
    assert getattr(got[0], "access_key", None) == "AKIAFIRST"
