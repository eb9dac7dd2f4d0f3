"""The Dockerfile (no Docker engine here): hadolint passes and can fail, and what the image
declares matches what tether reads: the command line, the config it ships, its ports, its
writable paths, its user, the health check (run for real against a live tether)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from proxy import cli, config
from proxy.server.admin import OPEN_PATHS
from tests.redis_server import free_port
from tests.test_k8s import get, serve_tether

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGE_CONFIG = ROOT / "deploy" / "k8s" / "base" / "config"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


INSTRUCTIONS = instructions(DOCKERFILE.read_text())


def args_of(name: str) -> list[str]:
    return [rest for word, rest in INSTRUCTIONS if word == name]


def runtime(name: str) -> list[str]:
    """Only the final stage's instructions."""
    last = max(i for i, (word, _) in enumerate(INSTRUCTIONS) if word == "FROM")
    return [rest for word, rest in INSTRUCTIONS[last:] if word == name]


def exec_form(name: str) -> list[str]:
    (value,) = runtime(name)
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    """The config the image ships at /etc/tether, loaded with the container's absolute paths
    under a temporary root (its key files are mounted Secrets: made up here)."""
    tmp = tmp_path_factory.mktemp("image")
    for f in IMAGE_CONFIG.iterdir():
        text = f.read_text()
        if f.name == "tether.yaml":
            text = re.sub(r"(?<=[ :\[])/(var|tmp)/", lambda m: f"{tmp}/{m.group(1)}/", text)
            for key_file in re.findall(rf"api_key_file: ({re.escape(str(tmp))}\S+?)[,}}]", text):
                Path(key_file).parent.mkdir(parents=True, exist_ok=True)
                Path(key_file).write_text("k")
        (tmp / f.name).write_text(text)
    return config.load(tmp / "tether.yaml", env={})


def unroot(path: str, cfg: config.Config) -> str:
    assert cfg.source is not None
    return "/" + Path(path).relative_to(Path(cfg.source).parent).as_posix()


def test_hadolint_passes() -> None:
    done = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hadolint Dockerfile" in (ROOT / "Makefile").read_text()


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3015"):
        assert rule in done.stdout


def test_every_ignored_finding_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, "say why"


def test_the_base_image_is_python_312_slim_pinned_by_tag() -> None:
    (arg,) = [a for a in args_of("ARG") if a.startswith("PYTHON_IMAGE=")]
    image = arg.partition("=")[2]
    assert re.fullmatch(r"python:3\.12(\.\d+)?-slim(-[a-z]+)?", image), image
    froms = args_of("FROM")
    assert len(froms) == 2 and all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)


