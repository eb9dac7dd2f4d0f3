"""Transparent mode governs LLM traffic too, end to end in network namespaces (the
harness of tests/test_transparent.py): an agent that ignores HTTP_PROXY and calls
https://api.openai.com itself with its own key is still governed, and its key never
leaves the pod.

    pod namespace (tether-pod-<pid>)                  cloud namespace (tether-cloud-<pid>)
    tether serve --transparent-port 15001 (uid 0)      fake OpenAI on .2:443 (TLS, a cert for
    tether-redirect (TETHER_UID=0)                     api.openai.com from a CA of its own),
    curl as uid 65534 --- veth 10.251.N.0/29 --->      and on .2:80 (to see any bypass)

The pod's /etc/hosts maps api.openai.com to the fake, for the agent and tether alike,
as a poisoned or split-horizon DNS would: the agent believes it reaches OpenAI there.
Its packets are redirected to tether, which re-addresses the request to its own
reverse route (/openai/...) and governs it there; that route's upstream is
`upstreams.openai.url` (the real name, https://api.openai.com), which tether itself
(uid 0, not redirected) reaches at the fake, trusting the fake's CA through the
test-only `ca_file` and sending its own key from `api_key_file`. The fake logs each
connection (by port) and each request with its Authorization header to a file.
Plain HTTP to api.openai.com:80 is governed the same way (the reverse route still
goes upstream over TLS); it is never passed on to port 80.
Needs root, `ip netns`, iptables, curl and setpriv; skips otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_transparent import (
    REDIRECT,
    ROOT,
    TPORT,
    Pod,
    free_subnet,
    in_ns,
    preconditions,
    run,
    setup_netns,
    start,
    teardown,
)

OPENAI = "api.openai.com"
URL = f"https://{OPENAI}/v1/chat/completions"
AGENT_KEY = "sk-agent-own-key-4f1d"   # the agent's key: must never leave the pod
TETHER_KEY = "sk-tether-upstream-9c2e"  # tether's key, from upstreams.openai.api_key_file
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "delete_volume", "drop_database")]
PROD_DELETE = '{"volume_id": "vol-9", "tags": {"env": "production"}}'
WEATHER = '{"city": "Oslo"}'
# tests/conftest.py's rules (no-prod-deletes, no-drop), kept here so this module stands alone.
POLICY = """
tools:
  get_weather: {effect: read}
rules:
  - id: no-prod-deletes
    match:
      tool: ["delete_*", "terminate_*"]
      args: {tags.env: {in: [production, production-candidate]}}
    action: deny
    message: Deleting production resources is not allowed
  - id: no-drop
    match: {tool: drop_database}
    action: deny
    on_deny: error
    message: Dropping databases is never allowed
