"""Resource-tag lookups (`cloud.lookups.aws.tags`): boto3 through HTTPS_PROXY, rules on
`args.Tags` that the call itself never carries.

The fake EC2 (tests/test_forward_egress.py) answers DescribeTags from its tag table,
one tag per page, and records those calls apart from the agent's, so a test can
check both that nothing of the agent's was forwarded and that tether signed its own
lookup with its own key (the agent's boto3 client uses another).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.forward.lookups import LookupFailed, with_tags
from proxy.forward.lookups_aws import describe_tags_body, parse_describe_tags, resource_ids
from tests import test_forward_egress as egress_tests
from tests.test_forward_egress import EC2, Egr, FakeUpstream, StartEgr, describe_tags_xml

# The egress tests' fixtures (tether + forward proxy + fake EC2 over TLS), shared.
start_egr = egress_tests.start_egr
aws_env = egress_tests.aws_env

TETHER_KEY, TETHER_SECRET = "AKIDTETHEREXAMPLE", "tether-secret-key-example"
AGENT_KEY, AGENT_SECRET = "AKIDAGENTEXAMPLE", "agent-secret-key-example"
LOOKUPS = "cloud: {lookups: {aws: {tags: true}}}\n"
POLICY = """
rules:
  - id: no-prod-deletes
    match: {api: "aws.ec2.Delete*", args: {Tags.env: {in: [production, production-candidate]}}}
    action: deny
    message: Production volumes are never deleted by agents
  - id: no-prod-terminations
    match: {api: "aws.ec2.Terminate*", args: {Tags.env: {in: [production]}}}
    action: deny
"""


@pytest.fixture
def env(aws_env: Callable[[Egr], None], monkeypatch: pytest.MonkeyPatch) -> Callable[[Egr], None]:
    """The proxy env for boto3, and tether's own AWS key (the agent's client has another)."""

    def set_env(egr: Egr) -> None:
        aws_env(egr)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", TETHER_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TETHER_SECRET)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    return set_env


def agent_ec2(egr: Egr) -> Any:
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=f"https://{EC2}:{egr.port}",
                        aws_access_key_id=AGENT_KEY, aws_secret_access_key=AGENT_SECRET,
                        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}))


def actions(records: list[dict[str, str]]) -> list[str]:
    return [re.search(r"Action=(\w+)", r["body"]).group(1) for r in records]  # type: ignore[union-attr]


_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})")


def assert_signed(record: dict[str, str], key: str, secret: str) -> None:
    """Recompute the SigV4 signature with `secret`: the request was signed with this key."""
    m = _AUTH.fullmatch(record["authorization"])
    assert m, record["authorization"]
    assert (m.group(1), m.group(3), m.group(4)) == (key, "us-east-1", "ec2")
    names = m.group(5).split(";")
    assert set(names) == {"content-type", "host", "x-amz-date"}
    headers = {n: record["host-header" if n == "host" else n] for n in names}
    request = AWSRequest(method="POST", url=f"https://{record['host-header']}/",
                         data=record["body"].encode(), headers=headers)
    request.context["timestamp"] = record["x-amz-date"]
    signer = SigV4Auth(Credentials(key, secret), "ec2", "us-east-1")
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)),
                                request)
    assert expected == m.group(6)


# -- end to end ------------------------------------------------------------------------------


async def test_describe_is_allowed_and_needs_no_lookup(start_egr: StartEgr,
                                                       env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    out = await asyncio.to_thread(lambda: agent_ec2(egr).describe_volumes())
    assert [v["VolumeId"] for v in out["Volumes"]] == ["vol-prod"]
    assert actions(egr.fake.seen) == ["DescribeVolumes"] and egr.fake.lookups == []
    [decision] = egr.records("decision")
    assert decision["action"] == "allow" and "Tags" not in decision["arguments"]


async def test_delete_of_a_production_candidate_volume_is_denied_by_its_tags(
        start_egr: StartEgr, env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-cand"))
    e = err.value.response
    assert e["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e["Error"]["Code"] == "TetherRequestDenied"
    assert "denied by no-prod-deletes" in e["Error"]["Message"]
    assert egr.fake.seen == []  # the delete never reached EC2
    # tether asked for the tags itself, signed with its own key, paging (one tag a page)
    assert actions(egr.fake.lookups) == ["DescribeTags", "DescribeTags"]
    assert "Filter.1.Name=resource-id&Filter.1.Value.1=vol-cand" in egr.fake.lookups[0]["body"]
    assert "NextToken=1" in egr.fake.lookups[1]["body"]
    for lookup in egr.fake.lookups:
        assert_signed(lookup, TETHER_KEY, TETHER_SECRET)
        assert lookup["host-header"] == f"{EC2}:{egr.port}"
    [decision] = egr.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["no-prod-deletes"]
    assert decision["arguments"] == {"VolumeId": "vol-cand", "Version": "2016-11-15",
                                     "Tags": {"env": "production-candidate", "owner": "ml"}}


async def test_delete_of_a_temporary_volume_is_forwarded(start_egr: StartEgr,
                                                         env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    out = await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-tmp"))
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert actions(egr.fake.seen) == ["DeleteVolume"] and actions(egr.fake.lookups) == ["DescribeTags"]
    assert_signed(egr.fake.seen[0], AGENT_KEY, AGENT_SECRET)  # the agent's own request, untouched
    assert_signed(egr.fake.lookups[0], TETHER_KEY, TETHER_SECRET)
    [decision] = egr.records("decision")
    assert decision["action"] == "allow" and decision["arguments"]["Tags"] == {"env": "temporary"}


async def test_an_untagged_volume_has_empty_tags(start_egr: StartEgr,
                                                 env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY + """
  - id: untagged-deletes
    match: {api: "aws.ec2.Delete*", args: {Tags.env: {exists: false}}}
    action: deny
