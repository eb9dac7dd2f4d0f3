"""OpenAPI specs: compilation, matching, request and argument validation (no sockets)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.model import Action, Effect, HttpRequest, ToolCall
from proxy.policy.openapi import compile_spec
from proxy.policy.openapi_arguments import INVALID_ARGUMENTS, arguments_trace, check_arguments
from proxy.policy.openapi_judge import INVALID_REQUEST, METHOD_OVERRIDE, UNKNOWN_OPERATION, judge
from proxy.policy.openapi_model import Spec
from proxy.policy.source import load_yaml

RULES = Path(__file__).resolve().parent.parent / "rules" / "openapi"


def load(name: str) -> Spec:
    path = RULES / f"{name}.yaml"
    return compile_spec(load_yaml(path.read_text(), str(path)), name=name, file=str(path))


JIRA = load("jira")
VOLUMES = load("volumes")


def tiny(paths: dict[str, Any], version: str = "3.1.0", **extra: Any) -> dict[str, Any]:
    return {"openapi": version, "info": {"title": "t", "version": "1"}, "paths": paths, **extra}


def op(oid: str, *params: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"operationId": oid, "parameters": list(params), "responses": {}, **more}


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# --- compilation -----------------------------------------------------------------------

def test_example_specs_compile_with_names_effects_and_arguments() -> None:
    names = {o.name: o for o in JIRA.operations}
    assert set(names) == {"jira.createIssue", "jira.pickIssues", "jira.getIssue",
                          "jira.editIssue", "jira.deleteIssue", "jira.addComment",
                          "jira.searchIssues"}
    assert names["jira.getIssue"].effect is Effect.READ
    assert names["jira.deleteIssue"].effect is Effect.WRITE
    assert names["jira.createIssue"].argument_names[:3] == ("projectKey", "summary", "issueType")
    assert names["jira.addComment"].argument_names == ("issueIdOrKey", "body", "visibility")
    assert {o.operation_id for o in VOLUMES.operations} == {
        "listVolumes", "createVolume", "getVolume", "deleteVolume", "resizeVolume",
        "createSnapshot"}


def test_effects_can_be_overridden_per_operation() -> None:
    doc = tiny({"/search": {"post": op("search")}, "/x": {"get": op("x")}})
    spec = compile_spec(doc, name="t", file="t.yaml", effects={"search": Effect.READ,
                                                                "x": Effect.WRITE})
    assert spec.match("POST", "/search").effect is Effect.READ  # type: ignore[union-attr]
    assert spec.match("GET", "/x").effect is Effect.WRITE  # type: ignore[union-attr]


def _bad(mutate: Any) -> dict[str, Any]:
    doc = tiny({"/items/{id}": {"parameters": [path_param("id")],
                                "get": op("getItem"), "delete": op("deleteItem")},
                "/items": {"post": op("createItem", requestBody={"content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Item"}}}})}},
               components={"schemas": {"Item": {"type": "object",
                                                "properties": {"n": {"type": "integer"}}}}})
    mutate(doc)
    return doc


BAD_SPECS = [
    ("swagger", lambda d: d.update(swagger="2.0"), "Swagger 2.0 is not supported", "/"),
    ("version", lambda d: d.update(openapi="2.9"), "must be a 3.0.x or 3.1.x", "/openapi"),
    ("no paths", lambda d: d.update(paths={}), "defines no paths", "/paths"),
    ("external ref", lambda d: d["components"]["schemas"].update(
        Item={"$ref": "other.yaml#/Item"}), "external $ref 'other.yaml#/Item'",
     "/components/schemas/Item/$ref"),
    ("dangling ref", lambda d: d["components"]["schemas"].update(
        Item={"$ref": "#/components/schemas/Nope"}), "points at nothing",
     "/components/schemas/Item/$ref"),
    ("ref cycle", lambda d: d["components"].update(parameters={
        "A": {"$ref": "#/components/parameters/B"}, "B": {"$ref": "#/components/parameters/A"}})
     or d["paths"]["/items"]["post"].update(parameters=[{"$ref": "#/components/parameters/A"}]),
     "$ref cycle", "/paths/~1items/post/parameters/0"),
    ("no operationId", lambda d: d["paths"]["/items/{id}"]["get"].pop("operationId"),
     "every operation needs an operationId", "/paths/~1items~1{id}/get"),
    ("duplicate operationId", lambda d: d["paths"]["/items/{id}"]["delete"].update(
        operationId="getItem"), "operationId 'getItem' is also used",
     "/paths/~1items~1{id}/delete/operationId"),
    ("undeclared path param", lambda d: d["paths"]["/items/{id}"].pop("parameters"),
     "not declared: id", "/paths/~1items~1{id}/get"),
    ("param not in template", lambda d: d["paths"]["/items"]["post"].update(
        parameters=[path_param("id")]), "not in /items: id", "/paths/~1items/post"),
    ("same template", lambda d: d["paths"].update({"/items/{other}": {
        "parameters": [path_param("other")], "get": op("again")}}),
     "GET /items/{other} is the same as GET /items/{id}", "/paths/~1items~1{other}/get"),
    ("bad schema", lambda d: d["components"]["schemas"]["Item"]["properties"].update(
        n={"type": "strin"}), "invalid schema", "/components/schemas/Item/properties/n/type"),
    ("object query param", lambda d: d["paths"]["/items"]["post"].update(parameters=[
        {"name": "f", "in": "query", "schema": {"type": "object"}}]),
     "object-valued parameters are not supported", "/paths/~1items/post/parameters/0/schema"),
    ("deepObject", lambda d: d["paths"]["/items"]["post"].update(parameters=[
        {"name": "f", "in": "query", "style": "deepObject", "schema": {"type": "string"}}]),
     "style 'deepObject' is not supported", "/paths/~1items/post/parameters/0/style"),
    ("optional path param", lambda d: d["paths"]["/items/{id}"]["parameters"][0].update(
        required=False), "path parameters must be required", "/paths/~1items~1{id}/parameters/0"),
    ("content param", lambda d: d["paths"]["/items"]["post"].update(parameters=[
        {"name": "f", "in": "query", "content": {"application/json": {}}}]),
     "described by 'content' are not supported", "/paths/~1items/post/parameters/0/content"),
    ("relative path", lambda d: d["paths"].update({"items2": {"get": op("g")}}),
     "must start with '/'", "/paths/items2"),
    ("adjacent params", lambda d: d["paths"].update({"/x/{a}{b}": {
        "parameters": [path_param("a"), path_param("b")], "get": op("g")}}),
     "malformed path template", "/paths/~1x~1{a}{b}"),
    ("empty body", lambda d: d["paths"]["/items"]["post"].update(requestBody={"content": {}}),
     "needs a non-empty 'content'", "/paths/~1items/post/requestBody"),
]


@pytest.mark.parametrize(("mutate", "message", "where"), [b[1:] for b in BAD_SPECS],
                         ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_fail_with_file_pointer_and_reason(mutate: Any, message: str,
                                                     where: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_spec(_bad(mutate), name="t", file="specs/t.yaml")
    assert message in info.value.message
    assert info.value.file == "specs/t.yaml"
    assert info.value.key == where


def test_errors_in_yaml_specs_name_the_line() -> None:
    text = (RULES / "jira.yaml").read_text().replace(
        "summary: {type: string, minLength: 1, maxLength: 255}\n        issueType",
        "summary: {type: strng}\n        issueType")
    with pytest.raises(ConfigError) as info:
        compile_spec(load_yaml(text, "jira.yaml"), name="jira", file="jira.yaml")
    line = text.splitlines().index("        summary: {type: strng}") + 1
    assert str(info.value).startswith(f"jira.yaml:{line}: /components/schemas/IssueCreate/"
                                      "properties/summary/type: invalid schema")


def test_the_good_spec_still_compiles_after_the_bad_copies() -> None:
    compile_spec(_bad(lambda d: None), name="t", file="t.yaml")


# --- matching --------------------------------------------------------------------------

MATCHES = [
    ("GET", "/rest/api/2/issue/PROJ-1", "getIssue"),
    ("get", "/rest/api/2/issue/PROJ-1", "getIssue"),
    ("DELETE", "/rest/api/2/issue/PROJ-1", "deleteIssue"),
    ("POST", "/rest/api/2/issue", "createIssue"),
    ("GET", "/rest/api/2/issue/picker", "pickIssues"),        # literal beats {issueIdOrKey}
    ("DELETE", "/rest/api/2/issue/picker", "deleteIssue"),    # no literal DELETE: template
    ("POST", "/rest/api/2/issue/PROJ-1/comment", "addComment"),
    ("GET", "/rest/api/2/issue/a%2Fb", "getIssue"),           # an escaped / stays in one segment
    ("GET", "/rest/api/2/issue", None),                       # path known, method not
    ("GET", "/rest/api/2/issue/PROJ-1/", None),               # trailing slash
    ("GET", "/rest/api/2/issue/PROJ-1/comment", None),
    ("GET", "/rest/api/2/ISSUE/PROJ-1", None),                # case-sensitive
    ("GET", "/rest/api/2/issue/", None),                      # {param} is never empty
    ("GET", "/rest/api/2/issue/A/B", None),                   # {param} is one segment
    ("GET", "/rest/api/2/search2", None),                     # anchored at the end
    ("GET", "/x/rest/api/2/search", None),                    # anchored at the start
    ("PATCH", "/rest/api/2/issue/PROJ-1", None),
]


@pytest.mark.parametrize(("method", "path", "expected"), MATCHES)
def test_match(method: str, path: str, expected: str | None) -> None:
    found = JIRA.match(method, path)
    assert (found.operation_id if found else None) == expected


TEMPLATES = tiny({
    "/files/{name}": {"parameters": [path_param("name")], "get": op("file")},
    "/files/{name}.json": {"parameters": [path_param("name")], "get": op("fileJson")},
    "/a/{x}/b": {"parameters": [path_param("x")], "get": op("axb")},
    "/a/c/{y}": {"parameters": [path_param("y")], "get": op("acy")},
    "/v1/a.b+c": {"get": op("dots")},
    "/v1/{ver}:run": {"parameters": [path_param("ver")], "post": op("colon")},
    "/caf\u00e9": {"get": op("cafe")},
})
TEMPLATE_SPEC = compile_spec(TEMPLATES, name="t", file="t.yaml")


@pytest.mark.parametrize(("method", "path", "expected", "params"), [
    ("GET", "/files/report", "file", {"name": "report"}),
    ("GET", "/files/report.json", "fileJson", {"name": "report"}),   # mixed beats pure param
    ("GET", "/a/c/b", "acy", {"y": "b"}),                            # leftmost literal wins
    ("GET", "/a/z/b", "axb", {"x": "z"}),
    ("GET", "/v1/a.b+c", "dots", {}),
    ("GET", "/v1/aXb+c", None, {}),                                  # '.' is not a wildcard
    ("GET", "/v1/a.bbc", None, {}),                                  # '+' is not a quantifier
    ("POST", "/v1/beta:run", "colon", {"ver": "beta"}),
    ("GET", "/caf%C3%A9", "cafe", {}),                               # literals compared encoded
    ("GET", "/caf\u00e9", None, {}),
])
def test_template_edge_cases(method: str, path: str, expected: str | None,
                             params: dict[str, str]) -> None:
    found = TEMPLATE_SPEC.find(method, path)
    assert (found.operation.operation_id if found else None) == expected
    if found:
        assert dict(found.path_params) == params


# --- tool-call arguments ---------------------------------------------------------------

CREATE: dict[str, object] = {"projectKey": "OPS", "summary": "Disk full", "issueType": "Bug"}

ARGUMENTS = [
    ("createIssue", CREATE, []),
    ("createIssue", {**CREATE, "description": None, "assignee": None, "priority": "High",
                     "labels": ["disk"]}, []),
    ("createIssue", {**CREATE, "assignee_email": "a@example.com"},
     ["unknown argument 'assignee_email'", "jira.createIssue takes: projectKey, summary, "
      "issueType, description, labels, priority, assignee"]),
    ("createIssue", {"projectKey": "OPS"},
     ["missing required argument 'summary'", "missing required argument 'issueType'"]),
    ("createIssue", {**CREATE, "labels": "disk"}, ["argument 'labels' must be array, not string"]),
    ("createIssue", {**CREATE, "labels": ["ok", 3]},
     ["argument 'labels[1]' must be string, not integer"]),
    ("createIssue", {**CREATE, "priority": "Urgent"},
     ['argument \'priority\' must be one of ["Highest", "High", "Medium", "Low", "Lowest"] '
      '(got "Urgent")']),
    ("createIssue", {**CREATE, "summary": 5}, ["argument 'summary' must be string, not integer"]),
    ("createIssue", {**CREATE, "projectKey": "ops"},
     ["argument 'projectKey': 'ops' does not match '^[A-Z][A-Z0-9]+$'"]),
    ("getIssue", {"issueIdOrKey": "OPS-1", "fields": ["summary"]}, []),
    ("getIssue", {}, ["missing required argument 'issueIdOrKey'"]),
    ("getIssue", {"issueIdOrKey": "OPS-1", "fields": "summary"},
     ["argument 'fields' must be array, not string"]),
    ("getIssue", {"issueIdOrKey": "OPS-1", "body": {}},
     ["unknown argument 'body'", "jira.getIssue takes: issueIdOrKey, fields, expand"]),
    ("deleteIssue", {"issueIdOrKey": "OPS-1", "deleteSubtasks": "yes"},
     ["argument 'deleteSubtasks' must be boolean, not string"]),
    ("addComment", {"issueIdOrKey": "OPS-1", "body": "done", "visibility": None}, []),
    ("addComment", {"issueIdOrKey": "OPS-1", "body": "done",
                    "visibility": {"type": "team", "value": "x"}},
     ['argument \'visibility.type\' must be one of ["group", "role"] (got "team")']),
    ("editIssue", {"issueIdOrKey": "OPS-1"}, []),    # an optional-properties body may be empty
]


@pytest.mark.parametrize(("oid", "args", "problems"), ARGUMENTS)
def test_check_arguments(oid: str, args: dict[str, object], problems: list[str]) -> None:
    operation = JIRA.operation(oid)
    assert operation is not None
    assert check_arguments(operation, args) == problems


@pytest.mark.parametrize(("oid", "args", "problems"), [
    ("createSnapshot", {"volumeId": "vol-1a", "description": None}, []),   # 3.1 type lists
    ("createSnapshot", {"volumeId": "vol-1a", "tags": {"env": "prod", "n": 1}},
     ["argument 'tags.n' must be string, not integer"]),                    # $ref'd map
    ("createSnapshot", {"volumeId": "vol-1a"}, []),                         # optional body
    ("deleteVolume", {"volumeId": "v1"}, ["argument 'volumeId': 'v1' does not match "
                                          "'^vol-[0-9a-f]+$'"]),
    ("resizeVolume", {"volumeId": "vol-1", "sizeGb": 0},
     ["argument 'sizeGb': 0 is less than the minimum of 1"]),
    ("resizeVolume", {"volumeId": "vol-1", "sizeGb": True},
     ["argument 'sizeGb' must be integer, not boolean"]),
])
def test_check_arguments_31(oid: str, args: dict[str, object], problems: list[str]) -> None:
    operation = VOLUMES.operation(oid)
    assert operation is not None
    assert check_arguments(operation, args) == problems


def test_non_object_and_free_form_bodies_are_the_body_argument() -> None:
    body = {"content": {"application/json": {"schema": {"type": "array",
                                                         "items": {"type": "integer"}}}}}
    free = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    spec = compile_spec(tiny({"/nums": {"post": op("nums", requestBody=body)},
                              "/free": {"post": op("free", requestBody=free)}}),
                        name="t", file="t.yaml")
    nums, anything = spec.operation("nums"), spec.operation("free")
    assert nums is not None and anything is not None
    assert nums.argument_names == ("body",)
    assert check_arguments(nums, {"body": [1, 2]}) == []
    assert check_arguments(nums, {"body": [1, "2"]}) == [
        "argument 'body[1]' must be integer, not string"]
    assert check_arguments(anything, {}) == ["missing required argument 'body'"]
    assert check_arguments(anything, {"body": {"any": 1}}) == []


def test_recursive_schemas_validate() -> None:
    node = {"type": "object", "properties": {"name": {"type": "string"}, "children": {
        "type": "array", "items": {"$ref": "#/components/schemas/Node"}}},
        "additionalProperties": False}
    spec = compile_spec(tiny({"/tree": {"post": op("tree", requestBody={"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}})}},
        components={"schemas": {"Node": node}}), name="t", file="t.yaml")
    tree = spec.operation("tree")
    assert tree is not None
    assert check_arguments(tree, {"name": "a", "children": [{"name": "b", "children": []}]}) == []
    assert check_arguments(tree, {"children": [{"children": [{"nme": "x"}]}]}) == [
        "unknown argument 'children[0].children[0].nme'", "t.tree takes: name, children"]


def test_arguments_trace_denies_with_the_list() -> None:
    operation = JIRA.operation("createIssue")
    assert operation is not None
    call = ToolCall("c1", "create_issue", "", {**CREATE, "reporter_email": "x"})
    trace = arguments_trace(operation, call)
    assert trace is not None and trace.rule_id == INVALID_ARGUMENTS and trace.action is Action.DENY
    assert "unknown argument 'reporter_email'" in trace.reason
    assert trace.reason.startswith("the arguments do not fit the operation jira.createIssue: ")
    assert arguments_trace(operation, ToolCall("c2", "create_issue", "", CREATE)) is None
    assert arguments_trace(operation, ToolCall("c3", "create_issue", "{", None, problem="x")) \
        is None


# --- outgoing requests -----------------------------------------------------------------

def req(method: str, path: str, query: str = "", body: object = None, *,
        headers: tuple[tuple[str, str], ...] = (), ctype: str | None = None,
        raw: bytes | None = None) -> HttpRequest:
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    if data and ctype is None:
        ctype = "application/json"
    if ctype:
        headers = (*headers, ("Content-Type", ctype))
    return HttpRequest(method, "https", "jira.example.com", 443, path, query, headers, data)


REQUESTS: list[tuple[str, HttpRequest, str | None, str | None, dict[str, object] | None]] = [
    ("read", req("GET", "/rest/api/2/issue/OPS-1", "fields=summary,status&expand=names"),
     "getIssue", None, {"issueIdOrKey": "OPS-1", "fields": ["summary", "status"],
                        "expand": "names"}),
    ("typed query", req("GET", "/rest/api/2/search", "jql=project%20%3D%20OPS&maxResults=50"),
     "searchIssues", None, {"jql": "project = OPS", "maxResults": 50}),
    ("plus is space", req("GET", "/rest/api/2/search", "jql=a+b"), "searchIssues", None,
     {"jql": "a b"}),
    ("create", req("POST", "/rest/api/2/issue", "", CREATE), "createIssue", None, CREATE),
    ("json charset", req("POST", "/rest/api/2/issue", "", CREATE,
                         ctype="application/json; charset=utf-8"), "createIssue", None, CREATE),
    ("unknown op", req("PATCH", "/rest/api/2/issue/OPS-1"), None, UNKNOWN_OPERATION, None),
    ("unknown path", req("GET", "/rest/api/2/admin"), None, UNKNOWN_OPERATION, None),
    ("unknown query", req("GET", "/rest/api/2/search", "jql=x&admin=1"), "searchIssues",
     INVALID_REQUEST, None),
    ("repeated query", req("GET", "/rest/api/2/search", "jql=x&jql=y"), "searchIssues",
     INVALID_REQUEST, None),
    ("mistyped query", req("GET", "/rest/api/2/search", "jql=x&maxResults=lots"),
     "searchIssues", INVALID_REQUEST, None),
    ("range", req("GET", "/rest/api/2/search", "jql=x&maxResults=1000"), "searchIssues",
     INVALID_REQUEST, None),
    ("missing query", req("GET", "/rest/api/2/search"), "searchIssues", INVALID_REQUEST, None),
    ("bad path param", req("GET", "/rest/api/2/issue/ops-1"), "getIssue", INVALID_REQUEST, None),
    ("missing body", req("POST", "/rest/api/2/issue"), "createIssue", INVALID_REQUEST, None),
    ("body on delete", req("DELETE", "/rest/api/2/issue/OPS-1", "", {"x": 1}), "deleteIssue",
     INVALID_REQUEST, None),
    ("invalid json", req("POST", "/rest/api/2/issue", raw=b"{nope", ctype="application/json"),
     "createIssue", INVALID_REQUEST, None),
    ("duplicate keys", req("POST", "/rest/api/2/issue", ctype="application/json",
                           raw=b'{"projectKey": "OPS", "projectKey": "PROD", "summary": "s", '
                               b'"issueType": "Bug"}'), "createIssue", INVALID_REQUEST, None),
    ("wrong media", req("POST", "/rest/api/2/issue", raw=b"projectKey=OPS",
                        ctype="text/plain"), "createIssue", INVALID_REQUEST, None),
    ("no media", req("POST", "/rest/api/2/issue", raw=b"{}", ctype=""), "createIssue",
     INVALID_REQUEST, None),
    ("override", req("POST", "/rest/api/2/issue/OPS-1",
                     headers=(("X-HTTP-Method-Override", "delete"),)),
     "deleteIssue", None, {"issueIdOrKey": "OPS-1"}),
    ("override X-HTTP-Method", req("POST", "/rest/api/2/issue/OPS-1",
                                   headers=(("X-HTTP-Method", "GET"),)), "getIssue", None,
     {"issueIdOrKey": "OPS-1"}),
    ("override _method query", req("POST", "/rest/api/2/issue/OPS-1", "_method=DELETE"),
     "deleteIssue", None, {"issueIdOrKey": "OPS-1"}),
    ("override agrees", req("POST", "/rest/api/2/issue/OPS-1", "_method=DELETE",
                            headers=(("X-Method-Override", "DELETE"),)), "deleteIssue", None,
     {"issueIdOrKey": "OPS-1"}),
    ("override _method form", req("POST", "/rest/api/2/issue/OPS-1", raw=b"_method=DELETE",
                                  ctype="application/x-www-form-urlencoded"),
     "deleteIssue", INVALID_REQUEST, None),    # judged DELETE, whose operation takes no body
    ("override _method JSON", req("POST", "/rest/api/2/issue/OPS-1/comment",
                                  body={"_method": "DELETE"}), None, UNKNOWN_OPERATION, None),
    ("overrides disagree", req("POST", "/rest/api/2/issue/OPS-1", "_method=GET",
                               headers=(("X-HTTP-Method-Override", "DELETE"),)), None,
     METHOD_OVERRIDE, None),
    ("repeated header disagrees", req("POST", "/rest/api/2/issue/OPS-1", headers=(
        ("X-HTTP-Method-Override", "GET"), ("X-HTTP-Method-Override", "DELETE"))), None,
     METHOD_OVERRIDE, None),
    ("override off POST", req("DELETE", "/rest/api/2/issue/OPS-1",
                              headers=(("X-HTTP-Method-Override", "GET"),)), None,
     METHOD_OVERRIDE, None),
    ("override not a method", req("POST", "/rest/api/2/issue/OPS-1",
                                  headers=(("X-HTTP-Method-Override", "DEL ETE"),)), None,
     METHOD_OVERRIDE, None),
    ("override leaves two readings", req("POST", "/rest/api/2/issue", "",
                                         CREATE, headers=(("X-HTTP-Method", "GET"),)),
     None, UNKNOWN_OPERATION, None),
    ("multipart _method", req("POST", "/rest/api/2/issue", ctype="multipart/form-data; b=x",
                              raw=b'--x\r\nContent-Disposition: form-data; name="_method"'
                                  b'\r\n\r\nDELETE\r\n--x--'), None, METHOD_OVERRIDE, None),
]


@pytest.mark.parametrize(("request_", "oid", "rule", "args"), [r[1:] for r in REQUESTS],
                         ids=[r[0] for r in REQUESTS])
def test_judge(request_: HttpRequest, oid: str | None, rule: str | None,
               args: dict[str, object] | None) -> None:
    judged = judge(JIRA, request_)
    assert judged.refusal is None
    assert (judged.operation.operation_id if judged.operation else None) == oid
    assert (judged.denial.rule_id if judged.denial else None) == rule
    if args is not None:
        assert dict(judged.arguments) == args


def test_judge_messages_list_every_problem() -> None:
    judged = judge(JIRA, req("GET", "/rest/api/2/search", "jql=x&jql=y&maxResults=0&admin=1"))
    assert judged.denial is not None
    assert judged.denial.reason == (
        "GET /rest/api/2/search does not fit jira.searchIssues: unknown query parameter "
        "'admin' (accepted: jql, startAt, maxResults); query parameter 'jql' is given 2 times; "
        "query parameter 'maxResults': 0 is less than the minimum of 1")
    body = {"projectKey": "OPS", "summary": "", "assignee_email": "x"}
    judged = judge(JIRA, req("POST", "/rest/api/2/issue", "", body))
    assert judged.denial is not None
    assert "unknown body property 'assignee_email'" in judged.denial.reason
    assert "missing required body property 'issueType'" in judged.denial.reason
    assert "body property 'summary': '' should be non-empty" in judged.denial.reason
    unknown = judge(JIRA, req("PUT", "/rest/api/2/issue/picker/x"))
    assert unknown.denial is not None and "no path of the spec matches" in unknown.denial.reason
    method = judge(JIRA, req("PATCH", "/rest/api/2/issue/OPS-1"))
    assert method.denial is not None
    assert "the spec allows DELETE, GET, PUT there" in method.denial.reason
    two = judge(JIRA, req("POST", "/rest/api/2/issue/OPS-1/comment", "",
                          headers=(("X-HTTP-Method-Override", "PUT"),)))
    assert two.denial is not None and two.denial.rule_id == UNKNOWN_OPERATION
    both = judge(VOLUMES, req("POST", "/v1/volumes", "", {"name": "a", "sizeGb": 1},
                              headers=(("X-HTTP-Method-Override", "GET"),)))
    assert both.denial is not None and both.denial.rule_id == METHOD_OVERRIDE
    assert "runs volumes.createVolume" in both.denial.reason
    assert "runs volumes.listVolumes" in both.denial.reason


@pytest.mark.parametrize("query", ["jql=a;b", "jql=%zz", "jql=%ff", "jql=a%00", "j%qql=1"])
def test_ambiguous_queries_are_refused(query: str) -> None:
    judged = judge(JIRA, req("GET", "/rest/api/2/search", query))
    assert judged.refusal is not None and "ambiguous" in judged.refusal


def test_form_bodies_are_typed_by_the_schema() -> None:
    form = {"content": {"application/x-www-form-urlencoded": {"schema": {
        "type": "object", "required": ["size"], "properties": {
            "size": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}}}}
    spec = compile_spec(tiny({"/v": {"post": op("make", requestBody=form)}}), name="t",
                        file="t.yaml")
    ok = judge(spec, req("POST", "/v", raw=b"size=3&tags=a&tags=b",
                         ctype="application/x-www-form-urlencoded"))
    assert ok.denial is None and dict(ok.arguments) == {"size": 3, "tags": ["a", "b"]}
    bad = judge(spec, req("POST", "/v", raw=b"size=big&extra=1",
                          ctype="application/x-www-form-urlencoded"))
    assert bad.denial is not None
    assert "unknown body property 'extra'" in bad.denial.reason
    assert "body property 'size' must be integer, not string" in bad.denial.reason


def test_base_path_is_taken_off() -> None:
    inside = judge(JIRA, req("GET", "/jira/rest/api/2/issue/OPS-1"), base_path="/jira")
    assert inside.operation is not None and inside.operation.operation_id == "getIssue"
    outside = judge(JIRA, req("GET", "/jiraX/rest/api/2/issue/OPS-1"), base_path="/jira")
    assert outside.denial is not None and outside.denial.rule_id == UNKNOWN_OPERATION


def test_effect_follows_the_judged_method() -> None:
    assert judge(JIRA, req("GET", "/rest/api/2/issue/OPS-1")).effect is Effect.READ
    overridden = judge(JIRA, req("POST", "/rest/api/2/issue/OPS-1",
                                 headers=(("X-HTTP-Method-Override", "DELETE"),)))
    assert overridden.effect is Effect.WRITE and overridden.method == "DELETE"
    assert judge(JIRA, req("OPTIONS", "/nowhere")).effect is Effect.READ


# --- the config ------------------------------------------------------------------------

def write_config(tmp_path: Path, body: str) -> Path:
    (tmp_path / "openapi").mkdir(exist_ok=True)
    for name in ("jira", "volumes"):
        (tmp_path / "openapi" / f"{name}.yaml").write_text((RULES / f"{name}.yaml").read_text())
    (tmp_path / "openapi" / "bad.json").write_text('{"openapi": "3.1.0",\n "paths": }')
    (tmp_path / "openapi" / "dup.json").write_text('{"openapi": "3.1.0", "openapi": "3.0.0"}')
    path = tmp_path / "tether.yaml"
    path.write_text(body)
    return path


def test_config_loads_apis_and_links_tools(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
apis:
  jira: {url: https://jira.example.com/, spec: openapi/jira.yaml, api_key_env: JIRA_TOKEN,
         effects: {searchIssues: read}}
  volumes: {url: https://cloud.example.com/storage, spec: openapi/volumes.yaml}
tools:
  create_issue: {api: jira.createIssue}
  Get_Issue: {api: jira.getIssue, effect: write}
rules:
  - id: no-deletes
    match: {api: jira.deleteIssue}
    action: deny
""")
    cfg = config_mod.load(path, env={"TETHER_UPSTREAM_VOLUMES": "http://127.0.0.1:9"})
    assert not any("apis" in w for w in cfg.warnings)
    jira = cfg.apis.get("jira")
    assert jira is not None and jira.url == "https://jira.example.com"
    assert jira.api_key_env == "JIRA_TOKEN" and jira.provider == "api:jira"
    volumes = cfg.apis.get("volumes")
    assert volumes is not None and volumes.url == "http://127.0.0.1:9"
    created = cfg.apis.for_tool("create_issue")
    assert created is not None and created.name == "jira.createIssue"
    assert cfg.apis.for_tool("get_issue") is not None
    assert cfg.policy.effects["create_issue"] is Effect.WRITE
    assert cfg.policy.effects["get_issue"] is Effect.WRITE     # declared beats the operation's
    assert cfg.apis.operation("jira.searchIssues") is not None
    # A changed spec is a new policy revision.
    before = cfg.policy.revision
    (tmp_path / "openapi" / "jira.yaml").write_text(
        (RULES / "jira.yaml").read_text() + "\n# changed\n")
    assert config_mod.load(path).policy.revision != before


