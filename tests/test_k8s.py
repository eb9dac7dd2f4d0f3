"""The Kubernetes manifests: they render, validate strictly, and match what tether reads.

Rendering needs kubectl (its built-in kustomize, offline). The checks read the rendered
objects and hold them against tether's own code: the CLI parser for the container args,
`config.load` for the ConfigMap, the admin app's open routes for the probes, the CA module's
file names for the CA Secret. A live test serves the rendered config and probes it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy import cli, config
from proxy.forward import ca
from proxy.providers import PROVIDERS
from proxy.server.admin import OPEN_PATHS
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
VALIDATE = K8S / "validate.py"
OVERLAYS = ("sidecar", "transparent", "gateway")
SIDECARS = ("sidecar", "transparent")
TETHER_UID = 10001

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed (it renders the overlays)")

type Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@functools.cache
def _rendered(overlay: str) -> tuple[Doc, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[Doc]:
    return list(_rendered(overlay))


def validate(*overlays: Path) -> subprocess.CompletedProcess[str]:
    """What `make k8s-validate` runs."""
    return subprocess.run([sys.executable, str(VALIDATE), *map(str, overlays)],
                          capture_output=True, text=True, check=False, timeout=300)


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pods(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in docs
            if d["kind"] == "Deployment"]


def all_containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def tether_pod(docs: list[Doc]) -> tuple[Doc, Doc]:
    """(pod template, the tether container) of the one pod that runs tether."""
    found = [(t, c) for _, t in pods(docs) for c in all_containers(t["spec"])
             if c["name"] == "tether"]
    assert len(found) == 1
    return found[0]


def ports(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def mounts(container: Doc) -> dict[str, str]:
    """mount path -> volume name"""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volumes(pod: Doc) -> dict[str, Doc]:
    return {v["name"]: v for v in pod["spec"].get("volumes", [])}


def under(path: str, root: str, strictly: bool = False) -> bool:
    p, r = PurePosixPath(path), PurePosixPath(root)
    return (p != r or not strictly) and (p == r or r in p.parents)


def secret_data(docs: list[Doc], name: str) -> dict[str, str]:
    import base64

    secret = one(docs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def parse_args(container: Doc) -> Any:
    assert "command" not in container, "the image's ENTRYPOINT (tether) must run"
    return cli.parser().parse_args(container["args"])


def rerooted(text: str, root: Path) -> str:
    """Config text with the container's absolute paths moved under `root`."""
    return re.sub(r"(?<=[ :\[])/(etc|var|tmp)/", lambda m: f"{root}/{m.group(1)}/", text)


def unroot(path: str, root: Path) -> str:
    """A path tether resolved under `root`, as the container sees it."""
    return "/" + Path(path).relative_to(root).as_posix()


def load_config(docs: list[Doc], pod: Doc, container: Doc, root: Path,
                env: Mapping[str, str] | None = None) -> config.Config:
    """Loads the config as tether does in `container`: every ConfigMap and Secret volume it
    mounts is written to the same path under `root` (the container's /), emptyDirs are empty
    directories, and the config's absolute paths are moved under `root` too."""
    args = parse_args(container)
    vols = volumes(pod)
    for mount_path, volume_name in sorted(mounts(container).items()):
        volume = vols[volume_name]
        target = root / mount_path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = dict(one(docs, "ConfigMap", volume["configMap"]["name"])["data"])
        elif "secret" in volume:
            data = secret_data(docs, volume["secret"]["secretName"])
            if "items" in volume["secret"]:
                data = {i["path"]: data[i["key"]] for i in volume["secret"]["items"]}
        else:
            continue
        for key, text in data.items():
            (target / key).write_text(text, encoding="utf-8")
    file = root / args.config.lstrip("/")
    file.write_text(rerooted(file.read_text(encoding="utf-8"), root), encoding="utf-8")
    if env is None:
        env = {e["name"]: e.get("value", "set-from-a-secret") for e in container.get("env", [])}
    return config.load(file, env=env)


