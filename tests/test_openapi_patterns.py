"""OpenAPI patterns inside specs (no sockets): `pattern`, `patternProperties` and the
`additionalProperties` that depends on them are ECMA-262 run on RE2, in 3.0 and 3.1
specs, for requests and tool-call arguments alike; bad patterns fail at load with a
pointer and a line."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.model import HttpRequest
from proxy.policy.openapi import compile_spec
from proxy.policy.openapi_arguments import check_arguments
from proxy.policy.openapi_judge import INVALID_REQUEST, judge
from proxy.policy.openapi_model import Spec
from proxy.policy.source import load_yaml

TICKET = {"type": "string", "pattern": "^T-[0-9]+$"}


def spec_doc(version: str, ticket: dict[str, Any] | None = None) -> dict[str, Any]:
    ticket = ticket or TICKET
    labels = {"type": "object", "additionalProperties": False,
              "patternProperties": {"^x-[a-z]+$": {"type": "string"}}}
    body = {"type": "object", "required": ["ticket"],
            "properties": {"ticket": ticket, "labels": labels}}
    return {
        "openapi": version, "info": {"title": "t", "version": "1"},
        "paths": {
            "/tickets": {
                "get": {"operationId": "findTicket", "responses": {}, "parameters": [
                    {"name": "ticket", "in": "query", "required": True, "schema": ticket}]},
                "post": {"operationId": "fileTicket", "responses": {}, "requestBody": {
                    "required": True, "content": {"application/json": {"schema": body}}}},
            },
            "/tickets/{ticket}": {"get": {"operationId": "getTicket", "responses": {},
                                          "parameters": [{"name": "ticket", "in": "path",
                                                          "required": True, "schema": ticket}]}},
        },
    }


SPECS = {v: compile_spec(spec_doc(v), name="tix", file="tix.yaml") for v in ("3.0.3", "3.1.0")}


def request(method: str, path: str, query: str = "", body: object = None) -> HttpRequest:
    data = b"" if body is None else json.dumps(body).encode()
    headers = (("Content-Type", "application/json"),) if data else ()
    return HttpRequest(method, "https", "tix.example.com", 443, path, query, headers, data)


def verdict(spec: Spec, req: HttpRequest) -> str:
    judged = judge(spec, req)
    assert judged.refusal is None and judged.operation is not None
    return judged.denial.reason if judged.denial else "allow"


@pytest.mark.parametrize("version", SPECS)
@pytest.mark.parametrize(("req", "allowed"), [
    (request("GET", "/tickets", "ticket=T-1"), True),
    (request("GET", "/tickets", "ticket=T-1%0A"), False),
    (request("GET", "/tickets", "ticket=T-1%0D%0A"), False),
    (request("GET", "/tickets", "ticket=%0AT-1"), False),
    (request("GET", "/tickets/T-1"), True),
    (request("GET", "/tickets/T-1%0A"), False),
    (request("POST", "/tickets", body={"ticket": "T-1"}), True),
    (request("POST", "/tickets", body={"ticket": "T-1\n"}), False),
    (request("POST", "/tickets", body={"ticket": "T-1", "labels": {"x-team": "ops"}}), True),
    (request("POST", "/tickets", body={"ticket": "T-1", "labels": {"x-team\n": "ops"}}), False),
    (request("POST", "/tickets", body={"ticket": "T-1", "labels": {"x-team": 7}}), False),
])
def test_requests_are_judged_with_end_of_text_anchors(version: str, req: HttpRequest,
                                                      allowed: bool) -> None:
    reason = verdict(SPECS[version], req)
    assert (reason == "allow") is allowed, reason


@pytest.mark.parametrize("version", SPECS)
def test_the_denial_names_the_value_and_the_pattern(version: str) -> None:
    judged = judge(SPECS[version], request("GET", "/tickets", "ticket=T-1%0A"))
    assert judged.denial is not None and judged.denial.rule_id == INVALID_REQUEST
    assert "query parameter 'ticket': 'T-1\\n' does not match '^T-[0-9]+$'" \
        in judged.denial.reason
    judged = judge(SPECS[version], request("POST", "/tickets", body={
        "ticket": "T-1", "labels": {"x-team\n": "ops"}}))
    assert judged.denial is not None
    assert "unknown body property 'labels.x-team\\n'" in judged.denial.reason


@pytest.mark.parametrize("version", SPECS)
@pytest.mark.parametrize(("args", "problems"), [
    ({"ticket": "T-1"}, []),
    ({"ticket": "T-1\n"}, ["argument 'ticket': 'T-1\\n' does not match '^T-[0-9]+$'"]),
    ({"ticket": "T-1", "labels": {"x-a": "b"}}, []),
    ({"ticket": "T-1", "labels": {"x-a\n": "b"}}, ["unknown argument 'labels.x-a\\n'",
                                                    "tix.fileTicket takes: ticket, labels"]),
])
def test_tool_call_arguments_are_judged_alike(version: str, args: dict[str, object],
                                              problems: list[str]) -> None:
    operation = SPECS[version].operation("fileTicket")
    assert operation is not None
    assert check_arguments(operation, args) == problems


def test_a_huge_value_is_checked_in_linear_time() -> None:
    operation = SPECS["3.1.0"].operation("fileTicket")
    assert operation is not None
    nasty = compile_spec(spec_doc("3.1.0", {"type": "string", "pattern": "^(a+)+$"}),
                         name="tix", file="tix.yaml").operation("fileTicket")
    assert nasty is not None
    problems = check_arguments(nasty, {"ticket": "a" * (1 << 20) + "!"})
    assert len(problems) == 1 and "does not match '^(a+)+$'" in problems[0]
    assert len(problems[0]) < 300          # the value is not echoed whole


def test_patterns_python_refuses_but_ecma_262_allows_load() -> None:
    spec = compile_spec(spec_doc("3.1.0", {"type": "string", "pattern": "^(?<n>T)-\\d+$"}),
                        name="tix", file="tix.yaml")
    operation = spec.operation("fileTicket")
    assert operation is not None
    assert check_arguments(operation, {"ticket": "T-1"}) == []


def _with_pattern(version: str, pattern: str, where: str) -> dict[str, Any]:
    doc = spec_doc(version)
    schema = doc["paths"]["/tickets"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]
    if where == "pattern":
        schema["properties"]["ticket"] = {"type": "string", "pattern": pattern}
    else:
        schema["properties"]["labels"]["patternProperties"] = {pattern: {"type": "string"}}
    return doc


BODY = "/paths/~1tickets/post/requestBody/content/application~1json/schema/properties"


@pytest.mark.parametrize("version", SPECS)
@pytest.mark.parametrize(("pattern", "where", "pointer", "reason"), [
    ("^T(?=-)", "pattern", f"{BODY}/ticket/pattern", "lookahead and lookbehind"),
    (r"^T-\d+\Z", "pattern", f"{BODY}/ticket/pattern", r"\Z has no meaning in ECMA-262"),
    ("(?i)^t-1$", "pattern", f"{BODY}/ticket/pattern", "inline flags"),
    ("^(x", "pattern", f"{BODY}/ticket/pattern", "missing )"),
    (r"^(a)\1$", "patternProperties", f"{BODY}/labels/patternProperties/^(a)\\1$",
     "backreferences are not supported"),
])
def test_bad_patterns_fail_at_load_with_a_pointer(version: str, pattern: str, where: str,
                                                  pointer: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_spec(_with_pattern(version, pattern, where), name="tix", file="specs/tix.yaml")
    assert e.value.file == "specs/tix.yaml" and e.value.key == pointer
    assert f"pattern {pattern!r}: " in e.value.message and reason in e.value.message


def test_a_bad_pattern_in_a_yaml_spec_names_its_line() -> None:
    text = """openapi: 3.0.3
info: {title: t, version: "1"}
paths:
  /t:
    get:
      operationId: t
      responses: {}
      parameters:
        - name: q
          in: query
          schema: {type: string, pattern: "^a$(?!\\\\n)"}
"""
    with pytest.raises(ConfigError) as e:
        compile_spec(load_yaml(text, "t.yaml"), name="t", file="t.yaml")
    assert str(e.value).startswith("t.yaml:11: /paths/~1t/get/parameters/0/schema/pattern: ")
    assert "lookahead" in str(e.value)


def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    doc = spec_doc("3.1.0")
    doc["paths"]["/tickets"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "unevaluatedProperties"] = False
    with pytest.raises(ConfigError) as e:
        compile_spec(doc, name="tix", file="tix.yaml")
    assert "unevaluatedProperties is not supported in a spec that has patternProperties" \
        in e.value.message
    assert e.value.key is not None and e.value.key.endswith("/schema/unevaluatedProperties")
