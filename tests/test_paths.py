"""`proxy.paths.canonical_path`: one reading of a path, or a refusal that says why."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.paths import canonical_path

SLASH = frozenset("/")


@pytest.mark.parametrize("raw, segments", [
    ("v1/chat/completions", ("v1", "chat", "completions")),
    ("v1/models/", ("v1", "models", "")),                       # one trailing slash: the route's
    ("", ("",)),
    ("v1/models/ft:gpt-4o-mini:org::abc1", ("v1", "models", "ft:gpt-4o-mini:org::abc1")),
    ("v1beta/models/gemini-2.0-flash%3AcountTokens", ("v1beta", "models",
                                                      "gemini-2.0-flash:countTokens")),
    ("openai/deployments/gpt-4o.mini/chat/completions", ("openai", "deployments", "gpt-4o.mini",
                                                         "chat", "completions")),
    ("v1/files/file-abc_1/content", ("v1", "files", "file-abc_1", "content")),
    ("a%7Cb%22c%3C", ("a|b\"c<",)),                              # escapes that are needed
])
def test_plain_paths_have_one_reading(raw: str, segments: tuple[str, ...]) -> None:
    for ascii_only in (True, False):
        got = canonical_path(raw, ascii_only=ascii_only)
        assert (got.raw, got.segments) == (raw, segments)


def test_an_escaped_slash_only_where_the_route_names_it() -> None:
    arn = ("model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
           "us.anthropic.x-v1%3A0/converse")
    got = canonical_path(arn, escapes=SLASH, ascii_only=True)
    assert got.segments[1] == "arn:aws:bedrock:us-east-1:123456789012:inference-profile/" \
                              "us.anthropic.x-v1:0"
    with pytest.raises(BadRequest, match="an escaped '/'"):
        canonical_path(arn, ascii_only=True)


@pytest.mark.parametrize("raw, reason", [
    ("v1/chat/completions%20", "whitespace (U+0020)"),
    ("v1/chat/completions%09", "control character (U+0009)"),
    ("v1/chat/completions%0A", "control character (U+000A)"),
    ("v1/chat/completions%0d", "control character (U+000D)"),
    ("v1/chat/completions%00", "control character (U+0000)"),
    ("v1/chat/completions%7F", "control character (U+007F)"),
    ("v1/chat/completions.", "segment ending in '.'"),
    ("v1/chat/completions..", "segment ending in '.'"),
    ("v1/chat/./completions", "dot segment"),
    ("v1/chat/../completions", "dot segment"),
    ("v1/chat/completions%2E", "needless escape (%2E is '.')"),
    ("v1/chat/complet%69ons", "needless escape (%69 is 'i')"),
    ("v1/chat/complet%2569ons", "escaped '%' (double encoding)"),
    ("v1/chat%2Fcompletions", "escaped '/'"),
    ("v1/chat%5Ccompletions", "escaped a backslash"),
    ("v1/chat\\completions", "a backslash"),
    ("v1/chat/completions;x=1", "';' parameters"),
    ("v1/chat/completions%3B", "escaped ';'"),
    ("v1/chat/completions%3F", "escaped '?'"),
    ("v1/chat/completions%23", "escaped '#'"),
    ("v1//chat/completions", "empty segment"),
    ("/v1/chat/completions", "empty segment"),
    ("v1/chat/completions%", "malformed percent escape"),
    ("v1/chat/completions%zz", "malformed percent escape"),
    ("v1/chat/completions%C0%AE", "not UTF-8"),
    ("v1/chat/completions%FF", "not UTF-8"),
    ("v1/chat/completions|", "must be percent-encoded ('|')"),
    ("v1/chat/completions%E2%80%8B", "non-ASCII character (U+200B)"),  # zero-width space
    ("v1/chat/completions%EF%BD%93", "non-ASCII character (U+FF53)"),  # full-width s
])
def test_ambiguous_spellings_are_refused_with_the_reason(raw: str, reason: str) -> None:
    with pytest.raises(BadRequest) as info:
        canonical_path(raw, ascii_only=True)
    assert reason in info.value.message and "ambiguous" in info.value.message


@pytest.mark.parametrize("raw, reason", [
    ("issue/OPS-1%E2%80%8B", "invisible format character (U+200B)"),
    ("issue/OPS-1%E2%80%AE", "invisible format character (U+202E)"),   # right-to-left override
    ("issue/%EF%BB%BFOPS-1", "invisible format character (U+FEFF)"),   # BOM
    ("issue/OPS%C2%AD1", "invisible format character (U+00AD)"),       # soft hyphen
    ("issue/OPS-1%EF%B8%8F", "invisible character (U+FE0F)"),          # variation selector
    ("issue/OPS-1%E3%85%A4", "invisible character (U+3164)"),          # Hangul filler
    ("issue/OPS-1%C2%A0", "whitespace (U+00A0)"),
    ("issue/OPS-1%E3%80%80", "whitespace (U+3000)"),
    ("issue/OPS-1%E2%80%A8", "whitespace (U+2028)"),          # line separator
    ("issue/OPS-1%C2%85", "control character (U+0085)"),
    ("issue/OPS-1%EE%80%80", "private-use character (U+E000)"),
    ("issue/OPS-1%F0%AF%A8%A0", "unassigned"),
    ("issue/%EF%BC%AFPS-1", "normalisation (NFKC)"),                   # full-width O
    ("issue/e%CC%81", "normalisation (NFKC)"),                         # e + combining acute
])
def test_text_elsewhere_must_be_visible_and_normal(raw: str, reason: str) -> None:
    with pytest.raises(BadRequest, match="ambiguous") as info:
        canonical_path(raw)
    assert reason in info.value.message


def test_visible_normal_text_passes_off_the_llm_routes() -> None:
    assert canonical_path("issue/caf%C3%A9").segments == ("issue", "café")
    with pytest.raises(BadRequest, match="non-ASCII"):
        canonical_path("issue/caf%C3%A9", ascii_only=True)


@given(st.text(max_size=60))
def test_any_text_has_an_answer(raw: str) -> None:
    """Total: any string is either canonical or refused with BadRequest."""
    try:
        canonical_path(raw, ascii_only=True)
        canonical_path(raw, escapes=SLASH)
    except BadRequest:
        pass


@pytest.mark.parametrize("piece", ["a/", "%E2%82%AC", "ab.c/", "%41"])
def test_cost_is_linear(piece: str) -> None:
    """A megabyte of the worst cases costs about a linear pass, not a backtracking one."""
    raw = piece * (1_000_000 // len(piece))
    started = time.perf_counter()
    try:
        canonical_path(raw)
    except BadRequest:
        pass
    assert time.perf_counter() - started < 2.0
