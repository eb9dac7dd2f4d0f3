"""The sinks an audit log is shipped to: one module per wire, and an explicit registry.

A sink's `send` returns once the receiver has the whole batch (an HTTP 2xx, or for
syslog the bytes written to the connection), and raises SinkError otherwise; the
shipper (shipper.py) retries the same batch, so a sink sees lines in order, each at
least once. A sink holds at most one connection and is used by one task at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from ...errors import TetherError
from ..shipping_settings import SinkSettings
from ..spool import Line

CHUNK = 32  # lines encoded between two turns of the event loop


async def in_turns[T](lines: Sequence[Line], encode: Callable[[Line], T]) -> list[T]:
    """`encode` each line, yielding to the event loop every CHUNK lines: a batch of 500
    records is tens of milliseconds of JSON and protobuf work, which must not stall the
    governed calls sharing the loop (bench/audit_sinks.py)."""
    out: list[T] = []
    for i, line in enumerate(lines):
        out.append(encode(line))
        if i % CHUNK == CHUNK - 1:
            await asyncio.sleep(0)
    return out


class SinkError(TetherError):
    """A batch was not delivered (the receiver is down, refused it, or was too slow)."""


class Sink(Protocol):
    async def send(self, lines: Sequence[Line]) -> None: ...

    async def close(self) -> None: ...


def make_sink(settings: SinkSettings) -> Sink:
    from .file import FileSink, StdoutSink
    from .http import HttpBatchSink
    from .otlp import OtlpSink
    from .syslog import SyslogSink

    sinks: dict[str, Callable[[SinkSettings], Sink]] = {
        "stdout": StdoutSink,
        "file": FileSink,
        "syslog": SyslogSink,
        "otlp": OtlpSink,
        "http": HttpBatchSink,
    }
    return sinks[settings.type](settings)
