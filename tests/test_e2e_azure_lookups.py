"""Azure tag lookups (`cloud.lookups.azure`): the real azure-mgmt-compute SDK through
HTTPS_PROXY, rules on `args.Tags` that an ARM call never carries.

The agent's ComputeManagementClient talks to `management.azure.com` (the forward
proxy maps the name to a fake ARM on loopback, over TLS with a test CA tether is
told to trust); tether asks that fake's Tags API itself, with a token its own
azure-identity credential got from a fake Entra ID (client secret from the
environment). The agent's credential is a static token of its own, so the fake can
tell tether's requests from the agent's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import CreationData, Disk, DiskProperties, DiskSku

from proxy import config as config_mod
from proxy.approvals.listing import context_lines
from proxy.demo.fake_arm import CLIENT_ID, CLIENT_SECRET, SUB, TENANT, FakeArm, FakeEntra
from proxy.errors import ConfigError
from proxy.forward.lookup_settings import AzureLookupSettings
from proxy.forward.lookups import LookupFailed
from proxy.forward.lookups_azure import AzureTagLookup, parse_tags, scopes, tags_path
from proxy.forward.master import ForwardProxy
from proxy.forward.targets import Address
from proxy.model import Effect, HttpRequest
from proxy.policy.cloud import CloudOperation
from tests.conftest import MakeStack, Stack
from tests.fakes.tls import make_fake_ca
from tests.forwarding import agent_proxy, serve_tls
from tests.test_e2e_approvals import TOKEN, admin, pending

ARM = "management.azure.com"
RG = "rg-ops"
POLICY = """
rules:
  - id: no-prod-disk-deletes
    match:
      api: ["azure.Microsoft.Compute/disks/delete", "azure.Microsoft.Compute/snapshots/delete"]
      args: {Tags.env: {in: [production, production-candidate]}}
    action: deny
    message: Production disks are never deleted by agents
"""
HOLD = POLICY + """
  - id: temporary-deletes-are-reviewed
    match: {api: "azure.Microsoft.Compute/disks/delete", args: {Tags.env: {equals: temporary}}}
    action: hold
    timeout: 30s
"""


class AgentToken:
    """The agent's own credential: a static token (tether never forwards it to a lookup)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("agent-token", 4102444800)


@dataclass
class Az:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path
    arm: FakeArm
    entra: FakeEntra
    port: int

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == kind]

    def compute(self) -> ComputeManagementClient:
        return ComputeManagementClient(AgentToken(), SUB, base_url=f"https://{ARM}:{self.port}",
                                       connection_verify=str(self.ca_file), retry_total=0,
                                       polling_interval=0)


StartAz = Callable[..., Awaitable[Az]]


