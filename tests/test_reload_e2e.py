"""Policy changes without a restart, through a running `tether serve` and the official
openai SDK: a rule added by each way operators change files is in force within 2 s and a
stream in flight finishes; a broken or emptied config keeps the running policy and says
why; SIGHUP and POST /v1/reload reload; a held call is judged again by the new policy."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.threaded import ThreadedServer
from tests.reload_helpers import ConfigDir, Served, records, until

TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume", "resize_volume")]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "go"}]
STREAM_TEXT = "word " * 40  # 50 chunks of 4 characters, 50 ms apart: a 2.5 s stream
# Every deny rule here says `on_deny: rewrite`: the agent gets the denial at once (no
# continuation upstream), so what is timed is the reload.


def main_yaml(audit: Path) -> str:
    return (f"audit: {{path: {audit}}}\ndefaults: {{action: allow}}\n"
            "tools: {get_weather: {effect: read}}\ninclude: [rules.yaml]\n")


RULES = """rules:
  - id: no-prod-deletes
    match:
      tool: delete_*
      args: {tags.env: {equals: production}}
    action: deny
    on_deny: rewrite
"""
NO_DELETES = RULES + """  - id: no-deletes
    match: {tool: delete_*}
    action: deny
    on_deny: rewrite
    message: deletes are off during the incident
