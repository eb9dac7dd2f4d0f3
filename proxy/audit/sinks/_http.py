"""What the two HTTP sinks share: one aiohttp session, headers from config and env, a POST."""

from __future__ import annotations

import io
import os

import aiohttp

from ..shipping_settings import SinkSettings
from . import SinkError


class Poster:
    def __init__(self, settings: SinkSettings, content_type: str) -> None:
        assert settings.url is not None
        self.settings = settings
        self.url = settings.url
        self.content_type = content_type
        self._session: aiohttp.ClientSession | None = None

    def headers(self) -> dict[str, str]:
        """Read per request, so a rotated token (a re-mounted secret's env) is picked up
        on restart without a config change; never logged."""
        s = self.settings
        out = {"Content-Type": self.content_type, **s.headers}
        for header, env in s.headers_env.items():
            value = os.environ.get(env)
            if value:
                out[header] = value
        if s.bearer_token_env and os.environ.get(s.bearer_token_env):
            out["Authorization"] = f"Bearer {os.environ[s.bearer_token_env]}"
        return out

    async def post(self, body: bytes, extra: dict[str, str] | None = None) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                trust_env=False, auto_decompress=True)
        try:
            # A BytesIO is sent in pieces (aiohttp warns that one large bytes body would not be).
            async with self._session.post(self.url, data=io.BytesIO(body),
                                          headers={**self.headers(), **(extra or {})}) as resp:
                answer = await resp.read()
                if not 200 <= resp.status < 300:
                    text = answer[:200].decode("utf-8", "replace")
                    raise SinkError(f"{self.url}: HTTP {resp.status}: {text}")
                return answer
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise SinkError(f"{self.url}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
