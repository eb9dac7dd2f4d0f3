"""One decision, two planes, end to end (docs/linked-calls.md).

The agent asks the model through the official openai SDK (against the fake OpenAI);
the model asks for `delete_volume`, which a rule holds; a human approves it over the
admin API; the agent then runs it with its real boto3 `ec2.delete_volume` through
HTTPS_PROXY (tether's forward proxy, its CA trusted), presenting the same tether key
as on the LLM plane (`http://janitor:KEY@proxy`). The fake EC2 records what reaches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from openai import AsyncOpenAI

from proxy.demo.fake_tool_api import FakeToolApi
from proxy.egress import Egress
from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.targets import Address
from proxy.server.app import CONTEXT, bound_port
from tests.conftest import MakeStack
from tests.fakes import Call, Reply
from tests.fakes.tls import make_fake_ca
from tests.redis_server import RedisServer
from tests.test_e2e_approvals import TOKEN, admin, pending
from tests.test_e2e_openai import MESSAGES, TOOLS
from tests.test_forward_egress import EC2, FAKE_NAMES, Egr, FakeUpstream

KEY = "tk-janitor-key"
LINKED = f"""
tools:
  delete_volume: {{api: aws.ec2.DeleteVolume, args: {{VolumeId: volume_id}}}}
agents:
  janitor: {{key_sha256: [{hashlib.sha256(KEY.encode()).hexdigest()}]}}
rules:
  - id: writes-need-approval
    match: {{effect: write}}
    action: hold
    timeout: 30s
    message: Writes are reviewed
approvals: {{keepalive: 50ms}}
"""
ALLOWED = f"""
tools:
  delete_volume: {{api: aws.ec2.DeleteVolume, args: {{VolumeId: volume_id}}}}
agents:
  janitor: {{key_sha256: [{hashlib.sha256(KEY.encode()).hexdigest()}]}}
