"""ECMA-262 patterns (OpenAPI's `pattern` and `patternProperties`) rewritten in RE2 syntax.

JSON Schema defines these as ECMA-262 regular expressions; tether runs every pattern
with RE2 (patterns.py), so an OpenAPI pattern is rewritten token by token into the RE2
pattern that means the same, read as ECMA-262 reads it with the `u` flag (code points,
no `i`, `m`, `s` or `y` flag):

    .             any code point but a line terminator (\\n \\r U+2028 U+2029)
    \\s \\S         ECMA-262's white space and line terminators (wider than RE2's)
    \\uXXXX        a code point (a surrogate pair escaped as two is one code point);
    \\u{X} \\xHH    also \\cX and \\0
    [ in a class  a literal `[` (RE2 would read `[:alpha:]` as a POSIX class)
    [^]  [\\b]     any code point; a backspace

`^`, `$`, `\\d`, `\\w`, `\\b`, classes, groups, `|` and the quantifiers mean the same in
both and pass unchanged: `^` is the start of the text and `$` its end, never the place
before a final newline.

Refused, with the reason: what RE2 cannot run in linear time (backreferences,
lookahead, lookbehind), what is not ECMA-262 or is read differently elsewhere (inline
flags, `\\A` `\\z` `\\Z` `\\Q` and other letters ECMA-262 gives no meaning, `{,n}`, `\\pL`
without braces, octal escapes, `\\B`, which RE2 finds inside multi-byte characters), and
what cannot match (`[]`, lone surrogates).
"""

from __future__ import annotations

import string

from ..errors import ConfigError

_LINE_ENDS = r"\n\r\x{2028}\x{2029}"
_DOT = f"[^{_LINE_ENDS}]"
# WhiteSpace (TAB VT FF ZWNBSP and every Zs, which holds SP and NBSP) and LineTerminator.
_SPACE = r"\t\v\f\x{feff}\p{Zs}" + _LINE_ENDS
_HEX = frozenset(string.hexdigits)
_PUNCTUATION = frozenset(string.punctuation)
_SIMPLE = {"d", "D", "w", "W", "t", "n", "v", "f", "r"}
# RE2 tests \B byte by byte, so it also holds inside a multi-byte character.
NOT_A_BOUNDARY = "\\B is not supported: RE2 finds it inside characters that are not ASCII"


def to_re2(source: str) -> str:
    """The RE2 pattern that means what `source` means in ECMA-262; ConfigError if none."""
    out: list[str] = []
    i, n = 0, len(source)
    in_class = False
    while i < n:
        c = source[i]
        if c == "\\":
            piece, i = _escape(source, i + 1, in_class)
            out.append(piece)
        elif in_class:
            in_class = c != "]"
            out.append(r"\[" if c == "[" else c)
            i += 1
        elif c == "[":
            start = i + 2 if source.startswith("^", i + 1) else i + 1
            if source.startswith("]", start):
                if start == i + 1:
                    raise ConfigError("[] is an empty class: it matches nothing")
                out.append(r"[\x{0}-\x{10ffff}]")
                i = start + 1
            else:
                out.append(source[i:start])
                in_class = True
                i = start
        elif c == "(" and source.startswith("?", i + 1):
            piece, i = _group(source, i)
            out.append(piece)
        elif c == "{" and source.startswith(",", i + 1):
            raise ConfigError("{,n} is not a quantifier in ECMA-262 or RE2: write {0,n}")
        else:
            out.append(_DOT if c == "." else c)
            i += 1
    return "".join(out)


def _group(source: str, i: int) -> tuple[str, int]:
    head = source[i:i + 4]
    if head.startswith("(?:"):
        return "(?:", i + 3
    if head.startswith(("(?=", "(?!", "(?<=", "(?<!")):
        raise ConfigError("lookahead and lookbehind are not supported: tether runs patterns "
                          "with RE2, in time linear in the text")
    if head.startswith("(?<"):
        return "(?P<", i + 3
    raise ConfigError(f"{source[i:i + 3]!r} is not ECMA-262 syntax (inline flags such as "
                      "(?i) are not part of JSON Schema patterns)")


def _escape(source: str, j: int, in_class: bool) -> tuple[str, int]:
    """The escape whose letter is at `j`: its RE2 form and the index after it."""
    if j >= len(source):
        raise ConfigError("a pattern cannot end with a backslash")
    c = source[j]
    if c in _SIMPLE:
        return "\\" + c, j + 1
    if c == "s":
        return (_SPACE if in_class else f"[{_SPACE}]"), j + 1
    if c == "S" and not in_class:
        return f"[^{_SPACE}]", j + 1
    if c == "b":
        return (r"\x{8}" if in_class else r"\b"), j + 1
    if c == "0":
        if source[j + 1:j + 2].isdigit():
            raise ConfigError("octal escapes are not supported: write \\xHH or \\uHHHH")
        return r"\x{0}", j + 1
    if c in "123456789k":
        raise ConfigError(f"\\{c}: backreferences are not supported: tether runs patterns "
                          "with RE2, in time linear in the text")
    if c == "x" and len(digits := source[j + 1:j + 3]) == 2 and _HEX.issuperset(digits):
        return _code_point(int(digits, 16)), j + 3
    if c == "u":
        return _unicode(source, j + 1)
    if c == "c" and source[j + 1:j + 2].isascii() and source[j + 1:j + 2].isalpha():
        return _code_point(ord(source[j + 1]) % 32), j + 2
    if c in "pP" and source.startswith("{", j + 1) and (end := source.find("}", j + 2)) > 0:
        return "\\" + source[j:end + 1], end + 1
    if c in _PUNCTUATION:
        return "\\" + c, j + 1
    if not c.isascii():
        return c, j + 1
    if c in "pP":
        raise ConfigError(f"\\{c} needs a property name in braces, like \\{c}{{L}}")
    if c == "B":
        raise ConfigError(NOT_A_BOUNDARY)
    if c == "S":
        raise ConfigError("\\S inside a class is not supported (tether cannot rewrite it for "
                          "RE2): use a negated class instead")
    raise ConfigError(f"\\{c} has no meaning in ECMA-262 patterns (RE2, Python or PCRE give "
                      "it one): write the character itself, or a class")


def _unicode(source: str, j: int) -> tuple[str, int]:
    if source.startswith("{", j):
        end = source.find("}", j + 1)
        digits = source[j + 1:end] if end > 0 else ""
        if not digits or len(digits) > 6 or not _HEX.issuperset(digits):
            raise ConfigError("\\u{...} needs 1 to 6 hex digits")
        return _code_point(int(digits, 16)), end + 1
    digits = source[j:j + 4]
    if len(digits) != 4 or not _HEX.issuperset(digits):
        raise ConfigError("\\u needs 4 hex digits (or \\u{...})")
    cp = int(digits, 16)
    low = source[j + 6:j + 10]
    if 0xD800 <= cp <= 0xDBFF and source.startswith("\\u", j + 4) and len(low) == 4 \
            and _HEX.issuperset(low) and 0xDC00 <= int(low, 16) <= 0xDFFF:
        return _code_point(0x10000 + ((cp - 0xD800) << 10) + (int(low, 16) - 0xDC00)), j + 10
    return _code_point(cp), j + 4


def _code_point(cp: int) -> str:
    if 0xD800 <= cp <= 0xDFFF:
        raise ConfigError(f"U+{cp:04X} is a lone surrogate: no text tether judges holds one")
    if cp > 0x10FFFF:
        raise ConfigError(f"U+{cp:X} is beyond Unicode")
    return f"\\x{{{cp:x}}}"
