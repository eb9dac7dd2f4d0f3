"""OTLP logs over HTTP/protobuf: one LogRecord per audit line, to a collector's /v1/logs.

The body is the exact line (a string AnyValue), so the central copy can be re-hashed;
attributes `tether.instance`, `tether.seq` (int) and `tether.kind` let a pipeline route
and deduplicate without parsing it. The resource says `service.name: tether` and
`service.instance.id`. Messages are opentelemetry-proto's own classes (the package the
OTLP exporter uses), so the wire format is the specification's.

A 2xx acknowledges the batch. A partial success (`rejected_log_records`) is logged and
counted as failed records but not retried: the collector refused those records by
content, and sending them again would be refused again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from datetime import datetime

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    LogRecord,
    ResourceLogs,
    ScopeLogs,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from ..shipping_settings import SinkSettings
from ..spool import Line
from . import in_turns
from ._http import Poster

log = logging.getLogger("tether.audit.otlp")
SCOPE = InstrumentationScope(name="tether.audit")


def _attr(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _nanos(time: str | None) -> int:
    if time is None:
        return 0
    try:
        stamp = datetime.fromisoformat(time)
    except ValueError:
        return 0
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


def record(line: Line, observed: int) -> LogRecord:
    attributes = [_attr("tether.kind", line.kind)]
    if line.instance is not None:
        attributes.append(_attr("tether.instance", line.instance))
    if line.seq is not None:
        attributes.append(_attr("tether.seq", line.seq))
    # The log writes UTF-8 (lone surrogates stay \u escapes), so this decodes exactly; a line
    # damaged on disk gets U+FFFD rather than blocking the sink forever (verify flags it).
    return LogRecord(time_unix_nano=_nanos(line.time), observed_time_unix_nano=observed,
                     severity_number=SEVERITY_NUMBER_INFO, severity_text="INFO",
                     event_name=f"tether.audit.{line.kind}",
                     body=AnyValue(string_value=line.raw.decode("utf-8", "replace")),
                     attributes=attributes)


def encode(lines: Sequence[Line], observed: int, host: str) -> bytes:
    """One ExportLogsServiceRequest; one ResourceLogs per instance, in the lines' order."""
    return request([(line.instance, record(line, observed)) for line in lines], host)


def request(records: Sequence[tuple[str | None, LogRecord]], host: str) -> bytes:
    groups: list[tuple[str | None, list[LogRecord]]] = []
    for instance, log_record in records:
        if not groups or groups[-1][0] != instance:
            groups.append((instance, []))
        groups[-1][1].append(log_record)
    resources = []
    for instance, group in groups:
        attributes = [_attr("service.name", "tether"), _attr("host.name", host)]
        if instance is not None:
            attributes.append(_attr("service.instance.id", instance))
        resources.append(ResourceLogs(resource=Resource(attributes=attributes),
                                      scope_logs=[ScopeLogs(scope=SCOPE, log_records=group)]))
    data: bytes = ExportLogsServiceRequest(resource_logs=resources).SerializeToString()
    return data


class OtlpSink:
    def __init__(self, settings: SinkSettings) -> None:
        self.poster = Poster(settings, "application/x-protobuf")
        self.host = socket.gethostname()
        self.rejected = 0

    async def send(self, lines: Sequence[Line]) -> None:
        observed = time.time_ns()
        records = await in_turns(lines, lambda line: (line.instance, record(line, observed)))
        answer = await self.poster.post(request(records, self.host))
        if answer:
            response = ExportLogsServiceResponse()
            try:
                response.ParseFromString(answer)
            except ValueError:  # DecodeError: a 2xx without an OTLP body still acknowledges
                return
            rejected = response.partial_success.rejected_log_records
            if rejected:
                self.rejected += rejected
                log.warning("OTLP receiver %s rejected %d audit record(s): %s", self.poster.url,
                            rejected, response.partial_success.error_message)

    async def close(self) -> None:
        await self.poster.close()
