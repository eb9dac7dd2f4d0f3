"""The config reference and the JSON Schema, both written from the key tables.

    python -m proxy.config_reference          # rewrite docs/config-reference.md and
                                              # docs/tether.schema.json
    tether schema                             # print the schema

tests/test_config_reference.py fails when the committed files differ from what this
writes, so the reference cannot drift from the loader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config_keys import UNSET, Key, Table
from .config_tables import INCLUDED, TOP

SCHEMA_FILE = "tether.schema.json"
REFERENCE_FILE = "config-reference.md"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
_DURATION = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"
_PLAIN: dict[str, dict[str, object]] = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "duration": {"type": ["number", "string"], "pattern": _DURATION},
    "strings": {"type": "array", "items": {"type": "string"}},
    "string|strings": {"anyOf": [{"type": "string"},
                                 {"type": "array", "items": {"type": "string"}}]},
    "any": {},
}


def _object(t: Table | None) -> dict[str, object]:
    if t is None:
        return {"type": "object"}
    out: dict[str, object] = {"type": "object",
                              "properties": {k.name: _key(k) for k in t}}
    required = [k.name for k in t if k.required]
    if required:
        out["required"] = required
    if not t.open:
        out["additionalProperties"] = False
    return out


def _key(key: Key) -> dict[str, object]:
    s: dict[str, object]
    if key.type == "mapping":
        s = _object(key.keys)
    elif key.type == "map":
        s = {"type": "object", "additionalProperties":
             _object(key.each) if key.each else dict(_PLAIN[key.value])}
    elif key.type == "list":
        s = {"type": "array", "items": _object(key.each)}
    elif key.type == "mapping|list":
        one = _object(key.each)
        s = {"anyOf": [one, {"type": "array", "items": one}]}
    else:
        s = dict(_PLAIN[key.type])
    if key.values:
        s["enum"] = list(key.values)
    if key.nullable:
        s = {"anyOf": [s, {"type": "null"}]}
    s["description"] = key.meaning
    if key.default is not UNSET:
        s["default"] = key.default
    return s


def schema() -> dict[str, object]:
    """One schema for the config file and the files it includes (their keys are a subset)."""
    assert INCLUDED.names <= TOP.names
    out: dict[str, object] = {"$schema": DRAFT, "title": "tether config",
                              "description": "tether's config file, or a rule file it "
                                             "includes (docs/config-reference.md)"}
    out.update(_object(TOP))
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


def _show(value: object) -> str:
    if value is UNSET:
        return ""
    if value is None:
        return "`null`"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _anchor(path: str) -> str:
    return "k-" + ("".join(c if c.isalnum() else "-" for c in path).strip("-") or "top")


def _type(key: Key, path: str, seen: dict[int, str]) -> str:
    t = key.keys or key.each
    text = key.type if t is not None or key.type != "map" else f"map of {key.value}"
    if key.values:
        text += ": " + " | ".join(key.values)
    if key.nullable:
        text += " or null"
    text = text.replace("|", "\\|")
    if t is not None:
        child = seen.get(id(t), path)
        text += f", keys in [{child}](#{_anchor(child)})"
    return text


def _child_path(path: str, key: Key) -> str:
    name = f"{path}.{key.name}" if path else key.name
    if key.type == "map":
        return f"{name}.NAME"
    if key.type == "list":
        return f"{name}[]"
    return name


def _section(t: Table, path: str, seen: dict[int, str], out: list[str]) -> None:
    seen[id(t)] = path
    out += [f'<a id="{_anchor(path)}"></a>', "", f"## `{path}`" if path else "## The top level",
            "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    children: list[tuple[Table, str]] = []
    for key in t:
        child = key.keys or key.each
        child_path = _child_path(path, key)
        if child is not None and id(child) not in seen:
            seen[id(child)] = child_path
            children.append((child, child_path))
        meaning = key.meaning + (" (required)" if key.required else "")
        out.append(f"| `{key.name}` | {_type(key, child_path, seen)} | {_show(key.default)} "
                   f"| {meaning.replace('|', chr(92) + '|')} |")
    if t.open:
        out += ["", "Other keys here are not checked."]
    out.append("")
    for child, child_path in children:
        del seen[id(child)]
        _section(child, child_path, seen, out)


def reference() -> str:
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m proxy.config_reference` from proxy/config_tables*.py, "
        "the tables the loader checks keys against. Do not edit by hand. -->",
        "",
        "Every key tether's config file accepts, its type, default and meaning. A key not "
        "listed here is an error (`tether check` names it). Durations are seconds or text "
        "like `30s`, `10m`, `1h`. Files named by `include:` hold only `"
        + "`, `".join(sorted(INCLUDED.names)) + "`.",
        "",
        "The same tables write the JSON Schema [tether.schema.json](tether.schema.json) "
        "(`tether schema` prints it). Editors with the YAML language server (VS Code's "
        "YAML extension, Neovim's yamlls ...) check and complete a config against it "
        "with this first line:",
        "",
        "<!-- example: fragment -->",
        "```yaml",
        "# yaml-language-server: $schema=./tether.schema.json",
        "```",
        "",
    ]
    _section(TOP, "", {}, out)
    return "\n".join(out).rstrip("\n") + "\n"


def write(docs: Path) -> list[Path]:
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((REFERENCE_FILE, reference()), (SCHEMA_FILE, schema_text())):
        path = docs / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs"):
        print(f"wrote {path}")
