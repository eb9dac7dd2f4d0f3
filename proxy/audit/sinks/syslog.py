"""Syslog: RFC 5424 messages over TCP or TLS, octet-counted framing (RFC 6587 3.4.1).

Written by hand: no maintained asyncio library frames RFC 5424 (the logging-bound
rfc5424-logging-handler is synchronous and unmaintained since 2019), and the format
is a few fields. One record is one message; its MSG is the record's exact line (no
BOM: a receiver stores the bytes that `tether audit verify` re-hashes):

    <134>1 2026-12-07T06:35:00.123456Z host tether 4242 decision
        [tether@32473 instance="pod-1-x7" seq="42"] {"action":...}      (one line on the wire)

PRI is facility*8 + 6 (informational); MSGID the record's kind; the structured data
(SD-ID under 32473, the enterprise number RFC 5612 reserves for documentation) carries
the instance and seq a receiver deduplicates by.

TCP has no application-level acknowledgement: a batch counts as delivered once the
kernel took it. A receiver that closes the connection is noticed before the next
batch (its FIN), so a restarted rsyslog loses nothing; a receiver host that vanishes
without closing can lose what was in flight - which `tether audit verify` on the
central copy then reports as a gap. Use the otlp or http sink where every batch must
be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
from collections.abc import Sequence

from ..shipping_settings import SinkSettings
from ..spool import Line
from . import SinkError, in_turns

SEVERITY_INFO = 6
SD_ID = "tether@32473"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_SD_ESCAPE = re.compile(r'(["\\\]])')


def _printable(text: str, limit: int) -> str:
    """A header field: printable US-ASCII, no spaces, at most `limit` characters, else `-`."""
    return text if text and len(text) <= limit and all(33 <= ord(c) <= 126 for c in text) else "-"


def format_message(line: Line, *, facility: int, hostname: str, app_name: str,
                   procid: str, time: str | None = None) -> bytes:
    """One RFC 5424 message (without framing) whose MSG is `line.raw`."""
    stamp = time if time is not None and _TIMESTAMP.fullmatch(time) else "-"
    params = []
    if line.instance is not None:
        escaped = _SD_ESCAPE.sub(r"\\\1", line.instance)
        params.append(f'instance="{escaped}"')
    if line.seq is not None:
        params.append(f'seq="{line.seq}"')
    sd = f"[{SD_ID} {' '.join(params)}]" if params else "-"
    header = (f"<{facility * 8 + SEVERITY_INFO}>1 {stamp} {_printable(hostname, 255)} "
              f"{_printable(app_name, 48)} {_printable(procid, 128)} {_printable(line.kind, 32)} "
              f"{sd} ")
    return header.encode("utf-8") + line.raw


def frame(message: bytes) -> bytes:
    return b"%d " % len(message) + message


class SyslogSink:
    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.hostname = settings.hostname or socket.gethostname()
        self.procid = str(os.getpid())
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._ssl: ssl.SSLContext | None = None  # made at the first connection (files may
        # be mounted after the config is checked); a bad CA file is then an outage, not a crash

    def _context(self) -> ssl.SSLContext:
        tls = self.settings.tls
        assert tls is not None
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if not tls.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> asyncio.StreamWriter:
        s = self.settings
        if self._writer is not None and not self._writer.is_closing() and self._reader is not None \
                and not self._reader.at_eof():
            return self._writer
        await self._drop()
        server_name = (s.tls.server_name or s.host) if s.tls else None
        try:
            if s.tls and self._ssl is None:
                self._ssl = self._context()
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(s.host, s.port, ssl=self._ssl, server_hostname=server_name),
                s.timeout_s)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise SinkError(f"syslog {s.host}:{s.port}: cannot connect: {e}") from e
        assert self._writer is not None
        return self._writer

    async def send(self, lines: Sequence[Line]) -> None:
        writer = await self._connect()
        data = b"".join(await in_turns(lines, lambda line: frame(format_message(
            line, facility=self.settings.facility, hostname=self.hostname,
            app_name=self.settings.app_name, procid=self.procid, time=line.time))))
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.settings.timeout_s)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            await self._drop()
            raise SinkError(f"syslog {self.settings.host}:{self.settings.port}: {e}") from e

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def close(self) -> None:
        await self._drop()
