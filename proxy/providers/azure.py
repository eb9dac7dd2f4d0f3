"""Azure OpenAI behind `/azure/`: the Chat Completions wire format on Azure's paths.

    openai/deployments/{deployment}/chat/completions?api-version=...   (classic)
    openai/v1/chat/completions                                       (v1 API)
    openai/responses?api-version=...  and  openai/v1/responses        (Responses API)

The deployment names the model when the body does not. Keys go in `api-key`.
Errors have OpenAI's shape, which Azure shares. Batches (`openai/batches`,
`openai/v1/batches`) and their input uploads are BATCH routes, as on OpenAI.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import ErrorReply, Route, RouteKind
from .batch_routes import openai_batches
from .openai import NOT_YET_GOVERNED
from .openai_chat import CHAT
from .openai_chat_wire import error_reply
from .openai_responses import RESPONSES

RESPONSES_PATHS = (["openai", "v1", "responses"], ["openai", "responses"])


class AzureProvider:
    path_escapes: frozenset[str] = frozenset()
    name = "azure"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        segments = [s for s in path.split("/") if s]
        lower = [s.lower() for s in segments]
        batch = openai_batches(self.name, method, path, ("openai/v1", "openai"))
        if batch is not None:
            return batch
        if lower[-1:] == ["responses"]:
            if method == "POST" and path == "/".join(segments) and segments in RESPONSES_PATHS:
                return Route(RouteKind.GOVERNED, RESPONSES, upstream_path=path)
            return Route(RouteKind.REFUSE, status=404, message=(
                f"{method} /{self.name}/{path}: the responses endpoints are POST "
                f"/{self.name}/openai/responses and /{self.name}/openai/v1/responses"))
        if NOT_YET_GOVERNED.intersection(lower):
            return Route(RouteKind.REFUSE, status=501, message=(
                f"/{self.name}/{path} carries tool calls that this version of tether cannot "
                "govern yet, so it is refused rather than passed through"))
        if lower[-2:] != ["chat", "completions"]:
            if any(lower[i:i + 2] == ["chat", "completions"] for i in range(len(lower))):
                return Route(RouteKind.REFUSE, status=501, message=(
                    f"/{self.name}/{path}: stored chat completions hold the original tool "
                    "calls, which this version of tether does not rewrite, so they are refused"))
            return Route(RouteKind.PASS, upstream_path=path)
        exact = path == "/".join(segments) and method == "POST"
        if exact and lower[:2] == ["openai", "v1"] and len(segments) == 4:
            return Route(RouteKind.GOVERNED, CHAT, upstream_path=path)
        if exact and lower[:2] == ["openai", "deployments"] and len(segments) == 5 \
                and segments[3:] == ["chat", "completions"]:
            return Route(RouteKind.GOVERNED, CHAT, upstream_path=path, model=segments[2])
        return Route(RouteKind.REFUSE, status=404, message=(
            f"{method} /{self.name}/{path}: the chat endpoints are POST "
            f"/{self.name}/openai/deployments/DEPLOYMENT/chat/completions and "
            f"/{self.name}/openai/v1/chat/completions"))

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message, code)
