"""Receivers for the audit sinks: an OTLP/HTTP logs endpoint that decodes the real protobuf
(opentelemetry-proto's ExportLogsServiceRequest), and an HTTP batch endpoint (gunzip, split
lines). Both can be told to misbehave: answer 500, answer slowly, drop the connection, or go
away entirely and come back on the same port."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Faults:
    fail: int = 0          # the next N requests answer `status`
    status: int = 500
    drop: int = 0          # the next N requests have their connection closed, no answer
    delay: float = 0.0     # every answer waits this long first
    always_fail: bool = False


@dataclass
class Receiver:
    faults: Faults = field(default_factory=Faults)
    requests: int = 0
    _runner: web.AppRunner | None = None
    port: int = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        f = self.faults
        if f.delay:
            await asyncio.sleep(f.delay)
        if f.drop:
            f.drop -= 1
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        if f.always_fail or f.fail:
            f.fail = max(0, f.fail - 1)
            return web.Response(status=f.status, text="failing on purpose")
        return self.accept(request, body)

    def accept(self, request: web.Request, body: bytes) -> web.StreamResponse:
        raise NotImplementedError

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    async def start(self) -> int:
        """Serve on loopback; after a stop, on the same port again."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class BatchReceiver(Receiver):
    lines: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def accept(self, request: web.Request, body: bytes) -> web.StreamResponse:
        # aiohttp's server already inflated a gzip body (and answers 400 to a body that is
        # not what its Content-Encoding says); inflate here only if it did not.
        assert request.headers.get("Content-Encoding") == "gzip"
        data = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
        assert data.endswith(b"\n")
        self.lines.extend(data.split(b"\n")[:-1])
        self.headers.append(dict(request.headers))
        return web.Response(status=204)

    def seqs(self) -> list[int]:
        return [json.loads(line)["seq"] for line in self.lines]


@dataclass(frozen=True)
class OtlpRecord:
    body: str
    attributes: dict[str, str | int]
    resource: dict[str, str | int]
    time_unix_nano: int
    event_name: str


def _value(v: AnyValue) -> str | int:
    return v.int_value if v.WhichOneof("value") == "int_value" else v.string_value


@dataclass
class OtlpReceiver(Receiver):
    records: list[OtlpRecord] = field(default_factory=list)

    def accept(self, request: web.Request, body: bytes) -> web.StreamResponse:
        assert request.path == "/v1/logs"
        assert request.headers.get("Content-Type") == "application/x-protobuf"
        message = ExportLogsServiceRequest.FromString(body)
        for resource_logs in message.resource_logs:
            resource = {kv.key: _value(kv.value) for kv in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                assert scope_logs.scope.name == "tether.audit"
                for r in scope_logs.log_records:
                    self.records.append(OtlpRecord(
                        r.body.string_value, {kv.key: _value(kv.value) for kv in r.attributes},
                        resource, r.time_unix_nano, r.event_name))
        return web.Response(body=ExportLogsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def lines(self) -> list[bytes]:
        return [r.body.encode() for r in self.records]
