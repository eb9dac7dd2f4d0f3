"""Secret redaction, applied before a record leaves the process.

One function for every place that shows tool arguments to someone: the audit
log, Slack messages, the approvals page, spans. Two rules:

* by key: an object key whose words (split on `_`, `-`, `.`, spaces and
  camelCase, in the policy's normal form) spell a secret's name - password,
  token, api key, authorization, cookie... - has its value replaced whole,
  whatever its type. Word matching, not substring: `max_tokens` stays (a key
  over 256 characters, which names nothing, is read by substring: more is masked).
* by value: strings that look like credentials wherever they are - bearer
  tokens, OpenAI `sk-` keys, Slack `xox?-` tokens, and AWS secret access keys
  (40 base64 characters next to an AKIA/ASIA key id, or under a key named like
  a secret or key) - have the matching text replaced, the rest kept; so has
  the value of a `key=value` or `"key": value` pair in free text whose key is one.

Plus configured paths (`db.dsn`, `headers.*`), relative to the value given.
The result lists the paths that were masked, never what was there.

Every pass costs time linear in the text, whatever it holds (a megabyte of hex, a
base64 file, prompt-injected text): each token pattern begins with a literal, so the
engine jumps to its candidates instead of trying every offset, and `key=value` pairs
are found from their separators, so a long run of key characters is read once, not
once per offset (which made the earlier single pattern quadratic: 8 KB of hex took
seconds). bench/redaction.py measures it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..policy.names import CACHED_LENGTH, normalize

MASK = "[REDACTED]"

# Secret names, as words joined without separators.
SECRET_NAMES = frozenset({
    "password", "passwd", "secret", "token", "apikey", "authorization", "accesskey",
    "privatekey", "clientsecret", "credential", "credentials", "cookie", "sessiontoken",
})
_LONGEST = 3  # words per name at most ("api_key" is 2, "aws session token" spans 2)

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_NOT_WORD = re.compile(r"[^A-Za-z0-9]+")  # what _WORD never takes
# The word boundary before a token is a lookbehind *after* its literal start, so the
# search skips to the literal (`(?<!\w......)`: the character before `bearer`).
_BEARER = re.compile(r"(?i:bearer)(?<!\w......)\s+\S+")
_SK = re.compile(r"sk-(?<!\wsk-)[A-Za-z0-9_-]{20,}")
_XOX = re.compile(r"xox(?<!\wxox)[baprs]-[A-Za-z0-9-]{10,}")
_AWS_KEY_ID = re.compile(r"A(?:KIA|SIA)(?<!\wA...)[A-Z0-9]{16}\b")
# Tried only at the start of a run (the lookbehind fails at once inside one): linear.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_HEX = re.compile(r"[0-9a-fA-F]{40}")
# `password=x`, `"token": "x"` inside free text (raw arguments that are not valid JSON).
# Matched only where a secret key starts (see _secret_pairs), never searched for.
_PAIR = re.compile(r"""(?P<quote>["']?)(?P<key>[0-9_.-]*[A-Za-z][A-Za-z0-9_.-]*)(?P=quote)"""
                   r"""(?P<sep>\s*[:=]\s*)(?P<value>"[^"\\]*(?:\\.[^"\\]*)*"?|'[^']*'?|[^\s,;&}]+)""")
# A separator right after a key character, a quote or a blank: only those can end a key.
_SEPARATOR = re.compile(r"""[:=](?<=[A-Za-z0-9_.\-"'\s][:=])""")
# Read backwards from a separator, on the reversed text: blanks, a closing quote, the key.
_KEY_BEFORE = re.compile(r"\s*(?P<quote>[\"']?)(?P<key>[A-Za-z0-9_.-]*)")

Path = tuple[str, ...]


def key_words(key: str) -> list[str]:
    """`awsSecretAccessKey` -> [aws, secret, access, key]; `X-Api-Key` -> [x, api, key]."""
    return [w.casefold() for w in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """Cached for keys up to CACHED_LENGTH: every audit record walks the same few dozen
    keys, and a cache of arbitrary keys would hold whatever an agent sent. A longer key
    (a base64 run before its `=` padding) is tested by substring: a name anywhere in its
    letters and digits counts, which masks at least what its words would."""
    if len(key) <= CACHED_LENGTH:
        return _secret_key(key)
    return _spells_any(SECRET_NAMES, key) or (
        not key.isascii() and normalize(key).replace("_", "").replace("-", "") in SECRET_NAMES)


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    if key.isascii() and not _spells_any(SECRET_NAMES, key):
        return False  # the words of an ASCII key, joined, hold every name they spell
    words = key_words(key)
    if normalize(key).replace("_", "").replace("-", "") in SECRET_NAMES:
        return True
    for size in range(1, _LONGEST + 1):
        for i in range(len(words) - size + 1):
            if "".join(words[i:i + size]) in SECRET_NAMES:
                return True
    return False


def _spells_any(names: Iterable[str], key: str) -> bool:
    """Whether a name is in the key's ASCII letters and digits run together, that is in
    its words joined: a few passes in C, where splitting words is a Python step each."""
    joined = _NOT_WORD.sub("", key).lower()
    return any(name in joined for name in names)


def _names_a_key(key: str) -> bool:
    """A key under which a bare 40-character string is taken for an AWS secret."""
    if len(key) > CACHED_LENGTH:
        return _spells_any(("secret", "key"), key)
    return _names_a_key_cached(key)


@functools.lru_cache(maxsize=4096)
def _names_a_key_cached(key: str) -> bool:
    return bool({"secret", "key"} & set(key_words(key)))


def _secret_pairs(text: str) -> Iterator[re.Match[str]]:
    """The `key=value` / `key: value` pairs whose key names a secret, left to right.

    Found from the separators: the key before each is read backwards once (its whole run
    of key characters, the only place a pair can start), and only a secret one is matched
    forward for its value. A pair is every match searching _PAIR would find with a secret
    key, and more: a separator inside another key's value is read too (`url:
    https://x?token=...`), so values inside values are masked."""
    if ":" not in text and "=" not in text:
        return
    rev = text[::-1]
    n = len(text)
    done = 0  # the end of the last secret value
    for sep in _SEPARATOR.finditer(text):
        at = sep.start()
        if at < done:
            continue  # inside a secret value, which is masked whole
        back = _KEY_BEFORE.match(rev, n - at)
        assert back is not None  # every part of it may be empty
        if not is_secret_key(back["key"][::-1]):
            continue
        start = at - (back.end() - back.start())
        if back["quote"]:  # a quoted key needs the same quote before it
            start -= 1
            if start < 0 or text[start] != back["quote"]:
                continue
        m = _PAIR.match(text, start) if start >= done else None
        if m is not None:
            yield m
            done = m.end()


def _mask_pairs(text: str) -> str:
    out: list[str] = []
    done = 0
    for m in _secret_pairs(text):
        out += (text[done:m.start("value")], MASK)
        done = m.end()
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def _may_hold(text: str) -> bool:
    """Whether any pass but the AWS secret one could match: a few substring searches in
    C, cheaper than the passes for the many short strings of a JSON document."""
    return ("=" in text or ":" in text or "sk-" in text or "xox" in text or "KIA" in text
            or "SIA" in text or "bearer" in text.lower())


def _mask_bearer(text: str) -> str:
    # ASCII text (the usual case) is lowered in one pass to see whether there is any.
    if text.isascii() and "bearer" not in text.lower():
        return text
    return _BEARER.sub("Bearer " + MASK, text)


def mask_text(text: str, *, aws_context: bool = False) -> str:
    """Mask credential-looking substrings. `aws_context`: an AWS key id or a key
    named like a secret is next to this string, so a bare 40-char token is one."""
    if not _may_hold(text) and not (aws_context and len(text) >= 40):
        return text
    out = _mask_bearer(text)
    out = _SK.sub(MASK, out)
    out = _XOX.sub(MASK, out)
    out = _mask_pairs(out)
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
    relative to `value`; `prefix` is prepended to the reported paths only.

    The walk keeps its own stack: arguments nested as deep as a JSON parser allows
    (about a thousand levels) would overflow Python's, two layers after they parsed."""
    masked: list[str] = []
    root: list[object] = [None]
    # (node, its path, its key if in an object, next to an AWS key id, where it goes)
    todo: list[tuple[object, Path, str | None, bool, dict[object, object] | list[object],
                     object]] = [(value, (), None, False, root, 0)]
    while todo:
        node, path, key, aws_context, into, slot = todo.pop()
        if path and ((paths and _path_hit(path, paths))
                     or (key is not None and is_secret_key(key))):
            masked.append(".".join(prefix + path))
            node = MASK
        elif isinstance(node, dict):
            near_key_id = any(isinstance(v, str) and _AWS_KEY_ID.search(v) for v in node.values())
            copy: dict[object, object] = dict.fromkeys(node)  # the order is the original's
            todo += [(v, (*path, str(k)), str(k), near_key_id or _names_a_key(str(k)), copy, k)
                     for k, v in reversed(node.items())]  # popped in document order
            node = copy
        elif isinstance(node, list | tuple):
            items: list[object] = [None] * len(node)
            todo += [(v, (*path, str(i)), None, aws_context, items, i)
                     for i, v in reversed(list(enumerate(node)))]
            node = items
        elif isinstance(node, str):
            text = mask_text(node, aws_context=aws_context)
            if text != node:
                masked.append(".".join(prefix + path) or "$")
            node = text
        if isinstance(into, list):
            assert isinstance(slot, int)
            into[slot] = node
        else:
            into[slot] = node
    return Redacted(root[0], tuple(masked))


# Top-level audit fields whose values tether makes itself (verdicts, its own ids, names
# from the loaded config, numbers): nothing an agent, a model or an upstream wrote can be
# in them, so the audit log's redaction does not visit them. Only while they hold what
# tether puts there (scalars, or a list of them): anything else is walked as usual.
TETHER_MADE = frozenset({
    "kind", "event", "decision_id", "trace_id", "action", "policy_action", "outcome",
    "rules", "shadow_rules", "effect", "policy_revision", "latency_ms", "stream", "stage",
    "round", "continues", "linked_decision",
})
_SCALARS = (str, int, float, bool, type(None))


def _tether_made(key: str, value: object) -> bool:
    return key in TETHER_MADE and (isinstance(value, _SCALARS) or (
        isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)))


def _unchanged(value: object) -> bool:
    """Whether `redact` (no configured paths) would mask nothing in `value`, checked
    without its copies and paths: no key names a secret, and no string changes under
    `mask_text` even next to an AWS key id (a string that does not change there does not
    change anywhere). A string is run through the passes only past the pre-check. True
    for most records: they are written as they are."""
    todo: list[object] = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            if ((len(node) >= 40 or _may_hold(node))
                    and mask_text(node, aws_context=True) != node):
                return False
        elif isinstance(node, dict):
            for k, v in node.items():
                if is_secret_key(str(k)):
                    return False
                if isinstance(v, str | dict | list | tuple):
                    todo.append(v)
        elif isinstance(node, list | tuple):
            todo += node
    return True


def redact_record(record: dict[str, object], paths: Sequence[Path] = ()) -> Redacted:
    """`redact` of an audit record, with the same result (tests/test_redact.py compares
    the two) for less: the fields in TETHER_MADE are not visited, and a record with
    nothing to mask (checked first, without copying) is returned as it is. The values
    are the record's own, not copies: serialise them, do not change them."""
    skipped = {k: v for k, v in record.items() if _tether_made(k, v)}
    rest = {k: v for k, v in record.items() if k not in skipped} if skipped else record
    if not paths and _unchanged(rest):
        return Redacted(record, ())
    done = redact(rest, paths)
    assert isinstance(done.value, dict)
    return Redacted({**done.value, **skipped}, done.masked)


def redact_arguments(arguments: object, paths: Sequence[Path] = ()) -> object:
    """For display (Slack, the approvals page, spans): the masked copy only."""
    return redact(arguments, paths).value
