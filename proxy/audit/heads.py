"""The periodic signed chain head: one task per process, owned by the proxy app.

Every `audit.sign.interval` it asks the log for a head, which the log writes
only if records were written since the last one, so an idle instance adds
nothing to its chain. The head at shutdown is the log's own (`AuditLog.close`),
so it is written however the process stops short of kill -9; after a kill -9 the
records since the last head stay unsigned until the restarted process, which
continues the same chain, writes its first head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .log import AuditLog

log = logging.getLogger("tether.audit")


class HeadTimer:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Called on the running loop (the proxy app's startup); a no-op without signing."""
        sign = self.audit.settings.sign
        if sign is None or self.audit.path is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(sign.interval_s),
                                                            name="audit-chain-heads")

    async def _run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.audit.write_head()
            except Exception:  # the timer outlives any one failure; write_head counts its own
                log.exception("audit chain head failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
