"""Providers (route prefixes) and their wire formats. The registry is an explicit list."""

from .anthropic import AnthropicProvider
from .azure import AzureProvider
from .base import Provider
from .bedrock import BedrockProvider
from .gemini import GeminiProvider
from .openai import OpenAIProvider

PROVIDERS: list[Provider] = [
    OpenAIProvider(),
    AzureProvider(),
    AnthropicProvider(),
    BedrockProvider(),
    GeminiProvider(),
]

__all__ = ["PROVIDERS", "Provider"]