rules: []
"""
REQUIRE = "egress: {require_decided_call: true}\n"

StartLinked = Callable[..., Awaitable[Egr]]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


@pytest.fixture
async def start_linked(make_stack: MakeStack, tmp_path: Path) -> AsyncIterator[StartLinked]:
    """A tether (its forward proxy sharing its ledger and authenticator) in front of the
    fake OpenAI and a fake EC2 on one TLS port; `fake` lets replicas share one EC2."""
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", *FAKE_NAMES))

    async def resolver(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")] if host in FAKE_NAMES else []

    async def start(policy: str = LINKED, extra: str = "", fake: FakeUpstream | None = None,
                    fake_port: int | None = None) -> Egr:
        if fake is None or fake_port is None:
            fake = fake or FakeUpstream()
            runner = web.AppRunner(fake.app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0,
                              ssl_context=test_ca.server_context()).start()
            runners.append(runner)
            fake_port = bound_port(runner)
        ca_dir = tmp_path / "ca"  # replicas share their CA, as a deployment's do
        stack = await make_stack(policy=policy, extra=(
            f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
            f"allow_private: [{EC2}]}}\n{extra}"))
        cfg = stack.tether.config
        fwd = await start_forward(
            stack.tether.governor, stack.tether.governor.metrics, cfg.forward,
            host="127.0.0.1", port=0, reverse=("127.0.0.1", int(stack.proxy_url.rsplit(":", 1)[1])),
            own_ports=(), resolver=resolver, auth=stack.tether.proxy[CONTEXT].auth,
            egress=Egress(cfg.apis, cfg.cloud, stack.tether.holds, cfg.agent_keys,
                          cfg.trust_identity_headers, cfg.lookups, linked=stack.tether.linked))
        proxies.append(fwd)
        ca_file = tmp_path / f"tether-ca-{len(proxies)}.pem"
        ca_file.write_text(export_pem(cfg.forward.ca_dir))
        return Egr(stack, fwd, f"http://janitor:{KEY}@127.0.0.1:{fwd.port}", ca_file, fake,
                   fake_port)

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def ec2(egr: Egr) -> Any:
    """The agent's EC2 client: through this tether's forward proxy, with its CA."""
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=f"https://{EC2}:{egr.port}",
                        verify=str(egr.ca_file),
                        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"},
                                          proxies={"https": egr.url}))


async def delete(egr: Egr, volume: str) -> dict[str, Any]:
    return dict(await asyncio.to_thread(lambda: ec2(egr).delete_volume(VolumeId=volume)))


async def denied(egr: Egr, volume: str) -> ClientError:
    with pytest.raises(ClientError) as err:
        await delete(egr, volume)
    return err.value


async def ask_model(egr: Egr, arguments: str, *, approve: bool = True) -> str:
    """The model asks for delete_volume; with `approve`, a human approves the hold.
    Returns the arguments of the call the agent received."""
    egr.stack.fake.push(Reply(calls=(Call("delete_volume", arguments),)))
    client = AsyncOpenAI(base_url=egr.stack.base_url, api_key=KEY, max_retries=0)
    egr.stack.clients.append(client)
    task = asyncio.create_task(client.chat.completions.create(model="m", messages=MESSAGES,
                                                              tools=TOOLS))
    if approve:
        [approval] = await pending(egr.stack)
        assert approval["tool"] == "delete_volume"
        # The approver sees what else approving lets run.
        expected = json.dumps({"VolumeId": json.loads(arguments).get("volume_id")},
                              separators=(",", ":"))
        assert approval["message"] == (
            f"Writes are reviewed; approving it also lets one aws.ec2.DeleteVolume request "
            f"with exactly {expected} through, within 10 min"), approval["message"]
        status, _ = await admin(egr.stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                                {"by": "alice"})
        assert status == 200
    answer = await asyncio.wait_for(task, 20)
    [call] = answer.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "delete_volume"
    return call.function.arguments


def decisions(egr: Egr, tool: str) -> list[dict[str, Any]]:
    return [r for r in egr.stack.audit() if r["kind"] == "decision" and r["tool"] == tool]


def holds(egr: Egr) -> list[dict[str, Any]]:
    return [r for r in egr.stack.audit() if r["kind"] == "hold"]


async def no_pending(egr: Egr) -> bool:
    _, body = await admin(egr.stack, "GET", "/v1/approvals")
    return not body["pending"]


async def deny_next_hold(egr: Egr, tool: str) -> dict[str, Any]:
    [approval] = await pending(egr.stack)
    assert approval["tool"] == tool
    await admin(egr.stack, "POST", f"/v1/approvals/{approval['id']}/deny", {"by": "bob"})
    return approval


# -- the approved call, once ------------------------------------------------------------------

async def test_an_approved_delete_runs_once_through_boto3_without_a_second_hold(
        start_linked: StartLinked, aws: None) -> None:
    egr = await start_linked()
    await ask_model(egr, '{"volume_id": "vol-tmp", "reason": "scratch"}')
    [llm] = decisions(egr, "delete_volume")
    assert llm["action"] == "hold"

    out = await delete(egr, "vol-tmp")  # no approval is asked for: nothing waits
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert [("Action=DeleteVolume" in s["body"], "VolumeId=vol-tmp" in s["body"])
            for s in egr.fake.seen] == [(True, True)]
    assert await no_pending(egr)
    [api] = decisions(egr, "DeleteVolume")
    assert api["api"] == "aws.ec2.DeleteVolume" and api["agent"] == "janitor"
    assert api["linked_decision"] == llm["decision_id"]
    assert api["action"] == "hold"  # the egress rule held it; the LLM-side approval answered
    [llm_end, api_end] = holds(egr)
    assert llm_end["decision_id"] == llm["decision_id"] and llm_end["by"] == "alice"
    assert api_end["decision_id"] == api["decision_id"] and api_end["outcome"] == "approved"
    assert api_end["linked_decision"] == llm["decision_id"]

    # The same request again is a new decision: held, and here denied by a human.
    second = asyncio.create_task(denied(egr, "vol-tmp"))
    await deny_next_hold(egr, "DeleteVolume")
    err = await asyncio.wait_for(second, 20)
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(egr.fake.seen) == 1
    assert "linked_decision" not in decisions(egr, "DeleteVolume")[1]


async def test_a_changed_volume_id_is_a_new_decision_and_keeps_the_approval(
        start_linked: StartLinked, aws: None) -> None:
    egr = await start_linked()
    await ask_model(egr, '{"volume_id": "vol-tmp"}')
    other = asyncio.create_task(denied(egr, "vol-prod"))
    approval = await deny_next_hold(egr, "DeleteVolume")
    assert json.loads(approval["arguments"])["VolumeId"] == "vol-prod"
    await asyncio.wait_for(other, 20)
    assert egr.fake.seen == []
    # The approved call was not used up by the request that did not match it.
    out = await delete(egr, "vol-tmp")
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert len(egr.fake.seen) == 1


async def test_a_call_approved_for_one_agent_is_not_another_agents(
        start_linked: StartLinked, aws: None) -> None:
    egr = await start_linked()
    await ask_model(egr, '{"volume_id": "vol-tmp"}')
    anonymous = Egr(egr.stack, egr.proxy, f"http://127.0.0.1:{egr.proxy.port}", egr.ca_file,
                    egr.fake, egr.port)
    attempt = asyncio.create_task(denied(anonymous, "vol-tmp"))
    await deny_next_hold(egr, "DeleteVolume")  # held, not redeemed
    await asyncio.wait_for(attempt, 20)
    assert egr.fake.seen == []


# -- require_decided_call ---------------------------------------------------------------------

async def test_with_require_decided_call_a_direct_delete_is_denied(
        start_linked: StartLinked, aws: None) -> None:
    egr = await start_linked(policy=ALLOWED, extra=REQUIRE)
    err = await denied(egr, "vol-tmp")
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert err.response["Error"]["Code"] == "TetherNoDecidedCall"
    assert "tether:no-decided-call" in str(err) and "no write without a governed tool call" in str(err)
    assert egr.fake.seen == []
    [record] = decisions(egr, "DeleteVolume")
    assert record["action"] == "deny" and record["rules"] == ["tether:no-decided-call"]
    # Reads are unaffected.
    out = await asyncio.to_thread(lambda: ec2(egr).describe_volumes())
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200


async def test_with_require_decided_call_an_allowed_call_runs_once(
        start_linked: StartLinked, aws: None) -> None:
    egr = await start_linked(policy=ALLOWED, extra=REQUIRE)
    args = await ask_model(egr, '{"volume_id": "vol-tmp"}', approve=False)
    assert json.loads(args) == {"volume_id": "vol-tmp"}
    [llm] = decisions(egr, "delete_volume")
    assert llm["action"] == "allow"
    await delete(egr, "vol-tmp")
    [first] = decisions(egr, "DeleteVolume")
    assert first["action"] == "allow" and first["linked_decision"] == llm["decision_id"]
    err = await denied(egr, "vol-tmp")  # once
    assert "tether:no-decided-call" in str(err)
    assert len(egr.fake.seen) == 1


async def test_an_allowed_call_does_not_answer_a_hold_on_the_egress_plane(
        start_linked: StartLinked, aws: None) -> None:
    """Strictest wins: the LLM plane allowed delete_volume outright, the egress plane holds
    DeleteVolume: a human is asked (the policy said so); the link is still recorded."""
    egr = await start_linked(policy=ALLOWED.replace("rules: []", "rules:") + """
  - id: egress-deletes-held
    match: {api: aws.ec2.DeleteVolume}
    action: hold
    timeout: 30s