# ---- the check itself: renders, validates, and can fail ------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_strictly(overlay: str) -> None:
    done = validate(K8S / "overlays" / overlay)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok: {K8S / 'overlays' / overlay}:" in done.stdout
    assert "Kubernetes 1.29.0 and 1.37.0, strict" in done.stdout


def test_make_validates_every_overlay() -> None:
    line = next(li for li in (ROOT / "Makefile").read_text().splitlines()
                if li.startswith("K8S_OVERLAYS"))
    assert set(line.split(":=")[1].split()) == set(OVERLAYS)
    assert {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()} == set(OVERLAYS)


def _replace(file: Path, old: str, new: str) -> None:
    text = file.read_text()
    assert text.count(old) == 1, f"{old!r} not once in {file}"
    file.write_text(text.replace(old, new))


CERTIFICATE = """apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: tether}
spec: {secretName: tether-tls, dnsNames: [tether.example.com], issuerRef: {name: x}}
"""


def _break(root: Path, how: str) -> None:
    sidecar = root / "overlays" / "sidecar"
    if how == "unknown field":
        _replace(sidecar / "agent.yaml", "          image: registry.example.com/my-agent:1.0.0",
                 "          imagePullPolicyy: Always\n"
                 "          image: registry.example.com/my-agent:1.0.0")
    elif how == "wrong type":
        _replace(sidecar / "agent.yaml", "replicas: 1", 'replicas: "one"')
    elif how == "bad servicemonitor":
        _replace(root / "base" / "servicemonitor.yaml", "      path: /metrics",
                 "      pathh: /metrics")
    elif how == "crd without a schema":
        (sidecar / "certificate.yaml").write_text(CERTIFICATE)
        _replace(sidecar / "kustomization.yaml", "  - agent.yaml\n",
                 "  - agent.yaml\n  - certificate.yaml\n")
    else:
        assert how == "unchanged"


@pytest.mark.parametrize(("how", "message"), [
    ("unchanged", None),
    ("unknown field", "Additional properties are not allowed ('imagePullPolicyy' was unexpected)"),
    ("wrong type", "'one' is not of type 'integer'"),
    ("bad servicemonitor", "ServiceMonitor/tether: spec.endpoints.0: Additional properties"),
    ("crd without a schema", "Couldn't find schema for kind Certificate"),
])
def test_a_broken_manifest_fails_the_check(tmp_path: Path, how: str, message: str | None) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("__pycache__"))
    _break(copy, how)
    done = validate(copy / "overlays" / "sidecar")
    if message is None:
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        assert done.returncode == 1, done.stdout + done.stderr
        assert message in done.stderr
        assert "ok:" not in done.stdout


def test_a_missing_kubectl_is_a_clear_error() -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, str(VALIDATE), str(K8S / "overlays" / "sidecar")],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2
    assert "kubectl not found on PATH" in done.stderr


