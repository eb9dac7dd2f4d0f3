"""Egress policy through the forward proxy: `apis:` hosts and cloud API hosts are
judged per request, with the official clients (boto3, requests) through HTTPS_PROXY.

The names are the real ones (ec2.us-east-1.amazonaws.com, jira.example.com):
the forward proxy is given a resolver that maps them to loopback, where one
fake serves them over TLS with a certificate from a test CA tether is told to
trust (`forward.upstream_ca`). The clients trust tether's CA (AWS_CA_BUNDLE,
`verify=`). The fake records what reaches it, so "denied" also means "nothing
was sent".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
import requests
from aiohttp import web
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy
from proxy.forward.targets import Address
from proxy.server.app import bound_port
from tests.conftest import MakeStack, Stack
from tests.fakes.tls import make_fake_ca
from tests.forwarding import forward_for
from tests.test_e2e_approvals import TOKEN, admin, pending

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
EC2 = "ec2.us-east-1.amazonaws.com"
JIRA = "jira.example.com"
FAKE_NAMES = (EC2, JIRA)
POLICY = """
rules:
  - id: no-prod-volume-deletes
    match: {api: aws.ec2.DeleteVolume, args: {VolumeId: {in: [vol-prod]}}}
    action: deny
    message: Production volumes are never deleted by agents
  - id: no-issue-deletes
    match: {api: jira.deleteIssue}
    action: deny
    message: Agents never delete issues
"""
DESCRIBE_XML = """<?xml version="1.0" encoding="UTF-8"?>
<DescribeVolumesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>req-1</requestId>
  <volumeSet><item><volumeId>vol-prod</volumeId><size>8</size><status>in-use</status></item></volumeSet>
