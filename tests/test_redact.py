"""Redaction on hostile text: every pass linear, and masking what it masked before.

A megabyte of each pattern's worst case must complete (timings are in
bench/redaction.py); the scanner that finds `key=value` pairs from their separators
must find exactly what searching the pair pattern from every offset finds; keys are
tested by their words as before, however the test is sped up."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.audit.redact import MASK, is_secret_key, mask_text, redact, redact_record
from proxy.policy.names import normalize

redact_mod = importlib.import_module("proxy.audit.redact")  # proxy.audit.redact is a function
MB = 1_000_000
HEX = os.urandom(MB // 2).hex()
B64 = base64.b64encode(os.urandom(MB * 3 // 4 - 2)).decode()  # ends in "=" padding


def _searched(text: str) -> list[tuple[int, int]]:
    """Where the values of secret pairs are when the pair pattern is searched from every
    offset, as before: the reference (quadratic on a long run of key characters, so
    only for short texts)."""
    pattern: re.Pattern[str] = redact_mod._PAIR
    return [m.span("value") for m in pattern.finditer(text) if is_secret_key(m["key"])]


_PIECES = st.sampled_from([*'aZ09_.-"\': =\n\t,;&}\\é\u3000', "password", "_token", "api_key",
                           "secret", "Bearer ", "sk-", "xoxb-", "url", "http://"])


@given(st.lists(_PIECES, max_size=40).map("".join))
def test_pairs_found_from_separators_mask_at_least_the_searched_ones(text: str) -> None:
    """Every secret value the searched pattern finds is masked; values inside another
    key's value are masked too (the search skipped them)."""
    found = [(m.start("value"), m.end()) for m in redact_mod._secret_pairs(text)]
    for start, end in _searched(text):
        assert any(a <= start and end <= b for a, b in found), (text, (start, end), found)
    masked = redact_mod._mask_pairs(text)
    assert (masked == text) is (not found)


def _by_words(key: str) -> bool:
    """The key rule as written (no shortcut): normal form, or 1-3 consecutive words."""
    if normalize(key).replace("_", "").replace("-", "") in redact_mod.SECRET_NAMES:
        return True
    words = redact_mod.key_words(key)
    return any("".join(words[i:i + n]) in redact_mod.SECRET_NAMES
               for n in (1, 2, 3) for i in range(len(words) - n + 1))


_KEY_PIECES = st.sampled_from([*"aAbZ09_.- \u200bé\u0301ßＫ\u212a", "pass", "Word", "api", "Key",
                               "token", "Secret", "TOKEN", "cookie", "x", "X"])


@given(st.lists(_KEY_PIECES, max_size=12).map("".join))
def test_keys_are_judged_by_their_words(key: str) -> None:
    assert is_secret_key(key) == _by_words(key)


@given(st.lists(_KEY_PIECES, max_size=12).map("".join))
def test_a_long_key_masks_at_least_what_its_words_would(key: str) -> None:
    long_key = "x" * 300 + "_" + key
    assert is_secret_key(long_key) or not _by_words(long_key)


