"""The two local sinks: stdout (one record a line, for the cluster's log collector) and a
copy of the log in another file (a persistent volume, say)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from ..shipping_settings import SinkSettings
from ..spool import Line
from . import SinkError


def _ndjson(lines: Sequence[Line]) -> bytes:
    return b"".join(line.raw + b"\n" for line in lines)


class StdoutSink:
    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings

    def _write(self, data: bytes) -> None:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()

    async def send(self, lines: Sequence[Line]) -> None:
        # In a thread: a collector that stops reading the pipe must not stall the event loop.
        try:
            await asyncio.to_thread(self._write, _ndjson(lines))
        except (OSError, ValueError) as e:
            raise SinkError(f"stdout: {e}") from e

    async def close(self) -> None:
        return None


class FileSink:
    def __init__(self, settings: SinkSettings) -> None:
        assert settings.path is not None
        self.settings = settings
        self.path = settings.path

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.settings.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, lines: Sequence[Line]) -> None:
        try:
            await asyncio.to_thread(self._write, _ndjson(lines))
        except OSError as e:
            raise SinkError(f"file {self.path}: {e.strerror or e}") from e

    async def close(self) -> None:
        return None