"""


def script(body: dict[str, object]) -> Reply:
    """A stream: text, then a delete; otherwise a delete of a staging volume (allowed
    until `no-deletes` is added); `resize_volume` when the user asks for it."""
    messages = body.get("messages")
    asked = str(messages[-1].get("content")) if isinstance(messages, list) else ""
    if asked == "resize":
        return Reply(calls=(Call("resize_volume", '{"volume_id": "vol-9", "size": 2}'),))
    call = Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "staging"}}')
    if body.get("stream"):
        return Reply(content=STREAM_TEXT, calls=(call,))
    return Reply(calls=(call,))


@pytest.fixture
def upstream() -> Iterator[int]:
    fake = FakeOpenAI(script=script, delay_s=0.05)
    with ThreadedServer(fake.app()) as port:
        yield port


def start(tmp_path: Path, upstream: int, how: str = "overwrite",
          rules: str = RULES) -> tuple[Served, ConfigDir, Path]:
    audit = tmp_path / "audit.jsonl"
    cfg = ConfigDir(tmp_path / "config", how)
    cfg.write({"tether.yaml": main_yaml(audit), "rules.yaml": rules})
    return Served(cfg.main, upstream, tmp_path / "tether.log"), cfg, audit


def delete_allowed(client: openai.OpenAI) -> bool:
    r = client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    return bool(r.choices[0].message.tool_calls)


@pytest.mark.parametrize("how", ["overwrite", "rename", "kubelet"])
def test_a_rule_added_to_the_files_is_in_force_within_2s_and_a_stream_in_flight_finishes(
        tmp_path: Path, upstream: int, how: str) -> None:
    served, cfg, audit = start(tmp_path, upstream, how)
    client = openai.OpenAI(base_url=served.base_url, api_key="sk-agent", max_retries=0)
    try:
        assert delete_allowed(client)
        revision = served.admin("GET", "/readyz")[1]["policy_revision"]
        streamed: list[str] = []
        finished: list[str | None] = []

        def stream() -> None:
            with client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                stream=True) as events:
                for event in events:
                    for choice in event.choices:
                        streamed.append(choice.delta.content or "")
                        if choice.finish_reason:
                            finished.append(choice.finish_reason)

        reader = threading.Thread(target=stream)
        reader.start()
        until(lambda: len(streamed) > 5)  # the stream is flowing
        cfg.write({"rules.yaml": NO_DELETES})  # the included file: watched too
        took = until(lambda: not delete_allowed(client), timeout=5, step=0.02)
        reader.join(10)
        assert took < 2.0, took
        assert not reader.is_alive() and finished == ["stop"]  # its delete was denied
        text = "".join(streamed)
        assert text.startswith(STREAM_TEXT)
        assert "deletes are off during the incident" in text
        status, ready = served.admin("GET", "/readyz")
        assert status == 200 and ready["policy_revision"] != revision
        new = ready["policy_revision"]
        assert ready["reload"]["last"]["result"] == "ok"
        assert ready["reload"]["last"]["rules"] == {"added": ["no-deletes"], "removed": [],
                                                    "changed": []}
        assert f'tether_policy_revision{{revision="{new}"}} 1.0' in served.metrics()
        assert f'revision="{revision}"' not in served.metrics()
        [reload] = records(audit, "reload")
        assert (reload["old_revision"], reload["revision"], reload["trigger"]) == (
            revision, new, "watch")
        decisions = records(audit, "decision")
        # The stream's delete was decided after the reload, by the new revision, and named it.
        last_stream = [d for d in decisions if d["stream"]][-1]
        assert (last_stream["action"], last_stream["policy_revision"]) == ("deny", new)
        assert {d["policy_revision"] for d in decisions} == {revision, new}
    finally:
        client.close()
        assert served.stop() == 0


def test_a_broken_edit_keeps_the_running_policy_and_says_where(tmp_path: Path,
                                                               upstream: int) -> None:
    served, cfg, audit = start(tmp_path, upstream, rules=NO_DELETES)
    client = openai.OpenAI(base_url=served.base_url, api_key="sk-agent", max_retries=0)
    try:
        assert not delete_allowed(client)
        revision = served.admin("GET", "/readyz")[1]["policy_revision"]
        broken = NO_DELETES.replace("action: deny\n    on_deny: rewrite\n    message",
                                    "action: maybe\n    on_deny: rewrite\n    message")
        assert broken != NO_DELETES
        cfg.write({"rules.yaml": broken})
        until(lambda: served.admin("GET", "/readyz")[1]["reload"]["last_error"] is not None)
        status, ready = served.admin("GET", "/readyz")
        assert status == 200 and ready["status"] == "ready"  # the old policy still decides
        assert ready["policy_revision"] == revision
        error = ready["reload"]["last_error"]
        assert error["result"] == "error"
        assert re.search(r"rules\.yaml:10: rule no-deletes: action", error["error"]), error
        assert not delete_allowed(client)
        assert 'tether_config_reload_total{result="error"} 1.0' in served.metrics()
        [record] = records(audit, "reload")
        assert record["result"] == "error" and "rules.yaml:10" in str(record["error"])
        # Emptied (an emptied ConfigMap): refused, the gate stays shut.
        cfg.write({"tether.yaml": "", "rules.yaml": ""})
        until(lambda: served.admin("GET", "/readyz")[1]["reload"]["last_error"]["result"]
              == "refused")
        assert not delete_allowed(client)
        assert "refused" in served.log.read_text()
        # Fixed: it loads.
        cfg.write({"tether.yaml": main_yaml(audit), "rules.yaml": RULES})
        until(lambda: delete_allowed(client))
        assert served.admin("GET", "/readyz")[1]["reload"]["last"]["result"] == "ok"
    finally:
        client.close()
        assert served.stop() == 0


def test_sighup_and_the_admin_route_reload(tmp_path: Path, upstream: int) -> None:
    served, cfg, audit = start(tmp_path, upstream)
    client = openai.OpenAI(base_url=served.base_url, api_key="sk-agent", max_retries=0)
    try:
        served.proc.send_signal(signal.SIGHUP)  # nothing changed: it used to kill tether
        until(lambda: served.admin("GET", "/readyz")[1]["reload"]["last"] is not None)
        assert served.admin("GET", "/readyz")[1]["reload"]["last"]["result"] == "unchanged"
        assert served.proc.poll() is None and delete_allowed(client)

        cfg.write({"rules.yaml": NO_DELETES})
        served.proc.send_signal(signal.SIGHUP)  # before the watcher sees the file still
        until(lambda: not delete_allowed(client), timeout=2)
        assert [r["trigger"] for r in records(audit, "reload")] == ["SIGHUP"]

        cfg.write({"rules.yaml": RULES})
        assert served.admin("POST", "/v1/reload", token=None)[0] == 401
        status, body = served.admin("POST", "/v1/reload")
        assert status == 200 and body["result"] == "ok" and body["trigger"] == "api"
        assert body["rules"] == {"added": [], "removed": ["no-deletes"], "changed": []}
        assert delete_allowed(client)
        cfg.write({"rules.yaml": "rules: [{id: x, action: deny, match: {tool: 3}}]"})
        status, body = served.admin("POST", "/v1/reload")
        assert status == 422 and body["result"] == "error" and "rules.yaml:1" in body["error"]
        assert delete_allowed(client)
    finally:
        client.close()
        assert served.stop() == 0


HELD = RULES + """  - id: resizes-held
    match: {tool: resize_volume}
    action: hold
    on_deny: rewrite
    timeout: 30s