@pytest.mark.parametrize(("name", "text", "masked"), [
    ("hex run", HEX, False),
    ("base64 run, padded", B64, False),
    ("hex run, then a separator", HEX + "=x", False),
    ("key characters, then a secret's name", "a" * MB + "_password=x", True),
    ("dense pairs", "a=b " * (MB // 4), False),
    ("dense secret pairs", "token=x " * (MB // 8), True),
    ("separators alone", ":" * MB, False),
    ("blanks before a separator", "a" + " " * MB + ":x", False),
    ("quotes and letters", '"a' * (MB // 2), False),
    ("an unclosed quoted value", 'password="' + "x" * MB, True),
    ("bearer, repeated", "bearer " * (MB // 7), True),
    ("a bearer token a megabyte long", "Bearer " + "x" * MB, True),
    ("sk-, repeated", "sk-" * (MB // 3), True),
    ("xoxb-, repeated", "xoxb-" * (MB // 5), True),
    ("AKIA, repeated", "AKIA" * (MB // 4), False),
    ("prose", "lorem ipsum dolor sit amet, consectetur " * (MB // 40), False),
    ("JSON text", json.dumps({f"k{i}": "v" * 10 for i in range(MB // 20)}), False),
])
def test_a_megabyte_of_each_worst_case_completes(name: str, text: str, masked: bool) -> None:
    out = mask_text(text)
    assert (MASK in out) is masked, name
    mask_text(text, aws_context=True)  # the AWS secret pass too


def test_a_long_run_is_read_once_not_once_per_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structurally linear: the pair pass asks about each key once, however long, where
    the searched pattern retried at every offset of the run."""
    asked: list[int] = []
    real = redact_mod.is_secret_key

    def counted(key: str) -> bool:
        asked.append(len(key))
        return bool(real(key))

    monkeypatch.setattr(redact_mod, "is_secret_key", counted)
    redact_mod._mask_pairs(HEX + "=x " + HEX + ": y")
    assert asked == [len(HEX), len(HEX)]


def test_ordinary_secrets_are_still_masked() -> None:
    value = {
        "cmd": "deploy --password=hunter2 -H 'Authorization: Bearer abc.def' token: xyz",
        "raw": '{"api_key": "k-123", "n": 1',
        "note": "use sk-abcdefghijklmnopqrstuvwx or xoxb-1234567890-abcdef",
        "aws": "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "content": HEX,
        "max_tokens": 5,
    }
    out = redact(value)
    text = json.dumps(out.value)
    for secret in ("hunter2", "abc.def", "xyz", "k-123", "sk-abc", "xoxb-1", "wJalr"):
        assert secret not in text, secret
    assert out.masked == ("cmd", "raw", "note", "aws")
    assert out.value["content"] == HEX and out.value["max_tokens"] == 5  # type: ignore[index]


def test_arguments_as_deep_as_json_allows_are_redacted() -> None:
    """The walk has its own stack: what json.loads accepted (just under a thousand
    levels) does not overflow Python's in the audit log two layers later."""
    def nested(depth: int) -> object:
        return json.loads('{"a":' * depth + '{"password": "x"}' + "}" * depth)

    low, high = 1, 100_000  # the deepest object json.loads reads here, by bisection
    while low + 1 < high:
        mid = (low + high) // 2
        try:
            nested(mid)
            low = mid
        except RecursionError:
            high = mid
    depth = low
    value = nested(depth)
    out = redact({"arguments": value})
    assert out.masked == (".".join(["arguments", *["a"] * depth, "password"]),)


RECORD = {"kind": "decision", "decision_id": "6a6e04fc716245efabb750bdcd6dfa24",
          "action": "allow", "rules": ["r1"], "latency_ms": 0.06, "stream": False,
          "session": "s-1", "tool": "get_weather", "message": "no rule matched",
          "arguments": {"city": "Paris", "nested": [{"unit": "celsius"}, "x"]}}


@pytest.mark.parametrize("change", [
    {},
    {"arguments": {"password": "hunter2"}},
    {"arguments": {"note": "use Bearer abc.def please"}},
    {"arguments": ["AKIAABCDEFGHIJKLMNOP", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]},
    {"arguments": {"aws_secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}},
    {"arguments": "curl -H 'x-api-key: sk-abcdefghijklmnopqrstuvwx'"},
    {"message": "token=abc123", "tool": "sk-abcdefghijklmnopqrstuvwxyz"},
    {"rules": [{"token": "t"}]},                 # not what tether puts there: walked
    {"kind": "xoxb-1234567890-abcdef"},          # tether-made: not visited
])
def test_an_audit_record_is_redacted_as_by_the_whole_walk(change: dict[str, object]) -> None:
    record = {**RECORD, **change}
    fast, full = redact_record(record), redact(record)
    if change.get("kind"):
        assert fast.value == record and fast.masked == ()   # the one documented difference
        return
    assert fast.value == full.value and fast.masked == full.masked
    if not change:
        assert fast.value is record   # nothing to mask: not even copied


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20))
def test_redact_record_agrees_with_redact_on_any_arguments(arguments: object) -> None:
    record = {**RECORD, "arguments": arguments}
    fast, full = redact_record(record), redact(record)
    assert fast.value == full.value and fast.masked == full.masked
