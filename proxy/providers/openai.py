"""OpenAI behind `/openai/`: which paths are governed, passed or refused.

A path is governed by what it ends in, not by its exact spelling, so an
upstream configured with a path of its own (`http://vllm:8000/v1`) cannot open
a second, ungoverned door to the same endpoint: one spelling is governed, the
near-misses are refused, everything else passes. Batches and their input
uploads are BATCH routes (`batch_routes`), judged by `upstreams.openai.batches`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import ErrorReply, Route, RouteKind
from .batch_routes import openai_batches
from .openai_chat import CHAT
from .openai_chat_wire import error_reply
from .openai_responses import RESPONSES
from .openai_stored import stored_route

CHAT_PATH = "v1/chat/completions"
RESPONSES_PATH = "v1/responses"
# Segments of endpoints that carry tool calls in a format this version does not
# read yet: refused rather than passed through ungoverned. Only `POST v1/responses`
# itself is governed: a stored response and its input items hold the original,
# unrewritten calls; so do conversation items and stored chat completions.
NOT_YET_GOVERNED = {"responses", "assistants", "threads", "realtime", "conversations"}


class OpenAIProvider:
    path_escapes: frozenset[str] = frozenset()
    name = "openai"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        segments = [s for s in path.lower().split("/") if s]
        batch = openai_batches(self.name, method, path, ("v1",))
        if batch is not None:
            return batch
        stored = stored_route(method, path)  # read back as tether rewrote it (openai_stored)
        if stored is not None:
            return stored
        if segments[-1:] == ["responses"]:
            if method != "POST" or path != RESPONSES_PATH:
                return Route(RouteKind.REFUSE, status=404, message=(
                    f"{method} /{self.name}/{path}: the responses endpoint is "
                    f"POST /{self.name}/{RESPONSES_PATH}"))
            return Route(RouteKind.GOVERNED, RESPONSES, upstream_path=path)
        if NOT_YET_GOVERNED.intersection(segments):
            return Route(RouteKind.REFUSE, status=501, message=(
                f"/{self.name}/{path} carries tool calls that this version of tether cannot "
                "govern yet, so it is refused rather than passed through"))
        if segments[-2:] == ["chat", "completions"]:
            if method != "POST" or path != CHAT_PATH:
                return Route(RouteKind.REFUSE, status=404, message=(
                    f"{method} /{self.name}/{path}: the chat endpoint is "
                    f"POST /{self.name}/{CHAT_PATH}"))
            return Route(RouteKind.GOVERNED, CHAT, upstream_path=path)
        if any(segments[i:i + 2] == ["chat", "completions"] for i in range(len(segments))):
            return Route(RouteKind.REFUSE, status=501, message=(
                f"/{self.name}/{path}: stored chat completions hold the original tool calls, "
                "which this version of tether does not rewrite, so they are refused"))
        return Route(RouteKind.PASS, upstream_path=path)

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message, code)
