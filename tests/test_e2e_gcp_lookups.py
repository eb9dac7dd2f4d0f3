"""GCP label lookups (`cloud.lookups.gcp.labels`) end to end: the real google-cloud-compute,
google-cloud-storage and google-cloud-container clients through HTTPS_PROXY, rules on
`args.Tags` that no call carries.

The names are the real ones (compute.googleapis.com, storage.googleapis.com,
container.googleapis.com): the forward proxy's resolver maps them to loopback, where one fake
(tests/fakes/google_cloud.py) serves GCE, Cloud Storage, GKE and Google's OAuth token endpoint
over TLS with a test CA tether is told
to trust. The agent's clients carry the agent's own token; tether looks labels up with its
own identity, a service-account key file whose JWT grant the fake checks, so the fake can
tell tether's lookups from what the agent sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core import exceptions as google_errors
from google.cloud import compute_v1, container_v1
from google.cloud import storage as gcs  # type: ignore[attr-defined]  # ships no py.typed
from google.oauth2.credentials import Credentials as OAuthCredentials

from proxy.forward.master import ForwardProxy
from proxy.forward.targets import Address
from tests.conftest import MakeStack, Stack
from tests.fakes.google_cloud import AGENT_TOKEN, READ_ONLY, SA_EMAIL, FakeGoogle
from tests.fakes.tls import make_fake_ca
from tests.forwarding import agent_proxy, serve_tls
from tests.test_e2e_approvals import TOKEN, admin, pending

COMPUTE, STORAGE, WWW = "compute.googleapis.com", "storage.googleapis.com", "www.googleapis.com"
GKE = "container.googleapis.com"
NAMES = (COMPUTE, STORAGE, GKE, WWW)
PROJECT, ZONE, REGION = "proj-1", "us-central1-a", "europe-west1"
DISKS = f"compute/v1/projects/{PROJECT}/zones/{ZONE}/disks"
GKE_LOCATION = f"projects/{PROJECT}/locations/{REGION}"  # the name the GKE client is given
POLICY = """
rules:
  - id: no-prod-deletes
    match: {api: "gcp.*.delete", args: {Tags.env: {in: [production, production-candidate]}}}
    action: deny
    message: Production resources are never deleted by agents
"""
HOLD_WRITES = """
  - id: writes-need-approval
    match: {effect: write}
    action: hold
    timeout: 30s
    message: Cloud writes are reviewed
approvals: {keepalive: 50ms}
"""
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # one per run: 2048 bits is slow


def agent_credentials() -> OAuthCredentials:
    """The agent's own identity: a token of its own, which tether never uses."""
    return OAuthCredentials(AGENT_TOKEN)  # type: ignore[no-untyped-call]


@dataclass
class Gcp:
    stack: Stack
    proxy: ForwardProxy
    fake: FakeGoogle
    port: int

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == kind]

    def disks(self) -> compute_v1.DisksClient:
        client = compute_v1.DisksClient(credentials=agent_credentials(),
                                        client_options={"api_endpoint": f"{COMPUTE}:{self.port}"})
        # The SDK polls an operation with a ZoneOperationsClient of its own, made on the
        # default endpoint (port 443) whatever the DisksClient was given; the fake listens
        # on another port, so hand the transport one made like the agent's.
        client._transport._extended_operations_services["zone_operations"] = self.operations()
        return client

    def operations(self) -> compute_v1.ZoneOperationsClient:
        return compute_v1.ZoneOperationsClient(
            credentials=agent_credentials(),
            client_options={"api_endpoint": f"{COMPUTE}:{self.port}"})

    def storage(self) -> Any:
        return gcs.Client(project=PROJECT, credentials=agent_credentials(),
                              client_options={"api_endpoint": f"https://{STORAGE}:{self.port}"})

    def clusters(self) -> container_v1.ClusterManagerClient:
        return container_v1.ClusterManagerClient(
            credentials=agent_credentials(), transport="rest",
            client_options={"api_endpoint": f"https://{GKE}:{self.port}"})

    def agent_calls(self) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in self.fake.seen]


