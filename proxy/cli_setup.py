"""The commands that set a config up: `tether init`, `tether schema`, `tether --version`."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from .config_reference import SCHEMA_FILE, reference, schema_text

CONFIG = f"""\
# yaml-language-server: $schema=./{SCHEMA_FILE}
# tether's config. `tether check tether.yaml` reports every mistake in it and the files it
# includes; `tether serve --config tether.yaml` runs it. Every key, its type and default:
# docs/config-reference.md (`tether schema` prints the JSON Schema editors use).

upstreams:                    # the LLM APIs; point the agent's SDK base URL at tether
  openai: {{url: https://api.openai.com, api_key_env: OPENAI_API_KEY}}
  anthropic: {{url: https://api.anthropic.com, api_key_env: ANTHROPIC_API_KEY}}

include: [rules.yaml]         # the rules live in their own file, relative to this one

defaults:
  action: allow               # when no rule matches (deny: only what a rule allows passes)
  on_error: deny              # anything failing while deciding denies

budgets:                      # per session: a runaway loop trips these
  session: {{tokens: 200000, llm_calls: 50, cost_usd: 5, repeats: 3}}

server: {{host: 127.0.0.1, port: 8080, admin_port: 9090}}
audit: {{path: audit.jsonl}}    # hash-chained; `tether audit verify audit.jsonl`
admin: {{token_env: TETHER_ADMIN_TOKEN}}   # the admin port's bearer token (approvals)
store: memory                 # or redis://host:6379/0 when replicas share sessions and holds
"""

RULES = f"""\
# yaml-language-server: $schema=./{SCHEMA_FILE}
# Rules: every rule that matches a tool call counts, and the strictest action wins
# (deny over hold over allow), so their order never opens a hole.
# `tether explain --config tether.yaml --tool delete_volume --args '{{}}'` shows why.

tools:                        # what each tool does; a tool not declared counts as write
  list_volumes: {{effect: read}}
  delete_volume: {{effect: write}}

rules:
  - id: no-prod-deletes
    description: Nothing tagged production or production-candidate is deleted
    match:
      tool: ["delete_*", "terminate_*"]
      args: {{tags.env: {{in: [production, production-candidate]}}}}
    action: deny
    message: Deleting production resources is not allowed

  - id: writes-need-approval
    description: A person approves every other write (tether approvals list)
    match: {{effect: write}}
    action: hold
    timeout: 10m
    message: Writes wait for a human
"""


def version() -> str:
    try:
        return metadata.version("tether")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    files = {"tether.yaml": CONFIG, "rules.yaml": RULES, SCHEMA_FILE: schema_text()}
    existing = [name for name in files if (directory / name).exists()]
    if existing and not args.force:
        print(f"error: {', '.join(str(directory / n) for n in existing)} already exist"
              f"{'s' if len(existing) == 1 else ''}; --force overwrites", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
        print(f"wrote {directory / name}")
    print(f"next: tether check {directory / 'tether.yaml'}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = reference() if args.format == "markdown" else schema_text()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("init", help="write a starter tether.yaml, rules.yaml and the schema")
    i.add_argument("dir", nargs="?", default=".", metavar="DIR")
    i.add_argument("--force", action="store_true", help="overwrite files that exist")
    i.set_defaults(func=cmd_init)

    s = sub.add_parser("schema", help="print the config's JSON Schema (or its reference)")
    s.add_argument("--format", choices=["json", "markdown"], default="json",
                   help="json: the JSON Schema (default); markdown: the config reference")
    s.add_argument("-o", "--output", default=None, metavar="FILE", help="write it here")
    s.set_defaults(func=cmd_schema)
