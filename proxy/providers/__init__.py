"""Providers (route prefixes) and their wire formats. The registry is an explicit list."""

from .base import Provider
from .openai import OpenAIProvider

PROVIDERS: list[Provider] = [OpenAIProvider()]

__all__ = ["PROVIDERS", "OpenAIProvider", "Provider"]
