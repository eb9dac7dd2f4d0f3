"""Which operation of an OpenAPI spec an outgoing HTTP request is, and whether it fits.

The egress entry point, `judge(spec, request)`: the request is read as the
upstream would read it (openapi_wire.py: strict decoding, method overrides),
matched to an operation of the spec, and its parameters and body checked
(openapi_request.py). A POST whose override leaves two operations possible (one
for an upstream that ignores the override, one for an upstream that honours it)
is denied rather than guessed. Built-in rule ids:

  tether:unknown-operation   no operation of the spec has this method and path
  tether:invalid-request     the request's parameters or body do not fit it
  tether:method-override     overrides that disagree or cannot be judged

LLM tool calls mapped to an operation are checked by openapi_arguments.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..model import Effect, HttpRequest, RuleTrace
from .openapi_model import Operation, Spec, effect_of_method
from .openapi_problems import deny, join
from .openapi_request import check_request
from .openapi_wire import Ambiguous, parse_query, read_payload, requested_method

UNKNOWN_OPERATION = "tether:unknown-operation"
INVALID_REQUEST = "tether:invalid-request"
METHOD_OVERRIDE = "tether:method-override"


@dataclass(frozen=True, slots=True)
class Judged:
    """One outgoing request as judged. `denial`: a built-in check failed (deny it);
    `refusal`: the request is ambiguous and is refused whole (400)."""

    method: str
    path: str
    operation: Operation | None = None
    arguments: Mapping[str, object] = field(default_factory=dict)
    denial: RuleTrace | None = None
    refusal: str | None = None

    @property
    def effect(self) -> Effect:
        return self.operation.effect if self.operation else effect_of_method(self.method)

    def tool(self, api: str) -> str:
        """The name the request is audited and decided under."""
        return self.operation.name if self.operation else f"{api}:{self.method} {self.path}"


def judge(spec: Spec, request: HttpRequest, base_path: str = "") -> Judged:
    """Which operation `request` is and whether it fits; `request.path` is raw and
    canonical, `base_path` (the API's, from its URL) is taken off it first."""
    method = request.method.upper()
    path = request.path
    try:
        if base_path:
            if path != base_path and not path.startswith(base_path.rstrip("/") + "/"):
                return Judged(method, path, denial=deny(
                    UNKNOWN_OPERATION, f"{path} is outside the {spec.name} API ({base_path})"))
            path = path[len(base_path.rstrip("/")):] or "/"
        query = parse_query(request.query)
        payload = read_payload(request)
    except Ambiguous as e:
        return Judged(method, path, refusal=f"the request is ambiguous ({e}); it was not forwarded")

    asked, problem = requested_method(request, method, query, payload)
    if problem:
        return Judged(asked, path, denial=deny(METHOD_OVERRIDE, problem))
    found = spec.find(asked, path)
    if found is None:
        allowed = spec.methods_at(path)
        hint = (f"the spec allows {', '.join(allowed)} there" if allowed
                else "no path of the spec matches")
        return Judged(asked, path, denial=deny(
            UNKNOWN_OPERATION, f"{asked} {path} is not an operation of the {spec.name} API "
                               f"({hint})"))
    if asked != method:
        other = spec.find(method, path)
        if other is not None:
            return Judged(asked, path, found.operation, denial=deny(
                METHOD_OVERRIDE, f"this {method} asks to be {asked}: an upstream that ignores "
                f"the override runs {other.operation.name}, one that honours it runs "
                f"{found.operation.name}; tether does not guess which"))
    arguments, problems = check_request(found, query, request.headers, payload)
    denial = None
    if problems:
        denial = deny(INVALID_REQUEST, f"{asked} {path} does not fit {found.operation.name}: "
                                       + join(problems))
    return Judged(asked, path, found.operation, arguments, denial)