approvals: {keepalive: 50ms}
""")
    await ask_model(egr, '{"volume_id": "vol-tmp"}', approve=False)
    attempt = asyncio.create_task(denied(egr, "vol-tmp"))
    await deny_next_hold(egr, "DeleteVolume")
    await asyncio.wait_for(attempt, 20)
    assert egr.fake.seen == []
    [record] = decisions(egr, "DeleteVolume")
    assert record["action"] == "hold" and record["linked_decision"]


# -- two replicas, one Redis ------------------------------------------------------------------

async def test_across_replicas_the_approval_is_redeemed_exactly_once(
        start_linked: StartLinked, aws: None, redis_server: RedisServer) -> None:
    store = f"store: {redis_server.url}\n{REQUIRE}"
    first = await start_linked(extra=store)
    second = await start_linked(extra=store, fake=first.fake, fake_port=first.port)
    await ask_model(first, '{"volume_id": "vol-tmp"}')

    async def attempt(egr: Egr) -> int:
        try:
            out = await delete(egr, "vol-tmp")
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
        return int(out["ResponseMetadata"]["HTTPStatusCode"])

    results = await asyncio.gather(attempt(first), attempt(second), attempt(second))
    assert sorted(results) == [200, 403, 403]
    assert len(first.fake.seen) == 1
    linked = [r for egr in (first, second) for r in decisions(egr, "DeleteVolume")
              if r.get("linked_decision")]
    assert len(linked) == 1


# -- /apis/: a tool linked to an OpenAPI operation (the identity mapping) -----------------------

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
JIRA_POLICY = f"""
apis:
  jira: {{url: https://jira.invalid, spec: {SPECS / 'jira.yaml'}}}
tools:
  create_issue: {{api: jira.createIssue}}
rules:
  - id: writes-need-approval
    match: {{effect: write}}
    action: hold
    timeout: 30s
approvals: {{keepalive: 50ms}}
egress: {{require_decided_call: true}}
"""
CREATE = {"projectKey": "OPS", "summary": "Disk full on vol-7 \u00e9", "issueType": "Bug"}
AGENT = {"X-Tether-Agent": "janitor"}


async def test_an_approved_openapi_tool_call_runs_once_through_apis(
        make_stack: MakeStack) -> None:
    fake = FakeToolApi()
    stack = await make_stack(policy=JIRA_POLICY, upstreams={"jira": fake})
    stack.fake.push(Reply(calls=(Call("create_issue", json.dumps(CREATE)),)))
    client = stack.client(default_headers=AGENT)
    task = asyncio.create_task(client.chat.completions.create(
        model="m", messages=MESSAGES, tools=[{"type": "function", "function": {
            "name": "create_issue", "parameters": {"type": "object"}}}]))
    [approval] = await pending(stack)
    assert "one jira.createIssue request with exactly" in approval["message"]
    await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "alice"})
    await asyncio.wait_for(task, 20)

    async def post(body: dict[str, Any]) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.post(stack.proxy_url + "/apis/jira/rest/api/2/issue", json=body,
                                 headers=AGENT) as resp:
                return resp.status

    assert await post({**CREATE, "summary": "something else"}) == 403  # not what was approved
    assert await post(CREATE) == 201                                   # no second hold
    assert await post(CREATE) == 403                                   # once
    assert [json.loads(s.body) for s in fake.seen] == [CREATE]
    records = [r for r in stack.decisions() if r["provider"] == "api:jira"]
    assert [(r["action"], r.get("linked_decision") is not None) for r in records] == [
        ("deny", False), ("hold", True), ("deny", False)]
    assert all("tether:no-decided-call" in r["rules"] for r in (records[0], records[2]))


# -- hostile values: compared canonically, never loosely ---------------------------------------

@pytest.mark.parametrize(("asked", "sent", "redeemed"), [
    ("vol-caf\u00e9", "vol-caf\u00e9", True),          # non-ASCII survives the Query form
    ("vol-caf\u00e9", "vol-cafe\u0301", False),        # NFC is not NFD
    ("vol-1", "VOL-1", False),                          # no case folding
    ("vol-1", "vol-1 ", False),                         # no trimming
    (123, "123", False),                                # a number is not its text
    (["vol-1"], "vol-1", False),                        # a list is not its element
    ("vol-1\u200b", "vol-1", False),                    # a zero-width space counts
])
async def test_argument_values_are_compared_exactly(
        start_linked: StartLinked, aws: None, asked: object, sent: str, redeemed: bool) -> None:
    egr = await start_linked(policy=ALLOWED, extra=REQUIRE)
    await ask_model(egr, json.dumps({"volume_id": asked}), approve=False)
    if redeemed:
        await delete(egr, sent)
        assert len(egr.fake.seen) == 1
    else:
        err = await denied(egr, sent)
        assert "tether:no-decided-call" in str(err) and egr.fake.seen == []
