"""The Vercel AI SDK (node `ai` + `@ai-sdk/openai`) on the Responses API, through a real tether,
against the fake upstream that stores responses and checks item references: a denial, the
SDK's next step (earlier output sent back as `item_reference`s, the default), and one more
turn, with generateText and streamText; and a task whose first answer is only a denied call,
which tether continues (`on_deny: continue`, the default) so the SDK's steps go on. Needs
node and `npm ci --prefix tests/node`; skipped without them."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.providers.responses_history import Rewrite
from proxy.server.routes import CONTEXT
from proxy.sessions.rewrites import MemoryRewrites
from tests.conftest import Stack
from tests.fakes import Call, Reply
from tests.test_e2e_continuations import DONE, SCRIPT, check_continuation

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "ai").is_dir(),
    reason="needs node and `npm ci --prefix tests/node`")
DENIAL = "'delete_volume' was denied by no-prod-deletes"


class Watched(MemoryRewrites):
    """The rewrite store, noting which replacement messages were referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def items(self, ids: Sequence[str]) -> dict[str, Rewrite | None]:
        self.asked += ids
        return await super().items(ids)


async def run(stack: Stack, *args: str, script: str = "ai_sdk_turns.mjs") -> dict[str, Any]:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / script), stack.base_url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_a_denial_and_two_more_turns(stack: Stack, mode: str) -> None:
    stack.fake.push(
        Reply(content="Cleaning up.", calls=(
            Call("list_volumes", "{}", id="call_list"),
            Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}',
                 id="call_del"))),
        Reply(content="Skipped the delete."),
        Reply(content="Bye."))
    watched = stack.tether.proxy[CONTEXT].rewrites = Watched()
    result = await run(stack, mode)
    assert result["ok"], result
    assert result["ran"] == ["list_volumes"]  # the denied call never reached the agent
    assert "Skipped the delete." in result["first"] and result["second"] == "Bye."
    step = stack.fake.requests[1]["input"]
    refs = [i["id"] for i in step if i.get("type") == "item_reference"]
    sent_back = [i for i in step if i.get("type") == "message" and i.get("role") == "assistant"]
    # Whatever the SDK sent for tether's message, the upstream got it in full, no made-up id.
    assert not any(r.startswith("msg_tether_") for r in refs)
    assert any(DENIAL in json.dumps(i) for i in sent_back), step
    assert len(stack.fake.requests) == 3
    assert [a[:11] for a in watched.asked] == ["msg_tether_"]  # the SDK referenced it


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_a_reference_tether_no_longer_holds(stack: Stack, mode: str) -> None:
    """The record is gone between the two steps: the SDK gets tether's 400, naming why."""
    class Forgetful(MemoryRewrites):
        async def items(self, ids: Sequence[str]) -> dict[str, Rewrite | None]:
            return dict.fromkeys(ids)

    stack.tether.proxy[CONTEXT].rewrites = Forgetful()
    stack.fake.push(Reply(calls=(
        Call("list_volumes", "{}", id="call_list"),
        Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}'))))
    result = await run(stack, mode)
    assert not result["ok"]
    assert "tether no longer holds it" in result["error"], result
    assert len(stack.fake.requests) == 1


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_a_denied_only_call_is_continued(stack: Stack, api: str, mode: str) -> None:
    """The SDK's steps stop at an answer without a tool call; with tether continuing, its
    first step already holds the model's answer to the denial (the list call), it runs it,
    and the task completes in two steps, the denied call never shown to it."""
    stack.fake.push(*SCRIPT)
    result = await run(stack, api, mode, script="ai_sdk_continue.mjs")
    assert result["ok"], result
    assert result["ran"] == ["list_volumes"]
    assert result["text"] == DONE
    steps = result["steps"]
    assert [s["calls"] for s in steps] == [["list_volumes"], []]
    assert DENIAL in steps[0]["text"] and steps[0]["finish"] == "tool-calls"
    if mode == "stream":
        assert DENIAL in result["streamed"] and result["streamed"].endswith(DONE)
    check_continuation(stack, api)
