"""The one rule for a request path on the proxy port: canonical, or refused.

Every reverse route (each provider prefix, `/apis/{name}/`, `/mcp/{name}/`)
reads the path after its prefix through `canonical_path` before anything is
judged. The path is decoded once, and refused (400) if any reading of it other
than the plain one is possible: an upstream, a gateway in front of it or an
OpenAI-compatible server that trims, folds or decodes differently must never be
able to turn a path tether passed into one it governs. Refused:

- malformed escapes, needless escapes (`complet%69ons`), an escaped `%`
  (double encoding), escaped `/` (unless the route names it, Bedrock's ARNs),
  `\\`, `;`, `?` or `#`, and raw characters that must be escaped (`|`, `{` ...);
- control characters (C0, DEL, C1), whitespace of any kind, invisible
  characters (zero-width, bidi controls, BOM, soft hyphen, variation selectors,
  fillers), private-use and unassigned code points, and bytes that are not
  UTF-8 once decoded;
- dot segments (`.`, `..`), empty segments (`//`; one trailing `/` is kept for
  the route to judge), `;params`, and segments ending in `.` (trailing dots are
  trimmed by some servers);
- on LLM routes (`ascii_only`), any non-ASCII character, since no provider's
  endpoint has one and a look-alike may be folded onto an ASCII name; elsewhere,
  text that NFKC normalisation would change (full-width letters, ligatures).

Case is never folded: upstream paths are case-sensitive, and each provider
refuses (404) a case variant of an endpoint it governs rather than passing it.
What passes is returned still percent-encoded, so the upstream receives exactly
the bytes that were judged.

The forward and transparent proxies (HTTP_PROXY mode) read whole cloud paths
through the laxer `canonical_tail` instead: S3 keys and other cloud paths
legitimately hold spaces and non-ASCII text.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .errors import BadRequest

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar, less ';' (parameters), plus '/' and '%': what may appear unescaped.
_NOT_RAW = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@/%]")
# Escaped, these read differently to a server that decodes before it splits.
_NEVER_ESCAPED = {"\\": "a backslash", ";": "';'", "?": "'?'", "#": "'#'",
                  "%": "'%' (double encoding)"}
_RAW_PROBLEMS = {"\\": "a backslash", ";": "';' parameters"}
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ANY_ESCAPE = re.compile(r"%(.{0,2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_REFUSED_CATEGORIES = {
    "Cc": "a control character", "Cf": "an invisible format character",
    "Cs": "a surrogate", "Co": "a private-use character", "Cn": "an unassigned code point",
    "Zs": "whitespace", "Zl": "a line separator", "Zp": "a paragraph separator",
}
# Default-ignorable code points outside category Cf: drawn as nothing.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800,
     0x3164, 0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])


@dataclass(frozen=True, slots=True)
class CanonicalPath:
    raw: str                    # as received, still percent-encoded: what goes upstream
    segments: tuple[str, ...]   # the same path decoded once, split at its raw '/'


def canonical_path(raw: str, *, escapes: frozenset[str] = frozenset(),
                   ascii_only: bool = False) -> CanonicalPath:
    """`raw` (the path after a route's prefix, percent-encoded) if it has one reading.

    `escapes`: characters the route legitimately carries escaped (only `/` is
    ever needed). Raises BadRequest naming the first problem found. Linear in
    the length of `raw`."""
    if bad := _NOT_RAW.search(raw):
        raise _refused(_RAW_PROBLEMS.get(bad.group()) or _describe(bad.group()))
    if _BAD_ESCAPE.search(raw):
        raise _refused("a malformed percent escape")
    pieces = raw.split("/")
    segments = tuple(_decoded(p, escapes) for p in pieces)
    for i, segment in enumerate(segments):
        # An escaped '/' (where allowed) still may not hide a dot or empty segment.
        for part in segment.split("/"):
            _check_segment(part, last=i == len(segments) - 1 and "/" not in segment)
        _check_text(segment, ascii_only)
    return CanonicalPath(raw, segments)


def _decoded(piece: str, escapes: frozenset[str]) -> str:
    if "%" not in piece:
        return piece
    for m in _ESCAPE.finditer(piece):
        byte = int(m.group(1), 16)
        if byte >= 0x80:
            continue  # part of a UTF-8 sequence, checked once decoded
        ch = chr(byte)
        if ch in _UNRESERVED:
            raise _refused(f"a needless escape ({m.group(0)} is {ch!r})")
        if ch in _NEVER_ESCAPED:
            raise _refused(f"an escaped {_NEVER_ESCAPED[ch]}")
        if ch == "/" and "/" not in escapes:
            raise _refused("an escaped '/'")
        if byte < 0x21 or byte == 0x7F:
            raise _refused(_describe(ch))
    try:
        return unquote_to_bytes(piece).decode("utf-8")
    except UnicodeDecodeError:
        raise _refused("percent-encoded bytes that are not UTF-8") from None


def _check_segment(segment: str, *, last: bool) -> None:
    if segment in (".", ".."):
        raise _refused("a dot segment ('.' or '..')")
    if segment == "" and not last:
        raise _refused("an empty segment ('//')")
    if segment.endswith("."):
        raise _refused("a segment ending in '.'")


def _check_text(segment: str, ascii_only: bool) -> None:
    if segment.isascii():
        return  # every ASCII problem was refused above, raw or escaped
    for ch in segment:
        if ch.isascii():
            continue
        if ascii_only:
            raise _refused(f"a non-ASCII character ({_code(ch)}); no provider's API path has "
                           "one, and a look-alike may be folded onto an ASCII name")
        if unicodedata.category(ch) in _REFUSED_CATEGORIES or ord(ch) in _INVISIBLE:
            raise _refused(_describe(ch))
    if not unicodedata.is_normalized("NFKC", segment):
        raise _refused("text that Unicode normalisation (NFKC) would change, such as "
                       "full-width letters")


def _describe(ch: str) -> str:
    category = unicodedata.category(ch)
    if ch == " " or category in ("Zs", "Zl", "Zp"):
        what = "whitespace"
    elif category == "Cc":
        what = "a control character"
    elif ord(ch) in _INVISIBLE:
        what = "an invisible character"
    elif category in _REFUSED_CATEGORIES:
        what = _REFUSED_CATEGORIES[category]
    else:
        what = f"a character that must be percent-encoded ({ch!r})"
    return f"{what} ({_code(ch)})"


def _code(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def _refused(reason: str) -> BadRequest:
    return BadRequest(f"the request path is ambiguous: {reason}; it was not forwarded")


def canonical_tail(raw_tail: str) -> str:
    """The forward and transparent proxies' laxer check of a whole request path.

    Cloud paths (S3 keys ...) legitimately hold spaces and non-ASCII text, so only
    what upstreams read two ways is refused: `%2F`, `..`, `;params`, doubled
    slashes, backslashes, NUL and needless escapes (`complet%69ons`). The path is
    returned still percent-encoded, so the upstream receives exactly the bytes that
    were judged."""
    if "\\" in raw_tail or "\x00" in raw_tail or ";" in raw_tail or "//" in raw_tail:
        raise _ambiguous_tail()
    for m in _ANY_ESCAPE.finditer(raw_tail):
        code = m.group(1)
        if len(code) != 2 or any(c not in string.hexdigits for c in code):
            raise _ambiguous_tail()
        char = chr(int(code, 16))
        if char in _UNRESERVED and char != ".":
            raise _ambiguous_tail()
        if char in "/\\.\x00;":
            raise _ambiguous_tail()
    if any(seg in (".", "..") for seg in raw_tail.split("/")):
        raise _ambiguous_tail()
    return raw_tail


def _ambiguous_tail() -> BadRequest:
    return BadRequest("the request path is ambiguous (needless or reserved escapes, dot "
                      "segments, doubled slashes, ';' or backslashes); it was not forwarded")
