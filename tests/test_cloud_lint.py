"""`match.api` as a list, and what `tether check` says about rules on cloud operations
that can never match: a tag condition no enabled lookup serves, an api entry that can
name no cloud operation. Shipped rules and docs examples must stay quiet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config_check import check_file
from proxy.errors import ConfigError
from proxy.model import Action, Effect, ToolCall
from proxy.policy.rules import Subject, compile_rule
from proxy.policy.source import load_yaml

ROOT = Path(__file__).resolve().parent.parent
LOOKUPS = {
    "none": "",
    "aws": "cloud: {lookups: {aws: {tags: true}}}\n",
    "azure": "cloud: {lookups: {azure: {tags: true}}}\n",
    "azure-groups": "cloud: {lookups: {azure: {tags: true, scopes: [resource, resource_group]}}}\n",
    "gcp": "cloud: {lookups: {gcp: {labels: true}}}\n",
    "azure-compute": "cloud: {lookups: {azure: {tags: true, apis: ['azure.Microsoft.Compute/*']}}}\n",
}


def warnings(tmp_path: Path, rules: str, lookups: str = "none") -> list[str]:
    cfg = tmp_path / "tether.yaml"
    cfg.write_text(LOOKUPS[lookups] + "rules:\n" + rules)
    checked = check_file(str(cfg), env={})
    assert checked.config is not None, checked.findings
    return [f"{f.rule}: {f.key}: {f.message}" for f in checked.findings if f.severity == "warning"]


def rule(api: str, arg: str = "Tags.env") -> str:
    return "  - {id: r, match: {api: " + api + ", args: {" + arg + ": {equals: production}}}, " \
           "action: deny}\n"


def test_api_takes_a_list() -> None:
    doc = load_yaml("{id: r, match: {api: [jira.deleteIssue, 'aws.ec2.Delete*']}, action: deny}",
                    file="t.yaml")
    compiled = compile_rule(doc, "t.yaml", 1)
    assert compiled.api == ("jira.deleteIssue", "aws.ec2.Delete*")

    def verdict(api: str | None) -> bool:
        subject = Subject(ToolCall("c", "t", "{}", {}), "t", None, Effect.WRITE, api=api)
        return compiled.evaluate(subject).matched

    assert verdict("aws.ec2.DeleteVolume") and verdict("JIRA.deleteissue")
    assert not verdict("aws.ec2.DescribeVolumes") and not verdict(None)
    assert compiled.action is Action.DENY
    with pytest.raises(ConfigError, match="api must be"):
        compile_rule(load_yaml("{id: r, match: {api: []}, action: deny}", file="t.yaml"), "t", 1)
    with pytest.raises(ConfigError, match="api must be"):
        compile_rule(load_yaml("{id: r, match: {api: [1]}, action: deny}", file="t.yaml"), "t", 1)


@pytest.mark.parametrize(("api", "arg", "lookups", "warned"), [
    # a lookup that serves the operation: quiet
    ("'aws.ec2.DeleteVolume'", "Tags.env", "aws", False),
    ("'azure.Microsoft.Compute/disks/delete'", "Tags.env", "azure", False),
    ("'gcp.compute.disks.delete'", "tags.env", "gcp", False),
    ("'azure.*'", "ResourceGroupTags.tier", "azure-groups", False),
    ("'azure.Microsoft.Compute/disks/delete'", "Tags.env", "azure-compute", False),
    ("'azure.*/delete'", "Tags.env", "azure-compute", False),
    # none that does: the condition can never hold
    ("'azure.Microsoft.Compute/disks/delete'", "Tags.env", "aws", True),
    ("'aws.ec2.DeleteVolume'", "Tags.env", "none", True),
    ("'aws.s3.DeleteBucket'", "Tags.env", "aws", True),
    ("'azure.Microsoft.Compute/disks/read'", "Tags.env", "azure", True),
    ("'azure.*'", "ResourceGroupTags.tier", "azure", True),
    ("'azure.Microsoft.Storage/*'", "Tags.env", "azure-compute", True),
    ("['gcp.compute.disks.delete', 'azure.*']", "Tags.env", "aws", True),
    # not only cloud operations: the call may carry Tags itself
    ("'*'", "Tags.env", "none", False),
    ("[jira.createIssue, 'aws.ec2.*']", "Tags.env", "none", False),
    ("'aws.ec2.DeleteVolume'", "VolumeId", "none", False),
])
def test_a_tag_condition_no_lookup_serves(tmp_path: Path, api: str, arg: str, lookups: str,
                                          warned: bool) -> None:
    found = [w for w in warnings(tmp_path, rule(api, arg), lookups) if "is never there" in w]
    assert bool(found) is warned, found
    if warned:
        assert found[0].startswith(f"r: match.args.{arg.split('.')[0]}: ")


@pytest.mark.parametrize(("api", "why"), [
    ("azure.Microsoft.Compute.disks.delete", "slashes, not dots"),
    ("azure.Microsoft.Compute/disks/begin_delete", "not 'begin_delete'"),
    ("aws.s3.DeleteBuckets", "no such aws.s3 operation"),
    ("aws.s3.Frobnicate*", "no such aws.s3 operation"),
])
def test_an_api_that_names_no_cloud_operation(tmp_path: Path, api: str, why: str) -> None:
    [found] = warnings(tmp_path, f"  - {{id: r, match: {{api: '{api}'}}, action: deny}}\n")
    assert found.startswith("r: match.api: ") and why in found, found


@pytest.mark.parametrize("api", [
    "azure.Microsoft.Compute/disks/delete", "azure.Microsoft.Compute/*",
    "azure.Microsoft.Compute/virtualMachines/start/action", "azure.*/delete", "aws.s3.Delete*",
    "aws.ec2.DeleteVolumez",  # EC2's operations are not in the catalog: not guessed at
    "aws.sqs.Anything", "gcp.compute.disks.frobnicate", "jira.createIssue", "aws.*", "*"])
def test_what_tether_cannot_judge_is_not_warned_about(tmp_path: Path, api: str) -> None:
    assert warnings(tmp_path, f"  - {{id: r, match: {{api: '{api}'}}, action: deny}}\n") == []


def test_tether_check_prints_the_warning_and_passes(tmp_path: Path) -> None:
    cfg = tmp_path / "tether.yaml"
    cfg.write_text("rules:\n" + rule("'azure.Microsoft.Compute/disks/delete'"))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{cfg}:2:" in done.stderr and "warning: rule r: match.args.Tags: Tags is never " \
                                          "there" in done.stderr, done.stderr


def test_the_shipped_rules_are_quiet() -> None:
    checked = check_file(str(ROOT / "rules" / "tether.yaml"), env={})
    assert not [f for f in checked.findings if "never there" in f.message
                or "names no cloud operation" in f.message]