@pytest.mark.parametrize(("body", "message"), [
    ("apis: {jira: {url: https://j, spec: openapi/missing.yaml}}\n", "missing.yaml: cannot read"),
    ("apis: {jira: {spec: openapi/jira.yaml}}\n", "tether.yaml:1: apis.jira.url: url is required"),
    ("apis: {jira: {url: ftp://j, spec: openapi/jira.yaml}}\n", "is not an http(s) base URL"),
    ("apis: {jira: {url: https://j, spec: openapi/jira.yaml, auth: x}}\n",
     "apis.jira.auth: unknown key"),
    ("apis: {jira.cloud: {url: https://j, spec: openapi/jira.yaml}}\n",
     "an API name is letters, digits"),
    ("apis: {jira: {url: https://j, spec: openapi/jira.yaml, effects: {getIssue: maybe}}}\n",
     "getIssue: must be read or write"),
    ("apis: {jira: {url: https://j, spec: openapi/jira.yaml, effects: {getIsue: read}}}\n",
     "tether.yaml:1: apis.jira.effects: names operations the spec does not have: getIsue"),
    ("apis: {jira: {url: https://j, spec: openapi/bad.json}}\n",
     "openapi/bad.json:2: invalid JSON"),
    ("apis: {jira: {url: https://j, spec: openapi/dup.json}}\n",
     "openapi/dup.json: invalid JSON: duplicate key 'openapi'"),
    ("apis: {jira: {url: https://j, spec: openapi/jira.yaml}}\n"
     "tools:\n  create_issue: {api: jira.createIsue}\n",
     ":3: tools.create_issue.api: no operation 'jira.createIsue' (jira has: createIssue"),
    ("tools:\n  create_issue: {api: jira.createIssue}\n",
     "no operation 'jira.createIssue' (configured APIs: none)"),
    ("apis: {jira: {url: https://j, spec: openapi/jira.yaml}}\n"
     "rules:\n  - id: r\n    match: {api: jira.deleteIsue}\n    action: deny\n",
     ":3: rule r: match.api: no operation 'deleteIsue' in the jira API"),
])
def test_config_errors(tmp_path: Path, body: str, message: str) -> None:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    assert message in str(info.value)


