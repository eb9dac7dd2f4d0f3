"""The fakes refuse the histories the real APIs refuse: a tool result without its call, a
call without its result, an item reference to nothing. Unit tests of proxy/demo/fake_history.py;
the fakes call it on every request (the rest of the suite runs through it)."""

from __future__ import annotations

from typing import Any

from proxy.demo.fake_history import (
    anthropic_problem,
    bedrock_problem,
    chat_problem,
    gemini_problem,
    responses_problem,
)

CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
USER = {"role": "user", "content": "hi"}


def test_chat() -> None:
    assert chat_problem({"messages": [USER, CALL, RESULT, USER]}) is None
    assert "must be a response to a preceding message" in str(
        chat_problem({"messages": [USER, RESULT]}))
    assert "must be a response" in str(chat_problem({"messages": [USER, CALL, RESULT, RESULT]}))
    assert "did not have response messages: call_1" in str(
        chat_problem({"messages": [USER, CALL, USER]}))
    assert "call_1" in str(chat_problem({"messages": [USER, CALL]}))


def _use(i: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": i, "name": "f",
                                              "input": {}}]}


def _result(i: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": i,
                                         "content": "ok"}]}


def test_anthropic() -> None:
    assert anthropic_problem({"messages": [USER, _use("t1"), _result("t1")]}) is None
    assert "unexpected `tool_use_id`" in str(anthropic_problem({"messages": [USER, _result("t1")]}))
    assert "without `tool_result` blocks immediately after: t1" in str(
        anthropic_problem({"messages": [USER, _use("t1"), USER]}))
    # The last assistant turn (prefill) may end in a call with no result yet.
    assert anthropic_problem({"messages": [USER, _use("t1")]}) is None


def test_bedrock() -> None:
    use = {"role": "assistant", "content": [{"toolUse": {"toolUseId": "b1", "name": "f",
                                                         "input": {}}}]}
    result = {"role": "user", "content": [{"toolResult": {"toolUseId": "b1",
                                                          "content": [{"text": "ok"}]}}]}
    text = {"role": "user", "content": [{"text": "hi"}]}
    assert bedrock_problem({"messages": [text, use, result]}) is None
    assert "exceeds the number of toolUse blocks" in str(
        bedrock_problem({"messages": [text, result]}))
    assert "for the following Ids: b1" in str(bedrock_problem({"messages": [text, use, text]}))


def test_gemini() -> None:
    call = {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]}
    part: dict[str, Any] = {"functionResponse": {"name": "f", "response": {}}}
    answer = {"role": "user", "parts": [part]}
    text = {"role": "user", "parts": [{"text": "hi"}]}
    assert gemini_problem({"contents": [text, call, answer]}) is None
    assert "comes immediately after a function call turn" in str(
        gemini_problem({"contents": [text, answer]}))
    assert "number of function response parts" in str(gemini_problem(
        {"contents": [text, call, {"role": "user", "parts": [part, part]}]}))


def test_responses() -> None:
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
            "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    assert responses_problem([call, output], {}) is None
    assert "No tool call found for function call output with call_id c1" in str(
        responses_problem([output], {}))
    assert "No tool output found for function call c1" in str(responses_problem([call], {}))
    assert "Item with id 'fc_9' not found" in str(
        responses_problem([{"type": "item_reference", "id": "fc_9"}], {}))
    assert responses_problem([{"type": "item_reference", "id": "fc_1"}, output],
                             {"fc_1": call}) is None
