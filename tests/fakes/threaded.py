"""An aiohttp app served from a thread of its own, for tests whose client is synchronous
(the official SDKs' sync clients) and whose tether is another process (a subprocess, the
installed wheel, the container image)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web


class ThreadedServer:
    """`with ThreadedServer(app, host) as port:` serves `app` until the block ends."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1") -> None:
        self._app = app
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-upstream")
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, self._host, 0).start())
            self.port = int(self._runner.addresses[0][1])
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> int:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the fake upstream did not start: {self._error!r}")
        return self.port

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
