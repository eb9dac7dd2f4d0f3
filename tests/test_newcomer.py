"""The newcomer path: a fresh clone of this tree, the README's first commands, the story.

The copy holds what a clone would (tests/test_wheel.py's `as_cloned`: tracked and new
files, nothing ignored), so a file the demo needs but git ignores fails here. `make demo`
runs in the copy for real; only the virtualenv is this checkout's (VENV=, with `-o` so
make never reinstalls into it: a fresh `make setup` downloads every dependency and takes
minutes), and PYTHONPATH puts the copy's `proxy` first, so the copy's code is what runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_wheel import as_cloned

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)


def first_commands(readme: str) -> list[str]:
    """The commands of the README's first fenced block, comments dropped."""
    match = re.search(r"^```\w*\n(.*?)^```", readme, re.S | re.M)
    assert match, "the README has no fenced block"
    return [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()
            if line.split("#", 1)[0].strip()]


def make(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "MAKE"))}
    env["PYTHONPATH"] = str(clone)
    env["TMPDIR"] = str(clone.parent)   # the demo's audit log stays inside the test's tmp
    return subprocess.run(["make", "--no-print-directory", f"VENV={VENV}",
                           "-o", f"{VENV}/.installed", *args],
                          cwd=clone, env=env, text=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("make"):
        pytest.skip("no make here")
    return as_cloned(tmp_path_factory.mktemp("newcomer") / "tether")


def test_the_readme_starts_with_make_demo_and_make_test(clone: Path) -> None:
    assert first_commands((clone / "README.md").read_text(encoding="utf-8")) == [
        "make demo", "make test"]


def test_make_test_runs_the_suite(clone: Path) -> None:
    planned = make(clone, "-n", "test")
    assert planned.returncode == 0, planned.stderr
    assert f"{VENV}/bin/pytest -q" in planned.stdout


def test_make_demo_in_a_fresh_clone_tells_the_readme_story(clone: Path) -> None:
    started = time.monotonic()
    done = make(clone, "demo")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 60, took
    out = done.stdout
    readme = (clone / "README.md").read_text(encoding="utf-8")
    story = re.search(r"^```text\n(.*?)^```", readme, re.S | re.M)
    assert story, "the README shows no story output"
    for line in story.group(1).splitlines():
        if line.strip().startswith(("deleted in the cloud", "still in the cloud")):
            assert line.strip() in out, line
        elif re.match(r"\s+\d+\s", line):   # one decision: number, tool, verdict, rules
            no, tool, verdict, *rules = line.split(maxsplit=3)
            row = next((r for r in out.splitlines() if r.split()[:2] == [no, tool]), None)
            assert row is not None and verdict in row.split(), (line, out)
            if rules and rules[0] != "-":
                assert rules[0] in row, (line, row)
    # The Azure leg's block (the second): its rows and lines as the demo prints them.
    azure = re.findall(r"^```text\n(.*?)^```", readme, re.S | re.M)[1]
    assert "still in ARM:" in azure
    for line in azure.splitlines():
        if line.strip():
            assert line.rstrip() in out, (line, out)


def test_the_clone_runs_its_own_code(clone: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(clone)}
    where = subprocess.run([str(VENV / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
                           cwd=clone, env=env, text=True, capture_output=True, timeout=60)
    assert where.stdout.strip() == str(clone / "proxy" / "__init__.py"), where
