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
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if resp.status == 200 and ctype != "application/json":
                    # A captive portal or a misrouted proxy: whatever it says is not OPA's.
                    return Failed("bad_json", f"the answer is {ctype or 'untyped'}, not JSON")
                # Whole, up to the bound (one read() returns only what has arrived so
                # far); a gzip answer is bounded after decompression.
                answer = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    answer += chunk
                    if len(answer) > MAX_ANSWER:
                        return Failed("bad_json", f"the answer is over {MAX_ANSWER} bytes")
                return read_http(resp.status, bytes(answer))
        except (aiohttp.ClientError, OSError) as e:
            return Failed("connect", f"{type(e).__name__}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
