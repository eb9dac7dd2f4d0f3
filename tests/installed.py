"""What a user of an installed tether (the wheel in a fresh venv, the container image) sees,
checked from outside: the tests of what ships (test_wheel.py, test_image.py) share these.

The tether under test is another process started from the install; the fake OpenAI runs in
a thread of this one (tests/fakes/threaded.py) and answers every chat completion with two
calls, one the janitor policy allows and one it denies.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
from openai.types.chat import ChatCompletionFunctionToolParam

from tests.fakes import Call, FakeOpenAI, Reply

TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume")]
SERIES = ("tether_requests_total", "tether_tool_decisions_total")
TIMEOUT = 30.0


def janitor_upstream() -> FakeOpenAI:
    """Every answer: an allowed read and the production delete rules/janitor.yaml denies."""
    return FakeOpenAI(script=lambda body: Reply(calls=(
        Call("get_weather", '{"city": "Oslo"}'),
        Call("delete_volume", '{"volume_id": "vol-0a1", "tags": {"env": "production"}}'))))


@dataclass(frozen=True)
class Ports:
    proxy: int
    admin: int
    forward: int | None


BANNER = re.compile(r"proxy on http://[^:]+:(\d+) .*admin on http://[^:]+:(\d+)"
                    r"(?:.*HTTP_PROXY on http://[^:]+:(\d+))?")


def read_banner(proc: subprocess.Popen[str], deadline: float = TIMEOUT,
                stderr: bool = False) -> Ports:
    """The ports `tether serve` printed on its first line (it prints nothing before), on
    stdout, or on stderr when an audit sink is stdout."""
    stream = proc.stderr if stderr else proc.stdout
    assert stream is not None
    line = stream.readline()
    match = BANNER.search(line)
    if not match:
        proc.kill()
        _, err = proc.communicate(timeout=deadline)
        raise AssertionError(f"tether serve did not start: {line!r} {err}")
    forward = match.group(3)
    return Ports(int(match.group(1)), int(match.group(2)), int(forward) if forward else None)


def wait_ready(admin_url: str, deadline: float = TIMEOUT) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(f"{admin_url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > end:
            raise AssertionError(f"{admin_url}/readyz did not answer 200 within {deadline} s")
        time.sleep(0.2)


def check_admin(admin_url: str) -> None:
    """Health checks answer 200 and /metrics carries tether's own series (after a request:
    labelled series appear with their first sample)."""
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"{admin_url}{path}", timeout=5) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    for series in SERIES:
        assert f"\n{series}{{" in metrics, f"{series} missing from /metrics"


def _check_answer(response: openai.types.chat.ChatCompletion) -> None:
    message = response.choices[0].message
    kept = [c.function.name for c in message.tool_calls or [] if c.type == "function"]
    assert kept == ["get_weather"], kept
    assert "no-prod-deletes" in (message.content or ""), message.content


def check_governed(base_url: str) -> None:
    """Through the base URL, as an SDK pointed at tether: the read is kept, the delete is
    replaced by text naming the rule."""
    with openai.OpenAI(base_url=base_url, api_key="sk-agent", max_retries=0,
                       timeout=TIMEOUT) as client:
        _check_answer(client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "clean up"}], tools=TOOLS))


def check_forwarded(forward_url: str, ca_file: Path) -> None:
    """Through HTTPS_PROXY to api.openai.com, trusting the CA tether wrote: governed the same."""
    trust = ssl.create_default_context(cafile=str(ca_file))
    http = openai.DefaultHttpxClient(proxy=forward_url, verify=trust, trust_env=False)
    with openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-agent",
                       max_retries=0, timeout=TIMEOUT, http_client=http) as client:
        _check_answer(client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "clean up"}], tools=TOOLS))


def check_upstream_saw(fake: FakeOpenAI, count: int, key: str | None) -> None:
    """The fake got `count` requests; with `key`, each carried tether's key, not the agent's."""
    assert len(fake.requests) == count, len(fake.requests)
    if key is not None:
        assert all(h.get("Authorization") == f"Bearer {key}" for h in fake.headers), \
            [h.get("Authorization") for h in fake.headers]


def audit_actions(path: Path) -> list[str]:
    records = [json.loads(line) for line in path.read_text().split("\n") if line]
    return [r["action"] for r in records if r.get("kind") == "decision"]


# The Azure leg of the demo (`tether demo --cloud azure`): tether looks the disks' tags up with
# azure-identity (tether[azure]); without it every lookup denies and nothing is deleted.
AZURE_DEMO_KEPT = "still in ARM:    disk-prod (production), disk-cand (production-candidate)"
AZURE_DEMO_DELETED = "deleted in ARM:  disk-tmp"

# tether's own Google identity, asked for a token with a key file that is not there: with
# google-auth (tether[gcp]) the ADC chain says so; without it the lookup says what to install.
GCP_IDENTITY_PROBE = """
import asyncio
from proxy.forward.lookups import LookupFailed
from proxy.forward.lookups_gcp import GoogleIdentity
try:
    asyncio.run(GoogleIdentity(None, 5.0).headers())
except LookupFailed as e:
    print(e)
"""
GCP_IDENTITY_ENV = {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}
GCP_IDENTITY_FOUND = "no usable Google credentials"


def check_azure_demo(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert AZURE_DEMO_KEPT in out.stdout and AZURE_DEMO_DELETED in out.stdout, out.stdout
