"""A `tether serve` subprocess whose config the test edits the ways operators do: a plain
overwrite, an editor's rename-over, and the kubelet's `..data` symlink swap of a
ConfigMap volume (a timestamped directory, a `..data_tmp` symlink renamed over
`..data`, the files symlinks into `..data`, the old directory removed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.installed import Ports, read_banner

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "reload-test-token"


class ConfigDir:
    """The config as files in `root`: `tether.yaml` including `rules.yaml`."""

    def __init__(self, root: Path, how: str) -> None:
        self.root, self.how, self.n = root, how, 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def main(self) -> Path:
        return self.root / "tether.yaml"

    def write(self, files: dict[str, str]) -> None:
        if self.how == "kubelet":
            self._kubelet(files)
            return
        for name, text in files.items():
            target = self.root / name
            if self.how == "rename" and target.exists():
                tmp = self.root / f".{name}.swp"
                tmp.write_text(text)
                os.replace(tmp, target)
            else:
                target.write_text(text)

    def _kubelet(self, files: dict[str, str]) -> None:
        """What the kubelet's atomic writer does (k8s.io/kubernetes/pkg/volume/util/
        atomic_writer.go): every file of the ConfigMap, changed or not, in a new
        directory; `..data` swapped in one rename; the old directory removed."""
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        current = {p.name: p.read_text() for p in (self.root / old).iterdir()} if old else {}
        self.n += 1
        stamp = self.root / f"..2024_01_01_00_00_{self.n:02d}.{os.getpid()}"
        stamp.mkdir()
        for name, text in {**current, **files}.items():
            (stamp / name).write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(stamp.name, tmp)
        os.rename(tmp, data)
        for name in {**current, **files}:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old:
            shutil.rmtree(self.root / old)


class Served:
    """`tether serve --config DIR/tether.yaml` with the admin token set."""

    def __init__(self, config: Path, upstream_port: int, log: Path) -> None:
        env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream_port}",
               "TETHER_ADMIN_TOKEN": TOKEN}
        self.stderr = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
             "--admin-port", "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True)
        self.log = log
        self.ports: Ports = read_banner(self.proc)
        self.base_url = f"http://127.0.0.1:{self.ports.proxy}/openai/v1"
        self.admin_url = f"http://127.0.0.1:{self.ports.admin}"

    def admin(self, method: str, path: str, body: dict[str, object] | None = None,
              token: str | None = TOKEN) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.admin_url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=10) as r:
            return str(r.read().decode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.stderr.close()
        return code


def until(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started


def records(audit: Path, kind: str | None = None) -> list[dict[str, object]]:
    out = []
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        if kind is None or record.get("kind") == kind:
            out.append(record)
    return out
