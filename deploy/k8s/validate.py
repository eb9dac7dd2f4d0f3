"""Render kustomize overlays and validate every resource strictly, offline.

    python deploy/k8s/validate.py deploy/k8s/overlays/sidecar [...]

Each overlay is rendered with `kubectl kustomize` (the kustomize built into kubectl), then:
- built-in kinds go to `kubernetes-validate --strict` (unknown fields and wrong types are
  errors) for the oldest Kubernetes tether supports (1.29: native sidecars on by default)
  and the newest the validator knows;
- custom resources have no schema there: kubernetes-validate would only print a WARN and
  pass. So a WARN counts as a failure, and the CRDs tether ships (ServiceMonitor) are
  checked against the strict schemas vendored in deploy/k8s/schemas/ instead.
Exit status: 0 all valid, 1 a resource is invalid, 2 a tool is missing or rendering failed.
`make k8s-validate` and tests/test_k8s.py both run this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# (apiVersion, kind) -> the vendored schema that checks it.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        HERE / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json",
}


class ToolMissing(Exception):
    pass


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name   # the venv's console script
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} not found: install it (kubectl ships kustomize; "
                          f"kubernetes-validate is in tether's dev extras)")
    return found


def render(overlay: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ToolMissing("kubectl not found on PATH: install kubectl >= 1.27 (it renders the "
                          "overlays with its built-in kustomize; no cluster is needed)")
    done = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ToolMissing(f"kubectl kustomize {overlay} failed:\n{done.stderr.strip()}")
    return done.stdout


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def check_crd(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{_name(doc)}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def check_builtin(docs: list[dict[str, Any]]) -> list[str]:
    if not docs:
        return []
    validate = _tool("kubernetes-validate")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "rendered.yaml"
        file.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
        args = [validate, "--strict", "--quiet"]
        for version in KUBERNETES_VERSIONS:
            args += ["-k", version]
        done = subprocess.run([*args, str(file)], capture_output=True, text=True, check=False)
    lines = [line.replace(str(file), "rendered") for line in
             (done.stdout + done.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if not line.startswith("INFO")]
    if done.returncode != 0 and not problems:
        problems = [f"kubernetes-validate exited {done.returncode}"]
    return problems


def check(overlay: Path) -> tuple[int, list[str]]:
    """(resources checked, problems) for one rendered overlay."""
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    problems: list[str] = []
    builtin: list[dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            problems.append(f"not a Kubernetes resource: {str(doc)[:80]}")
        elif (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            problems += check_crd(doc)
        else:
            builtin.append(doc)
    problems += check_builtin(builtin)
    return len(docs), problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overlays", nargs="+", type=Path)
    args = p.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        try:
            count, problems = check(overlay)
        except ToolMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"{overlay}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            print(f"ok: {overlay}: {count} resources valid (Kubernetes "
                  f"{' and '.join(KUBERNETES_VERSIONS)}, strict)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
