"""Every example in README.md and docs/*.md runs, and every relative link resolves.

A fenced block is an example when the line before it is a marker comment:

    <!-- example: KIND [file=PATH] -->

yaml blocks, all of which must be marked (an unmarked one fails, so nothing is skipped):
  config       a whole config file, loaded with proxy.config.load
  rules        a rule file, loaded through a config that includes it
  broken       a config that must fail to load (a documented error message)
  policy-test  a `tether test` file, run with `tether test` (every case must pass)
  foreign      YAML for another program (Kubernetes, a collector): it must parse
  data         a file a later command reads (with file=): it must parse
  fragment     an illustrative piece of a config, not loadable alone
sh blocks:
  run          each command runs (bash, cwd the page's sandbox); it must exit 0, or N
               when its line ends with `# exit N`
text blocks:
  output       right after a run block: each non-blank line appears in what it printed

Each page gets one sandbox, a directory holding a copy of the repository's rules/, so
examples may include `janitor.yaml` or name `openapi/jira.yaml` as the example config
does. Blocks run in page order: `file=` writes a block where later commands find it
(relative to the sandbox; unnamed config and rule blocks go to rules/).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from proxy.config import load
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
YAML_KINDS = {"config", "rules", "broken", "policy-test", "foreign", "data", "fragment"}
MARKER = re.compile(r"^<!-- example: ([a-z-]+)((?: [a-z]+=\S+)*) -->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int             # of the opening fence, 1-based
    lang: str
    text: str
    kind: str | None      # from the marker, None when unmarked
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        prev = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = MARKER.match(prev)
        kind = marker.group(1) if marker else None
        attrs = dict(a.split("=", 1) for a in marker.group(2).split()) if marker else {}
        yield Block(page, start + 1, lang, "\n".join(body) + "\n", kind, attrs)


def commands(script: str) -> Iterator[tuple[str, int]]:
    """Each command of a run block with the exit code it must end with."""
    pending = ""
    for raw in script.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        expect = re.search(r"#\s*exit (\d+)\b", line)
        yield line, int(expect.group(1)) if expect else 0


class Sandbox:
    def __init__(self, top: Path) -> None:
        self.top = top
        shutil.copytree(ROOT / "rules", top / "rules")
        self.count = 0
        self.output: str | None = None   # what the run block just before printed

    def write(self, block: Block, default_dir: str = "rules") -> Path:
        self.count += 1
        name = block.attrs.get("file", f"{default_dir}/_example_{self.count}.yaml")
        path = self.top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text, encoding="utf-8")
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "OTEL_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", cmd], cwd=self.top, env=self.env(), text=True,
                              capture_output=True, timeout=60)


def run_block(box: Sandbox, block: Block) -> str | None:
    """What is wrong with one example, or None."""
    kind = block.kind
    output, box.output = box.output, None
    if block.lang == "yaml" and kind not in YAML_KINDS:
        return (f"unmarked yaml block: put <!-- example: KIND --> before it "
                f"(one of {', '.join(sorted(YAML_KINDS))})" if kind is None
                else f"unknown kind {kind!r} for a yaml block")
    if kind is None or kind == "fragment":
        return None
    if kind in ("foreign", "data"):
        try:
            list(yaml.safe_load_all(block.text))
        except yaml.YAMLError as e:
            return f"not valid YAML: {e}"
        if kind == "data":
            box.write(block)
        return None
    if kind == "config":
        try:
            load(box.write(block), env={})
        except ConfigError as e:
            return f"does not load: {e}"
        return None
    if kind == "rules":
        rules = box.write(block)
        main = rules.parent / f"_include_{box.count}.yaml"
        main.write_text(f"include: [{rules.name}]\naudit: {{path: null}}\n", encoding="utf-8")
        try:
            load(main, env={})
        except ConfigError as e:
            return f"does not load through include: {e}"
        return None
    if kind == "broken":
        path = box.write(block)
        try:
            load(path, env={})
        except ConfigError:
            return None
        return "loads, but the page says it is an error"
    if kind == "policy-test":
        path = box.write(block, default_dir="rules/tests")
        done = box.run(f"tether test {shlex.quote(str(path))}")
        if done.returncode != 0:
            return f"tether test exited {done.returncode}: {done.stdout}{done.stderr}"
        return None
    if kind == "run":
        said = ""
        for cmd, code in commands(block.text):
            done = box.run(cmd)
            said += done.stdout + done.stderr
            if done.returncode != code:
                return f"`{cmd}` exited {done.returncode}, not {code}: {done.stdout}{done.stderr}"
        box.output = said
        return None
    if kind == "output":
        if output is None:
            return "an output block must come right after a run block"
        said = " ".join(output.split())
        missing = [ln.strip() for ln in block.text.splitlines()
                   if ln.strip() and " ".join(ln.split()) not in said]
        return f"not in the output of the run block before it: {missing}" if missing else None
    return f"unknown kind {kind!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_on_the_page_runs(page: Path) -> None:
    with tempfile.TemporaryDirectory() as top:
        box = Sandbox(Path(top))
        problems = [f"{b.where}: {why}" for b in blocks(page) if (why := run_block(box, b))]
    assert not problems, "\n".join(problems)


def test_the_docs_have_runnable_examples() -> None:
    """The convention is in use: the pages load configs and run commands, not only fragments."""
    kinds = [b.kind for page in PAGES for b in blocks(page)]
    for kind in ("config", "rules", "run", "output", "policy-test", "broken"):
        assert kind in kinds, kind


# -- the harness itself: each kind can fail ---------------------------------------------

def page_of(tmp_path: Path, text: str) -> list[str]:
    """What is wrong with each example of a page holding `text`."""
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    box = Sandbox(tmp_path / "sandbox")
    return [why for b in blocks(page) if (why := run_block(box, b))]


@pytest.mark.parametrize(("text", "expect"), [
    ("```yaml\nrules: []\n```\n", "unmarked yaml block"),
    ("<!-- example: config -->\n```yaml\nrules: [{id: a, match: {tool: x}, action: maybe}]\n```\n",
     "does not load"),
    ("<!-- example: rules -->\n```yaml\nrules: [{id: a, match: {tool: x}, actoin: deny}]\n```\n",
     "does not load through include"),
    ("<!-- example: broken -->\n```yaml\nrules: []\n```\n", "loads, but"),
    ("<!-- example: foreign -->\n```yaml\na: [\n```\n", "not valid YAML"),
    ("<!-- example: run -->\n```sh\ntrue\nfalse\n```\n", "`false` exited 1, not 0"),
    ("<!-- example: run -->\n```sh\ntrue   # exit 1\n```\n", "exited 0, not 1"),
    ("<!-- example: run -->\n```sh\necho 'rules/tether.yaml: ok'\n```\n"
     "<!-- example: output -->\n```text\nrules/tether.yaml: broken\n```\n", "not in the output"),
    ("<!-- example: run -->\n```sh\necho ok\n```\n<!-- example: fragment -->\n```yaml\na: 1\n```\n"
     "<!-- example: output -->\n```text\nok\n```\n", "must come right after a run block"),
    ("<!-- example: policy-test -->\n```yaml\nconfig: ../tether.yaml\n"
     "cases: [{tool: list_volumes, expect: deny}]\n```\n", "tether test exited 1"),
])
def test_the_harness_fails_a_bad_example(tmp_path: Path, text: str, expect: str) -> None:
    problems = page_of(tmp_path, text)
    assert len(problems) == 1 and expect in problems[0], problems


def test_the_harness_passes_good_examples(tmp_path: Path) -> None:
    text = ("<!-- example: rules file=rules/mine.yaml -->\n```yaml\n"
            "rules: [{id: no-drop, match: {tool: drop_*}, action: deny}]\n```\n"
            "<!-- example: run -->\n```sh\ngrep -c no-drop \\\n  rules/mine.yaml\n"
            "ls rules/nope.yaml   # exit 2\n```\n"
            "<!-- example: output -->\n```text\n1\n```\n")
    assert page_of(tmp_path, text) == []


# -- links -------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped,
    spaces to `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    fence = None
    for line in page.read_text(encoding="utf-8").split("\n"):
        m = FENCE.match(line)
        if m:
            fence = None if fence and line.strip().startswith(fence) else (fence or m.group(2))
            continue
        if fence is not None:
            continue
        out.update(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", line))
        h = re.match(r"^#{1,6} (.+?)\s*#*$", line)
        if h:
            base = slug(h.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> Iterator[tuple[int, str]]:
    fence = None
    for no, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        m = FENCE.match(line)
        if m:
            fence = None if fence and line.strip().startswith(fence) else (fence or m.group(2))
            continue
        if fence is None:
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    yield no, target


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for no, target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.relative_to(root)}:{no}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.relative_to(root)}:{no}: {target}: no such heading")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index() -> None:
    index = ROOT / "docs" / "README.md"
    named = {(index.parent / target.partition("#")[0]).resolve() for _, target in links(index)}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p != index and p.resolve() not in named]
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_link_check_sees_a_broken_link_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text('# A title\n\n## Sub `code` part\n<a id="k-x"></a>\n',
                                   encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#sub-code-part) [gone](c.md) [bad](a.md#nope) [self](#top)\n"
                    "[html](a.md#k-x)\n"
                    "```\n[in a fence](nowhere.md)\n```\n# Top\n[web](https://example.com)\n",
                    encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "c.md: no such file", "a.md#nope: no such heading"]
