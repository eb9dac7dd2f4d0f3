"""An LLM tool call's arguments checked against the OpenAPI operation it is mapped to.

The LLM side of the same law the egress side applies to requests (openapi_judge.py):
a tool call's arguments are the operation's parameters by name plus the body's
top-level properties (or `body`, for a body that is not an object with declared
properties). A call that does not fit is denied before it reaches the agent, with
every problem listed so the model can correct itself. Built-in rule id:

  tether:invalid-arguments   an LLM tool call's arguments do not fit the operation
"""

from __future__ import annotations

from collections.abc import Mapping

from ..model import RuleTrace, ToolCall
from .openapi_model import Operation
from .openapi_problems import check_body, deny, join, unique, validate

INVALID_ARGUMENTS = "tether:invalid-arguments"
_ABSENT = object()


def check_arguments(op: Operation, args: Mapping[str, object]) -> list[str]:
    """Every problem with a tool call's arguments for `op` (empty: they fit)."""
    problems: list[str] = []
    params = {p.name: p for p in op.params if p.location != "cookie"}
    body_args: dict[str, object] = {}
    body_value: object = _ABSENT
    for name, value in args.items():
        param = params.get(name)
        if param is not None:
            if param.schema is not None:
                problems += validate(param.schema, value, name, "argument")
        elif op.body is not None and op.body.flat:
            body_args[name] = value
        elif op.body is not None and name == "body":
            body_value = value
        else:
            problems.append(f"unknown argument {name!r}")
    for param in params.values():
        if param.required and param.name not in args:
            problems.append(f"missing required argument {param.name!r}")
    if op.body is not None:
        if op.body.flat and (body_args or op.body.required):
            body_value = body_args
        if body_value is _ABSENT and op.body.required:
            problems.append("missing required argument 'body'")
        elif body_value is not _ABSENT:
            problems += check_body(op.body, op.body.argument_schema, body_value, "argument")
    if any(p.startswith("unknown ") for p in problems):
        problems.append(f"{op.name} takes: {', '.join(op.argument_names) or 'no arguments'}")
    return unique(problems)


def arguments_trace(op: Operation, call: ToolCall) -> RuleTrace | None:
    """A deny for the engine's `extra` when the call's arguments do not fit `op`."""
    if call.arguments is None:
        return None  # already denied as malformed
    try:
        problems = check_arguments(op, call.arguments)
    except Exception as e:  # noqa: BLE001 - a check that breaks must deny, not pass
        return deny(INVALID_ARGUMENTS, f"the arguments could not be checked against "
                                       f"{op.name} ({type(e).__name__}); denied")
    if not problems:
        return None
    return deny(INVALID_ARGUMENTS, f"the arguments do not fit the operation {op.name}: "
                                   + join(problems))
