"""proxy/surrogates.py and the audit chain's canonical encoding: total on any str a
parser yields, lone surrogates included, and unchanged, byte for byte, on text.

The property the audit chain needs: a line is valid UTF-8, `json.loads` reads it
back, and re-encoding what it read gives the same bytes (`tether audit verify`
recomputes every line that way).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy import strict_json, surrogates
from proxy.audit.chain import canonical, verify_targets
from proxy.audit.log import AuditLog
from proxy.cli import main as cli_main
from proxy.model import Action, Exchange, HttpRequest, ToolCall
from proxy.policy.cloud import Refused, classify
from proxy.policy.engine import MALFORMED, Policy, PolicyEngine
from proxy.providers.arguments import parse_arguments

# Text with surrogates in it: lone ones, pairs spelled as two code points, reversed pairs.
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
SURROGATE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00"])
HOSTILE_TEXT = st.lists(st.one_of(ANY_CHAR, SURROGATE), max_size=12).map("".join)
PLAIN_TEXT = st.text(max_size=12)  # hypothesis leaves surrogates out by default
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                          allow_infinity=False))


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.recursive(st.one_of(SCALARS, text), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def joined(value: object) -> object:
    """`value` as a JSON reader sees it: a high surrogate then a low one is one character."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(value, list):
        return [joined(v) for v in value]
    if isinstance(value, dict):
        return {joined(k): joined(v) for k, v in value.items()}
    return value


# -- json_text / json_bytes ------------------------------------------------------------------

