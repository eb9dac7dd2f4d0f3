"""The regular expressions people write into tether's policy, and the one engine that runs them.

Two dialects, one engine. A rule's `matches` is RE2 syntax, as OPA's `regex.match`,
Go's `regexp` and Envoy's `safe_regex` read it; an OpenAPI `pattern` (and a
`patternProperties` name) is ECMA-262, as JSON Schema defines it, rewritten into RE2 by
ecma262.py. Both run on RE2, which takes time linear in the text for any pattern
(no backtracking): a few ms for a megabyte-long argument, whatever an agent puts in it
(bench/patterns.py), so no input-length bound is needed beyond the body limit. Both
search: a pattern matches anywhere in the text
unless it is anchored. In both, `^` is the start of the text and `$` its end: never
the place before a final newline, as Python's `$` is. A lone surrogate in the text is
matched as U+FFFD (JSON may escape one; UTF-8 cannot hold it).

Patterns are compiled at load, where a bad one is a ConfigError naming what is wrong
(the caller adds the file and line); RE2's own syntax errors and the constructs it
refuses (backreferences, lookaround, `\\Z`) say what to write instead.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Protocol

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from ..errors import ConfigError
from .ecma262 import NOT_A_BOUNDARY, to_re2

_SURROGATE = re.compile("[\ud800-\udfff]")
_HINTS = (
    ("invalid escape sequence: \\Z", "RE2 has no \\Z: $ (or \\z) is the end of the text"),
    ("invalid escape sequence: \\u", "write a code point as \\x{hex}"),
    ("invalid perl operator: (?=", "lookahead is not supported"),
    ("invalid perl operator: (?!", "lookahead is not supported"),
    ("invalid perl operator: (?<=", "lookbehind is not supported"),
    ("invalid perl operator: (?<!", "lookbehind is not supported"),
    ("invalid perl operator: (?P", "(?P=name) backreferences are not supported"),
    ("invalid repetition size", "a repeat count is at most 1000"),
)


class _Regexp(Protocol):
    def search(self, text: bytes) -> object: ...


def _options() -> object:
    options = re2.Options()
    options.log_errors = False      # RE2 would print every refused pattern to stderr
    options.never_capture = True    # only "does it match" is ever asked
    return options


_OPTIONS = _options()


@dataclass(frozen=True, slots=True)
class Pattern:
    source: str          # as the author wrote it
    dialect: str         # "re2" (rule `matches`) or "ecma262" (OpenAPI)
    _regexp: _Regexp = field(repr=False, compare=False)

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in `text`."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            data = _SURROGATE.sub("\ufffd", text).encode("utf-8")
        return self._regexp.search(data) is not None


def _compile(source: str, rewritten: str, dialect: str) -> Pattern:
    try:
        rewritten.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("the pattern holds a lone surrogate, which no text can") from None
    try:
        regexp = re2.compile(rewritten, _OPTIONS)
    except re2.error as e:
        detail = e.args[0].decode("utf-8", "replace") if e.args and isinstance(
            e.args[0], bytes) else str(e)
        hint = next((h for prefix, h in _HINTS if detail.startswith(prefix)), None)
        if re.match(r"invalid escape sequence: \\[1-9]", detail):
            hint = "backreferences are not supported"
        raise ConfigError(f"{detail}" + (f" ({hint})" if hint else "")) from None
    return Pattern(source, dialect, regexp)


def rule_pattern(source: str) -> Pattern:
    """A rule's `matches`: RE2 syntax. ConfigError when RE2 refuses it, when it holds
    `{,n}`, which RE2 reads as literal text and Python as a repeat, or `\\B`."""
    refused = _misread(source)
    if refused:
        raise ConfigError(refused)
    return _compile(source, source, "re2")


@functools.lru_cache(maxsize=4096)
def schema_pattern(source: str) -> Pattern:
    """An OpenAPI `pattern` or `patternProperties` name: ECMA-262. Cached, since
    jsonschema hands the keyword its text on every validation."""
    return _compile(source, to_re2(source), "ecma262")


def _misread(source: str) -> str | None:
    """Why RE2 would not read `source` as its author meant, looking at what stands outside
    classes and `\\Q...\\E`: `{,n}` (literal text in RE2, a repeat in Python) and `\\B`."""
    i, n, in_class = 0, len(source), False
    while i < n:
        c = source[i]
        if c == "\\":
            if source.startswith("Q", i + 1):         # \Q...\E is literal text
                end = source.find("\\E", i + 2)
                i = n if end < 0 else end + 2
                continue
            if source.startswith("B", i + 1) and not in_class:
                return NOT_A_BOUNDARY
            i += 2
        elif in_class:
            if source.startswith("[:", i) and (end := source.find(":]", i + 2)) > 0:
                i = end + 2
                continue
            in_class = c != "]"
            i += 1
        elif c == "[":
            i += 2 if source.startswith("^", i + 1) else 1
            i += 1 if source.startswith("]", i) else 0   # a leading ] is literal
            in_class = True
        elif c == "{" and source.startswith(",", i + 1):
            return "{,n} is literal text in RE2 (not a repeat): write {0,n}, or \\{ for the text"
        else:
            i += 1
    return None