"""


def _held(served: Served, client: openai.OpenAI) -> tuple[threading.Thread, list[Any],
                                                          dict[str, Any]]:
    answers: list[Any] = []

    def ask() -> None:
        r = client.chat.completions.create(model="gpt-x", tools=TOOLS,
                                           messages=[{"role": "user", "content": "resize"}])
        answers.append(r.choices[0].message)

    asking = threading.Thread(target=ask)
    asking.start()
    until(lambda: bool(served.admin("GET", "/v1/approvals")[1]["pending"]))
    [approval] = served.admin("GET", "/v1/approvals")[1]["pending"]
    return asking, answers, approval


def test_a_held_call_the_new_policy_denies_is_denied_and_the_approver_told_why(
        tmp_path: Path, upstream: int) -> None:
    served, cfg, audit = start(tmp_path, upstream, rules=HELD)
    client = openai.OpenAI(base_url=served.base_url, api_key="sk-agent", max_retries=0)
    try:
        asking, answers, approval = _held(served, client)
        cfg.write({"rules.yaml": HELD + """  - id: resizes-frozen
    match: {tool: resize_volume}
    action: deny
    on_deny: rewrite
    message: resizes are frozen
"""})
        assert served.admin("POST", "/v1/reload")[1]["result"] == "ok"
        asking.join(10)
        [message] = answers
        assert not message.tool_calls
        assert "resizes are frozen" in message.content
        status, seen = served.admin("GET", f"/v1/approvals/{approval['id']}")
        assert seen["state"] == "denied" and seen["decided_by"] == "tether"
        assert "denies it: resizes are frozen" in str(seen["reason"])
        status, late = served.admin("POST", f"/v1/approvals/{approval['id']}/approve",
                                    {"by": "alice"})
        assert status == 409 and "resizes are frozen" in str(late["approval"])
        [hold] = records(audit, "hold")
        assert hold["outcome"] == "denied"
    finally:
        client.close()
        assert served.stop() == 0


def test_a_held_call_the_new_policy_no_longer_holds_is_released_at_once(
        tmp_path: Path, upstream: int) -> None:
    served, cfg, audit = start(tmp_path, upstream, rules=HELD)
    client = openai.OpenAI(base_url=served.base_url, api_key="sk-agent", max_retries=0)
    try:
        asking, answers, approval = _held(served, client)
        started = time.monotonic()
        assert served.admin("POST", "/v1/reload")[1]["result"] == "unchanged"
        cfg.write({"rules.yaml": RULES})  # the hold rule is gone; defaults.action: allow
        assert served.admin("POST", "/v1/reload")[1]["result"] == "ok"
        asking.join(10)
        assert time.monotonic() - started < 5  # not the 30 s timeout, nobody clicked
        [message] = answers
        assert [c.function.name for c in message.tool_calls] == ["resize_volume"]
        seen = served.admin("GET", f"/v1/approvals/{approval['id']}")[1]
        assert seen["state"] == "approved" and seen["decided_by"] == "tether"
        assert "no longer holds it" in str(seen["reason"])
        [hold] = records(audit, "hold")
        assert hold["outcome"] == "approved"
    finally:
        client.close()
        assert served.stop() == 0