@given(json_values(PLAIN_TEXT))
def test_text_is_written_exactly_as_json_dumps_writes_it(value: object) -> None:
    assert surrogates.json_text(value) == json.dumps(value, ensure_ascii=False)
    assert surrogates.json_bytes(value, sort_keys=True, separators=(",", ":")) == json.dumps(
        value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


@given(json_values(HOSTILE_TEXT))
def test_any_str_is_written_as_utf8_json_that_reads_back_to_the_same_bytes(value: object) -> None:
    line = surrogates.json_bytes(value, separators=(",", ":"))
    text = line.decode("utf-8")          # strict: valid UTF-8
    back = json.loads(text)
    assert back == joined(value)
    assert surrogates.json_bytes(back, separators=(",", ":")) == line


@pytest.mark.parametrize(("value", "line"), [
    ("\ud800", b'"\\ud800"'),
    ("a\udfffb", b'"a\\udfffb"'),
    ("\ud83d\ude00", '"\U0001f600"'.encode()),       # a pair in two code points: the character
    ("\ude00\ud83d", b'"\\ude00\\ud83d"'),          # reversed: two lone halves
    ("\ud800\ud800\udc00", '"\\ud800\U00010000"'.encode()),
    ({"k\udcc0": ["\x00", "é"]}, '{"k\\udcc0": ["\\u0000", "é"]}'.encode()),
])
def test_examples(value: object, line: bytes) -> None:
    assert surrogates.json_bytes(value) == line
    assert surrogates.json_bytes(json.loads(line)) == line


def test_replace_is_for_readers_that_refuse_the_escape() -> None:
    assert surrogates.json_text({"t": "a\ud800\ud83d\ude00"}, replace=True) == '{"t": "a\ufffd\U0001f600"}'
    assert surrogates.scrub("a\udcc0b") == "a\ufffdb" and surrogates.scrub("ok é") == "ok é"


@given(HOSTILE_TEXT, HOSTILE_TEXT)
def test_utf8_for_hashing_is_total_and_injective(a: str, b: str) -> None:
    assert surrogates.utf8(a).decode("utf-8", "surrogatepass") == a
    assert (surrogates.utf8(a) == surrogates.utf8(b)) == (a == b)


@given(PLAIN_TEXT)
def test_utf8_of_text_is_encode(text: str) -> None:
    assert surrogates.utf8(text) == text.encode()


# -- the audit chain -------------------------------------------------------------------------

@given(st.dictionaries(HOSTILE_TEXT, json_values(HOSTILE_TEXT), max_size=5))
def test_canonical_is_a_fixpoint_of_json_loads(record: dict[str, object]) -> None:
    # Two keys that spell the same text once pairs are joined cannot both be written
    # (tether's own field names are ASCII); every other record must round-trip.
    assume(len({surrogates.joined(k) for k in record}) == len(record))
    line = canonical(record)
    assert canonical(json.loads(line.decode("utf-8"))) == line


@given(st.dictionaries(PLAIN_TEXT, json_values(PLAIN_TEXT), max_size=5))
def test_canonical_bytes_of_ordinary_records_are_unchanged(record: dict[str, object]) -> None:
    before = json.dumps(dict(sorted(record.items())), separators=(",", ":"), ensure_ascii=False,
                        default=str).encode("utf-8")
    assert canonical(record) == before


HOSTILE_RECORDS: list[dict[str, object]] = [
    {"kind": "decision", "tool": "delete\ud800", "arguments": {"v": "\udfff"}},
    {"kind": "decision", "tool": "t", "arguments": '{"v": "\\ud800"}'},         # raw text
    {"kind": "request", "session": "s-\udcc0\udcaf", "message": "x"},            # surrogateescape
    {"kind": "request", "agent": "\ud83d\ude00", "endpoint": "\ude00\ud83d"},
    {"kind": "decision", "arguments": {"k\ud800": ["\x00", "é", 1.5]}},
]


def test_an_audit_log_with_lone_surrogates_verifies_and_resumes(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    for record in HOSTILE_RECORDS[:3]:
        log.write(record)
    log.close()
    resumed = AuditLog(str(path))  # picks the chain up from the last line on disk
    for record in HOSTILE_RECORDS[3:]:
        resumed.write(record)
    resumed.close()
    data = path.read_bytes()
    data.decode("utf-8")  # strict
    assert verify_targets([str(path)]) == []
    assert cli_main(["audit", "verify", str(path)]) == 0
    assert "the chain is intact" in capsys.readouterr().out
    read = [json.loads(line) for line in data.splitlines()]
    assert [r["seq"] for r in read] == [1, 2, 3, 4, 5]
    assert read[0]["tool"] == "delete\ud800" and read[2]["session"] == "s-\udcc0\udcaf"
    assert read[3]["agent"] == "\U0001f600"  # the pair, read back as the character it spells
    # An edit is still caught: the escape is part of the hashed bytes.
    path.write_bytes(data.replace(b"\\ud800", b"\\ud801", 1))
    assert [p.line for p in verify_targets([str(path)])] == [1]


# -- refusing them before they are judged ----------------------------------------------------

@pytest.mark.parametrize("data", [
    b'{"a": "\\ud800"}', b'{"a": "x\\uDFFFy"}', b'{"\\udc00": 1}', b'["\\ud800\\u0041"]',
    b'{"a": "\xed\xa0\x80"}',                                        # a surrogate's UTF-8 bytes
    '{"a": "\\ud800"}'.encode("utf-16-le"), '{"a": "\ud800"}'.encode("utf-32-be", "surrogatepass"),
    '{"a": "\ud800"}',                                               # already in the str
])
def test_strict_json_refuses_lone_surrogates(data: str | bytes) -> None:
    assert surrogates.may_hold(data)
    with pytest.raises(strict_json.NotText) as e:
        strict_json.loads(data)
    assert e.value.where.startswith("$") and "\ud800" not in str(e.value)


@pytest.mark.parametrize(("data", "value"), [
    (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),    # an escaped pair is a character
    (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),             # an escaped backslash is not an escape
    (b'{"a": "\\u0000"}', {"a": "\x00"}),
    ('{"a": "é"}'.encode(), {"a": "é"}),
])
def test_strict_json_accepts_text(data: bytes, value: object) -> None:
    assert strict_json.loads(data) == value


@pytest.mark.parametrize(("value", "where"), [
    ({"a": [1, {"b": "\ud800"}]}, "$.a[1].b"), ({"a": 1, "\udc00": 2}, "$.\ufffd"),
    ("\ud800", "$"), ({"a": "ok"}, None), ([["x"], "\ud800"], "$[1]"),
])
def test_find_names_the_path(value: object, where: str | None) -> None:
    assert surrogates.find(value) == where


@given(json_values(HOSTILE_TEXT))
def test_may_hold_has_no_false_negatives(value: object) -> None:
    if surrogates.find(value) is None:
        return
    for data in (json.dumps(value).encode(),
                 json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                 json.dumps(value).encode("utf-16-le"),
                 json.dumps(value, ensure_ascii=False).encode("utf-32-be", "surrogatepass"),
                 json.dumps(value, ensure_ascii=False)):
        assert surrogates.may_hold(data)


CLOUD_JSON = [  # (host, method, path, headers): a JSON body each cloud's classifier reads
    ("dynamodb.us-east-1.amazonaws.com", "POST", "/", (
        ("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),
        ("Content-Type", "application/x-amz-json-1.0"))),
    ("management.azure.com", "PUT", "/subscriptions/s/resourceGroups/rg/providers/"
     "Microsoft.Compute/disks/d1", ()),
    ("compute.googleapis.com", "POST", "/compute/v1/projects/p/zones/z/disks", ()),
]


@pytest.mark.parametrize(("host", "method", "path", "headers"), CLOUD_JSON)
@pytest.mark.parametrize("body", [b'{"TableName": "t\\ud800"}', b'{"TableName": "t\xed\xa0\x80"}'])
def test_cloud_json_bodies_with_a_lone_surrogate_are_refused(
        host: str, method: str, path: str, headers: tuple[tuple[str, str], ...],
        body: bytes) -> None:
    query = "api-version=2023-04-02" if "azure" in host else ""
    found = classify(HttpRequest(method, "https", host, 443, path, query, headers, body))
    assert isinstance(found, Refused), found
    text = body.replace(b"\\ud800", b"").replace(b"\xed\xa0\x80", b"")
    assert not isinstance(classify(HttpRequest(method, "https", host, 443, path, query, headers,
                                               text)), Refused)


def test_model_arguments_with_a_lone_surrogate_are_a_malformed_call() -> None:
    engine = PolicyEngine(Policy(undeclared_tools=Action.ALLOW))
    exchange = Exchange(provider="openai", model="m")
    for raw, name in (('{"v": "\\ud800"}', "delete_volume"), ('{"v": "\udfff"}', "delete_volume"),
                      ("{}", "delete\ud800volume")):
        arguments, problem = parse_arguments(raw)
        call = ToolCall("c", name, raw, arguments, problem=problem)
        decision = engine.decide(call, exchange)
        assert decision.action is Action.DENY and decision.rules == (MALFORMED,), raw
        assert "surrogate" in decision.message and not surrogates.holds(decision.message)
    ok = engine.decide(ToolCall("c", "get_weather", '{"v": "\\ud83d\\ude00 \\u0000"}',
                                {"v": "\U0001f600 \x00"}), exchange)
    assert ok.action is Action.ALLOW


# -- linear on the worst case ----------------------------------------------------------------

@pytest.mark.parametrize("unit", ["\ud800", "\ud83d\ude00", "\ude00\ud83d", "a\udcc0"])
def test_a_megabyte_of_the_worst_case_is_linear(unit: str) -> None:
    """Written, read back, looked for and refused: every step a regex or one walk."""
    started = time.perf_counter()
    line = surrogates.json_bytes({"k": unit * (1024 * 1024 // len(unit))})
    back = json.loads(line)
    assert surrogates.json_bytes(back) == line
    lone = surrogates.find(back) is not None
    assert lone is (unit != "\ud83d\ude00") and surrogates.may_hold(line) is lone
    if lone:
        with pytest.raises(strict_json.NotText):
            strict_json.loads(line)
    else:
        strict_json.loads(line)
    assert time.perf_counter() - started < 5
