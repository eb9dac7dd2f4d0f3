"""Placeholder until the gemini wire format lands: every gemini route is refused (501),
never passed through ungoverned."""

from __future__ import annotations

from collections.abc import Mapping

from .base import ErrorReply, Route, RouteKind
from .openai_chat import error_reply


class GeminiProvider:
    path_escapes: frozenset[str] = frozenset()
    name = "gemini"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        return Route(RouteKind.REFUSE, status=501,
                     message=f"/{self.name}/ is not governed by this version of tether yet")

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message, code)