# ---- the manifests match what tether reads -------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_args_parse_with_tethers_cli(overlay: str) -> None:
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    args = parse_args(tether)
    assert args.func is cli.cmd_serve
    assert mounts(tether)[str(PurePosixPath(args.config).parent)] == "tether-config"
    named = ports(tether)
    assert args.forward_port == named["forward"]
    transparent = getattr(args, "transparent_port", None)
    if overlay == "transparent":
        assert transparent is not None and transparent == named["transparent"]
    else:
        assert transparent is None and "transparent" not in named
    expected = {"proxy", "forward", "admin"} | ({"transparent"} if transparent else set())
    assert set(named) == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_loads_and_its_paths_are_mounted(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    cfg = load_config(docs, pod, tether, tmp_path)
    assert cfg.warnings == ()
    named = ports(tether)
    assert (cfg.port, cfg.admin_port) == (named["proxy"], named["admin"])
    assert cfg.host == "0.0.0.0"   # probes and Prometheus reach the pod IP

    env = {e["name"]: e for e in tether.get("env", [])}
    ref = env[cfg.admin_token_env]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secret_data(docs, ref["name"])

    vols, where = volumes(pod), mounts(tether)

    def mount_of(path: str) -> tuple[str, Doc]:
        best = max((m for m in where if under(path, m)), key=len)
        return best, vols[where[best]]

    # The CA dir is writable, and below its mount point: tether chmods it 0700, which the
    # root-owned mount point of an emptyDir would refuse.
    ca_dir = unroot(cfg.forward.ca_dir, tmp_path)
    point, volume = mount_of(ca_dir)
    assert "emptyDir" in volume and point != ca_dir
    assert cfg.audit_path is not None
    point, volume = mount_of(str(PurePosixPath(unroot(cfg.audit_path, tmp_path)).parent))
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    assert "emptyDir" in mount_of("/tmp")[1]

    # Upstream keys are files of the mounted Secret.
    keyed = [u for u in cfg.upstreams.values() if u.api_key_file]
    assert keyed, "the config names no api_key_file"
    for upstream in keyed:
        assert upstream.api_key_file is not None
        path = unroot(upstream.api_key_file, tmp_path)
        point, volume = mount_of(path)
        assert "secret" in volume, path
        assert PurePosixPath(path).relative_to(point).as_posix() in secret_data(
            docs, volume["secret"]["secretName"])

    store = cfg.store_url
    if overlay == "gateway":
        host, _, port = store.removeprefix("redis://").partition("/")[0].partition(":")
        service = one(docs, "Service", host)
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        redis_pod = dict(pods(docs))["tether-redis"]
        assert service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    else:
        assert store == "memory"


QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_audit_ships_from_an_emptydir_spool_on_stdout(overlay: str, tmp_path: Path) -> None:
    """Every overlay ships its decisions by default (stdout, for the node's log collector);
    the emptyDir holds only the spool, sized for it; the chain is named after the pod; the
    drain at SIGTERM fits the pod's grace period."""
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    cfg = load_config(docs, pod, tether, tmp_path)
    assert [(s.name, s.type) for s in cfg.audit_shipping.sinks] == [("stdout", "stdout")]
    assert cfg.audit_path is not None
    audit_dir = unroot(str(Path(cfg.audit_path).parent), tmp_path)
    volume = volumes(pod)[mounts(tether)[audit_dir]]
    assert "emptyDir" in volume, volume
    number, unit = re.fullmatch(r"(\d+)(\w+)", volume["emptyDir"]["sizeLimit"]).groups()  # type: ignore[union-attr]
    size_limit = int(number) * QUANTITY[unit]
    audit = cfg.audit
    assert audit.max_bytes is not None and audit.keep is not None
    # Unshipped bytes are bounded by the spool; shipped ones by rotation (keep + the live file).
    assert cfg.audit_shipping.spool.max_bytes + (audit.keep + 1) * audit.max_bytes <= size_limit
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    assert cfg.audit_shipping.spool.drain_timeout_s <= grace / 2, grace
    env = {e["name"]: e for e in tether["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_gateway_config_differs_from_the_base_only_in_the_store() -> None:
    base = yaml.safe_load((K8S / "base" / "config" / "tether.yaml").read_text())
    gateway = yaml.safe_load((K8S / "overlays" / "gateway" / "tether.yaml").read_text())
    assert base.pop("store") == "memory"
    assert gateway.pop("store").startswith("redis://")
    assert base == gateway


def test_the_rule_files_are_the_repos_own() -> None:
    """kustomize reads no file outside the base, so it holds a copy (`make k8s-rules`)."""
    copy = K8S / "base" / "config"
    for name in ("janitor.yaml",):
        assert (copy / name).read_bytes() == (ROOT / "rules" / name).read_bytes(), (
            f"deploy/k8s/base/config/{name} differs from rules/{name}: run make k8s-rules")
    assert "cp rules/janitor.yaml deploy/k8s/base/config/janitor.yaml" in (
        ROOT / "Makefile").read_text()
    generated = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = next(g["files"] for g in generated["configMapGenerator"] if g["name"] == "tether-config")
    included = yaml.safe_load((copy / "tether.yaml").read_text())["include"]
    assert {PurePosixPath(f).name for f in files} == {"tether.yaml", *included}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scraping_use_open_admin_routes(overlay: str) -> None:
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    probes = {k: tether[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in OPEN_PATHS   # a probe sends no admin token
        assert probe["port"] == "admin" and "admin" in ports(tether)
    service = one(docs, "Service", "tether-admin")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "admin" and port["port"] == ports(tether)["admin"]
    monitor = one(docs, "ServiceMonitor", "tether")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics" in OPEN_PATHS
    pdb = one(docs, "PodDisruptionBudget", "tether")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_secret_and_configmap_is_rendered(overlay: str) -> None:
    docs = rendered(overlay)
    for name, pod in pods(docs):
        spec = pod["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                keys = secret_data(docs, volume["secret"]["secretName"])
                assert {i["key"] for i in volume["secret"].get("items", [])} <= keys.keys()
            if "configMap" in volume:
                one(docs, "ConfigMap", volume["configMap"]["name"])
        for container in all_containers(spec):
            names = set(volumes(pod))
            assert set(mounts(container).values()) <= names, f"{name}/{container['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_data(docs, ref["name"])


def test_the_base_secrets_hold_placeholders_only() -> None:
    docs = kustomize(K8S / "base")
    keys = secret_data(docs, next(d["metadata"]["name"] for d in docs if d["kind"] == "Secret"
                                  and d["metadata"]["name"].startswith("tether-upstream-keys")))
    assert keys and all(v.startswith("PLACEHOLDER") for v in keys.values())
    admin = secret_data(docs, next(d["metadata"]["name"] for d in docs if d["kind"] == "Secret"
                                   and d["metadata"]["name"].startswith("tether-admin")))
    assert admin == {"TETHER_ADMIN_TOKEN": ""}   # no token: the admin API answers 503


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tether_container_runs_the_same_published_image(overlay: str) -> None:
    """An overlay's `images:` reaches only what it renders itself: a component's container
    added later would keep the bare name `tether` (pulled from Docker Hub)."""
    _, tether = tether_pod(rendered(overlay))
    assert tether["image"].startswith("ghcr.io/") and tether["image"].endswith("/tether:0.1.0")
    for name, pod in pods(rendered(overlay)):
        for c in all_containers(pod["spec"]):
            if c["name"].startswith("tether") and name != "tether-redis":
                assert c["image"] == tether["image"], f"{name}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    for name, pod in pods(rendered(overlay)):
        spec = pod["spec"]
        assert spec.get("automountServiceAccountToken") is False, name
        pod_seccomp = spec.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for c in all_containers(spec):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert (sc.get("seccompProfile", {}).get("type") or pod_seccomp) == "RuntimeDefault"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), where
            if c["name"] == "tether-redirect":
                assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
                assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
            else:
                assert "add" not in sc["capabilities"], where
                assert sc.get("runAsNonRoot", spec.get("securityContext", {}).get(
                    "runAsNonRoot")) is True, where
            if c["name"] in ("tether", "tether-ca"):
                assert (sc["runAsUser"], sc["runAsGroup"]) == (TETHER_UID, TETHER_UID)


def _agent(docs: list[Doc]) -> tuple[Doc, Doc]:
    pod = dict(pods(docs))["agent"]
    (container,) = pod["spec"]["containers"]
    assert pod["metadata"]["labels"]["tether.dev/agent"] == "true"
    return pod, container


def _check_agent_trusts_only_the_certificate(pod: Doc, agent: Doc, env: dict[str, str]) -> None:
    bundle = PurePosixPath(env["SSL_CERT_FILE"])
    for var in ("REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"):
        assert env[var] == str(bundle)
    volume = volumes(pod)[mounts(agent)[str(bundle.parent)]]
    (item,) = volume["secret"]["items"]
    assert (item["key"], item["path"]) == (ca.CERT_FILE, bundle.name)
    # The agent sees no key: no volume it mounts holds the CA key, upstream keys or state.
    for volume_name in mounts(agent).values():
        v = volumes(pod)[volume_name]
        assert "secret" in v and [i["key"] for i in v["secret"]["items"]] == [ca.CERT_FILE]


@pytest.mark.parametrize("overlay", SIDECARS)
def test_the_agent_reaches_llms_through_its_sidecar(overlay: str) -> None:
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    agent_pod, agent = _agent(docs)
    assert agent_pod is pod
    assert tether["restartPolicy"] == "Always"      # a native sidecar: up before the agent
    env = {e["name"]: e["value"] for e in agent["env"]}
    named = ports(tether)
    assert "openai" in {p.name for p in PROVIDERS}
    assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{named['proxy']}/openai/v1"
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{named['proxy']}/anthropic"
    if overlay == "sidecar":
        assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == f"http://127.0.0.1:{named['forward']}"
        assert set(env["NO_PROXY"].split(",")) == {"127.0.0.1", "localhost"}
    else:
        assert not {"HTTPS_PROXY", "HTTP_PROXY"} & env.keys()   # iptables redirects instead
    _check_agent_trusts_only_the_certificate(pod, agent, env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ca_init_container_feeds_tethers_ca_dir(overlay: str, tmp_path: Path) -> None:
    """Runs the init container's script: placeholders are refused, a real CA is copied."""
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    cfg = load_config(docs, pod, tether, tmp_path / "root")
    ca_dir = unroot(cfg.forward.ca_dir, tmp_path / "root")
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names.index("tether-ca") < names.index("tether") if "tether" in names else True
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "tether-ca")
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    (src_mount, volume_name), = [(m, v) for m, v in mounts(init).items() if "secret" in volumes(
        pod)[v]]
    secret = volumes(pod)[volume_name]["secret"]
    assert "items" not in secret
    data = secret_data(docs, secret["secretName"])
    assert set(data) == {ca.SECRET_FILES[0], ca.CERT_FILE}
    assert f"src={src_mount} dst={ca_dir}\n" in script

    src, dst = tmp_path / "secret", tmp_path / "state" / "ca"
    src.mkdir()
    local = script.replace(src_mount, str(src)).replace(ca_dir, str(dst))
    for key, value in data.items():
        (src / key).write_text(value)
    refused = subprocess.run(["sh", "-c", local], capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "holds placeholders" in refused.stderr
    assert not dst.exists()

    made = tmp_path / "made"
    cert = ca.ensure_ca(made)
    for key in data:
        (src / key).write_bytes((made / key).read_bytes())
    copied = subprocess.run(["sh", "-c", local], capture_output=True, text=True, check=False)
    assert copied.returncode == 0, copied.stderr
    assert stat.S_IMODE((dst / ca.SECRET_FILES[0]).stat().st_mode) == 0o600
    assert stat.S_IMODE(dst.stat().st_mode) == 0o700
    assert ca.export_pem(dst) == cert.read_text()    # tether uses it; makes no CA of its own


def test_transparent_mode_redirects_before_the_agent_starts() -> None:
    docs = rendered("transparent")
    pod, tether = tether_pod(docs)
    inits = pod["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["tether-redirect", "tether-ca", "tether"]
    redirect = inits[0]
    assert redirect["command"] == ["tether-redirect"]
    assert redirect["image"] == tether["image"]
    env = {e["name"]: e["value"] for e in redirect["env"]}
    admin_port = next(p["containerPort"] for p in tether["ports"] if p["name"] == "admin")
    assert env == {"TETHER_UID": str(tether["securityContext"]["runAsUser"]),
                   "TETHER_TRANSPARENT_PORT": str(parse_args(tether).transparent_port),
                   "TETHER_REDIRECT_PORTS": "80 443",
                   "TETHER_ADMIN_PORT": str(admin_port),    # the agent is kept off it
                   "TETHER_ALLOW_EGRESS": ""}               # nothing but DNS leaves unseen
    assert "COPY --chmod=0755 deploy/transparent/tether-redirect /usr/local/bin/tether-redirect" \
        in (ROOT / "Dockerfile").read_text()
    script = ROOT / "deploy" / "transparent" / "tether-redirect"
    assert script.is_file(), "deploy/transparent/tether-redirect (helper TRANSPARENT) is missing"
    text = script.read_text()
    assert all(name in text for name in env)


# ---- the gateway ---------------------------------------------------------------------------

def _matches(selector: Doc, labels: Mapping[str, str]) -> bool:
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def test_the_gateway_container_is_the_sidecar_container() -> None:
    sidecar_pod, sidecar = tether_pod(rendered("sidecar"))
    gateway_pod, gateway = tether_pod(rendered("gateway"))
    assert {k: v for k, v in sidecar.items() if k != "restartPolicy"} == gateway
    ca_init = [next(c for c in p["spec"]["initContainers"] if c["name"] == "tether-ca")
               for p in (sidecar_pod, gateway_pod)]
    assert ca_init[0] == ca_init[1]
    used = set(mounts(sidecar).values()) | set(mounts(ca_init[0]).values())
    side_vols, gate_vols = volumes(sidecar_pod), volumes(gateway_pod)
    for name in used:   # generated names carry different hashes; compare the rest
        a, b = side_vols[name], gate_vols[name]
        assert a.keys() == b.keys() and all(
            {k: v for k, v in a[kind].items() if k not in ("name", "secretName")}
            == {k: v for k, v in b[kind].items() if k not in ("name", "secretName")}
            for kind in a if kind != "name"), name


def test_the_gateway_scales_and_survives_disruptions() -> None:
    docs = rendered("gateway")
    gateway = one(docs, "Deployment", "tether-gateway")
    assert gateway["spec"]["replicas"] >= 2
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    hpa = one(docs, "HorizontalPodAutoscaler", "tether-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tether-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = one(docs, "PodDisruptionBudget", "tether")
    assert _matches(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    service = one(docs, "Service", "tether-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    tether = gateway["spec"]["template"]["spec"]["containers"][0]
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == {
        "proxy": ports(tether)["proxy"], "forward": ports(tether)["forward"]}


def _policy(docs: list[Doc], name: str) -> Doc:
    spec: Doc = one(docs, "NetworkPolicy", name)["spec"]
    return spec


def _ports(rule: Doc) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule.get("ports", [])}


DNS = {(53, "UDP"), (53, "TCP")}


def test_agents_can_reach_only_the_gateway_and_dns() -> None:
    docs = rendered("gateway")
    gateway_labels = one(docs, "Deployment", "tether-gateway")["spec"]["template"]["metadata"][
        "labels"]
    agent_pod, agent = _agent(docs)
    agent_labels = agent_pod["metadata"]["labels"]
    named = ports(tether_pod(docs)[1])

    egress = _policy(docs, "agents-egress-only-gateway")
    assert _matches(egress["podSelector"], agent_labels)
    assert egress["policyTypes"] == ["Egress"]
    rules = egress["egress"]
    assert len(rules) == 2 and all("ipBlock" not in peer for r in rules for peer in r["to"])
    to_gateway, to_dns = rules
    assert all(_matches(p["podSelector"], gateway_labels) for p in to_gateway["to"])
    assert _ports(to_gateway) == {(named["proxy"], "TCP"), (named["forward"], "TCP")}
    assert _ports(to_dns) == DNS
    assert to_dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}

    ingress = _policy(docs, "gateway-ingress")
    assert _matches(ingress["podSelector"], gateway_labels)
    assert _matches(ingress["ingress"][0]["from"][0]["podSelector"], agent_labels)

    out = _policy(docs, "gateway-egress")
    assert _matches(out["podSelector"], gateway_labels)
    internet = next(r for r in out["egress"] if any("ipBlock" in p for p in r["to"]))
    assert _ports(internet) == {(443, "TCP")}
    v4 = next(p["ipBlock"] for p in internet["to"] if p["ipBlock"]["cidr"] == "0.0.0.0/0")
    metadata = ipaddress.ip_address("169.254.169.254")
    assert any(metadata in ipaddress.ip_network(e) for e in v4["except"])
    assert any(_ports(r) == DNS for r in out["egress"])

    redis = _policy(docs, "redis-from-gateway")
    (rule,) = redis["ingress"]
    assert [p["podSelector"] for p in rule["from"]] == [{"matchLabels": {
        "app.kubernetes.io/name": "tether-gateway"}}]

    env = {e["name"]: e["value"] for e in agent["env"]}
    service = one(docs, "Service", "tether-gateway")
    assert env["OPENAI_BASE_URL"] == f"http://{service['metadata']['name']}:{named['proxy']}/openai/v1"
    assert env["HTTPS_PROXY"] == f"http://{service['metadata']['name']}:{named['forward']}"
    assert "tether-gateway" in env["NO_PROXY"].split(",")
    _check_agent_trusts_only_the_certificate(agent_pod, agent, env)


def test_the_sidecar_proxy_ports_are_closed_to_other_pods() -> None:
    docs = rendered("sidecar")
    pod, tether = tether_pod(docs)
    policy = _policy(docs, "agent-tether-ingress")
    assert _matches(policy["podSelector"], pod["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    assert [_ports(r) for r in policy["ingress"]] == [{(ports(tether)["admin"], "TCP")}]


# ---- live: the rendered config serves, and the probes answer -------------------------------

@contextmanager
def serve_tether(config_path: Path, args: list[str], env: Mapping[str, str]
                 ) -> Iterator[dict[str, int]]:
    """tether serve with `args` (a manifest's), on free loopback ports; yields the ports."""
    chosen = {"--port": free_port(), "--admin-port": free_port(), "--forward-port": free_port()}
    if "--transparent-port" in args:
        chosen["--transparent-port"] = free_port()
    argv = [*args, "--config", str(config_path), "--host", "127.0.0.1"]
    for flag, value in chosen.items():
        argv += [flag, str(value)]
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *argv], cwd=ROOT, env={**env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield {k.strip("-"): v for k, v in chosen.items()}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, out + err


def get(url: str, deadline: float = 30) -> tuple[int, str]:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            if time.monotonic() > end:
                return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
        time.sleep(0.2)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_config_serves_and_the_probes_answer(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    pod, tether = tether_pod(docs)
    cfg = load_config(docs, pod, tether, tmp_path)
    assert cfg.source is not None
    file = Path(cfg.source)
    if overlay == "gateway":   # the manifest's Redis is not here; the probes are what is tested
        file.write_text(re.sub(r"(?m)^store: .*$", "store: memory", file.read_text()))
    env = {"PATH": os.environ.get("PATH", ""), "TETHER_ADMIN_TOKEN": "t0ken"}
    with serve_tether(file, tether["args"], env) as bound:
        admin = f"http://127.0.0.1:{bound['admin-port']}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            status, _ = get(admin + tether[probe]["httpGet"]["path"])
            assert status == 200, probe
        status, body = get(admin + "/metrics")
        assert status == 200 and "tether_requests_total" in body
    assert (tmp_path / "var/lib/tether/ca" / ca.CERT_FILE).is_file()