def test_rules_may_name_apis_that_are_not_openapi(tmp_path: Path) -> None:
    """`api:` names of other catalogs (cloud operations) are not this module's to refuse."""
    path = write_config(tmp_path, "rules:\n  - id: r\n    match: {api: ec2.DeleteVolume}\n"
                                  "    action: deny\n")
    assert config_mod.load(path, env={}).policy.rules[0].api == ("ec2.DeleteVolume",)


def test_deep_copies_of_the_spec_are_not_shared() -> None:
    """Compiling converts 3.0 `nullable` on a copy: the caller's data is left alone."""
    doc = tiny({"/x": {"post": op("x", requestBody={"content": {"application/json": {
        "schema": {"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}
    }}})}}, version="3.0.3")
    before = copy.deepcopy(doc)
    spec = compile_spec(doc, name="t", file="t.yaml")
    assert doc == before
    x = spec.operation("x")
    assert x is not None and check_arguments(x, {"a": None}) == []


def test_nullable_refs_in_30_still_coerce_query_text() -> None:
    doc = tiny({"/q": {"get": op("q", {"name": "n", "in": "query", "schema": {
        "$ref": "#/components/schemas/Count", "nullable": True}})}}, version="3.0.3",
        components={"schemas": {"Count": {"type": "integer", "minimum": 1}}})
    spec = compile_spec(doc, name="t", file="t.yaml")
    ok = judge(spec, req("GET", "/q", "n=5"))
    assert ok.denial is None and dict(ok.arguments) == {"n": 5}
    bad = judge(spec, req("GET", "/q", "n=0"))
    assert bad.denial is not None and bad.denial.rule_id == INVALID_REQUEST


def test_json_specs_load(tmp_path: Path) -> None:
    doc = load_yaml((RULES / "volumes.yaml").read_text(), "volumes.yaml")
    write_config(tmp_path, "")
    (tmp_path / "openapi" / "volumes.json").write_text(json.dumps(doc))
    path = tmp_path / "tether.yaml"
    path.write_text("apis: {v: {url: https://v, spec: openapi/volumes.json}}\n")
    api = config_mod.load(path, env={}).apis.get("v")
    assert api is not None and api.spec.operation("deleteVolume") is not None
