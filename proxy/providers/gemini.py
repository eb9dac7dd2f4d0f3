"""Google Gemini (the generativelanguage API) behind `/gemini/`.

    POST {v}/models/{m}:generateContent          governed (v: v1beta, v1, v1alpha;
    POST {v}/models/{m}:streamGenerateContent    also tunedModels/{m}); streamed as SSE
                                                 with `alt=sse`, else as one JSON array
    POST {v}/openai/chat/completions             governed: Gemini's OpenAI-compatible
                                                 endpoint, read as Chat Completions
    :batchGenerateContent, :bidiGenerateContent (Live), interactions, agents,
    batches ... and every other generating method     refused (501)
    any other spelling of the governed methods        refused (404)
    :countTokens, :embedContent, models, files, cachedContents ...   passed through

Paths are judged decoded (`%3A` is `:` to Google), but only the plain
spelling is governed, so a path that only decoding makes governed is refused.
The response is read only as JSON or SSE: any other `alt` (`proto`, `media`)
is refused, since tether could not read the calls in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import BadRequest, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..strict_json import PAIRS, text_of
from ..surrogates import json_text
from . import tool_scope
from .base import ErrorReply, ParsedRequest, ParsedResponse, Restricted, Route, RouteKind, denial_summary
from .gemini_read import Chunk, field_of, read_chunk
from .gemini_rewrite import error_body, finish_problem, rewrite, tool_call
from .gemini_stream import GeminiStream
from .held import DEFAULT_MAX_ARGUMENTS
from .openai_chat import CHAT

VERSIONS = frozenset({"v1beta", "v1", "v1alpha"})
COLLECTIONS = frozenset({"models", "tunedModels"})
METHODS = {"generateContent": False, "streamGenerateContent": True}  # name -> streams
# Methods and collections that carry generated content tether cannot read (lower case).
NOT_GOVERNED_METHODS = frozenset({
    "batchgeneratecontent", "bidigeneratecontent", "bidigeneratecontentconstrained",
    "generateanswer", "generatetext", "generatemessage", "predict", "predictlongrunning"})
NOT_GOVERNED = frozenset({
    "batches", "batchpredictionjobs", "interactions", "agents", "triggers", "decisions",
    "environments", "auth_tokens", "batch", "ws"})
OPENAI_PASS = frozenset({"models", "embeddings", "files"})
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _refuse(status: int, message: str) -> Route:
    return Route(RouteKind.REFUSE, status=status, message=message)


def _alt(query: Mapping[str, str]) -> str | None:
    """The response format asked for: None (JSON), or "sse"."""
    # items(), not keys(): a multidict's keys() hides a repeated parameter.
    given = [(k, v) for k, v in query.items() if k.lower() in ("alt", "$alt")]
    if not given:
        return None
    [(key, value), *more] = given
    if more or key not in ("alt", "$alt"):
        raise ValueError("the 'alt' query parameter must be given once, spelled 'alt'")
    if value not in ("json", "sse"):
        raise ValueError(f"alt={value!r}: tether reads only JSON and SSE responses")
    return None if value == "json" else value


class GeminiProvider:
    # Google decodes `%3A`; it is judged decoded below, so none of these is needed.
    path_escapes: frozenset[str] = frozenset()
    name = "gemini"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        decoded = unquote(path)
        segments = [s for s in decoded.split("/") if s]
        lower = [s.lower() for s in segments]
        methods = {s.partition(":")[2] for s in lower if ":" in s}
        where = f"/{self.name}/{path}"
        if NOT_GOVERNED_METHODS & methods or NOT_GOVERNED.intersection(lower) \
                or any("bidigeneratecontent" in s for s in lower):
            return _refuse(501, f"{where} carries generated content that this version of "
                                "tether cannot govern, so it is refused rather than passed through")
        if lower[-2:] == ["chat", "completions"]:
            return self._openai_chat(method, path, segments, query)
        if "openai" in lower:
            rest = lower[lower.index("openai") + 1:]
            if rest and rest[0] in OPENAI_PASS:
                return Route(RouteKind.PASS, upstream_path=path)
            return _refuse(501, f"{where} carries generated content that this version of "
                                "tether cannot govern, so it is refused rather than passed through")
        if not any("generatecontent" in s for s in lower):
            return Route(RouteKind.PASS, upstream_path=path)
        return self._generate(method, path, decoded, segments, query)

    def _generate(self, method: str, path: str, decoded: str, segments: list[str],
                  query: Mapping[str, str]) -> Route:
        model, _, verb = segments[-1].partition(":")
        exact = (method == "POST" and path == decoded == "/".join(segments)
                 and len(segments) == 3 and segments[0] in VERSIONS
                 and segments[1] in COLLECTIONS and _MODEL_ID.fullmatch(model) is not None
                 and verb in METHODS)
        if not exact:
            return _refuse(404, (
                f"{method} /{self.name}/{path}: the governed endpoints are POST "
                f"/{self.name}/VERSION/models/MODEL:generateContent and "
                ":streamGenerateContent (VERSION v1beta, v1 or v1alpha; also tunedModels/MODEL)"))
        try:
            alt = _alt(query)
        except ValueError as e:
            return _refuse(400, str(e))
        name = model if segments[1] == "models" else f"tunedModels/{model}"
        return Route(RouteKind.GOVERNED, GEMINI, upstream_path=path, model=name,
                     stream=METHODS[verb], params={"alt": alt} if alt else {})

    def _openai_chat(self, method: str, path: str, segments: list[str],
                     query: Mapping[str, str]) -> Route:
        exact = (method == "POST" and path == "/".join(segments) and len(segments) == 4
                 and segments[0] in VERSIONS and segments[1:] == ["openai", "chat", "completions"])
        if not exact:
            return _refuse(404, f"{method} /{self.name}/{path}: the OpenAI-compatible chat "
                                f"endpoint is POST /{self.name}/VERSION/openai/chat/completions")
        try:
            if _alt(query) is not None:
                raise ValueError("alt=sse does not apply to the OpenAI-compatible endpoint")
        except ValueError as e:
            return _refuse(400, str(e))
        return Route(RouteKind.GOVERNED, CHAT, upstream_path=path)

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message, code)


def error_reply(status: int, message: str, code: str) -> ErrorReply:
    return ErrorReply(status, error_body(status, message, code).encode())


# --- requests ---------------------------------------------------------------------------


def _loads_object(body: bytes) -> dict[str, object]:
    try:
        value = PAIRS.decode(text_of(body))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def _get(obj: Mapping[str, object], name: str, where: str) -> object:
    try:
        return field_of(obj, name)
    except ValueError as e:
        raise BadRequest(f"{where}: {e}") from e


def _declared(obj: Mapping[str, object]) -> tuple[str, ...]:
    tools = _get(obj, "tools", "request")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array")
    names: list[str] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{i}] must be an object")
        declarations = _get(tool, "functionDeclarations", f"tools[{i}]")
        if declarations is None:
            continue
        if not isinstance(declarations, list):
            raise BadRequest(f"tools[{i}].functionDeclarations must be an array")
        for j, declaration in enumerate(declarations):
            name = declaration.get("name") if isinstance(declaration, dict) else None
            if not isinstance(name, str):
                raise BadRequest(f"tools[{i}].functionDeclarations[{j}] has no name")
            names.append(name)
    return tuple(names)


def _whole(value: object, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{where} must be a whole number")
    return value


def _max_output(obj: Mapping[str, object]) -> int | None:
    config = _get(obj, "generationConfig", "request")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise BadRequest("'generationConfig' must be an object")
    limit = _whole(_get(config, "maxOutputTokens", "generationConfig"),
                   "generationConfig.maxOutputTokens")
    count = _whole(_get(config, "candidateCount", "generationConfig"),
                   "generationConfig.candidateCount")
    return None if limit is None else limit * max(count or 1, 1)


def _fingerprint(obj: Mapping[str, object]) -> str | None:
    """The system instruction and the first user turn: the same on every turn of a chat."""
    system = _get(obj, "systemInstruction", "request")
    contents = obj.get("contents")
    first = None
    if isinstance(contents, list):
        first = next((c for c in contents if isinstance(c, dict)
                      and c.get("role", "user") == "user"), None)
    if system is None and first is None:
        return None
    return json_text([system, first], sort_keys=True)


def parse_request(body: bytes, route: Route) -> ParsedRequest:
    """The model and streaming come from the path; the body gives the declared tools."""
    obj = _loads_object(body)
    return ParsedRequest(model=route.model or "", stream=bool(route.stream),
                         declared_tools=_declared(obj), max_output_tokens=_max_output(obj),
                         fingerprint=_fingerprint(obj))


# --- whole responses --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeminiResponse:
    body: bytes
    chunk: Chunk
    calls: tuple[ToolCall, ...]
    usage: Usage | None


def parse_response(body: bytes) -> GeminiResponse:
    try:
        chunk = read_chunk(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UpstreamError(f"the upstream response is not a readable Gemini response: {e}"
                            ) from e
    if chunk.error is not None:
        raise UpstreamError(f"the upstream answered 200 with an error: {chunk.error.message}")
    if not chunk.has_candidates and not chunk.feedback:
        raise UpstreamError("the upstream response has no 'candidates'")
    calls: list[ToolCall] = []
    ordinal: dict[int, int] = {}
    for cand, call in chunk.calls:
        index = ordinal.get(cand.index, 0)
        ordinal[cand.index] = index + 1
        calls.append(tool_call(cand, call, index, finish_problem(cand.finish)))
    return GeminiResponse(body, chunk, tuple(calls), chunk.usage)


def render_response(response: GeminiResponse, decisions: Sequence[Decision]) -> bytes:
    """The response with denied calls replaced by text parts; the original bytes if none is."""
    if all(d.allowed for d in decisions):
        return response.body
    [text] = rewrite([response.chunk], list(zip(response.calls, decisions, strict=True)), {})
    return text.encode("utf-8")


class GeminiFormat:
    """generateContent / streamGenerateContent."""

    name = "gemini.generate"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.gemini(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body, route)

    def parse_response(self, body: bytes) -> GeminiResponse:
        return parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, GeminiResponse)
        return render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> GeminiStream:
        return GeminiStream(sse=route.params.get("alt") == "sse", max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return error_reply(403, denial_summary(calls, decisions), "tool_call_denied")


GEMINI = GeminiFormat()