"""


# -- the fake OpenAI, run in the cloud namespace -------------------------------------------

READ_IT = "Understood, vol-9 stays."  # the model, having read a denial


def _script(body: dict[str, Any]) -> Any:
    """What the fake model answers, by the user's message: `both` -> an allowed call and
    a production delete; `drop` -> drop_database; anything else -> the delete alone. A
    conversation that ends with a tool result (tether's continuation after a denial: the
    default `on_deny: continue`) -> text, the model having read it."""
    from tests.fakes import Call, Reply

    if body["messages"][-1].get("role") == "tool":
        return Reply(content=READ_IT)
    said = str(body["messages"][-1]["content"])
    if "drop" in said:
        return Reply(calls=(Call("drop_database", '{"name": "prod"}'),))
    if "both" in said:
        return Reply(content="On it.", calls=(Call("get_weather", WEATHER),
                                              Call("delete_volume", PROD_DELETE)))
    return Reply(calls=(Call("delete_volume", PROD_DELETE),))


async def _serve_fake(log: Path, cert: Path, key: Path) -> None:
    from aiohttp import web

    from tests.fakes import FakeOpenAI

    def write(record: dict[str, object]) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        write({"kind": "request", "port": sock[1] if sock else None, "method": request.method,
               "path": request.path_qs, "host": request.headers.get("host", ""),
               "authorization": request.headers.getall("authorization", []),
               "body": (await request.read()).decode()})
        response: web.StreamResponse = await handler(request)
        return response

    app = FakeOpenAI(script=_script).app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    factory = runner.server
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()

    def counted(port: int) -> Any:
        def make() -> Any:
            write({"kind": "connection", "port": port})
            return factory()
        return make

    for port, context in ((80, None), (443, tls)):
        await loop.create_server(counted(port), "0.0.0.0", port, ssl=context)
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the pod ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    python = preconditions()
    from tests.fakes.tls import make_fake_ca

    work = tmp_path_factory.mktemp("transparent-llm")
    shared = Path(tempfile.mkdtemp(prefix="tether-transparent-llm-"))
    shared.chmod(0o755)
    pid = os.getpid()
    p = Pod(f"tether-pod-{pid}", f"tether-cloud-{pid}", free_subnet(), python, shared, work)
    try:
        setup_netns(p)
        # The pod's DNS: api.openai.com is the fake, for the agent and for tether.
        (Path("/etc/netns") / p.pod / "hosts").write_text(
            f"127.0.0.1 localhost\n{p.fake_ip} {OPENAI}\n")
        fake_ca = make_fake_ca(work / "fake-ca", names=(OPENAI,))
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent_llm", "fake",
                       str(work / "fake.jsonl"), str(fake_ca.cert_file), str(fake_ca.key_file)),
              "ready", 15)
        key_file = work / "openai-key"
        key_file.write_text(TETHER_KEY + "\n")
        key_file.chmod(0o600)
        config = work / "tether.yaml"
        config.write_text(
            f"audit: {{path: {work / 'audit.jsonl'}}}\n"
            "upstreams:\n"
            "  openai:\n"
            f"    url: https://{OPENAI}\n"
            "    # TEST-ONLY: the fake OpenAI's certificate is from a CA of the test's own.\n"
            f"    ca_file: {fake_ca.ca_file}\n"
            "    # tether's key goes upstream; the agent's own (agent_credentials: strip,\n"
            "    # the default) never does.\n"
            f"    api_key_file: {key_file}\n"
            "forward:\n"
            f"  ca_dir: {work / 'ca'}\n"
            "  # No allow_private: an LLM host is never connected to by the forward side;\n"
            "  # its requests go to the reverse route, whose upstream the operator chose.\n"
            f"{POLICY}")
        start(p, in_ns(p.pod, sys.executable, "-m", "proxy", "serve", "--config", str(config),
                       "--host", "127.0.0.1", "--port", "8080", "--admin-port", "9090",
                       "--transparent-port", str(TPORT)), "tether: proxy on", 15)
        redirect = run(*in_ns(p.pod, "sh", str(REDIRECT)),
                       env={**os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT)})
        assert f"REDIRECT --to-ports {TPORT}" in redirect.stdout
        ca = run(sys.executable, "-m", "proxy", "ca", "export", "--config", str(config),
                 env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        (shared / "tether-ca.pem").write_text(ca)
        (shared / "tether-ca.pem").chmod(0o644)
        yield p
    finally:
        teardown(p)


def chat(pod: Pod, said: str, *, url: str = URL,
         stream: bool = False) -> tuple[int, str, dict[str, str]]:
    """The agent's own LLM call: curl, its own key, no proxy settings, tether's CA."""
    body: dict[str, Any] = {"model": "gpt-x", "messages": [{"role": "user", "content": said}],
                            "tools": TOOLS}
    if stream:
        body["stream"] = True
    return pod.curl(url, "--cacert", str(pod.shared / "tether-ca.pem"), "-N",
                    "-H", "content-type: application/json",
                    "-H", f"authorization: Bearer {AGENT_KEY}", "--data-binary", json.dumps(body))


def upstream_requests(pod: Pod, said: str) -> list[dict[str, Any]]:
    """What the fake OpenAI received for the request whose user message was `said`."""
    return [r for r in pod.fake_log() if r["kind"] == "request" and said in r["body"]]


def assert_went_upstream_with_tethers_key(pod: Pod, said: str, rounds: int = 1) -> None:
    """`rounds`: the agent's request, and tether's continuation after a denial."""
    seen = upstream_requests(pod, said)
    assert len(seen) == rounds
    for one in seen:
        assert one["port"] == 443 and one["host"] == OPENAI
        assert one["path"] == "/v1/chat/completions"
        assert one["authorization"] == [f"Bearer {TETHER_KEY}"]
    if rounds > 1:  # the denial went to the model as the call's result
        last = json.loads(seen[-1]["body"])["messages"][-1]
        assert last["role"] == "tool" and "denied by no-prod-deletes" in last["content"]
    assert AGENT_KEY not in json.dumps(pod.fake_log())
    assert AGENT_KEY not in json.dumps(pod.audit()) and TETHER_KEY not in json.dumps(pod.audit())


def count_decisions(pod: Pod) -> int:
    return len([r for r in pod.audit() if r.get("kind") == "decision"])


def new_decisions(pod: Pod, before: int) -> list[tuple[str, str, list[str], bool]]:
    """(tool, action, rules, stream) of the decisions since `before`: every one on the
    openai reverse route, where transparent LLM requests are governed."""
    records = [r for r in pod.audit() if r.get("kind") == "decision"][before:]
    assert {r["provider"] for r in records} <= {"openai"}
    return [(r["tool"], r["action"], r["rules"], r["stream"]) for r in records]


def sse(body: str) -> tuple[str, list[str], list[str], bool]:
    """A streamed answer as an agent reads it: text, tool names, finish reasons, [DONE]."""
    text, names, finishes, done = "", [], [], False
    for line in body.splitlines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices", []):
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            names += [tc["function"]["name"] for tc in delta.get("tool_calls") or []
                      if (tc.get("function") or {}).get("name")]
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    return text, names, finishes, done


# -- the tests ---------------------------------------------------------------------------------

def test_a_production_delete_from_the_agents_own_openai_call_is_denied(pod: Pod) -> None:
    before = count_decisions(pod)
    status, body, headers = chat(pod, "clean up, call 1")
    assert status == 200, body
    answer = json.loads(body)
    [choice] = answer["choices"]
    assert choice["message"].get("tool_calls") in (None, [])
    assert "'delete_volume' was denied by no-prod-deletes" in choice["message"]["content"]
    assert choice["message"]["content"].endswith(READ_IT)  # the model's, after the denial
    assert choice["finish_reason"] == "stop"  # was tool_calls: no call remains
    assert new_decisions(pod, before) == [("delete_volume", "deny", ["no-prod-deletes"], False)]
    assert_went_upstream_with_tethers_key(pod, "clean up, call 1", rounds=2)
    assert "x-tether-refused" not in headers


def test_allowed_calls_pass_and_only_the_denied_one_is_replaced(pod: Pod) -> None:
    before = count_decisions(pod)
    status, body, _ = chat(pod, "both, call 2")
    assert status == 200, body
    [choice] = json.loads(body)["choices"]
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", WEATHER)]
    assert "'delete_volume' was denied by no-prod-deletes" in choice["message"]["content"]
    assert choice["finish_reason"] == "tool_calls"
    assert new_decisions(pod, before) == [("get_weather", "allow", [], False),
                                          ("delete_volume", "deny", ["no-prod-deletes"], False)]
    assert_went_upstream_with_tethers_key(pod, "both, call 2")


def test_a_streamed_call_is_governed_the_same_way(pod: Pod) -> None:
    before = count_decisions(pod)
    status, body, headers = chat(pod, "clean up, call 3", stream=True)
    assert status == 200, body
    assert headers["content-type"].startswith("text/event-stream")
    text, names, finishes, done = sse(body)
    assert names == [] and "delete_volume" not in "".join(
        line for line in body.splitlines() if '"tool_calls"' in line)
    assert "'delete_volume' was denied by no-prod-deletes" in text and text.endswith(READ_IT)
    assert finishes == ["stop"] and done
    assert new_decisions(pod, before) == [("delete_volume", "deny", ["no-prod-deletes"], True)]
    assert_went_upstream_with_tethers_key(pod, "clean up, call 3", rounds=2)


def test_on_deny_error_is_openais_403(pod: Pod) -> None:
    before = count_decisions(pod)
    status, body, _ = chat(pod, "drop, call 4")
    assert status == 403, body
    error = json.loads(body)["error"]
    assert "Dropping databases is never allowed" in error["message"]
    assert new_decisions(pod, before) == [("drop_database", "deny", ["no-drop"], False)]
    assert_went_upstream_with_tethers_key(pod, "drop, call 4")


def test_plain_http_to_openai_is_governed_and_goes_upstream_over_tls(pod: Pod) -> None:
    """Port 80 is redirected like 443: tether names the request by its Host, sends it to
    the reverse route, and the upstream call is tether's, over TLS. Nothing reaches the
    fake's port 80."""
    before = count_decisions(pod)
    status, body, _ = chat(pod, "clean up, call 5", url=f"http://{OPENAI}/v1/chat/completions")
    assert status == 200, body
    [choice] = json.loads(body)["choices"]
    assert "'delete_volume' was denied by no-prod-deletes" in choice["message"]["content"]
    assert choice["message"]["content"].endswith(READ_IT)
    assert choice["finish_reason"] == "stop"
    assert new_decisions(pod, before) == [("delete_volume", "deny", ["no-prod-deletes"], False)]
    assert_went_upstream_with_tethers_key(pod, "clean up, call 5", rounds=2)
    assert not [r for r in pod.fake_log() if r.get("port") == 80]


def test_without_trusting_tether_the_call_fails_and_nothing_goes_upstream(pod: Pod) -> None:
    status, err, _ = pod.curl(URL, "-H", f"authorization: Bearer {AGENT_KEY}",
                              "--data-binary", '{"messages": [{"content": "call 6"}]}')
    assert status == 0 and "certificate" in err.lower()
    assert upstream_requests(pod, "call 6") == []


def main(argv: list[str]) -> None:
    if argv[:1] == ["fake"]:
        asyncio.run(_serve_fake(Path(argv[1]), Path(argv[2]), Path(argv[3])))


if __name__ == "__main__":
    main(sys.argv[1:])
