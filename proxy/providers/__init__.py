"""Wire formats. The registry is an explicit list; order does not matter."""

from .openai_chat import OpenAIChatProvider

PROVIDERS = [OpenAIChatProvider()]

__all__ = ["PROVIDERS", "OpenAIChatProvider"]
