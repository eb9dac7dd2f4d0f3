"""The commands that decide without a running tether: check, explain, test, replay and
opa-test. They load a config, judge calls the way the proxy would (rules, and OPA when
the config has one) and print; none of them opens a port."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from .errors import ConfigError
from .model import Action, Exchange, OnDeny, PastCall, ToolCall
from .policy.engine import PolicyEngine
from .providers.arguments import parse_arguments

if TYPE_CHECKING:
    from .opa.offline import OfflineDecider
    from .policy_tests import CaseFile


def load_config(path: str) -> config_mod.Config:
    cfg = config_mod.load(path)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def cmd_check(args: argparse.Namespace) -> int:
    """Every error in every file (config_check.py), then the warnings; exit 1 on any error."""
    from .config_check import check_file, render_json, render_text

    checked = [check_file(path) for path in args.files]
    if getattr(args, "format", "text") == "json":
        print(render_json(checked))
    else:
        out, err = render_text(checked)
        if err:
            print(err, file=sys.stderr)
        print(out)
    return 1 if any(c.errors for c in checked) else 0


def _explain_call(engine: PolicyEngine, tool: str, raw: str, agent: str | None,
                  declared: Sequence[str] | None) -> tuple[ToolCall, Exchange]:
    arguments, problem = parse_arguments(raw)
    call = ToolCall(id="explain", name=tool, raw_arguments=raw,
                    arguments=None if problem else arguments, problem=problem)
    exchange = Exchange(provider="cli", model="", agent=agent,
                        declared_tools=tuple(declared) if declared is not None else (tool,))
    return call, exchange


# How a denial reaches the agent and the model, per `on_deny` (docs/continuations.md).
_REACHES = {
    OnDeny.CONTINUE: "the model reads the denial as the call's result and the agent gets "
                     "its next answer",
    OnDeny.REWRITE: "the call becomes text in the answer; the model reads it on the "
                    "agent's next turn",
    OnDeny.ERROR: "the agent gets an error (HTTP 403, or an error event in a stream)",
}


def cmd_explain(args: argparse.Namespace) -> int:
    from .opa.offline import OfflineDecider

    cfg = load_config(args.config)
    history: tuple[PastCall, ...] = ()
    if getattr(args, "history", None):
        from .history_input import load_history_file

        try:
            text = Path(args.history).read_text(encoding="utf-8")
            history = load_history_file(text, args.history, cfg.policy)
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    with OfflineDecider(cfg) as decider:
        call, exchange = _explain_call(decider.engine, args.tool, args.args, args.agent, None)
        exchange = replace(exchange, history=history)
        decision = decider.decide(call, exchange, explain=True)
    print(f"decision: {decision.action.value}")
    if decision.message:
        print(f"message:  {decision.message}")
    print(f"effect:   {decision.effect.value}")
    if decision.action is Action.DENY:
        print(f"on_deny:  {decision.on_deny.value}: {_REACHES[decision.on_deny]}")
    for t in decision.trace:
        mark = ("SHADOW" if t.shadow else "MATCH") if t.matched else "no   "
        action = f" -> {t.action.value}" if t.matched and t.action else ""
        if t.shadow and t.matched:
            action += " (shadow: not enforced)"
        print(f"  {mark} {t.rule_id}{action}: {t.reason}")
    if decision.shadow:
        print(f"  (shadow rules matched, not enforced: {', '.join(decision.shadow)})")
    if not decision.rules:
        print(f"  (no rule matched: defaults.action {cfg.policy.default_action.value})")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Every file is checked before its cases run (policy_tests.py): a file that cannot
    be read, or a case that is malformed, is an error (exit 1), never a pass."""
    from .opa.offline import OfflineDecider
    from .policy_tests import parse_case_file

    passed = failed = 0
    for path in args.files:
        try:
            case_file = parse_case_file(Path(path).read_text(encoding="utf-8"), path)
            cfg = load_config(case_file.config)
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        with OfflineDecider(cfg) as decider:
            passed, failed = _run_cases(decider, case_file, args.verbose, passed, failed)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _run_cases(decider: OfflineDecider, case_file: CaseFile, verbose: bool,
               passed: int, failed: int) -> tuple[int, int]:
    for case in case_file.cases:
        where = f"{case_file.file}:{case.line}: {case.name}"
        call, exchange = _explain_call(decider.engine, case.tool, case.raw_args, case.agent,
                                       case.declared)
        if case.history:  # a flow: the session's earlier calls (history_input.py)
            from .history_input import resolve

            exchange = replace(exchange, history=resolve(case.history,
                                                          decider.engine.policy))
        decision = decider.decide(call, exchange)
        if decision.action is case.expect and case.rules <= set(decision.rules):
            passed += 1
            if verbose:
                print(f"PASS {where}")
        else:
            failed += 1
            print(f"FAIL {where}: got {decision.action.value} "
                  f"(rules: {', '.join(decision.rules) or 'none'}), want {case.expect.value}"
                  + (f" (rules: {', '.join(sorted(case.rules))})" if case.rules else ""))
    return passed, failed


def cmd_replay(args: argparse.Namespace) -> int:
    from .audit.chain import chain_files
    from .replay import Reload, ReplayInputError, read_records, render_json, render_text, replay

    cfg = load_config(args.config)
    files: list[Path] = []
    try:
        for target in map(Path, args.files):
            rotated = target.is_dir() or any(target.parent.glob(target.name + ".[0-9]*"))
            files += chain_files(target) if rotated else [target]
        reloads: list[Reload] = []
        outcomes = replay(PolicyEngine(cfg.policy), read_records(files), reloads)
    except (ReplayInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    render = render_json if args.json else render_text
    print(render(outcomes, args.config, cfg.policy.revision, reloads))
    return 0


def cmd_opa_test(args: argparse.Namespace) -> int:
    """OPA-style `test_*` rules in .rego directories, run with the embedded engine."""
    from .opa.testing import run_tests

    passed = failed = 0
    for directory in args.dirs:
        try:
            results = run_tests(Path(directory))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if not results:
            print(f"FAIL {directory}: no test_* rules found")
            failed += 1
        for r in results:
            if r.passed:
                passed += 1
                if args.verbose:
                    print(f"PASS {r.name}")
            else:
                failed += 1
                print(f"FAIL {r.name}: {r.detail}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