""", extra=LOOKUPS)
    env(egr)
    with pytest.raises(ClientError, match="untagged-deletes"):
        await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-bare"))
    assert egr.fake.seen == []
    [decision] = egr.records("decision")
    assert decision["arguments"]["Tags"] == {}


async def test_several_resources_get_one_tag_object_each(start_egr: StartEgr,
                                                         env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    with pytest.raises(ClientError, match="no-prod-terminations"):
        await asyncio.to_thread(
            lambda: agent_ec2(egr).terminate_instances(InstanceIds=["i-tmp", "i-prod"]))
    assert egr.fake.seen == []
    assert "Filter.1.Value.1=i-tmp&Filter.1.Value.2=i-prod" in egr.fake.lookups[0]["body"]
    [decision] = egr.records("decision")
    assert decision["arguments"]["Tags"] == [{"env": "temporary"}, {"env": "production"}]


@pytest.mark.parametrize(("status", "delay", "why"), [
    (500, 0.0, "HTTP 500"), (403, 0.0, "HTTP 403"), (200, 2.0, "timed out")])
async def test_a_failed_lookup_denies(start_egr: StartEgr, env: Callable[[Egr], None],
                                      status: int, delay: float, why: str) -> None:
    fake = FakeUpstream(tags_status=status, tags_delay=delay)
    egr = await start_egr(policy=POLICY, fake=fake,
                          extra="cloud: {lookups: {aws: {tags: true, timeout: 300ms}}}\n")
    env(egr)
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-tmp"))
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "denied by tether:lookup-failed" in err.value.response["Error"]["Message"]
    assert egr.fake.seen == [] and actions(egr.fake.lookups) == ["DescribeTags"]
    [decision] = egr.records("decision")
    assert decision["action"] == "deny" and decision["rules"] == ["tether:lookup-failed"]
    assert why in decision["message"] and "Tags" not in decision["arguments"]


async def test_a_lookup_without_tethers_own_credentials_denies(
        start_egr: StartEgr, env: Callable[[Egr], None], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Any) -> None:
    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ClientError, match="tether:lookup-failed"):
        await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-tmp"))
    assert egr.fake.seen == [] and egr.fake.lookups == []
    [decision] = egr.records("decision")
    assert "no AWS credentials" in decision["message"]


async def test_tags_the_agent_sends_are_replaced_by_the_looked_up_ones(
        start_egr: StartEgr, env: Callable[[Egr], None]) -> None:
    import requests

    egr = await start_egr(policy=POLICY, extra=LOOKUPS)
    env(egr)
    s = requests.Session()
    s.trust_env, s.proxies, s.verify = False, {"https": egr.url}, str(egr.ca_file)
    r = await asyncio.to_thread(lambda: s.post(
        f"https://{EC2}:{egr.port}/",
        data="Action=DeleteVolume&VolumeId=vol-prod&tags.env=temporary&Version=2016-11-15",
        headers={"content-type": "application/x-www-form-urlencoded"}, timeout=20))
    assert r.status_code == 403 and "no-prod-deletes" in r.text
    [decision] = egr.records("decision")
    assert decision["arguments"] == {"VolumeId": "vol-prod", "Tags": {"env": "production"},
                                     "Version": "2016-11-15"}


async def test_lookups_are_off_by_default(start_egr: StartEgr, env: Callable[[Egr], None]) -> None:
    egr = await start_egr(policy=POLICY)
    env(egr)
    await asyncio.to_thread(lambda: agent_ec2(egr).delete_volume(VolumeId="vol-cand"))
    assert actions(egr.fake.seen) == ["DeleteVolume"] and egr.fake.lookups == []


# -- the parts -------------------------------------------------------------------------------


def test_resource_ids() -> None:
    assert resource_ids({"VolumeId": "vol-1", "DryRun": "false"}) == ["vol-1"]
    assert resource_ids({"InstanceId": ["i-1", "i-2", "i-1"], "imageid": "ami-1"}) == [
        "i-1", "i-2", "ami-1"]
    assert resource_ids({"Filter": [{"Name": "x"}]}) == []
    for bad in ({"VolumeId": {"a": "b"}}, {"SnapshotId": [""]}, {"VolumeId": [1]}):
        with pytest.raises(LookupFailed):
            resource_ids(bad)


def test_describe_tags_body_and_answer() -> None:
    body = describe_tags_body(["vol-1", "vol-2"], "tok").decode()
    assert body == ("Action=DescribeTags&Version=2016-11-15&Filter.1.Name=resource-id&"
                    "Filter.1.Value.1=vol-1&Filter.1.Value.2=vol-2&MaxResults=1000&NextToken=tok")
    xml = describe_tags_xml([("vol-1", "env", "prod"), ("vol-1", "empty", "")], "t2").encode()
    assert parse_describe_tags(xml) == ([("vol-1", "env", "prod"), ("vol-1", "empty", "")], "t2")
    assert parse_describe_tags(describe_tags_xml([], None).encode()) == ([], None)


@pytest.mark.parametrize("body", [
    b"", b"not xml", b"<Response><Errors><Error><Code>X</Code></Error></Errors></Response>",
    b"<DescribeTagsResponse/>",
    b"<DescribeTagsResponse><tagSet><item><key>env</key></item></tagSet></DescribeTagsResponse>",
    b'<!DOCTYPE x [<!ENTITY a "b">]><DescribeTagsResponse><tagSet/></DescribeTagsResponse>',
])
def test_unreadable_answers_fail(body: bytes) -> None:
    with pytest.raises(LookupFailed):
        parse_describe_tags(body)


def test_with_tags() -> None:
    assert with_tags({"VolumeId": "v", "TAGS": "x"}, ["v"], {"v": {"env": "p"}}) == {
        "VolumeId": "v", "Tags": {"env": "p"}}
    assert with_tags({"InstanceId": ["a", "b"]}, ["a", "b"], {"b": {"k": "v"}})["Tags"] == [
        {}, {"k": "v"}]


def test_config(tmp_path: Any) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("cloud:\n  lookups:\n    aws: {tags: true, timeout: 2s}\n")
    lookups = config_mod.load(cfg, env={}).lookups
    assert lookups.aws_tags and lookups.timeout_s == 2.0
    cfg.write_text('cloud:\n  effects: {"aws.ec2.Describe*": read}\n')
    assert not config_mod.load(cfg, env={}).lookups.aws_tags
    for text, line, key in [("cloud:\n  lookups:\n    aws: {tags: yes please}\n", 3, "tags"),
                            ("cloud:\n  lookups:\n    ibm: {tags: true}\n", 3, "ibm"),
                            ("cloud:\n  lookups:\n    aws:\n      timeout: soon\n", 4, "timeout"),
                            ("cloud:\n  lookups: [aws]\n", 2, "lookups")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError) as e:
            config_mod.load(cfg, env={})
        assert e.value.line == line and key in str(e.value), str(e.value)
