"""The parts of GCP label lookups that open no socket: `cloud.lookups.gcp` settings, which
resources a call names and where tether asks, and reading GCP's answers, hostile ones too.
(End to end, with the Google SDKs through the forward proxy: test_e2e_gcp_lookups.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.forward.lookup_settings_gcp import GcpLookupSettings, parse_gcp
from proxy.forward.lookups import LookupFailed
from proxy.forward.lookups_gcp import (
    GcpLabelLookup,
    GcpResource,
    GoogleIdentity,
    labels_from,
    resources,
)
from proxy.model import Effect, HttpRequest
from proxy.policy.cloud import CloudOperation, classify
from proxy.policy.source import YMap, load_yaml

CP = "/compute/v1/projects/p1/zones/us-central1-a"


def gcp_settings(text: str) -> GcpLookupSettings:
    doc = load_yaml(f"lookups:\n  gcp: {text}\n", file="t.yaml")
    assert isinstance(doc, YMap)
    lookups = doc["lookups"]
    assert isinstance(lookups, YMap)
    return parse_gcp(lookups.get("gcp"), lookups)


def operation(method: str, path: str, host: str = "compute.googleapis.com",
              body: bytes = b"") -> CloudOperation:
    headers = (("content-type", "application/json"),) if body else ()
    found = classify(HttpRequest(method, "https", host, 443, path, "", headers, body))
    assert isinstance(found, CloudOperation), found
    return found


# -- settings ----------------------------------------------------------------------------------


def test_settings_defaults_and_overrides() -> None:
    assert parse_gcp(None, YMap()) == GcpLookupSettings()
    off = gcp_settings("{}")
    assert not off.labels and off.timeout_s == 5.0
    assert off.endpoint("compute") == "https://compute.googleapis.com"
    assert off.endpoint("storage") == "https://storage.googleapis.com"
    assert off.endpoint("container") == "https://container.googleapis.com"
    assert off.endpoint("secretmanager") is None
    on = gcp_settings("{labels: true, timeout: 300ms, endpoints: "
                      "{compute: 'https://compute-p.p.googleapis.com:8443/'}}")
    assert on.labels and on.timeout_s == 0.3
    assert on.compute == "https://compute-p.p.googleapis.com:8443"
    assert on.storage == "https://storage.googleapis.com"


@pytest.mark.parametrize(("text", "line", "key"), [
    ("{labels: yes please}", 2, "cloud.lookups.gcp.labels"),
    ("{tags: true}", 2, "cloud.lookups.gcp.tags"),
    ("{timeout: soon}", 2, "cloud.lookups.gcp.timeout"),
    ("[labels]", 2, "gcp"),
    ("\n    labels: true\n    endpoints: [x]", 4, "endpoints"),
    ("\n    endpoints:\n      bigquery: https://x", 4, "cloud.lookups.gcp.endpoints.bigquery"),
    ("\n    endpoints:\n      compute: http://compute.googleapis.com", 4, "compute"),
    ("\n    endpoints:\n      compute: https://compute.googleapis.com/compute/v1", 4, "compute"),
    ("\n    endpoints:\n      storage: https://user@storage.googleapis.com", 4, "storage"),
    ("\n    endpoints:\n      storage: https://storage.googleapis.com?x=1", 4, "storage"),
    ("\n    endpoints:\n      storage: https://:443", 4, "storage"),
    ("\n    endpoints:\n      storage: https://h:99999", 4, "storage"),
    ("\n    endpoints:\n      container: 42", 4, "container"),
])
def test_bad_settings_name_file_line_and_key(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        gcp_settings(text)
    assert e.value.file == "t.yaml" and e.value.line == line, str(e.value)
    assert key in str(e.value), str(e.value)


def test_settings_through_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("cloud:\n  lookups:\n    gcp: {labels: true, timeout: 2s}\n")
    gcp = config_mod.load(cfg, env={}).lookups.gcp
    assert gcp == GcpLookupSettings(labels=True, timeout_s=2.0)
    cfg.write_text("cloud:\n  lookups:\n    gcp:\n      labels: maybe\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg, env={})
    assert e.value.line == 4 and "cloud.lookups.gcp.labels" in str(e.value)


# -- which resources, asked where --------------------------------------------------------------

D = "compute/v1/projects/p1"


@pytest.mark.parametrize(("method", "path", "host", "body", "named"), [
    ("DELETE", f"{CP}/disks/d1", "compute.googleapis.com", b"", [f"{D}/zones/us-central1-a/disks/d1"]),
    ("DELETE", "/compute/v1/projects/p1/regions/us-east1/disks/rd", "compute.googleapis.com", b"",
     [f"{D}/regions/us-east1/disks/rd"]),
    ("POST", f"{CP}/instances/i1/stop", "compute.googleapis.com", b"",
     [f"{D}/zones/us-central1-a/instances/i1"]),
    ("POST", f"{CP}/instances/i1:setLabels", "compute.googleapis.com", b'{"labels": {}}',
     [f"{D}/zones/us-central1-a/instances/i1"]),
    ("POST", f"{CP}/disks/d1/createSnapshot", "compute.googleapis.com", b"",
     [f"{D}/zones/us-central1-a/disks/d1"]),
    ("DELETE", "/compute/v1/projects/p1/global/snapshots/s1", "compute.googleapis.com", b"",
     [f"{D}/global/snapshots/s1"]),
    ("DELETE", "/compute/beta/projects/p1/global/images/im", "compute.googleapis.com", b"",
     [f"{D}/global/images/im"]),
    ("DELETE", f"{CP}/disks/d1", "www.googleapis.com", b"", [f"{D}/zones/us-central1-a/disks/d1"]),
    ("DELETE", "/compute/v1/projects/p1/zones/z/disks/a%20b%3Fc", "compute.googleapis.com", b"",
     [f"{D}/zones/z/disks/a%20b%3Fc"]),
    ("DELETE", "/storage/v1/b/bkt", "storage.googleapis.com", b"", ["storage/v1/b/bkt"]),
    ("DELETE", "/storage/v1/b/bkt/o/a%2Fb.txt", "storage.googleapis.com", b"", ["storage/v1/b/bkt"]),
    ("POST", "/storage/v1/b/src/o/a/rewriteTo/b/dst/o/z", "storage.googleapis.com", b"",
     ["storage/v1/b/src", "storage/v1/b/dst"]),
    ("POST", "/storage/v1/b/same/o/a/copyTo/b/same/o/z", "storage.googleapis.com", b"",
     ["storage/v1/b/same"]),
    ("DELETE", "/v1/projects/p/locations/europe-west1/clusters/prod", "container.googleapis.com", b"",
     ["v1/projects/p/locations/europe-west1/clusters/prod"]),
    ("DELETE", "/v1/projects/p/zones/europe-west1-b/clusters/c/nodePools/np",
     "container.googleapis.com", b"", ["v1/projects/p/locations/europe-west1-b/clusters/c"]),
    # nothing to look up: reads, polling, creates, resources without labels here
    ("GET", f"{CP}/disks/d1", "compute.googleapis.com", b"", []),
    ("GET", f"{CP}/operations/op-1", "compute.googleapis.com", b"", []),
    ("POST", f"{CP}/operations/op-1/wait", "compute.googleapis.com", b"", []),
    ("POST", f"{CP}/disks", "compute.googleapis.com", b'{"name": "d2"}', []),
    ("DELETE", "/compute/v1/projects/p1/global/firewalls/fw", "compute.googleapis.com", b"", []),
    ("POST", "/storage/v1/b", "storage.googleapis.com", b'{"name": "new"}', []),
    ("DELETE", "/v1/projects/p/secrets/s", "secretmanager.googleapis.com", b"", []),
])
def test_the_resources_a_call_names(method: str, path: str, host: str, body: bytes,
                                    named: list[str]) -> None:
    found = operation(method, path, host, body)
    assert [r.path for r in resources(found)] == named
    lookup = GcpLabelLookup(GcpLookupSettings(labels=True), None)
    assert lookup.wanted(found) == named
    assert GcpLabelLookup(GcpLookupSettings(), None).wanted(found) == []  # off by default


def test_where_is_tethers_endpoint_for_the_api() -> None:
    settings = GcpLookupSettings(labels=True, storage="https://storage-psc.p.googleapis.com:8443")
    lookup = GcpLabelLookup(settings, None)
    disk = operation("DELETE", f"{CP}/disks/d1", "www.googleapis.com")
    http = HttpRequest("DELETE", "https", "www.googleapis.com", 443, f"{CP}/disks/d1", "", (), b"")
    assert lookup.where(disk, http) == ("compute.googleapis.com", 443)
    bucket = operation("DELETE", "/storage/v1/b/bkt", "storage.googleapis.com")
    assert lookup.where(bucket, http) == ("storage-psc.p.googleapis.com", 8443)


@pytest.mark.parametrize("arguments", [
    {"project": "p", "zone": "z", "disk": ".."},
    {"project": "p", "zone": "z", "disk": "a/../../b"},
    {"project": "p", "zone": "z", "disk": "a\r\nHost: evil"},
    {"project": "p", "zone": "z", "disk": ""},
    {"project": "p", "zone": "z", "disk": "x" * 256},
    {"project": "p", "zone": "z", "disk": ["d1", "d2"]},
    {"project": "p", "zone": {"z": 1}, "disk": "d"},
    {"project": None, "zone": "z", "disk": "d"},
    {"project": "p", "disk": "d"},  # a disk without its zone or region
])
def test_hostile_names_fail_the_lookup(arguments: dict[str, object]) -> None:
    found = CloudOperation("gcp", "compute", "compute.disks.delete", Effect.WRITE,
                           "gcp.compute.disks.delete", arguments)
    with pytest.raises(LookupFailed):
        resources(found)


# -- reading answers ---------------------------------------------------------------------------

DISK = GcpResource("compute/v1/projects/p/zones/z/disks/d1", "d1")


def test_labels_as_gcp_serves_them() -> None:
    body = {"kind": "compute#disk", "name": "d1", "labels": {"env": "production", "team": ""}}
    assert labels_from(json.dumps(body).encode(), "compute", DISK) == {"env": "production", "team": ""}
    assert labels_from(b'{"name": "d1", "sizeGb": "10"}', "compute", DISK) == {}  # none: omitted
    assert labels_from(b'{"name": "d1", "labels": null}', "compute", DISK) == {}
    cluster = GcpResource("v1/projects/p/locations/l/clusters/c", "c")
    gke = b'{"name": "c", "labels": {"env": "x"}, "resourceLabels": {"env": "production"}}'
    assert labels_from(gke, "container", cluster) == {"env": "production"}
    assert labels_from(b'{"name": "b", "labels": {"env": "t"}}', "storage",
                       GcpResource("storage/v1/b/b", "b")) == {"env": "t"}


@pytest.mark.parametrize(("body", "why"), [
    (b"", "not JSON"),
    (b"<html>Service Unavailable</html>", "not JSON"),
    (b'{"name": "d1", "labels": {"env": "a", "env": "b"}}', "not JSON"),  # duplicate key
    (b'{"name": "d1", "labels": {"env": "\\ud800"}}', "not JSON"),  # a lone surrogate
    (b'{"name": "d1", "labels": {"env": NaN}}', "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nesting deeper than the parser goes
    (b'["d1"]', "not a JSON object"),
    (b'{"labels": {"env": "temporary"}}', "about None"),
    (b'{"name": "d2", "labels": {"env": "temporary"}}', "about 'd2'"),
    (b'{"name": "d1", "labels": ["env", "production"]}', "not a mapping"),
    (b'{"name": "d1", "labels": "env=production"}', "not a mapping"),
    (b'{"name": "d1", "labels": {"env": 1}}', "text values"),
    (b'{"name": "d1", "labels": {"env": {"nested": "x"}}}', "text values"),
    (json.dumps({"name": "d1", "labels": {f"k{i}": "v" for i in range(1001)}}).encode(), "up to 1000"),
])
def test_unreadable_or_hostile_answers_fail(body: bytes, why: str) -> None:
    with pytest.raises(LookupFailed) as e:
        labels_from(body, "compute", DISK)
    assert why in str(e.value)


def test_a_megabyte_answer_is_read_in_linear_time() -> None:
    """The worst a 1 MiB answer (the most read_limited takes) can hold: long labels, or
    one long string of escapes."""
    labels = {f"k{i}": "v" * 1000 for i in range(1000)}
    big = json.dumps({"name": "d1", "labels": labels}).encode()
    escapes = b'{"name": "d1", "labels": {"k": "' + b"\\u0041" * 170_000 + b'"}}'
    for body in (big, escapes):
        start = time.perf_counter()
        out: Any = labels_from(body, "compute", DISK)
        assert time.perf_counter() - start < 1.0
        assert len(out) in (1, 1000)


# -- tether's own identity ---------------------------------------------------------------------

PEM = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption()).decode()


@pytest.mark.parametrize(("key_file", "why"), [
    (None, "no usable Google credentials"),
    ("not json at all", "no usable Google credentials"),
    (json.dumps({"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com",
                 "private_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
                 "token_uri": "https://127.0.0.1:9/token"}), "Failed to load service account"),
    (json.dumps({"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com",
                 "private_key": PEM, "token_uri": "https://127.0.0.1:9/token"}),
     "token could not be had: TransportError"),  # nothing listens on port 9
])
async def test_no_usable_identity_fails_the_lookup(key_file: str | None, why: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    if key_file is None:
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    else:
        (tmp_path / "key.json").write_text(key_file)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    with pytest.raises(LookupFailed, match=why):
        await GoogleIdentity(None, 2.0).headers()
