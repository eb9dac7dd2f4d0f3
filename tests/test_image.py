"""The container image, run as the sidecar manifest runs it (`make image && make image-test`).

No Docker engine or Kubernetes here, and `podman run` is refused in this sandbox (cgroups in
hybrid mode), so containers run with `buildah run --isolation chroot --network host`, as uid
10001, with the manifest's own volumes made on the host: the ConfigMap is the directory it is
generated from, the Secrets are files of mode 0440 root:10001 (the manifest's defaultMode and
fsGroup), the emptyDirs are directories of 10001's, and the image's VOLUMEs are dropped from
each container as Kubernetes ignores them. What buildah cannot do is noted where it matters:
it has no read-only root filesystem (instead, every path uid 10001 can write outside the
manifest's volumes is listed and must be only the world-writable scratch directory Debian
ships, left empty by a run) and no probes (they are called over HTTP as the kubelet would).

Deselected from `make test` (`-m "not image"`); `make image-test` runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakes.threaded import ThreadedServer
from tests.installed import (
    GCP_IDENTITY_ENV,
    GCP_IDENTITY_FOUND,
    GCP_IDENTITY_PROBE,
    audit_actions,
    check_admin,
    check_azure_demo,
    check_forwarded,
    check_governed,
    check_upstream_saw,
    janitor_upstream,
    wait_ready,
)
from tests.test_k8s import (
    K8S,
    OVERLAYS,
    all_containers,
    mounts,
    rendered,
    secret_data,
    tether_pod,
    validate,
    volumes,
)

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("TETHER_IMAGE", "tether:0.1.0")
UID = 10001
GRACE_S = 30       # Kubernetes' default terminationGracePeriodSeconds (the sidecar sets none)
UPSTREAM_KEY = "sk-upstream-from-the-secret"


def buildah(*args: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


@dataclass
class Pod:
    """The sidecar pod's volumes on the host, and containers started from the image."""

    root: Path
    binds: dict[str, Path] = field(default_factory=dict)   # container path -> host path
    containers: list[str] = field(default_factory=list)

    def container(self) -> str:
        """A container of the image with its VOLUMEs dropped, as Kubernetes ignores them
        (buildah would mount its own volume over the pod's at the same path)."""
        name = buildah("from", "--pull-never", IMAGE).stdout.strip()
        self.containers.append(name)
        declared = buildah("inspect", "--format", "{{range $k, $v := .OCIv1.Config.Volumes}}"
                           "{{$k}} {{end}}", name).stdout.split()
        for path in declared:
            buildah("config", "--volume", f"{path}-", name)
        return name

    def run_args(self, container: dict[str, object], env: dict[str, str]) -> list[str]:
        args = ["run", "--isolation", "chroot", "--network", "host", "--user", f"{UID}:{UID}"]
        paths = mounts(container)
        # Parents before children, as the kubelet mounts them.
        for path in sorted(paths, key=len):
            host = self.binds[path]
            ro = ":ro" if path == "/etc/tether" or "secrets" in path else ""
            args += ["-v", f"{host}:{_resolved(path)}{ro}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        return args


def _resolved(path: str) -> str:
    """/var/run is a symlink to /run in the image; buildah binds the link's target."""
    return "/run" + path[len("/var/run"):] if path.startswith("/var/run/") else path


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: run `make image` first")
    found = buildah("inspect", "--type", "image", IMAGE, check=False)
    if found.returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `make image` first")
    return IMAGE


def _owned_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    os.chmod(path, mode)
    return path


def _secret_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
        os.chown(path / name, 0, UID)
        os.chmod(path / name, 0o440)
    return path


def _make_ca(directory: Path) -> dict[str, str]:
    from mitmproxy.certs import CertStore

    CertStore.create_store(directory, "mitmproxy", 2048, organization="tether image test",
                           cn="tether image test CA")
    return {n: (directory / n).read_text() for n in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem")}


@pytest.fixture
def pod(image: str, tmp_path: Path) -> Iterator[Pod]:
    """The sidecar overlay's volumes for its tether containers, made on the host."""
    os.chmod(tmp_path, 0o755)
    docs = rendered("sidecar")
    spec, _ = tether_pod(docs)
    made = Pod(tmp_path)
    ca = _make_ca(tmp_path / "ca-made")
    for container in all_containers(spec["spec"]):
        if not _is_tether(container["image"]):
            continue
        for path, name in mounts(container).items():
            volume = volumes(spec)[name]
            host = tmp_path / "volumes" / name
            if path in made.binds:
                continue
            if not host.exists():
                if "configMap" in volume:
                    shutil.copytree(K8S / "base" / "config", host)
                elif "secret" in volume:
                    secret = volume["secret"]["secretName"]
                    data = secret_data(docs, secret)
                    base = re.sub(r"-[a-z0-9]{10}$", "", secret)  # kustomize's hash suffix
                    if base == "tether-upstream-keys":
                        data = {k: UPSTREAM_KEY for k in data}
                    elif base == "tether-ca":
                        data = ca
                    _secret_dir(host, data)
                else:
                    assert "emptyDir" in volume, name
                    _owned_dir(host)
            made.binds[path] = host
    # The kubelet makes the mount point of a volume mounted inside another.
    for path in made.binds:
        for parent, host in made.binds.items():
            if path != parent and path.startswith(parent + "/"):
                (host / path[len(parent) + 1:]).mkdir(parents=True, exist_ok=True)
    yield made
    for name in made.containers:
        buildah("rm", name, check=False)


def _is_tether(image: str) -> bool:
    """The overlays name the image where it was pushed (ghcr.io/example/tether:VERSION)."""
    return image.rsplit("/", 1)[-1].startswith("tether:")


def _container(name: str) -> dict[str, object]:
    spec, _ = tether_pod(rendered("sidecar"))
    (found,) = [c for c in all_containers(spec["spec"]) if c["name"] == name]
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _run_init_container(pod: Pod) -> subprocess.CompletedProcess[str]:
    init = _container("tether-ca")
    command = init["command"]
    assert isinstance(command, list)
    return buildah(*pod.run_args(init, {}), pod.container(), "--", *command, check=False)


def test_the_image_is_the_one_the_manifests_name(image: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay in OVERLAYS:
        spec, tether = tether_pod(rendered(overlay))
        assert tether["image"].rsplit("/", 1)[-1] == f"tether:{version}", overlay
    assert image.rsplit("/", 1)[-1] == f"tether:{version}"
    config = buildah("inspect", "--type", "image", "--format",
                     "{{.Docker.Config.User}} {{.Docker.Config.Entrypoint}} "
                     "{{.Docker.Config.Healthcheck}}", image).stdout
    assert config.startswith(f"{UID}:{UID} [tether]") and "healthz" in config, config


def test_the_image_ships_the_identity_libraries_of_every_clouds_lookups(pod: Pod) -> None:
    """Built with the azure and gcp extras: the Azure demo runs as uid 10001, tether looking
    the disks' tags up with azure-identity, and tether's own Google identity gets as far as
    google-auth's credential chain (not "install tether[gcp]")."""
    run = ("run", "--isolation", "chroot", "--network", "host", "--user", f"{UID}:{UID}")
    demo = buildah(*run, pod.container(), "--", "tether", "demo", "--cloud", "azure",
                   check=False, timeout=180)
    check_azure_demo(demo)
    env = [a for k, v in GCP_IDENTITY_ENV.items() for a in ("-e", f"{k}={v}")]
    google = buildah(*run, *env, pod.container(), "--", "python", "-c", GCP_IDENTITY_PROBE,
                     check=False)
    assert google.returncode == 0 and GCP_IDENTITY_FOUND in google.stdout, \
        google.stdout + google.stderr


def test_the_ca_init_container_refuses_placeholders_then_feeds_tether(pod: Pod) -> None:
    ca_secret = next(h for p, h in pod.binds.items() if p.endswith("tether-ca"))
    real = {f.name: f.read_text() for f in ca_secret.iterdir()}
    for f in ca_secret.iterdir():
        os.chmod(f, 0o640)
        f.write_text("PLACEHOLDER")
        os.chmod(f, 0o440)
    refused = _run_init_container(pod)
    assert refused.returncode != 0 and "placeholders" in refused.stderr, refused
    for name, text in real.items():
        os.chmod(ca_secret / name, 0o640)
        (ca_secret / name).write_text(text)
        os.chmod(ca_secret / name, 0o440)
    done = _run_init_container(pod)
    assert done.returncode == 0, done.stderr
    ca_dir = pod.binds["/var/lib/tether"] / "ca"
    assert (ca_dir / "mitmproxy-ca-cert.pem").read_text() == real["mitmproxy-ca-cert.pem"]
    assert oct((ca_dir / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"


def test_the_sidecar_serves_governs_and_stops_cleanly(pod: Pod) -> None:
    """The tether container with the manifest's args, volumes and user: probes, metrics, an
    allowed and a denied call at the base URL and through HTTPS_PROXY with the pod's CA,
    the Secret's key upstream, the audit on its volume, and exit 0 on SIGTERM in time."""
    assert _run_init_container(pod).returncode == 0
    tether = _container("tether")
    args = tether["args"]
    assert isinstance(args, list)
    ports = {p["name"]: p["containerPort"] for p in tether["ports"]}  # type: ignore[attr-defined]
    busy = [p for p in ports.values() if not _port_free(p)]
    assert not busy, f"ports {busy} are in use on this machine; the container needs them"
    fake = janitor_upstream()
    with ThreadedServer(fake.app()) as upstream:
        env = {"TETHER_ADMIN_TOKEN": "image-test-token",
               "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}",
               "TETHER_UPSTREAM_ANTHROPIC": f"http://127.0.0.1:{upstream}",
               "POD_NAME": "agent-7d9f8-x2k4p"}   # the downward API's metadata.name
        name = pod.container()
        checked = buildah(*pod.run_args(tether, env), name, "--", "tether", "check",
                          "/etc/tether/tether.yaml", check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = (pod.root / "tether.log").open("w")
        shipped = (pod.root / "stdout.jsonl").open("w")   # what the node's log collector reads
        proc = subprocess.Popen(["buildah", *pod.run_args(tether, env), name, "--", "tether",
                                 *args], stdout=shipped, stderr=log)
        try:
            admin = f"http://127.0.0.1:{ports['admin']}"
            wait_ready(admin, deadline=60)
            check_governed(f"http://127.0.0.1:{ports['proxy']}/openai/v1")
            ca = pod.binds["/var/lib/tether"] / "ca" / "mitmproxy-ca-cert.pem"
            check_forwarded(f"http://127.0.0.1:{ports['forward']}", ca)
            check_admin(admin)
            health = buildah("run", "--isolation", "chroot", "--network", "host", "--user",
                             f"{UID}:{UID}", pod.container(), "--", "python", "-c",
                             _healthcheck_script(), check=False)
            assert health.returncode == 0, health.stderr
            writable, left = _writable_outside_volumes(name, tether)
            pid = _tether_pid()
            started = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            code = proc.wait(GRACE_S)
            took = time.monotonic() - started
        finally:
            for stray in _tether_pids():   # buildah's child outlives a killed buildah
                os.kill(stray, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
            shipped.close()
        output = (pod.root / "tether.log").read_text()
        assert code == 0, output
        assert took < GRACE_S, took
    check_upstream_saw(fake, 2, key=UPSTREAM_KEY)
    audit = pod.binds["/var/lib/tether/audit"] / "audit.jsonl"
    assert audit_actions(audit) == ["allow", "deny", "allow", "deny"]
    # The overlay's sink: the container's stdout is the spool's records, in order, nothing
    # else, one chain named after the pod, and the central copy's check accepts it.
    stdout = (pod.root / "stdout.jsonl").read_text(encoding="utf-8")
    assert stdout == audit.read_text(encoding="utf-8"), stdout
    assert {json.loads(line)["instance"].rsplit("-", 1)[0] for line in stdout.splitlines()} \
        == {"agent-7d9f8-x2k4p"}, stdout
    checked = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", "--merged", "-"],
                             input=stdout, capture_output=True, text=True, check=False,
                             cwd=ROOT, timeout=60)
    assert checked.returncode == 0 and "1 instance(s)" in checked.stdout, checked
    # Debian's /var/tmp (1777) is all a read-only root would take away, and tether left it empty.
    assert writable <= {"/var/tmp"} and left == "", (writable, left)


def _healthcheck_script() -> str:
    """The image's own HEALTHCHECK command (python -c ...), as the engine would run it."""
    out = buildah("inspect", "--type", "image", "--format", "{{.Docker.Config.Healthcheck.Test}}",
                  IMAGE).stdout
    match = re.search(r"-c (import .*)\]", out)
    assert match, out
    return match.group(1)


def _tether_pids() -> list[int]:
    """tether's own process in the container (chroot isolation shares the PID namespace)."""
    out = subprocess.run(["pgrep", "-u", str(UID), "-f", "^/opt/tether/bin/python .*tether serve"],
                         capture_output=True, text=True, check=False).stdout.split()
    return [int(p) for p in out]


def _tether_pid() -> int:
    (pid,) = _tether_pids()
    return pid


def _writable_outside_volumes(name: str, tether: dict[str, object]) -> tuple[set[str], str]:
    """What uid 10001 can write in container `name` beyond the manifest's volumes (a
    read-only root allows none of it), and what is in those places after the run."""
    script = ("find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \\) -prune "
              "-o -writable ! -type l -print 2>/dev/null; echo ---; ls -A /var/tmp")
    out = buildah("run", "--isolation", "chroot", "--network", "host", "--user", f"{UID}:{UID}",
                  name, "--", "sh", "-c", script, check=False).stdout
    listed, _, left = out.partition("---\n")
    volumes_at = [*mounts(tether), "/var/lib/tether"]
    found = {line for line in listed.splitlines()
             if not any(line == v or line.startswith(v + "/") for v in volumes_at)}
    return found, left.strip()


def test_the_overlays_render_and_validate() -> None:
    done = validate(*(K8S / "overlays" / o for o in OVERLAYS))
    assert done.returncode == 0, done.stdout + done.stderr
