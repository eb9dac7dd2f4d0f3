"""What ships runs: the wheel, built from this tree and installed into a fresh venv (not
editable), used from a directory outside the source tree so nothing but the install is on
`sys.path`. Every other test runs the editable checkout; these are the ones that see a file
missing from the package data, a dependency missing from the metadata, or a console script
that does not start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.threaded import ThreadedServer
from tests.installed import (
    GCP_IDENTITY_ENV,
    GCP_IDENTITY_PROBE,
    audit_actions,
    check_admin,
    check_azure_demo,
    check_forwarded,
    check_governed,
    check_upstream_saw,
    janitor_upstream,
    read_banner,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = ("rules/tether.yaml", "deploy/k8s/base/config/tether.yaml")


@dataclass(frozen=True)
class Install:
    wheel: Path
    venv: Path
    workdir: Path   # outside the source tree: the cwd of every command

    @property
    def tether(self) -> str:
        return str(self.venv / "bin" / "tether")

    def run(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=self.workdir, env=env or clean_env(), text=True,
                              capture_output=True, timeout=120)


def clean_env() -> dict[str, str]:
    """The environment without this venv or the source tree on any path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and "proxy" not in k.lower()}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(ROOT)))
    return env


def as_cloned(dest: Path) -> Path:
    """The files a fresh clone of this tree would hold (tracked and new, not ignored), so no
    build leftover (an editable install's egg-info lists data files setuptools would then
    include whatever package-data says) hides a file the package data misses."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_wheel(dest: Path) -> Path:
    """`pip wheel` of a clean copy of this tree, as a user or the image build runs it."""
    src = as_cloned(dest / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest),
                    str(src)], check=True, cwd=dest, env=clean_env(), timeout=300)
    (wheel,) = dest.glob("tether-*.whl")
    return wheel


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    top = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(top)
    venv = top / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--no-compile", "--disable-pip-version-check", f"{wheel}[azure]"],
                   check=True, cwd=top, env=clean_env(), timeout=600)
    workdir = top / "work"
    workdir.mkdir()
    yield Install(wheel, venv, workdir)
    shutil.rmtree(top, ignore_errors=True)


def tracked_data_files() -> set[str]:
    """Every file under proxy/ that git tracks and that is not Python source."""
    out = subprocess.run(["git", "ls-files", "proxy"], cwd=ROOT, check=True, text=True,
                         capture_output=True).stdout.split()
    return {p for p in out if not p.endswith(".py")}


def test_every_tracked_data_file_is_in_the_wheel(install: Install) -> None:
    data = tracked_data_files()
    assert "proxy/sessions/prices.yaml" in data  # the file whose absence broke every install
    with zipfile.ZipFile(install.wheel) as whl:
        names = set(whl.namelist())
    missing = sorted(data - names)
    assert not missing, f"tracked under proxy/ but not in the wheel: {missing}"


def test_missing_data_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a wheel without a data file is reported by name."""
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as whl:
        whl.writestr("proxy/__init__.py", "")
    with zipfile.ZipFile(bad) as whl:
        assert "proxy/sessions/prices.yaml" in tracked_data_files() - set(whl.namelist())


def test_the_install_is_what_runs(install: Install) -> None:
    out = install.run(str(install.venv / "bin" / "python"), "-c",
                      "import proxy, sys; print(proxy.__file__); print(sys.path)")
    assert out.returncode == 0, out.stderr
    where = Path(out.stdout.splitlines()[0])
    assert where.is_relative_to(install.venv), where
    assert str(ROOT) not in out.stdout.splitlines()[1]
    deps = install.run(str(install.venv / "bin" / "python"), "-m", "pip", "check")
    assert deps.returncode == 0, deps.stdout + deps.stderr


def deploy_config_here(workdir: Path) -> Path:
    """The sidecar's config with its container paths (the mounted Secret's key files, the
    state and audit volumes) moved under `workdir`; everything else as shipped. The image
    test checks it unmodified, with the Secret mounted where the manifest mounts it."""
    src = ROOT / "deploy/k8s/base/config"
    dst = workdir / "deploy-config"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    secrets = workdir / "secrets"
    secrets.mkdir(exist_ok=True)
    text = (dst / "tether.yaml").read_text()
    for name in re.findall(r"/var/run/secrets/tether/(\w+)", text):
        (secrets / name).write_text(f"sk-{name}-from-the-secret\n")
    text = text.replace("/var/run/secrets/tether", str(secrets))
    text = text.replace("/var/lib/tether", str(workdir / "state"))
    (dst / "tether.yaml").write_text(text)
    return dst / "tether.yaml"


