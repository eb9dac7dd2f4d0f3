"""A remote OPA over its Data API: `POST {url}/v1/data/{path}` with `{"input": ...}`.

The HTTP answer is read by `proxy.policy.opa.read_http` (the same interpretation
as the embedded engine's). Connection failures become a `Failed` reply; the
caller applies the timeout. The session is made on first use (it needs the
running loop) and keeps connections alive, so a decision costs one loopback
round trip when OPA runs as a sidecar.
"""

from __future__ import annotations

import aiohttp

from ..policy.opa import Failed, Reply, read_http

MAX_ANSWER = 1024 * 1024


class RemoteOpa:
    def __init__(self, url: str, path: str, token: str | None = None) -> None:
        self.endpoint = f"{url}/v1/data/{path}"
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        return self._session

    async def query(self, document: str) -> Reply:
        """`document`: the input as canonical JSON."""
        body = b'{"input":' + document.encode() + b"}"
        try:
            async with self._client().post(self.endpoint, data=body, headers=self._headers,
                                           allow_redirects=False) as resp:
                answer = await resp.content.read(MAX_ANSWER + 1)
                if len(answer) > MAX_ANSWER:
                    return Failed("bad_json", f"the answer is over {MAX_ANSWER} bytes")
                return read_http(resp.status, answer)
        except (aiohttp.ClientError, OSError) as e:
            return Failed("connect", f"{type(e).__name__}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
