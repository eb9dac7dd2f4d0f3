"""OpenAPI patterns against ECMA-262 itself: thousands of generated patterns and texts,
judged by tether (rewritten for RE2) and by JavaScript's own `RegExp` with the `u` flag
(node), must agree wherever JavaScript accepts the pattern. Skipped where node is not
installed; the table-driven edges in test_patterns.py hold everywhere."""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from proxy.errors import ConfigError
from proxy.policy.patterns import schema_pattern

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node runs ECMA-262's own RegExp")

ATOMS = ["a", "b", "1", "-", "_", " ", ".", r"\s", r"\S", r"\d", r"\D", r"\w", r"\W",
         "[ab]", "[^a]", "[a-c]", r"[\s]", r"[^\s1]", r"[\d-]", "[.$]", "[^]", r"\n", r"\r",
         r"\t", r"\v", r"\f", r"\u00e9", r"\u{1F600}", r"\x41", r"\$", r"\.", r"\/", "é",
         "😀", r"\uD83D\uDE00", r"[\b]", r"\cJ", r"\0", r"[\u2028]", r"[^\n]", "[[]", "[[a]",
         r"[\]]", r"[a-]", r"[-a]", r"(?<n>a)", r"\p{L}", r"\P{L}", r"[\p{Lu}]", r"[^\W_]",
         r"[\u0000-\u007f]", r"[😀-😂]"]
ASSERTIONS = [r"\b"]          # \B is refused (see test_patterns.py)
QUANTIFIERS = ["", "", "", "*", "+", "?", "{2}", "{1,3}", "*?", "{0,2}", "+?", "{2,}"]
TEXT = ["a", "b", "c", "1", "-", "_", " ", "\n", "\r", "\r\n", "\u00a0", "\u2028", "\u3000",
        "\u00e9", "\U0001f600", "A", "$", ".", "/", "[", "\x08", "\x00", "\t", "\ufeff",
        "\x0b", "\x0c", "Z", "]", "\x7f", "\U0001f601"]


def generated(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.08:
            parts.append(rng.choice(ASSERTIONS))
            continue
        atom = rng.choice(ATOMS)
        if rng.random() < 0.15:
            atom = f"({atom}|{rng.choice(ATOMS)})"
        elif rng.random() < 0.05:
            atom = f"(?:{atom})"
        parts.append(atom + rng.choice(QUANTIFIERS))
    body = "".join(parts)
    if rng.random() < 0.2:
        body += "|" + rng.choice(ATOMS)
    return rng.choice(["", "", "^"]) + body + rng.choice(["", "", "$"])


def texts(rng: random.Random) -> list[str]:
    return ["".join(rng.choices(TEXT, k=rng.randint(0, 5))) for _ in range(12)]


JUDGE = """
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(cases.map(([source, texts]) => {
  let re;
  try { re = new RegExp(source, "u"); } catch (e) { return null; }
  return texts.map((t) => re.test(t));
})));
"""


def test_openapi_patterns_agree_with_javascript() -> None:
    rng = random.Random(262)
    cases = [(generated(rng), texts(rng)) for _ in range(3000)]
    assert NODE is not None
    out = subprocess.run([NODE, "-e", JUDGE], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120, check=True)
    verdicts: list[list[bool] | None] = json.loads(out.stdout)
    compared = 0
    for (source, samples), theirs in zip(cases, verdicts, strict=True):
        if theirs is None:
            continue                    # not ECMA-262 with `u`: whatever tether does is moot
        try:
            pattern = schema_pattern(source)
        except ConfigError as e:
            pytest.fail(f"{source!r} is valid ECMA-262 but refused: {e.message}")
        ours = [pattern.search(t) for t in samples]
        assert ours == theirs, (source, [(t, o, j) for t, o, j in
                                          zip(samples, ours, theirs, strict=True) if o != j])
        compared += 1
    assert compared > 2500