def test_check_accepts_every_shipped_config(install: Install) -> None:
    configs = [str(ROOT / c) for c in SHIPPED_CONFIGS[:1]]
    configs.append(str(deploy_config_here(install.workdir)))
    out = install.run(install.tether, "check", *configs)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": ok (") == len(configs), out.stdout
    tests = sorted(str(p) for p in (ROOT / "rules/tests").glob("*.yaml"))
    out = install.run(install.tether, "test", *tests)
    assert out.returncode == 0, out.stdout + out.stderr
    out = install.run(install.tether, "opa-test", str(ROOT / "rules/opa"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_demo_runs_on_embedded_defaults(install: Install) -> None:
    out = install.run(install.tether, "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 calls allowed, 1 held for a human, 2 denied" in out.stdout


def test_the_azure_demo_runs_with_the_azure_extra(install: Install) -> None:
    """Installed as `tether[azure]`: the extra's metadata pulls azure-identity in, and the
    Azure leg of the demo looks the disks' tags up with it (the production-candidate disk
    survives)."""
    check_azure_demo(install.run(install.tether, "demo", "--cloud", "azure"))


def test_without_the_gcp_extra_a_google_lookup_says_what_to_install(install: Install) -> None:
    """The gcp extra is not installed here: tether's Google identity fails (a lookup denies)
    naming the extra, rather than an ImportError escaping."""
    out = install.run(str(install.venv / "bin" / "python"), "-c", GCP_IDENTITY_PROBE,
                      env={**clean_env(), **GCP_IDENTITY_ENV})
    assert out.returncode == 0, out.stderr
    assert "pip install 'tether[gcp]'" in out.stdout, out.stdout


def test_check_still_fails_on_a_bad_config(install: Install) -> None:
    bad = install.workdir / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    match: {tool: a}\n    action: maybe\n")
    out = install.run(install.tether, "check", str(bad))
    assert out.returncode == 1 and f"{bad}:4" in out.stderr, out.stderr


def test_serve_governs_through_base_url_and_forward_proxy(install: Install) -> None:
    """`tether serve` from the install, with the sidecar's config: an allowed and a denied
    call through the official SDK at the base URL and through HTTPS_PROXY with the CA it
    wrote; tether's key upstream, never the agent's; health, metrics, a clean SIGTERM."""
    config = deploy_config_here(install.workdir)
    (install.workdir / "state" / "audit").mkdir(parents=True, exist_ok=True)
    fake = janitor_upstream()
    with ThreadedServer(fake.app()) as upstream:
        env = {**clean_env(), "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}",
               "TETHER_ADMIN_TOKEN": "admin-token", "POD_NAME": "agent-7d9f8-x2k4p"}
        proc = subprocess.Popen(
            [install.tether, "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", "0", "--admin-port", "0", "--forward-port", "0"],
            cwd=install.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            ports = read_banner(proc, stderr=True)  # stdout is the audit stream
            assert ports.forward is not None
            admin = f"http://127.0.0.1:{ports.admin}"
            wait_ready(admin)
            check_governed(f"http://127.0.0.1:{ports.proxy}/openai/v1")
            ca_file = install.workdir / "state" / "ca" / "mitmproxy-ca-cert.pem"
            assert ca_file.is_file()
            check_forwarded(f"http://127.0.0.1:{ports.forward}", ca_file)
            check_admin(admin)
        finally:
            proc.terminate()
            shipped, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    check_upstream_saw(fake, 2, key="sk-openai-from-the-secret")
    spool = install.workdir / "state" / "audit" / "audit.jsonl"
    actions = audit_actions(spool)
    assert actions == ["allow", "deny", "allow", "deny"], actions
    # The shipped default: every record of the spool on stdout, in order, nothing else, one
    # chain named after the pod, which the central copy's check accepts.
    assert shipped == spool.read_text(encoding="utf-8"), shipped
    instances = {json.loads(line)["instance"] for line in shipped.splitlines()}
    assert len(instances) == 1 and instances.pop().startswith("agent-7d9f8-x2k4p"), shipped
    checked = subprocess.run([install.tether, "audit", "verify", "--merged", "-"],
                             input=shipped, capture_output=True, text=True, cwd=install.workdir,
                             env=clean_env(), timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 instance(s)" in checked.stdout, checked.stdout
