"""`tether demo`: the cloud janitor story, offline (janitor.py), and its Azure leg
(janitor_azure.py, `--cloud azure`). The fakes here ship with the wheel for it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def add_command(sub: Any) -> None:
    """The `demo` subcommand on the CLI's subparsers (proxy/cli.py)."""
    d = sub.add_parser("demo", help="the cloud janitor story, offline")
    d.add_argument("--rules", default=None, help="rule file (default: the packaged janitor.yaml, "
                   "or janitor_azure.yaml with --cloud azure)")
    d.add_argument("--cloud", choices=["azure"], default=None,
                   help="azure: the janitor's disk deletes through the forward proxy, judged "
                        "by the tags tether looks up at ARM (needs tether[azure])")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.cloud == "azure":
        from .janitor_azure import run_azure_demo

        return asyncio.run(run_azure_demo(rules=args.rules, out=sys.stdout))
    from .janitor import run_demo

    return asyncio.run(run_demo(rules=args.rules, out=sys.stdout))
