"""Secret redaction, applied before a record leaves the process.

One function for every place that shows tool arguments to someone: the audit
log, Slack messages, the approvals page, spans. Two rules:

* by key: an object key whose words (split on `_`, `-`, `.`, spaces and
  camelCase, in the policy's normal form) spell a secret's name - password,
  token, api key, authorization, cookie... - has its value replaced whole,
  whatever its type. Word matching, not substring: `max_tokens` stays.
* by value: strings that look like credentials wherever they are - bearer
  tokens, OpenAI `sk-` keys, Slack `xox?-` tokens, and AWS secret access keys
  (40 base64 characters next to an AKIA/ASIA key id, or under a key named like
  a secret or key) - have the matching text replaced, the rest kept.

Plus configured paths (`db.dsn`, `headers.*`), relative to the value given.
The result lists the paths that were masked, never what was there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..policy.names import normalize

MASK = "[REDACTED]"

# Secret names, as words joined without separators.
SECRET_NAMES = frozenset({
    "password", "passwd", "secret", "token", "apikey", "authorization", "accesskey",
    "privatekey", "clientsecret", "credential", "credentials", "cookie", "sessiontoken",
})
_LONGEST = 3  # words per name at most ("api_key" is 2, "aws session token" spans 2)

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_TOKENS = re.compile(
    r"(?i:\bbearer\s+)\S+"
    r"|\bsk-[A-Za-z0-9_-]{20,}"
    r"|\bxox[baprs]-[A-Za-z0-9-]{10,}"
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_HEX = re.compile(r"[0-9a-fA-F]{40}")
# `password=x`, `"token": "x"` inside free text (raw arguments that are not valid JSON).
_PAIR = re.compile(r"""(["']?)([A-Za-z][A-Za-z0-9_.-]*)\1(\s*[:=]\s*)"""
                   r"""("(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s,;&}]+)""")

Path = tuple[str, ...]


def key_words(key: str) -> list[str]:
    """`awsSecretAccessKey` -> [aws, secret, access, key]; `X-Api-Key` -> [x, api, key]."""
    return [w.casefold() for w in _WORD.findall(key)]


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Cached: every audit record walks the same few dozen keys."""
    words = key_words(key)
    if normalize(key).replace("_", "").replace("-", "") in SECRET_NAMES:
        return True
    for size in range(1, _LONGEST + 1):
        for i in range(len(words) - size + 1):
            if "".join(words[i:i + size]) in SECRET_NAMES:
                return True
    return False


@functools.lru_cache(maxsize=4096)
def _names_a_key(key: str) -> bool:
    """A key under which a bare 40-character string is taken for an AWS secret."""
    return bool({"secret", "key"} & set(key_words(key)))


def mask_text(text: str, *, aws_context: bool = False) -> str:
    """Mask credential-looking substrings. `aws_context`: an AWS key id or a key
    named like a secret is next to this string, so a bare 40-char token is one."""
    out = _PAIR.sub(lambda m: m.group(0) if not is_secret_key(m.group(2)) else
                    f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{MASK}", text)
    out = _TOKENS.sub(lambda m: "Bearer " + MASK if m.group(0)[:6].lower() == "bearer" else MASK,
                      out)
    if aws_context or _AWS_KEY_ID.search(out):
        # Commit hashes are 40 hex characters; a base64 secret is practically never pure hex.
        out = _AWS_SECRET.sub(lambda m: m.group(0) if _HEX.fullmatch(m.group(0)) else MASK, out)
    return out


@dataclass(frozen=True, slots=True)
class Redacted:
    value: object
    masked: tuple[str, ...]  # dotted paths of what was replaced, in document order


def parse_paths(paths: Iterable[str]) -> tuple[Path, ...]:
    """`db.dsn`, `headers.*`: dotted, `*` matches any one key or list index."""
    return tuple(tuple(p.split(".")) for p in paths if p)


def _path_hit(path: Path, patterns: Sequence[Path]) -> bool:
    return any(len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path, strict=True))
               for p in patterns)


def redact(value: object, paths: Sequence[Path] = (), *, prefix: Path = ()) -> Redacted:
    """A copy of a JSON-like value with secrets masked. `paths` (see parse_paths) are
    relative to `value`; `prefix` is prepended to the reported paths only."""
    masked: list[str] = []

    def walk(node: object, path: Path, key: str | None, aws_context: bool) -> object:
        if path and (_path_hit(path, paths) or (key is not None and is_secret_key(key))):
            masked.append(".".join(prefix + path))
            return MASK
        if isinstance(node, dict):
            near_key_id = any(isinstance(v, str) and _AWS_KEY_ID.search(v) for v in node.values())
            return {k: walk(v, (*path, str(k)), str(k), near_key_id or _names_a_key(str(k)))
                    for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, (*path, str(i)), None, aws_context) for i, v in enumerate(node)]
        if isinstance(node, str):
            text = mask_text(node, aws_context=aws_context)
            if text != node:
                masked.append(".".join(prefix + path) or "$")
            return text
        return node

    return Redacted(walk(value, (), None, False), tuple(masked))


def redact_arguments(arguments: object, paths: Sequence[Path] = ()) -> object:
    """For display (Slack, the approvals page, spans): the masked copy only."""
    return redact(arguments, paths).value
