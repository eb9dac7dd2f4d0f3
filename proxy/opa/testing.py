"""`tether opa-test DIR...`: OPA-style `test_*` rules, run with rego-cpp (no OPA binary).

Every `.rego` file of each directory (the `*_test.rego` files too) and its
`data.json` are loaded into one interpreter; every rule whose name starts with
`test_` in any module is queried, and passes only if its value is `true`
(false, undefined or an evaluation error fail), as `opa test` counts them.
Rule names are found by their head at the start of a line (`test_x if {`,
`test_x {`, `test_x := ...`), in the module's declared package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..policy.opa import Defined, Undefined
from .embedded import RegoLoadError, new_interpreter, reply_of
from .settings import read_policy_dir

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)\s*$", re.M)
_TEST = re.compile(r"^(test_\w+)\b", re.M)


@dataclass(frozen=True, slots=True)
class OpaTestResult:
    name: str        # data.<package>.<rule>
    passed: bool
    detail: str = ""


def find_tests(modules: tuple[tuple[str, str], ...]) -> list[str]:
    found: list[str] = []
    for _, text in modules:
        package = _PACKAGE.search(text)
        if package is None:
            continue
        for name in _TEST.findall(text):
            ref = f"data.{package.group(1)}.{name}"
            if ref not in found:
                found.append(ref)
    return found


def run_tests(directory: Path) -> list[OpaTestResult]:
    """Raises ConfigError when the directory cannot be read or does not compile."""
    if not directory.is_dir():
        raise ConfigError("not a directory", file=str(directory))
    modules, data = read_policy_dir(directory, tests=True)
    try:
        rego = new_interpreter(modules, data)
    except RegoLoadError as e:
        raise ConfigError(str(e), file=str(directory)) from e
    results = []
    for ref in find_tests(modules):
        out = rego.query(f"x = {ref}")
        reply = reply_of(out)
        if isinstance(reply, Defined) and reply.value is True:
            results.append(OpaTestResult(ref, True))
        elif isinstance(reply, Defined):
            results.append(OpaTestResult(ref, False, f"= {json.dumps(reply.value)}"))
        else:
            results.append(OpaTestResult(ref, False, "undefined" if isinstance(reply, Undefined)
                                         else reply.detail))
    return results
