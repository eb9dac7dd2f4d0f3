"""The layers of `proxy/`, read from the import statements of every module.

- forward/ and auth/ sit below server/: neither imports from it; auth/ sits below
  forward/ too (forward/ asks auth/ who is calling). What both front ends share
  (paths.py, upstream_auth/, small_file.py) lives below both.
- A feature's settings module reads its own section: it imports from its own
  package, from top-level modules and from the core, never another feature.
- The core (model.py, providers/, policy/) is sans-IO: no aiohttp, no mitmproxy,
  and nothing of the packages that do I/O on its behalf.
- providers/ has no import cycle (every import counts, lazy and TYPE_CHECKING ones
  too: a circle is a circle in the design even where Python tolerates it).

Every import anywhere in a module counts, inside functions too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "proxy"

type Graph = Mapping[str, frozenset[str]]

CORE = ("proxy.model", "proxy.providers", "proxy.policy")
NOT_IN_CORE = ("aiohttp", "mitmproxy", "proxy.server", "proxy.forward", "proxy.approvals",
               "proxy.audit")
BELOW = {  # package -> packages it must not import from
    "proxy.forward": ("proxy.server",),
    "proxy.auth": ("proxy.server", "proxy.forward"),
}
def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: Iterable[str]) -> list[str]:
    """The modules one import statement names, relative imports resolved; `from p import m`
    names the module p.m where there is one, else p."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = set(known)
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in names else target
            for a in node.names]


def import_graph(root: Path) -> dict[str, frozenset[str]]:
    """Every module under `root` (a package directory) -> every module it imports."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, frozenset[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(imported(node, name, path.name == "__init__.py", files))
        graph[name] = frozenset(found)
    return graph


def within(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def feature_of(name: str) -> str | None:
    """`proxy.X` for a module of a subpackage X, None for a top-level module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else None


def is_settings(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return feature_of(name) is not None and (last == "settings" or last.endswith("_settings"))


def layer_violations(graph: Graph) -> list[str]:
    out: list[str] = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            for package, forbidden in BELOW.items():
                if within(module, (package,)) and within(dep, forbidden):
                    out.append(f"{module} imports {dep}: {package} lies below it")
            if within(module, CORE) and within(dep, NOT_IN_CORE):
                out.append(f"{module} imports {dep}: the core is sans-IO")
            if (is_settings(module) and dep.startswith("proxy.")
                    and feature_of(dep) not in (None, feature_of(module))
                    and not within(dep, CORE)):
                out.append(f"{module} imports {dep}: settings read their own section")
    return out


def circles(graph: Graph, package: str) -> set[frozenset[str]]:
    """The strongly connected components (of more than one module) inside `package`."""
    inside = {m: sorted(d for d in deps if within(d, (package,)) and d in graph and d != m)
              for m, deps in graph.items() if within(m, (package,))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:  # Tarjan; providers/ is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in inside[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(inside):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, frozenset[str]]:
    return import_graph(ROOT)


def test_the_walk_sees_the_tree(graph: Graph) -> None:
    # A walk that found nothing would pass every rule below.
    assert len(graph) > 100
    assert "proxy.upstream_auth.sigv4" in graph["proxy.forward.lookups_aws"]
    assert "proxy.paths" in graph["proxy.forward.judge"]
    assert "proxy.providers.tool_scope" in graph["proxy.providers.openai_chat"]


def test_no_layer_reaches_up(graph: Graph) -> None:
    assert layer_violations(graph) == []


def test_providers_have_no_circle(graph: Graph) -> None:
    assert circles(graph, "proxy.providers") == set()


# --- the rules themselves, on graphs made up for them ---------------------------------

def g(**edges: str) -> dict[str, frozenset[str]]:
    """A graph from `a__b="c__d e__f"`: module a.b imports c.d and e.f."""
    return {k.replace("__", "."): frozenset(v.replace("__", ".").split()) for k, v in edges.items()}


@pytest.mark.parametrize(("edges", "why"), [
    ({"proxy__forward__judge": "proxy__server__upstream"}, "proxy.forward lies below"),
    ({"proxy__forward__x": "proxy__server"}, "proxy.forward lies below"),
    ({"proxy__auth__jwks_fetch": "proxy__server__credentials"}, "proxy.auth lies below"),
    ({"proxy__auth__settings": "proxy__forward__settings"}, "proxy.auth lies below"),
    ({"proxy__providers__bedrock": "aiohttp"}, "the core is sans-IO"),
    ({"proxy__policy__engine": "mitmproxy__http"}, "the core is sans-IO"),
    ({"proxy__model": "proxy__audit__log"}, "the core is sans-IO"),
    ({"proxy__providers__held": "proxy__approvals__holds"}, "the core is sans-IO"),
    ({"proxy__opa__settings": "proxy__audit__settings"}, "settings read their own section"),
    ({"proxy__approvals__settings": "proxy__sessions__store"},
     "settings read their own section"),
])
def test_a_forbidden_import_is_found(edges: dict[str, str], why: str) -> None:
    found = layer_violations(g(**edges))
    assert any(why in f for f in found), found


@pytest.mark.parametrize("edges", [
    {"proxy__server__app": "proxy__forward__master proxy__auth__settings aiohttp"},
    {"proxy__forward__addon": "proxy__auth__authenticator proxy__paths mitmproxy"},
    {"proxy__forward__judge": "proxy__server_settings"},  # top level, not server/
    {"proxy__providers__bedrock": "proxy__errors proxy__model proxy__policy__engine"},
    {"proxy__opa__settings": "proxy__opa__embedded proxy__policy__opa proxy__errors"},
    {"proxy__server_settings": "proxy__policy__rules"},
])
def test_an_allowed_import_is_not(edges: dict[str, str]) -> None:
    assert layer_violations(g(**edges)) == []


def test_circles_are_found_and_only_inside_the_package() -> None:
    graph = g(proxy__providers__a="proxy__providers__b",
              proxy__providers__b="proxy__providers__a proxy__providers__c",
              proxy__providers__c="proxy__providers__d",
              proxy__providers__d="proxy__providers__c proxy__model",
              proxy__providers__e="proxy__server__x",
              proxy__server__x="proxy__providers__e",
              proxy__model="")
    assert circles(graph, "proxy.providers") == {
        frozenset({"proxy.providers.a", "proxy.providers.b"}),
        frozenset({"proxy.providers.c", "proxy.providers.d"})}
    assert circles(g(proxy__providers__a="proxy__providers__b", proxy__providers__b=""),
                   "proxy.providers") == set()


def test_relative_imports_are_resolved_from_source(tmp_path: Path) -> None:
    """The walk over real files: a forbidden import written the way this tree writes them."""
    root = tmp_path / "proxy"
    for package in ("", "forward", "server", "providers"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "server" / "upstream.py").write_text("X = 1\n")
    (root / "providers" / "one.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .two import Y\n")
    (root / "providers" / "two.py").write_text(
        "def f():\n    from . import one\n    return one\nY = 1\n")
    (root / "forward" / "judge.py").write_text(
        "from ..server.upstream import X\n\n\ndef g():\n    import aiohttp\n")
    graph = import_graph(root)
    assert graph["proxy.forward.judge"] == {"proxy.server.upstream", "aiohttp"}
    assert layer_violations(graph) == [
        "proxy.forward.judge imports proxy.server.upstream: proxy.forward lies below it"]
    assert circles(graph, "proxy.providers") == {
        frozenset({"proxy.providers.one", "proxy.providers.two"})}