</DescribeVolumesResponse>"""
DELETE_XML = """<?xml version="1.0" encoding="UTF-8"?>
<DeleteVolumeResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>req-2</requestId><return>true</return></DeleteVolumeResponse>"""


def default_tags() -> dict[str, dict[str, str]]:
    return {"vol-prod": {"env": "production"},
            "vol-cand": {"env": "production-candidate", "owner": "ml"},
            "vol-tmp": {"env": "temporary"}, "vol-bare": {},
            "i-prod": {"env": "production"}, "i-tmp": {"env": "temporary"}}


def describe_tags_xml(items: list[tuple[str, str, str]], token: str | None) -> str:
    rows = "".join(f"<item><resourceId>{r}</resourceId><resourceType>volume</resourceType>"
                   f"<key>{k}</key><value>{v}</value></item>" for r, k, v in items)
    more = f"<nextToken>{token}</nextToken>" if token else ""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<DescribeTagsResponse '
            'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>req-3</requestId>'
            f"<tagSet>{rows}</tagSet>{more}</DescribeTagsResponse>")


@dataclass
class FakeUpstream:
    """EC2 (Query protocol) and a Jira-like API on one TLS port; records every request.

    `seen` is what agents sent; `lookups` the DescribeTags calls (tether's), answered
    from `tags` one tag per page (so paging is exercised), or with `tags_status`
    (non-200: an error) after `tags_delay` seconds."""

    seen: list[dict[str, str]] = field(default_factory=list)
    tags: dict[str, dict[str, str]] = field(default_factory=default_tags)
    lookups: list[dict[str, str]] = field(default_factory=list)
    tags_status: int = 200
    tags_delay: float = 0.0

    def describe_tags(self, form: dict[str, list[str]]) -> web.Response:
        if form.get("Filter.1.Name") != ["resource-id"]:
            return web.Response(status=400, text="only resource-id filters")
        ids = [v[0] for k, v in sorted(form.items()) if k.startswith("Filter.1.Value.")]
        items = [(r, k, v) for r in ids for k, v in self.tags.get(r, {}).items()]
        start = int((form.get("NextToken") or ["0"])[0])
        token = str(start + 1) if start + 1 < len(items) else None
        return web.Response(text=describe_tags_xml(items[start:start + 1], token),
                            content_type="text/xml")

    def app(self) -> web.Application:
        async def any_route(request: web.Request) -> web.Response:
            body = (await request.read()).decode()
            record = {"host": request.host.split(":")[0], "method": request.method,
                      "path": request.path_qs, "body": body,
                      "host-header": request.headers.get("host", ""),
                      "authorization": request.headers.get("authorization", ""),
                      "x-amz-date": request.headers.get("x-amz-date", ""),
                      "content-type": request.headers.get("content-type", "")}
            form = parse_qs(body)
            if request.host.startswith(EC2) and form.get("Action") == ["DescribeTags"]:
                self.lookups.append(record)
                await asyncio.sleep(self.tags_delay)
                if self.tags_status != 200:
                    return web.Response(status=self.tags_status, text="<Response/>")
                return self.describe_tags(form)
            self.seen.append(record)
            if request.host.startswith(EC2):
                action = (form.get("Action") or [request.query.get("Action", "")])[0]
                xml = DESCRIBE_XML if action == "DescribeVolumes" else DELETE_XML
                return web.Response(text=xml, content_type="text/xml")
            return web.json_response({"ok": True, "path": request.path_qs})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_route)
        return app


@dataclass
class Egr:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path
    fake: FakeUpstream
    port: int

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == kind]


StartEgr = Callable[..., Awaitable[Egr]]


@pytest.fixture
async def start_egr(make_stack: MakeStack, tmp_path: Path) -> AsyncIterator[StartEgr]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", *FAKE_NAMES))

    async def resolver(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")] if host in FAKE_NAMES else []

    async def start(forward: str = "", policy: str = POLICY, extra: str = "",
                    fake: FakeUpstream | None = None) -> Egr:
        fake = fake or FakeUpstream()
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=test_ca.server_context()).start()
        runners.append(runner)
        ca_dir = tmp_path / f"ca-{len(proxies)}"
        body = forward or f"allow_private: [{EC2}]"
        apis = (f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}}}\n")
        stack = await make_stack(
            policy=policy, extra=f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
                                 f"{body}}}\n{apis}{extra}")
        cfg = stack.tether.config
        fwd = await forward_for(stack, resolver)
        proxies.append(fwd)
        ca_file = tmp_path / f"tether-ca-{len(proxies)}.pem"
        ca_file.write_text(export_pem(cfg.forward.ca_dir))
        return Egr(stack, fwd, f"http://127.0.0.1:{fwd.port}", ca_file, fake, bound_port(runner))

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Egr], None]:
    def set_env(egr: Egr) -> None:
        monkeypatch.setenv("HTTPS_PROXY", egr.url)
        monkeypatch.setenv("NO_PROXY", "")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(egr.ca_file))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
        monkeypatch.delenv("AWS_PROFILE", raising=False)

    return set_env


def ec2(egr: Egr) -> Any:
    return boto3.client("ec2", region_name="us-east-1",
                        endpoint_url=f"https://{EC2}:{egr.port}",
                        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}))


# -- cloud: EC2 through boto3 -----------------------------------------------------------------


async def test_boto3_describe_volumes_is_allowed_and_forwarded(
        start_egr: StartEgr, aws_env: Callable[[Egr], None]) -> None:
    egr = await start_egr()
    aws_env(egr)
    out = await asyncio.to_thread(lambda: ec2(egr).describe_volumes())
    assert [v["VolumeId"] for v in out["Volumes"]] == ["vol-prod"]
    assert [(s["host"], "Action=DescribeVolumes" in s["body"]) for s in egr.fake.seen] == [
        (EC2, True)]
    [decision] = egr.records("decision")
    assert decision["api"] == "aws.ec2.DescribeVolumes" and decision["action"] == "allow"
    assert decision["effect"] == "read" and decision["provider"] == f"forward:{EC2}"
    assert decision["tool"] == "DescribeVolumes"
    # The audit names the host; the metric does not (one label value per S3 bucket would
    # be unbounded): the provider label of a cloud host's decisions is `forward`.
    metrics = egr.stack.tether.governor.metrics.render().decode()
    assert any(line.startswith("tether_tool_decisions_total{") and 'provider="forward"' in line
               and 'action="allow"' in line for line in metrics.splitlines()), metrics
    assert f'provider="forward:{EC2}"' not in metrics


async def test_boto3_delete_of_a_production_volume_is_denied_in_ec2s_error_shape(
        start_egr: StartEgr, aws_env: Callable[[Egr], None]) -> None:
    egr = await start_egr()
    aws_env(egr)
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(lambda: ec2(egr).delete_volume(VolumeId="vol-prod"))
    e = err.value.response
    assert e["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e["Error"]["Code"] == "TetherRequestDenied"
    assert "denied by no-prod-volume-deletes" in e["Error"]["Message"]
    assert "Production volumes are never deleted" in str(err.value)
    assert egr.fake.seen == []  # nothing reached EC2
    [decision] = egr.records("decision")
    assert decision["api"] == "aws.ec2.DeleteVolume" and decision["action"] == "deny"
    assert decision["arguments"]["VolumeId"] == "vol-prod"
    assert decision["rules"] == ["no-prod-volume-deletes"]
    # another volume is not production: the same call is forwarded
    await asyncio.to_thread(lambda: ec2(egr).delete_volume(VolumeId="vol-scratch"))
    assert [s["host"] for s in egr.fake.seen] == [EC2]


def _session(egr: Egr) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"https": egr.url}
    s.verify = str(egr.ca_file)
    return s


async def test_action_in_body_and_query_that_disagree_is_refused(start_egr: StartEgr) -> None:
    egr = await start_egr()
    url = f"https://{EC2}:{egr.port}/?Action=DescribeVolumes"
    r = await asyncio.to_thread(lambda: _session(egr).post(
        url, data="Action=DeleteVolume&VolumeId=vol-prod&Version=2016-11-15",
        headers={"content-type": "application/x-www-form-urlencoded"}, timeout=20))
    assert r.status_code == 403
    assert "<Code>TetherAmbiguousRequest</Code>" in r.text and "<Response><Errors>" in r.text
    assert egr.fake.seen == []
    [refusal] = egr.records("request")
    assert refusal["code"] == "tether:ambiguous-request" and refusal["status"] == 403


async def test_x_amz_target_spoofing_is_refused(start_egr: StartEgr) -> None:
    """A Query-protocol call that also claims a JSON-protocol target: two readings."""
    egr = await start_egr()
    r = await asyncio.to_thread(lambda: _session(egr).post(
        f"https://{EC2}:{egr.port}/", data="Action=DescribeVolumes&Version=2016-11-15",
        headers={"content-type": "application/x-www-form-urlencoded",
                 "x-amz-target": "AmazonEC2.DeleteVolume"}, timeout=20))
    assert r.status_code == 403
    # the refusal comes in the JSON protocol's shape the request claimed
    assert r.json()["__type"] == "TetherAmbiguousRequest", r.text
    assert "X-Amz-Target" in r.json()["message"] or "x-amz-target" in r.json()["message"].lower()
    assert egr.fake.seen == []
    [refusal] = egr.records("request")
    assert refusal["code"] == "tether:ambiguous-request"
    assert egr.records("decision") == []


async def test_unknown_cloud_operation_is_denied_as_an_unknown_write(start_egr: StartEgr) -> None:
    egr = await start_egr()
    r = await asyncio.to_thread(lambda: _session(egr).put(
        f"https://{EC2}:{egr.port}/some/rest/path", data=b"x", timeout=20))
    assert r.status_code == 403, r.text
    assert egr.fake.seen == []
    [decision] = egr.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["tether:unknown-cloud-operation"]


async def test_unknown_cloud_operation_passes_when_the_host_is_listed_exactly(
        start_egr: StartEgr) -> None:
    egr = await start_egr(f"allow_private: [{EC2}], pass_hosts: [{EC2}]")
    r = await asyncio.to_thread(lambda: _session(egr).put(
        f"https://{EC2}:{egr.port}/some/rest/path", data=b"x", timeout=20))
    assert r.status_code == 200
    [decision] = egr.records("decision")
    assert decision["action"] == "allow" and decision["effect"] == "write"


async def test_a_wildcard_pass_host_does_not_let_unknown_cloud_operations_through(
        start_egr: StartEgr) -> None:
    egr = await start_egr(f"allow_private: [{EC2}], pass_hosts: ['*.amazonaws.com']")
    r = await asyncio.to_thread(lambda: _session(egr).put(
        f"https://{EC2}:{egr.port}/some/rest/path", data=b"x", timeout=20))
    assert r.status_code == 403 and egr.fake.seen == []


async def test_cloud_effect_overrides_from_the_config(start_egr: StartEgr) -> None:
    egr = await start_egr(policy="""
rules:
  - id: no-cloud-writes
    match: {effect: write}
    action: deny
""", extra='cloud: {effects: {"aws.ec2.DeleteVolume": read}}\n')
    r = await asyncio.to_thread(lambda: _session(egr).post(
        f"https://{EC2}:{egr.port}/", data="Action=DeleteVolume&VolumeId=vol-1&Version=2016-11-15",
        headers={"content-type": "application/x-www-form-urlencoded"}, timeout=20))
    assert r.status_code == 200
    [decision] = egr.records("decision")
    assert decision["effect"] == "read" and decision["action"] == "allow"


async def test_a_held_cloud_call_waits_for_approval_then_is_forwarded(
        start_egr: StartEgr, monkeypatch: pytest.MonkeyPatch,
        aws_env: Callable[[Egr], None]) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    egr = await start_egr(policy=POLICY + """
  - id: deletes-need-approval
    match: {api: aws.ec2.DeleteVolume}
    action: hold
    timeout: 30s
    message: Volume deletes are reviewed
""", extra="approvals: {keepalive: 50ms}\n")
    aws_env(egr)
    task = asyncio.create_task(asyncio.to_thread(
        lambda: ec2(egr).delete_volume(VolumeId="vol-scratch")))
    [approval] = await pending(egr.stack)
    assert approval["tool"] == "DeleteVolume" and approval["provider"] == f"forward:{EC2}"
    assert json.loads(approval["arguments"])["VolumeId"] == "vol-scratch"
    await asyncio.sleep(0.2)
    assert not task.done() and egr.fake.seen == []
    status, _ = await admin(egr.stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                            {"by": "alice"})
    assert status == 200
    out = await asyncio.wait_for(task, 20)
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert [s["host"] for s in egr.fake.seen] == [EC2]


async def test_a_denied_hold_is_refused_and_not_forwarded(
        start_egr: StartEgr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    egr = await start_egr(policy="""
rules:
  - id: comments-need-approval
    match: {api: jira.addComment}
    action: hold
    timeout: 30s
""")
    task = asyncio.create_task(asyncio.to_thread(lambda: _session(egr).post(
        f"https://{JIRA}:{egr.port}/rest/api/2/issue/OPS-1/comment", json={"body": "hi"},
        timeout=20)))
    [approval] = await pending(egr.stack)
    assert approval["tool"] == "jira.addComment"
    await admin(egr.stack, "POST", f"/v1/approvals/{approval['id']}/deny", {"by": "bob"})
    r = await asyncio.wait_for(task, 20)
    assert r.status_code == 403 and r.json()["error"]["rule"] == "comments-need-approval"
    assert egr.fake.seen == []


# -- apis: hosts --------------------------------------------------------------------------------


async def test_requests_to_an_apis_host_unknown_operation_denied_known_allowed(
        start_egr: StartEgr) -> None:
    egr = await start_egr()
    s = _session(egr)
    base = f"https://{JIRA}:{egr.port}"
    bad = await asyncio.to_thread(lambda: s.get(f"{base}/rest/api/2/admin/everything", timeout=20))
    assert bad.status_code == 403
    err = bad.json()["error"]
    assert err["rule"] == "tether:unknown-operation" and err["code"] == "unknown_operation"
    assert egr.fake.seen == []
    ok = await asyncio.to_thread(lambda: s.get(f"{base}/rest/api/2/issue/OPS-1", timeout=20))
    assert ok.status_code == 200 and ok.json()["path"] == "/rest/api/2/issue/OPS-1"
    denied = await asyncio.to_thread(lambda: s.delete(f"{base}/rest/api/2/issue/OPS-1", timeout=20))
    assert denied.status_code == 403 and denied.json()["error"]["rule"] == "no-issue-deletes"
    assert [(x["method"], x["path"]) for x in egr.fake.seen] == [("GET", "/rest/api/2/issue/OPS-1")]
    decisions = egr.records("decision")
    assert [(d["provider"], d["api"], d["action"]) for d in decisions] == [
        ("api:jira", None, "deny"), ("api:jira", "jira.getIssue", "allow"),
        ("api:jira", "jira.deleteIssue", "deny")]


async def test_apis_host_body_is_checked_against_the_schema(start_egr: StartEgr) -> None:
    egr = await start_egr()
    r = await asyncio.to_thread(lambda: _session(egr).post(
        f"https://{JIRA}:{egr.port}/rest/api/2/issue", json={"summary": 3}, timeout=20))
    assert r.status_code == 403 and r.json()["error"]["rule"] == "tether:invalid-request"
    assert egr.fake.seen == []


async def test_apis_host_ambiguous_path_is_refused(start_egr: StartEgr) -> None:
    egr = await start_egr()
    r = await asyncio.to_thread(lambda: _session(egr).get(
        f"https://{JIRA}:{egr.port}/rest/api/2/issue/%2e%2e/x", timeout=20))
    assert r.status_code == 400 and r.json()["error"]["code"] == "ambiguous_request"
    assert egr.fake.seen == []
    [refusal] = egr.records("request")
    assert refusal["provider"] == "api:jira" and refusal["code"] == "tether:ambiguous-request"


async def test_cloud_ambiguous_path_is_refused_in_the_clouds_shape(start_egr: StartEgr) -> None:
    egr = await start_egr()
    r = await asyncio.to_thread(lambda: _session(egr).get(
        f"https://{EC2}:{egr.port}/a//b?Action=DescribeVolumes", timeout=20))
    assert r.status_code == 403 and "<Code>TetherAmbiguousRequest</Code>" in r.text
    assert egr.fake.seen == []


def test_hosts_key_config(tmp_path: Path) -> None:
    from proxy import config as config_mod
    from proxy.errors import ConfigError

    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}, "
                   "hosts: [jira.example.com, '*.atlassian.net']}\n")
    api = config_mod.load(cfg, env={}).apis.apis["jira"]
    assert api.serves("JIRA.example.com.") and api.serves("acme.atlassian.net")
    assert not api.serves("atlassian.net") and not api.serves("acme.atlassian.net.evil.com")
    cfg.write_text(f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}, "
                   "hosts: ['*']}\n")
    with pytest.raises(ConfigError, match="not a host name"):
        config_mod.load(cfg, env={})
    cfg.write_text('cloud:\n  effects:\n    "aws.ec2.Describe*": maybe\n')
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.line == 3 and "read or write" in str(e.value)
    assert json.dumps(str(e.value))
