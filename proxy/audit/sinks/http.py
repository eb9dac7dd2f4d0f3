"""HTTP batch: the lines as NDJSON, gzip-compressed, POSTed to a URL (in the spirit of OPA's
decision-log upload). Any 2xx acknowledges the batch; anything else (and a timeout, or a
dropped connection) is retried by the shipper with exponential backoff and jitter.

    POST <url>
    Content-Type: application/x-ndjson
    Content-Encoding: gzip
    X-Tether-Records: <count>

    {"action":"allow",...,"instance":"pod-1-x7","seq":41,...}\\n{"...","seq":42,...}\\n
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Sequence

from ..shipping_settings import SinkSettings
from ..spool import Line
from ._http import Poster


def encode(lines: Sequence[Line]) -> bytes:
    # Level 6: most of gzip's ratio on JSON at a fraction of level 9's time.
    return gzip.compress(b"".join(line.raw + b"\n" for line in lines), compresslevel=6)


class HttpBatchSink:
    def __init__(self, settings: SinkSettings) -> None:
        self.poster = Poster(settings, "application/x-ndjson")

    async def send(self, lines: Sequence[Line]) -> None:
        # In a thread: zlib lets go of the GIL while it compresses, the loop does not wait.
        body = await asyncio.to_thread(encode, lines)
        await self.poster.post(body, {"Content-Encoding": "gzip",
                                               "X-Tether-Records": str(len(lines))})

    async def close(self) -> None:
        await self.poster.close()
