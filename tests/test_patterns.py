"""The two pattern dialects at their edges (no sockets): a rule's `matches` (RE2) and an
OpenAPI `pattern` (ECMA-262), both run on RE2. `$` is the end of the text in both."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from proxy.errors import ConfigError
from proxy.policy.ecma262 import to_re2
from proxy.policy.patterns import Pattern, rule_pattern, schema_pattern

VOL = r"^vol-temp-[0-9]+$"
TICKET = r"^T-[0-9]+$"


@pytest.mark.parametrize(("pattern", "text", "found"), [
    (VOL, "vol-temp-1", True),
    (VOL, "vol-temp-12", True),
    (VOL, "vol-temp-1\n", False),             # Python's $ matches before a final \n
    (VOL, "vol-temp-1\r\n", False),
    (VOL, "vol-temp-1\r", False),
    (VOL, "vol-temp-1\n\n", False),
    (VOL, "x\nvol-temp-1", False),            # ^ is the start of the text, not of a line
    (VOL, "vol-temp-1\nrm -rf /", False),
    (VOL, "pre vol-temp-1", False),
    ("temp", "a temp b", True),               # unanchored: search
    (r"^a\z", "a", True),                     # \z is $
    (r"^a\z", "a\n", False),
    (r"^cost\$$", "cost$", True),             # an escaped $ is the character
    (r"^cost\$$", "cost$\n", False),
    (r"^a[$]$", "a$", True),                  # so is a $ in a class
    (r"^a[$]$", "a$\n", False),
    (r"^a[^$]$", "a\n", True),                # a negated class does match \n
    ("(?m)^b$", "a\nb\nc", True),             # lines only when the author asks
    ("(?m)^b$", "a\nbb\nc", False),
    (r"^a.b$", "a\nb", False),                # RE2: . is anything but \n
    (r"^a.b$", "a\rb", True),
    ("(?s)^a.b$", "a\nb", True),
    ("(?i)^prod$", "PROD", True),
    (r"^\d+$", "\u0663", False),              # \d is ASCII, as in RE2, Go and OPA
    (r"^\w+$", "\u00e9", False),
    (r"^a.$", "a\ud800", True),               # a lone surrogate is matched as U+FFFD
    (r"^a$", "a\ud800", False),
    (r"^\x{e9}$", "\u00e9", True),
    (r"^[[:alpha:]]+$", "abc", True),         # POSIX classes are RE2's
    (r"a{,3}b", "a{,3}b", None),              # refused: see below
])
def test_rule_patterns(pattern: str, text: str, found: bool | None) -> None:
    if found is None:
        with pytest.raises(ConfigError):
            rule_pattern(pattern)
        return
    assert rule_pattern(pattern).search(text) is found


@pytest.mark.parametrize(("pattern", "text", "found"), [
    (TICKET, "T-1", True),
    (TICKET, "T-1\n", False),
    (TICKET, "T-1\r\n", False),
    (TICKET, "\nT-1", False),
    (TICKET, "T-1\u2028", False),
    (r"^T-.+$", "T-x", True),
    (r"^T-.+$", "T-1\r", False),              # ECMA-262: . stops at every line terminator
    (r"^T-.+$", "T-1\u2029", False),
    (r"^T-.+$", "T-\u00e9", True),
    (r"^.$", "\U0001f600", True),             # code points, as with the u flag
    (r"^\s$", "\u00a0", True),                # ECMA-262's white space is Unicode's
    (r"^\s$", "\ufeff", True),
    (r"^\s$", "\x0b", True),
    (r"^\S$", "\u3000", False),
    (r"^\S$", "x", True),
    (r"^[\s\d]+$", "1 \u2003 2", True),
    (r"^\u00e9$", "\u00e9", True),
    (r"^\u{1F600}$", "\U0001f600", True),
    (r"^\uD83D\uDE00$", "\U0001f600", True),  # a pair escaped as two is one code point
    (r"^\x41\cJ\0$", "A\n\x00", True),
    (r"^[^]$", "\n", True),
    (r"^[\b]$", "\x08", True),
    (r"\bgo\b", "let go now", True),
    (r"^[[:alpha:]]$", "a]", True),          # ECMA-262: a class of [ : a l p h, then ]
    (r"^[[:alpha:]]$", "b", False),
    (r"^a\$$", "a$", True),
    (r"^a\$$", "a$\n", False),
    (r"^a[$]$", "a$", True),
    (r"^a[$.]$", "a.", True),                 # . in a class is the character
    (r"^a[$.]$", "ab", False),
    (r"^(?<id>[0-9]+)$", "42", True),         # named groups (Python's re refuses them)
    (r"^\d+$", "\u0663", False),
    (r"^\/\-$", "/-", True),
])
def test_openapi_patterns(pattern: str, text: str, found: bool) -> None:
    assert schema_pattern(pattern).search(text) is found


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"(?=a)b", "lookahead and lookbehind are not supported"),
    (r"(?<!a)b", "lookahead and lookbehind are not supported"),
    (r"(a)\1", "backreferences are not supported"),
    (r"(?<n>a)\k<n>", "backreferences are not supported"),
    (r"^a\Z", r"\Z has no meaning in ECMA-262"),
    (r"\Aa", r"\A has no meaning in ECMA-262"),
    (r"a\z", r"\z has no meaning in ECMA-262"),
    (r"\e", r"\e has no meaning in ECMA-262"),
    ("(?i)a", "inline flags"),
    ("[]a]", "[] is an empty class"),
    ("a{,3}", "write {0,n}"),
    (r"\uD800", "lone surrogate"),
    (r"\u{110000}", "beyond Unicode"),
    (r"\u12", "4 hex digits"),
    (r"[\S]", r"\S inside a class"),
    (r"a\B", r"\B is not supported: RE2 finds it inside characters"),
    (r"\pL", "in braces"),
    (r"\01", "octal escapes"),
    ("a\\", "cannot end with a backslash"),
    ("(a", "missing )"),
    ("a{1001}", "at most 1000"),
])
def test_openapi_patterns_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        schema_pattern(pattern)
    assert reason in e.value.message


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"^a\Z", r"RE2 has no \Z: $ (or \z) is the end of the text"),
    ("(?=a)b", "lookahead is not supported"),
    ("(?<=a)b", "lookbehind is not supported"),
    (r"(a)\1", "backreferences are not supported"),
    ("(?P<n>a)(?P=n)", "backreferences are not supported"),
    (r"\u0041", r"write a code point as \x{hex}"),
    ("a{1001}", "at most 1000"),
    ("^[a-z]{,8}$", "{,n} is literal text in RE2"),
    (r"a\B", r"\B is not supported: RE2 finds it inside characters"),
    ("(a", "missing )"),
])
def test_rule_patterns_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        rule_pattern(pattern)
    assert reason in e.value.message


@pytest.mark.parametrize("pattern", [r"\{,3}", r"[{,]", r"\Q{,3}\E", r"[[:alpha:]{,]", "[]{,]",
                                     r"\Q\B\E", r"\\B"])
def test_what_only_looks_refused_is_not(pattern: str) -> None:
    rule_pattern(pattern)


def test_rewrites_keep_the_meaning() -> None:
    assert to_re2(TICKET) == TICKET
    assert to_re2(r"a.b") == r"a[^\n\r\x{2028}\x{2029}]b"
    assert to_re2("[[]") == r"[\[]"


@pytest.mark.parametrize(("compile_", "pattern", "worst"), [
    (rule_pattern, r"(a+)+$", "a" * (1 << 20) + "!"),
    (rule_pattern, r"^(a|aa)*c$", "a" * (1 << 20)),
    (rule_pattern, r"(.*a){20}$", "a" * (1 << 20) + "b"),
    (rule_pattern, r"^(\w+\s?)*$", "word " * 200_000 + "!"),
    (schema_pattern, r"^(a+)+$", "a" * (1 << 20) + "!"),
    (schema_pattern, r"^([a-z0-9]+-?)*[a-z0-9]+$", "a-" * 500_000 + "!"),
    (schema_pattern, r"^(.*,){30}$", "," * (1 << 20) + "\n"),
])
def test_a_megabyte_of_the_worst_case_is_linear(compile_: Callable[[str], Pattern],
                                                pattern: str, worst: str) -> None:
    """Python's `re` backtracks on each of these for far longer than any test could wait
    (most are exponential in the length); RE2 takes milliseconds. The bound is loose for
    a shared CI machine."""
    compiled = compile_(pattern)
    started = time.perf_counter()
    assert compiled.search(worst) is False
    assert time.perf_counter() - started < 2.0