def test_the_image_installs_every_cloud_extra() -> None:
    """A sidecar that judges every cloud ships each lookup's identity library: the build
    installs tether with every extra but dev (tests/test_image.py checks they work there)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (install,) = [r for r in args_of("RUN") if "pip install" in r]
    named = re.search(r"pip install '\.\[([a-z0-9,]+)\]'", install)
    assert named is not None, install
    assert sorted(named.group(1).split(",")) == sorted(set(extras) - {"dev"})


def test_entrypoint_and_cmd_parse_with_tethers_cli() -> None:
    assert exec_form("ENTRYPOINT") == ["tether"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tether"] == "proxy.cli:main"
    args = cli.parser().parse_args(exec_form("CMD"))
    assert args.func is cli.cmd_serve
    assert args.config == "/etc/tether/tether.yaml"
    assert args.forward_port == 8081
    assert "deploy/k8s/base/config/ /etc/tether/" in runtime("COPY")


def test_exposed_ports_are_the_ones_tether_listens_on(shipped: config.Config) -> None:
    cfg = shipped
    args = cli.parser().parse_args(exec_form("CMD"))
    (exposed,) = runtime("EXPOSE")
    transparent = cli.parser().parse_args(
        ["serve", "--config", "x", "--transparent-port", "15001"]).transparent_port
    assert {int(p) for p in exposed.split()} == {cfg.port, cfg.admin_port, args.forward_port,
                                                 transparent}


def test_the_user_is_tether_10001_and_not_root() -> None:
    (user,) = runtime("USER")
    assert user == "10001:10001"   # numeric, so Kubernetes can check runAsNonRoot
    (setup,) = [r for r in runtime("RUN") if "useradd" in r]
    assert "groupadd --system --gid 10001 tether" in setup
    assert re.search(r"useradd .*--uid 10001 --gid 10001 .*tether\b", setup)


def test_the_writable_paths_are_the_configs(shipped: config.Config) -> None:
    cfg = shipped
    assert cfg.audit_path is not None
    (volume,) = runtime("VOLUME")
    declared = set(json.loads(volume))
    state = "/var/lib/tether"
    assert declared == {state, "/tmp"}   # one state volume: nested VOLUMEs shadow a parent mount
    assert PurePosixPath(state) in PurePosixPath(unroot(cfg.forward.ca_dir, cfg)).parents
    assert PurePosixPath(state) in PurePosixPath(unroot(cfg.audit_path, cfg)).parents
    (setup,) = [r for r in runtime("RUN") if "useradd" in r]
    owned = re.findall(r"install -d -o 10001 -g 10001 -m (\d+) ([^&]+)", setup)
    made = {path: mode for mode, paths in owned for path in paths.split()}
    assert made[unroot(cfg.forward.ca_dir, cfg)] == "0700"
    assert str(PurePosixPath(unroot(cfg.audit_path, cfg)).parent) in made
    env = " ".join(runtime("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env


def test_iptables_is_installed_lean_for_the_redirect_init_container() -> None:
    (apt,) = [r for r in runtime("RUN") if "apt-get" in r]
    assert "apt-get install -y --no-install-recommends iptables" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt
    assert "COPY --chmod=0755 deploy/transparent/tether-redirect /usr/local/bin/tether-redirect" \
        in [f"COPY {c}" for c in runtime("COPY")]


def _healthcheck() -> tuple[list[str], str]:
    (value,) = runtime("HEALTHCHECK")
    options, _, command = value.partition("CMD ")
    argv = json.loads(command)
    (url,) = re.findall(r"'(http://[^']+)'", argv[-1])
    return argv, url


def test_the_healthcheck_needs_no_curl_and_probes_an_open_admin_route(
        shipped: config.Config) -> None:
    argv, url = _healthcheck()
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2]
    assert not {"curl", "wget"} & set(shlex.split(" ".join(argv)))
    cfg = shipped
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", url)
    assert match is not None
    assert int(match.group(1)) == cfg.admin_port
    assert match.group(2) == "/healthz" in OPEN_PATHS


def test_the_healthcheck_passes_on_a_live_tether_and_fails_without_one(tmp_path: Path) -> None:
    argv, url = _healthcheck()
    conf = tmp_path / "tether.yaml"
    conf.write_text(f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
                    f"forward: {{ca_dir: {tmp_path / 'ca'}}}\n")
    with serve_tether(conf, ["serve"], {}) as bound:
        live = url.replace(":9090/", f":{bound['admin-port']}/")
        assert get(live)[0] == 200
        ok = subprocess.run([sys.executable, "-c", argv[2].replace(url, live)], check=False,
                            capture_output=True)
        assert ok.returncode == 0, ok.stderr
    down = url.replace(":9090/", f":{free_port()}/")
    failed = subprocess.run([sys.executable, "-c", argv[2].replace(url, down)], check=False,
                            capture_output=True)
    assert failed.returncode != 0


# ---- .dockerignore: what reaches the build context -----------------------------------------

def _pattern(body: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(body):
        if body.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif body.startswith("**", i):
            out, i = out + ".*", i + 2
        elif body[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif body[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(body[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        body = line.lstrip("!").strip("/")
        if any(_pattern(body).match(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "audit.jsonl", "rules/audit.jsonl.1",
    ".tether/ca/mitmproxy-ca.pem", "rules/.tether/ca/mitmproxy-ca.pem",
    "deploy/k8s/base/config/mitmproxy-ca.pem", "proxy/__pycache__/cli.cpython-312.pyc",
    "tests/test_k8s.py", "deploy/k8s/base/kustomization.yaml", "secrets/openai.key",
])
def test_secrets_state_and_the_venv_stay_out_of_the_build_context(path: str) -> None:
    assert ignored(path)


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    sources = []
    for value in args_of("COPY"):
        words = [w for w in value.split() if not w.startswith("--")]
        if "--from=" not in value:
            sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not ignored(rel), rel