StartGcp = Callable[..., Awaitable[Gcp]]


@pytest.fixture
async def start_gcp(make_stack: MakeStack, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartGcp]:
    proxies: list[ForwardProxy] = []
    runners: list[web.AppRunner] = []
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", *NAMES))

    async def resolver(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")] if host in NAMES else []

    async def start(policy: str = POLICY, lookups: str = "labels: true",
                    fake: FakeGoogle | None = None) -> Gcp:
        fake = fake or FakeGoogle(KEY)
        port = await serve_tls(fake.app(), test_ca, runners)
        fake.token_uri = f"https://127.0.0.1:{port}/token"
        key_file = tmp_path / f"tether-sa-{port}.json"
        key_file.write_text(json.dumps(fake.key_file()))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        endpoints = (f"{{compute: 'https://{COMPUTE}:{port}', storage: 'https://{STORAGE}:{port}', "
                     f"container: 'https://{GKE}:{port}'}}")
        ca_dir = tmp_path / f"ca-{len(proxies)}"
        stack = await make_stack(policy=policy, extra=(
            f"forward: {{ca_dir: {ca_dir}, upstream_ca: {test_ca.ca_file}, "
            f"allow_private: [{', '.join(NAMES)}]}}\n"
            f"cloud: {{lookups: {{gcp: {{{lookups}, endpoints: {endpoints}}}}}}}\n"))
        # The agent's clients (requests underneath) go through tether and trust its CA.
        ca_file = tmp_path / f"tether-ca-{len(proxies) + 1}.pem"
        fwd = await agent_proxy(stack, resolver, ca_file, monkeypatch)
        proxies.append(fwd)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        return Gcp(stack, fwd, fake, port)

    yield start
    for fwd in proxies:
        await fwd.stop()
    for runner in runners:
        await runner.cleanup()


def delete_disk(gcp: Gcp, name: str) -> Any:
    return gcp.disks().delete(project=PROJECT, zone=ZONE, disk=name)


# -- denied, held, relabelled ------------------------------------------------------------------


async def test_delete_of_a_production_disk_is_denied_in_gces_error_shape(start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    with pytest.raises(google_errors.Forbidden) as err:
        await asyncio.to_thread(delete_disk, gcp, "cand-disk")
    assert err.value.code == 403
    assert "denied by no-prod-deletes" in err.value.message
    assert "Production resources are never deleted" in err.value.message
    assert gcp.fake.seen == []  # the delete never reached GCE
    # tether asked GCE itself, with its own token (from its key file), for the disk
    [lookup] = gcp.fake.lookups
    assert (lookup.method, lookup.path, lookup.host) == ("GET", f"{DISKS}/cand-disk", COMPUTE)
    assert lookup.token == "tether-token-1" != AGENT_TOKEN
    [grant] = gcp.fake.grants
    assert grant["iss"] == SA_EMAIL and grant["scope"] == READ_ONLY
    [decision] = gcp.records("decision")
    assert decision["api"] == "gcp.compute.disks.delete" and decision["rules"] == ["no-prod-deletes"]
    assert decision["arguments"]["Tags"] == {"env": "production-candidate", "owner": "ml"}


async def test_a_temporary_disk_is_held_approved_and_its_operation_polled_as_reads(
        start_gcp: StartGcp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    gcp = await start_gcp(policy=POLICY + HOLD_WRITES)
    task = asyncio.create_task(asyncio.to_thread(delete_disk, gcp, "scratch-disk"))
    [approval] = await pending(gcp.stack)
    assert approval["context"]["api"] == "gcp.compute.disks.delete"
    assert approval["rules"] == ["writes-need-approval"]
    assert json.loads(approval["arguments"])["Tags"] == {"env": "temporary"}
    await asyncio.sleep(0.2)
    assert not task.done() and gcp.fake.seen == []
    status, _ = await admin(gcp.stack, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "alice"})
    assert status == 200
    operation = await asyncio.wait_for(task, 20)
    # The SDK's ExtendedOperation polls zoneOperations.get until DONE; the agent may also
    # wait on it: reads both, so the hold on writes holds neither, and no lookup is made.
    await asyncio.to_thread(lambda: operation.result(20))
    waited = await asyncio.to_thread(lambda: gcp.operations().wait(
        project=PROJECT, zone=ZONE, operation=operation.name))
    assert waited.status == compute_v1.Operation.Status.DONE
    calls = gcp.agent_calls()
    assert calls[0] == ("DELETE", f"{DISKS}/scratch-disk")
    polls = f"compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/{operation.name}"
    assert calls[1:] == [("GET", polls)] * (len(calls) - 2) + [("POST", f"{polls}/wait")]
    assert len(calls) >= 3
    assert len(gcp.fake.lookups) == 1  # only the delete was looked up
    decisions = gcp.records("decision")
    assert [(d["api"], d["action"], d["effect"]) for d in decisions][-2:] == [
        ("gcp.compute.operations.get", "allow", "read"),
        ("gcp.compute.operations.wait", "allow", "read")]


async def test_a_relabel_between_two_calls_changes_the_decision(start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    # the agent relabels its scratch disk (a write: looked up, allowed) ...
    disk = await asyncio.to_thread(lambda: gcp.disks().get(project=PROJECT, zone=ZONE,
                                                           disk="scratch-disk"))
    request = compute_v1.ZoneSetLabelsRequest(labels={"env": "production"},
                                              label_fingerprint=disk.label_fingerprint)
    relabel: Any = await asyncio.to_thread(lambda: gcp.disks().set_labels(
        project=PROJECT, zone=ZONE, resource="scratch-disk",
        zone_set_labels_request_resource=request))
    await asyncio.to_thread(lambda: relabel.result(20))
    # ... and the next call sees the new label at once: no cache
    with pytest.raises(google_errors.Forbidden, match="no-prod-deletes"):
        await asyncio.to_thread(delete_disk, gcp, "scratch-disk")
    # someone else relabels a production disk temporary: now its delete passes
    gcp.fake.relabel(f"{DISKS}/prod-disk", {"env": "temporary"})
    await asyncio.to_thread(lambda: delete_disk(gcp, "prod-disk").result(20))
    deletes = [p for m, p in gcp.agent_calls() if m == "DELETE"]
    assert deletes == [f"{DISKS}/prod-disk"]
    decisions = [(d["api"], d["action"], d["arguments"].get("Tags")) for d in gcp.records("decision")
                 if d["effect"] == "write"]
    assert decisions == [
        ("gcp.compute.disks.setLabels", "allow", {"env": "temporary"}),
        ("gcp.compute.disks.delete", "deny", {"env": "production"}),
        ("gcp.compute.disks.delete", "allow", {"env": "temporary"})]
    assert len(gcp.fake.grants) == 1  # one token for all three lookups


@pytest.mark.parametrize(("status", "delay", "body", "why"), [
    (403, 0.0, None, "HTTP 403 (PERMISSION_DENIED: Required 'compute.disks.get' permission"),
    (404, 0.0, None, "HTTP 404"),
    (200, 2.0, None, "timed out after 0.3s"),
    (200, 0.0, b"<html>not json</html>", "is not JSON"),
    (200, 0.0, b'{"name": "scratch-disk", "labels": ["env", "temporary"]}', "not a mapping"),
    (200, 0.0, b'{"name": "other-disk", "labels": {"env": "temporary"}}', "about 'other-disk'"),
])
async def test_a_failed_lookup_denies(start_gcp: StartGcp, status: int, delay: float,
                                      body: bytes | None, why: str) -> None:
    fake = FakeGoogle(KEY, lookup_status=status, lookup_delay=delay, lookup_body=body)
    gcp = await start_gcp(fake=fake, lookups="labels: true, timeout: 300ms")
    with pytest.raises(google_errors.Forbidden) as err:
        await asyncio.to_thread(delete_disk, gcp, "scratch-disk")
    assert "denied by tether:lookup-failed" in err.value.message
    assert gcp.fake.seen == [] and len(gcp.fake.lookups) == 1
    [decision] = gcp.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["tether:lookup-failed"]
    assert why in decision["message"] and "Tags" not in decision["arguments"]


async def test_a_lookup_without_tethers_own_credentials_denies(
        start_gcp: StartGcp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gcp = await start_gcp()
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    with pytest.raises(google_errors.Forbidden, match="tether:lookup-failed"):
        await asyncio.to_thread(delete_disk, gcp, "scratch-disk")
    assert gcp.fake.seen == [] and gcp.fake.lookups == []
    [decision] = gcp.records("decision")
    assert "no usable Google credentials" in decision["message"]


async def test_the_lookup_goes_to_tethers_endpoint_not_the_host_the_agent_called(
        start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    client = compute_v1.DisksClient(credentials=agent_credentials(),
                                    client_options={"api_endpoint": f"{WWW}:{gcp.port}"})
    with pytest.raises(google_errors.Forbidden, match="no-prod-deletes"):
        await asyncio.to_thread(lambda: client.delete(project=PROJECT, zone=ZONE, disk="prod-disk"))
    assert [(s.host, s.path) for s in gcp.fake.lookups] == [(COMPUTE, f"{DISKS}/prod-disk")]
    assert gcp.fake.seen == []


async def test_reads_need_no_lookup(start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    disk = await asyncio.to_thread(lambda: gcp.disks().get(project=PROJECT, zone=ZONE,
                                                           disk="prod-disk"))
    assert disk.labels == {"env": "production"}
    assert gcp.fake.lookups == [] and gcp.fake.grants == []


# -- Cloud Storage -----------------------------------------------------------------------------


async def test_a_production_bucket_delete_is_denied_and_a_temporary_one_passes(
        start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    with pytest.raises(google_errors.Forbidden, match="no-prod-deletes"):
        await asyncio.to_thread(lambda: gcp.storage().bucket("prod-bucket").delete())
    await asyncio.to_thread(lambda: gcp.storage().bucket("tmp-bucket").delete())
    # the client reads the bucket's metadata first (a read: no lookup); the production
    # bucket's DELETE never reached Cloud Storage
    assert gcp.agent_calls() == [("GET", "storage/v1/b/prod-bucket"), ("GET", "storage/v1/b/tmp-bucket"),
                                 ("DELETE", "storage/v1/b/tmp-bucket")]
    assert [(s.host, s.path) for s in gcp.fake.lookups] == [
        (STORAGE, "storage/v1/b/prod-bucket"), (STORAGE, "storage/v1/b/tmp-bucket")]
    assert [(d["api"], d["action"], d["arguments"].get("Tags")) for d in gcp.records("decision")] == [
        ("gcp.storage.buckets.get", "allow", None),
        ("gcp.storage.buckets.delete", "deny", {"env": "production"}),
        ("gcp.storage.buckets.get", "allow", None),
        ("gcp.storage.buckets.delete", "allow", {"env": "temporary"})]


async def test_a_copy_into_a_production_bucket_names_both_and_is_denied(start_gcp: StartGcp) -> None:
    gcp = await start_gcp(policy="""
rules:
  - id: nothing-written-into-production-buckets
    match: {api: "gcp.storage.objects.*", effect: write, args: {Tags.env: {in: [production]}}}
    action: deny
""")
    client = gcp.storage()
    source = client.bucket("tmp-bucket").blob("report.csv")
    target = client.bucket("prod-bucket").blob("report.csv")
    with pytest.raises(google_errors.Forbidden, match="nothing-written-into-production-buckets"):
        await asyncio.to_thread(lambda: target.rewrite(source))
    assert [(s.method, s.path) for s in gcp.fake.seen] == [("GET", "storage/v1/b/prod-bucket")]
    assert [s.path for s in gcp.fake.lookups] == ["storage/v1/b/tmp-bucket", "storage/v1/b/prod-bucket"]
    decision = gcp.records("decision")[-1]
    assert decision["api"] == "gcp.storage.objects.rewriteTo" and decision["action"] == "deny"
    assert decision["arguments"]["Tags"] == [{"env": "temporary"}, {"env": "production"}]


# -- GKE ---------------------------------------------------------------------------------------


async def test_delete_of_a_production_cluster_is_denied(start_gcp: StartGcp) -> None:
    gcp = await start_gcp()
    with pytest.raises(google_errors.Forbidden, match="denied by no-prod-deletes"):
        await asyncio.to_thread(gcp.clusters().delete_cluster,
                                name=f"{GKE_LOCATION}/clusters/prod-gke")
    assert gcp.fake.seen == [] and f"v1/{GKE_LOCATION}/clusters/prod-gke" in gcp.fake.resources
    # tether read the cluster's resourceLabels at GKE itself, with its own token
    assert [(s.method, s.host, s.path, s.token) for s in gcp.fake.lookups] == [
        ("GET", GKE, f"v1/{GKE_LOCATION}/clusters/prod-gke", "tether-token-1")]
    [decision] = gcp.records("decision")
    assert decision["api"] == "gcp.container.clusters.delete" and decision["action"] == "deny"
    assert decision["arguments"]["Tags"] == {"env": "production"}


async def test_a_temporary_cluster_delete_is_held_approved_and_its_operation_polled_as_reads(
        start_gcp: StartGcp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    gcp = await start_gcp(policy=POLICY + HOLD_WRITES)
    client = gcp.clusters()
    task = asyncio.create_task(asyncio.to_thread(client.delete_cluster,
                                                 name=f"{GKE_LOCATION}/clusters/tmp-gke"))
    [approval] = await pending(gcp.stack)
    assert approval["context"]["api"] == "gcp.container.clusters.delete"
    assert approval["rules"] == ["writes-need-approval"]
    assert json.loads(approval["arguments"])["Tags"] == {"env": "temporary"}
    await asyncio.sleep(0.2)
    assert not task.done() and gcp.fake.seen == []
    status, _ = await admin(gcp.stack, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "alice"})
    assert status == 200
    operation = await asyncio.wait_for(task, 20)
    assert operation.operation_type == container_v1.Operation.Type.DELETE_CLUSTER
    assert operation.status == container_v1.Operation.Status.RUNNING
    # GKE's Operation is no google.longrunning one: the agent polls operations.get itself
    polled = [await asyncio.to_thread(client.get_operation,
                                      name=f"{GKE_LOCATION}/operations/{operation.name}")
              for _ in range(2)]
    assert [p.status for p in polled] == [container_v1.Operation.Status.RUNNING,
                                          container_v1.Operation.Status.DONE]
    with pytest.raises(google_errors.NotFound):
        await asyncio.to_thread(client.get_cluster, name=f"{GKE_LOCATION}/clusters/tmp-gke")
    assert [m for m, _ in gcp.agent_calls()] == ["DELETE", "GET", "GET", "GET"]
    assert len(gcp.fake.lookups) == 1  # only the delete was looked up
    assert [(d["api"], d["action"], d["effect"]) for d in gcp.records("decision")][-3:] == [
        ("gcp.container.operations.get", "allow", "read"),
        ("gcp.container.operations.get", "allow", "read"),
        ("gcp.container.clusters.get", "allow", "read")]