@pytest.fixture
async def start_az(make_stack: MakeStack, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartAz]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", ARM))

    async def resolver(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")] if host == ARM else []

    async def start(policy: str = POLICY, lookups: str = "tags: true, credential: environment",
                    arm: FakeArm | None = None, extra: str = "") -> Az:
        arm, entra = arm or FakeArm(), FakeEntra()
        port = await serve_tls(arm.app(), test_ca, runners)
        entra_port = await serve_tls(entra.app(), test_ca, runners)
        # tether's own identity: a client secret in the environment, its tenant at the fake
        for name, value in (("AZURE_TENANT_ID", TENANT), ("AZURE_CLIENT_ID", CLIENT_ID),
                            ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
                            ("AZURE_AUTHORITY_HOST", f"https://localhost:{entra_port}")):
            monkeypatch.setenv(name, value)
        ca_dir = tmp_path / f"ca-{len(proxies)}"
        stack = await make_stack(policy=policy, extra=(
            f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
            f"allow_private: [{ARM}]}}\n"
            f"cloud: {{lookups: {{azure: {{endpoint: 'https://{ARM}:{port}', {lookups}}}}}}}\n"
            f"{extra}"))
        ca_file = tmp_path / f"tether-ca-{len(proxies) + 1}.pem"
        fwd = await agent_proxy(stack, resolver, ca_file, monkeypatch)
        proxies.append(fwd)
        return Az(stack, fwd, f"http://127.0.0.1:{fwd.port}", ca_file, arm, entra, port)

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


def delete(az: Az, disk: str) -> Any:
    """The janitor's call: begin the delete and wait for the operation to finish."""
    return az.compute().disks.begin_delete(RG, disk).result()


def disk_path(disk: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/disks/{disk}"


# -- end to end ------------------------------------------------------------------------------


async def test_a_read_is_allowed_and_needs_no_lookup(start_az: StartAz) -> None:
    az = await start_az()
    disk = await asyncio.to_thread(lambda: az.compute().disks.get(RG, "disk-prod"))
    assert disk.tags == {"env": "production"}
    assert [r["method"] for r in az.arm.seen] == ["GET"] and az.arm.lookups == []
    assert az.entra.tokens == []
    [decision] = az.records("decision")
    assert decision["action"] == "allow" and "Tags" not in decision["arguments"]


@pytest.mark.parametrize("disk", ["disk-prod", "disk-cand"])
async def test_a_production_disk_delete_is_denied_in_arms_error_shape(
        start_az: StartAz, disk: str) -> None:
    az = await start_az()
    with pytest.raises(HttpResponseError) as err:
        await asyncio.to_thread(delete, az, disk)
    assert err.value.status_code == 403
    assert err.value.error is not None and err.value.error.code == "TetherRequestDenied"
    assert "denied by no-prod-disk-deletes" in str(err.value.error.message)
    assert az.arm.seen == [] and disk in az.arm.disks  # the DELETE never reached ARM
    # tether asked the Tags API for the disk, with its own token (not the agent's)
    [lookup] = az.arm.lookups
    assert lookup["path"] == disk_path(disk) + "/providers/Microsoft.Resources/tags/default"
    assert lookup["query"] == "api-version=2021-04-01"
    assert lookup["authorization"] == "Bearer tether-token-1"
    assert [t["scope"] for t in az.entra.tokens] == [f"https://{ARM}/.default"]
    [decision] = az.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["no-prod-disk-deletes"]
    assert decision["api"] == "azure.Microsoft.Compute/disks/delete"
    assert decision["arguments"]["Tags"] == az.arm.disks[disk]


async def test_a_temporary_disk_is_held_approved_and_its_polling_passes_as_reads(
        start_az: StartAz, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    az = await start_az(policy=HOLD, extra="approvals: {keepalive: 50ms}\n")
    task = asyncio.create_task(asyncio.to_thread(delete, az, "disk-tmp"))
    [approval] = await pending(az.stack)
    # the approver sees the operation with its cloud prefix, and the tags it was judged on
    assert approval["shown"]["api"] == "azure.Microsoft.Compute/disks/delete"
    assert "API operation: azure.Microsoft.Compute/disks/delete" in context_lines(approval)[0]
    assert json.loads(approval["arguments"])["Tags"] == {"env": "temporary"}
    await asyncio.sleep(0.2)
    assert not task.done() and az.arm.seen == []
    status, _ = await admin(az.stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                            {"by": "alice"})
    assert status == 200
    await asyncio.wait_for(task, 20)  # the poller reached Succeeded
    assert "disk-tmp" not in az.arm.disks
    assert [r["method"] for r in az.arm.seen] == ["DELETE", "GET", "GET"] and az.arm.polls == 2
    assert len(az.arm.lookups) == 1  # the polls were judged as reads: no lookup
    decisions = az.records("decision")
    assert [(d["api"], d["effect"], d["action"]) for d in decisions] == [
        ("azure.Microsoft.Compute/disks/delete", "write", "hold"),
        ("azure.Microsoft.Compute/locations/DiskOperations/read", "read", "allow"),
        ("azure.Microsoft.Compute/locations/DiskOperations/read", "read", "allow")]


async def test_a_retag_between_two_calls_changes_the_decision(start_az: StartAz) -> None:
    arm = FakeArm(disks={"disk-x": {"env": "production"}})
    az = await start_az(arm=arm)
    with pytest.raises(HttpResponseError, match="no-prod-disk-deletes"):
        await asyncio.to_thread(delete, az, "disk-x")
    assert arm.seen == []
    arm.disks["disk-x"] = {"env": "temporary"}  # retagged a second later: it counts at once
    await asyncio.to_thread(delete, az, "disk-x")
    assert [r["method"] for r in arm.seen][0] == "DELETE" and "disk-x" not in arm.disks
    assert len(arm.lookups) == 2 and len(az.entra.tokens) == 1  # tags fresh, token cached
    assert [d["action"] for d in az.records("decision")][:2] == ["deny", "allow"]
    lookup = az.proxy.addon.judge.lookup.by_cloud["azure"]
    assert isinstance(lookup, AzureTagLookup) and lookup._credential is not None
    await az.proxy.stop()  # mitmproxy's done hook: tether's credential (and its session) closed
    assert lookup._credential is None


@pytest.mark.parametrize(("status", "delay", "why"), [
    (403, 0.0, "HTTP 403 for /subscriptions/"), (500, 0.0, "HTTP 500"),
    (200, 2.0, "timed out after 0.3s")])
async def test_a_failed_lookup_denies(start_az: StartAz, status: int, delay: float,
                                      why: str) -> None:
    arm = FakeArm(tags_status=status, tags_delay=delay)
    az = await start_az(arm=arm, lookups="tags: true, credential: environment, timeout: 300ms")
    with pytest.raises(HttpResponseError) as err:
        await asyncio.to_thread(delete, az, "disk-tmp")
    assert err.value.status_code == 403 and err.value.error is not None
    assert err.value.error.code == "TetherLookupFailed"
    assert "tether:lookup-failed" in str(err.value.error.message)
    assert arm.seen == [] and len(arm.lookups) == 1 and "disk-tmp" in arm.disks
    [decision] = az.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["tether:lookup-failed"]
    assert why in decision["message"] and "Tags" not in decision["arguments"]
    if status == 403:
        assert "AuthorizationFailed" in decision["message"]
    metrics = az.stack.tether.governor.metrics.render().decode()  # counted, by its rule
    assert any(line.startswith("tether_tool_decisions_total{") and 'action="deny"' in line
               and 'rule="tether:lookup-failed"' in line for line in metrics.splitlines())


async def test_a_lookup_without_tethers_own_credential_denies(
        start_az: StartAz, monkeypatch: pytest.MonkeyPatch) -> None:
    az = await start_az()
    for name in ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name)
    with pytest.raises(HttpResponseError, match="tether:lookup-failed"):
        await asyncio.to_thread(delete, az, "disk-tmp")
    assert az.arm.seen == [] and az.arm.lookups == [] and az.entra.tokens == []
    [decision] = az.records("decision")
    assert "tether has no Azure token" in decision["message"]


async def test_a_wrong_secret_denies(start_az: StartAz, monkeypatch: pytest.MonkeyPatch) -> None:
    az = await start_az()
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-the-secret")
    with pytest.raises(HttpResponseError, match="tether:lookup-failed"):
        await asyncio.to_thread(delete, az, "disk-tmp")
    assert az.arm.seen == [] and az.arm.lookups == [] and len(az.entra.tokens) == 1


async def test_resource_group_and_subscription_tags(start_az: StartAz) -> None:
    az = await start_az(policy="""
rules:
  - id: ops-groups-are-kept
    match: {api: "azure.Microsoft.Compute/*", args: {ResourceGroupTags.tier: {equals: ops}}}
    action: deny
""", lookups="tags: true, credential: environment, "
             "scopes: [resource, resource_group, subscription]")
    with pytest.raises(HttpResponseError, match="ops-groups-are-kept"):
        await asyncio.to_thread(delete, az, "disk-tmp")
    assert [r["path"].removesuffix("/providers/Microsoft.Resources/tags/default")
            for r in az.arm.lookups] == [disk_path("disk-tmp"),
                                         f"/subscriptions/{SUB}/resourceGroups/{RG}",
                                         f"/subscriptions/{SUB}"]
    [decision] = az.records("decision")
    args = decision["arguments"]
    assert (args["Tags"], args["ResourceGroupTags"], args["SubscriptionTags"]) == (
        {"env": "temporary"}, {"tier": "ops"}, {"billing": "ml"})


async def test_a_create_has_no_tags_yet_and_an_update_has_the_disks_own(start_az: StartAz) -> None:
    az = await start_az(policy="""
rules:
  - id: production-disks-are-not-changed
    match: {api: "azure.Microsoft.Compute/disks/write", args: {Tags.env: {equals: production}}}
    action: deny
""")
    disk = Disk(location="westeurope", tags={"env": "production"},
                sku=DiskSku(name="Standard_LRS"),
                properties=DiskProperties(creation_data=CreationData(create_option="Empty"),
                                          disk_size_gb=8))
    made = await asyncio.to_thread(
        lambda: az.compute().disks.begin_create_or_update(RG, "disk-new", disk).result())
    assert made.tags == {"env": "production"} and az.arm.disks["disk-new"] == {"env": "production"}
    with pytest.raises(HttpResponseError, match="production-disks-are-not-changed"):
        await asyncio.to_thread(
            lambda: az.compute().disks.begin_create_or_update(RG, "disk-prod", disk).result())
    assert [r["method"] for r in az.arm.seen].count("PUT") == 1
    decisions = az.records("decision")
    assert [(d["action"], d["arguments"]["Tags"]) for d in decisions if d["effect"] == "write"] == [
        ("allow", {}), ("deny", {"env": "production"})]


async def test_lookups_are_off_unless_asked(start_az: StartAz) -> None:
    az = await start_az(lookups="tags: false")
    await asyncio.to_thread(delete, az, "disk-prod")  # no rule can see the tags: forwarded
    assert az.arm.lookups == [] and "disk-prod" not in az.arm.disks


# -- the parts -------------------------------------------------------------------------------


def _op(method: str, path: str, effect: Effect = Effect.WRITE,
        **args: object) -> tuple[CloudOperation, HttpRequest]:
    http = HttpRequest(method=method, scheme="https", host=ARM, port=443, path=path,
                       query="api-version=1", headers=(), body=b"")
    arguments = {"subscriptionId": SUB, "resourceGroupName": RG, **args}
    return CloudOperation("azure", "Microsoft.Compute", "x", effect, "azure.x", arguments), http


def test_what_is_looked_up() -> None:
    lookup = AzureTagLookup(AzureLookupSettings(tags=True), None)
    found, http = _op("DELETE", disk_path("d"), resourceId=disk_path("d"))
    assert lookup.wanted(found) == [disk_path("d")]
    assert lookup.where(found, http) == (ARM, 443)
    read, _ = _op("GET", disk_path("d"), Effect.READ, resourceId=disk_path("d"))
    assert lookup.wanted(read) == []
    collection, _ = _op("POST", "/subscriptions/s/providers/X/doThing")
    assert lookup.wanted(collection) == []
    every = AzureLookupSettings(tags=True, scopes=("subscription", "resource_group", "resource"))
    assert [n for n, _ in scopes(found, every.scopes)] == [
        "SubscriptionTags", "ResourceGroupTags", "Tags"]
    compute_only = AzureTagLookup(AzureLookupSettings(tags=True, apis=("azure.Microsoft.Storage/*",
                                                                      "AZURE.*/DISKS/delete")), None)
    disk, _ = _op("DELETE", disk_path("d"), resourceId=disk_path("d"))
    assert compute_only.wanted(replace(disk, api="azure.Microsoft.Compute/disks/delete")) == [
        disk_path("d")]
    assert compute_only.wanted(replace(disk, api="azure.Microsoft.Compute/snapshots/delete")) == []
    other = HttpRequest(method="DELETE", scheme="https", host="management.usgovcloudapi.net",
                        port=443, path="/", query="", headers=(), body=b"")
    with pytest.raises(LookupFailed, match="cloud.lookups.azure.endpoint"):
        lookup.where(found, other)


def test_tags_path_and_answers() -> None:
    assert tags_path("/subscriptions/s/resourceGroups/r g/providers/M.C/disks/a?b#c") == (
        "/subscriptions/s/resourceGroups/r%20g/providers/M.C/disks/a%3Fb%23c"
        "/providers/Microsoft.Resources/tags/default")
    assert parse_tags(b'{"properties": {"tags": {"env": "prod"}}}') == {"env": "prod"}
    assert parse_tags(b'{"id": "x", "properties": {}}') == {}
    for bad in (b"", b"[]", b'{"error": {"code": "X", "message": "y"}}',
                b'{"properties": {"tags": {"env": 1}}}', b'{"properties": {"tags": []}}',
                b"\xff"):
        with pytest.raises(LookupFailed):
            parse_tags(bad)


def test_config(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("cloud:\n  lookups:\n    azure: {tags: true, scopes: [resource, subscription],"
                   " timeout: 2s, credential: managed_identity, apis: ['azure.*/delete']}\n")
    azure = config_mod.load(cfg, env={}).lookups.azure
    assert azure == AzureLookupSettings(tags=True, scopes=("resource", "subscription"),
                                        timeout_s=2.0, credential="managed_identity",
                                        apis=("azure.*/delete",))
    for text, key in [("azure: {tags: maybe}", "tags"), ("azure: {scopes: [everything]}", "scopes"),
                      ("azure: {endpoint: 'http://management.azure.com'}", "endpoint"),
                      ("azure: {endpoint: 'https://management.azure.com/x'}", "endpoint"),
                      ("azure: {credential: cli}", "credential"), ("azure: {timeout: soon}",
                                                                  "timeout"),
                      ("azure: {tag: true}", "tag"), ("azure: [tags]", "azure"),
                      ("azure: {apis: 'azure.*'}", "apis"), ("azure: {apis: []}", "apis")]:
        cfg.write_text(f"cloud:\n  lookups:\n    {text}\n")
        with pytest.raises(ConfigError) as e:
            config_mod.load(cfg, env={})
        assert e.value.line == 3 and key in str(e.value), str(e.value)


async def test_without_azure_identity_a_lookup_denies_and_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    lookup = AzureTagLookup(AzureLookupSettings(tags=True), None)
    found, http = _op("DELETE", disk_path("d"), resourceId=disk_path("d"))
    with pytest.raises(LookupFailed, match=r"install tether\[azure\]"):
        await lookup.tags(found, http, lookup.wanted(found), "127.0.0.1")


async def test_the_default_credential_is_the_non_interactive_chain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_FEDERATED_TOKEN_FILE", raising=False)
    monkeypatch.delenv("AZURE_TOKEN_CREDENTIALS", raising=False)
    from azure.identity.aio import DefaultAzureCredential

    from proxy.forward.lookups_azure import _credential

    credential = _credential("default", None)
    try:
        assert isinstance(credential, DefaultAzureCredential)
        # without AZURE_FEDERATED_TOKEN_FILE, workload identity is a placeholder that fails
        assert [type(c).__name__ for c in credential.credentials] == [
            "EnvironmentCredential", "AsyncFailedDACCredential", "ManagedIdentityCredential"]
    finally:
        await credential.close()
