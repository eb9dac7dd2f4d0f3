"""Lone UTF-16 surrogates: text a Python str can hold and UTF-8 cannot.

Three doors let one in. JSON may escape half of a UTF-16 pair (`"\\ud800"`), which
`json.loads` reads as the code point U+D800; `json.loads` on bytes decodes them with
`surrogatepass`, so the three bytes ED A0 80 become U+D800 too; and aiohttp decodes
header bytes that are not UTF-8 with `surrogateescape` (as mitmproxy does paths), so
an overlong C0 AF becomes U+DCC0 U+DCAF. `str.encode("utf-8")` raises on any of them,
so every encoder that writes agent- or model-controlled text uses one of these:

  json_text    JSON with every surrogate as its `\\uXXXX` escape and other text as
               is: valid UTF-8 once encoded, and `json.loads` gives the same str
               back, which re-encodes to the same bytes (the audit chain needs both).
               `replace=True`: surrogates become U+FFFD, for readers that refuse
               the escape (Slack).
  utf8         bytes to hash or key on: UTF-8, surrogates as their three bytes
               (`surrogatepass`), so distinct strs never share a hash.
  scrub        text for people and for fields that must be UTF-8 (span
               attributes, XML, the terminal): each surrogate becomes U+FFFD.

And for refusing them before they are judged: `may_hold` (a cheap look at JSON
text or bytes) and `find` (where in a parsed value one is). Ordinary text passes
every function here unchanged, byte for byte, at the cost of one regex scan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

SURROGATE = re.compile("[\ud800-\udfff]")
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
# What can make a surrogate in json.loads: an escape of one, or one already in the text.
_TEXT_HINT = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")
# The same in UTF-8 bytes: the escape, or a surrogate's three bytes (ED A0..BF xx).
_BYTES_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
REPLACEMENT = "\ufffd"


def holds(text: str) -> bool:
    return SURROGATE.search(text) is not None


def scrub(text: str) -> str:
    """`text` with each surrogate replaced by U+FFFD (lossy: for display only)."""
    return SURROGATE.sub(REPLACEMENT, text) if holds(text) else text


def utf8(text: str) -> bytes:
    """UTF-8 for hashing: the same bytes as `encode()` for any text that has them."""
    return text.encode("utf-8", "surrogatepass")


def joined(text: str) -> str:
    """`text` as a JSON reader gets it back: a high surrogate followed by a low one is
    the character they spell (a reader joins their two escapes into it). UTF-16 does
    exactly that; pairs written as two code points are rare (bytes decoded with
    `surrogatepass`, stream pieces put together), so only text with one pays for it."""
    if _PAIR.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def total(text: str, *, replace: bool = False) -> str:
    """JSON text from `json.dumps(..., ensure_ascii=False)` made encodable: pairs
    joined, any other surrogate escaped (or replaced). Surrogates occur only inside
    JSON strings, and two in a row only within one string; they are the only code
    points UTF-8 cannot encode, so `backslashreplace` escapes exactly them, as JSON's
    own `\\uXXXX`."""
    if not holds(text):
        return text
    text = joined(text)
    if replace:
        return SURROGATE.sub(REPLACEMENT, text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(value: object, *, replace: bool = False, sort_keys: bool = False,
              separators: tuple[str, str] | None = None, indent: int | None = None,
              default: Callable[[object], object] | None = None) -> str:
    """`json.dumps(value, ensure_ascii=False, ...)` that any str inside cannot break."""
    return total(json.dumps(value, ensure_ascii=False, sort_keys=sort_keys, separators=separators,
                            indent=indent, default=default), replace=replace)


def json_bytes(value: object, *, replace: bool = False, sort_keys: bool = False,
               separators: tuple[str, str] | None = None,
               default: Callable[[object], object] | None = None) -> bytes:
    return json_text(value, replace=replace, sort_keys=sort_keys, separators=separators,
                     default=default).encode("utf-8")


def may_hold(data: str | bytes) -> bool:
    """Whether `json.loads(data)` could yield a surrogate (False: it cannot). Bytes are
    read as json.loads reads them: UTF-8, or UTF-16/32 when they look like it."""
    if isinstance(data, bytes):
        encoding = json.detect_encoding(data)
        if encoding.startswith("utf-8"):
            return _BYTES_HINT.search(data) is not None
        try:
            data = data.decode(encoding, "surrogatepass")
        except UnicodeDecodeError:
            return False  # json.loads refuses these bytes itself
    return _TEXT_HINT.search(data) is not None


type Trail = tuple[Trail, str | int] | None  # the keys and indexes down to a node, last first


def find(value: object) -> str | None:
    """The path (`$`, `$.key`, `$[0]`; keys clipped) of the first str in a parsed JSON
    value, key or string, that holds a surrogate; None when none does. Iterative (json
    nests as deep as the recursion limit allows); a path is spelled only when found."""
    stack: list[tuple[object, Trail]] = [(value, None)]
    while stack:
        node, trail = stack.pop()
        if isinstance(node, str):
            if holds(node):
                return _path(trail)
        elif isinstance(node, dict):
            for key in node:
                if isinstance(key, str) and holds(key):
                    return _path((trail, key))
            stack.extend((child, (trail, str(key))) for key, child in reversed(node.items()))
        elif isinstance(node, list | tuple):
            stack.extend((child, (trail, i)) for i, child in reversed(list(enumerate(node))))
    return None


def _path(trail: Trail) -> str:
    parts: list[str] = []
    while trail is not None:
        trail, label = trail
        if isinstance(label, int):
            parts.append(f"[{label}]")
        else:
            label = scrub(label)
            parts.append("." + (label if len(label) <= 40 else label[:39] + "\u2026"))
    return "$" + "".join(reversed(parts))
