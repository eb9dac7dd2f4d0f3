"""The wire sinks against real receivers: Debian's rsyslogd (TCP, and TLS through its GnuTLS
driver, with a CA made here), an OTLP/HTTP logs receiver decoding the real protobuf, and an
HTTP batch receiver. Each receiver also goes away or misbehaves for a while: nothing is
lost, and a record sent twice is the same line (same instance and seq)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.audit.sinks.syslog import SD_ID
from tests.audit_shipping_helpers import (
    assert_at_least_once_in_order,
    make_shipping,
    until,
)
from tests.fakes.audit_receivers import BatchReceiver, OtlpReceiver
from tests.fakes.tls import FakeCA, make_fake_ca
from tests.rsyslog_server import Rsyslog

FAST = "  spool: {poll_interval: 20ms}\n"
BACKOFF = "backoff: {min: 50ms, max: 200ms}"
# Text an agent controls, as the log writes it: a lone surrogate (kept as its \u escape),
# non-ASCII, bidi, syslog's own delimiters, quotes and a JSON-looking string.
HOSTILE = {"note": "\ud800 é \u202e ] [x=\"y\"] \\ \" <134>1 - - {\"seq\":1}"}

_HEADER = re.compile(rb"<(\d{1,3})>1 (\S+) (\S{1,255}) (\S{1,48}) (\S{1,128}) (\S{1,32}) ")


def parse_rfc5424(message: bytes) -> tuple[dict[str, bytes], dict[str, dict[str, str]], bytes]:
    """A strict reading of RFC 5424 (section 6): header fields, structured data, MSG."""
    m = _HEADER.match(message)
    assert m, message[:120]
    header = dict(zip((b"pri", b"timestamp", b"hostname", b"app", b"procid", b"msgid"),
                      m.groups(), strict=True))
    rest = message[m.end():].decode("utf-8")
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith("-"):
        rest = rest[1:]
    else:
        while rest.startswith("["):
            element = re.match(r'\[([^ =\]"]{1,32})((?: [^ =\]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*)\]',
                               rest)
            assert element, rest[:120]
            params = re.findall(r' ([^ =\]"]+)="((?:[^"\\\]]|\\["\\\]])*)"', element.group(2))
            sd[element.group(1)] = {k: re.sub(r'\\(["\\\]])', r"\1", v) for k, v in params}
            rest = rest[element.end():]
    assert rest.startswith(" ") or rest == ""
    return {k.decode(): v for k, v in header.items()}, sd, rest[1:].encode("utf-8")


def syslog_config(server: Rsyslog, extra: str = "") -> str:
    tls = ""
    if server.tls is not None:
        tls = f", tls: {{ca_file: '{server.tls.ca_file}', server_name: localhost}}"
    return (f"{FAST}  sinks:\n    - {{name: rs, type: syslog, host: 127.0.0.1, port: {server.port}, "
            f"timeout: 2s, {BACKOFF}{tls}{extra}}}\n")


@pytest.fixture(params=["tcp", "tls"])
def rsyslog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rsyslog]:
    ca: FakeCA | None = make_fake_ca(tmp_path / "ca") if request.param == "tls" else None
    server = Rsyslog(tmp_path / "rsyslog", tls=ca)
    server.start()
    yield server
    server.stop()


def _messages(server: Rsyslog) -> list[bytes]:
    return [parse_rfc5424(raw)[2] for raw in server.raw()]


async def test_syslog_delivers_rfc5424_whose_msg_is_the_exact_line(rsyslog: Rsyslog,
                                                                   tmp_path: Path) -> None:
    s = make_shipping(tmp_path, syslog_config(rsyslog))
    s.write(5, arguments=HOSTILE)
    await until(lambda: len(rsyslog.raw()) == 5, what="rsyslog to write 5 messages")
    lines = s.lines()
    for raw, line in zip(rsyslog.raw(), lines, strict=True):
        header, sd, msg = parse_rfc5424(raw)
        record = json.loads(line)
        assert msg == line  # byte for byte: the central copy re-hashes to the chain
        assert header["pri"] == b"134" and header["app"] == b"tether"
        assert header["msgid"] == b"decision" and header["timestamp"].decode() == record["time"]
        assert sd[SD_ID] == {"instance": record["instance"], "seq": str(record["seq"])}
    # rsyslog's own RFC 5424 parser agrees on every field.
    for parsed, line in zip(rsyslog.parsed(), lines, strict=True):
        record = json.loads(line)
        assert parsed == (b'tether decision [' + SD_ID.encode() + b' instance="'
                          + record["instance"].encode() + b'" seq="' + str(record["seq"]).encode()
                          + b'"] ' + line)
    await s.close()


async def test_syslog_receiver_down_for_a_while_loses_nothing(rsyslog: Rsyslog,
                                                              tmp_path: Path) -> None:
    s = make_shipping(tmp_path, syslog_config(rsyslog))
    s.write(10)
    await until(lambda: len(rsyslog.raw()) == 10)
    rsyslog.stop()
    s.write(20, phase="down")
    await until(lambda: s.sample("tether_audit_records_failed_total", sink="rs") > 0,
                what="the sink to notice the receiver is gone")
    assert s.sample("tether_audit_spool_bytes", sink="rs") > 0 or s.shipper.workers[0].unshipped
    await asyncio.sleep(0.3)
    rsyslog.start()
    s.write(5, phase="back")
    await until(lambda: set(_messages(rsyslog)) == set(s.lines()), what="every line to arrive")
    assert_at_least_once_in_order(s.lines(), _messages(rsyslog))
    await s.close()


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


async def test_otlp_sends_one_log_record_per_line(otlp: OtlpReceiver, tmp_path: Path) -> None:
    s = make_shipping(tmp_path, f"{FAST}  sinks:\n    - {{type: otlp, endpoint: "
                                f"'http://127.0.0.1:{otlp.port}/v1/logs', {BACKOFF}}}\n")
    s.write(4, arguments=HOSTILE)
    await until(lambda: len(otlp.records) == 4)
    for record, line in zip(otlp.records, s.lines(), strict=True):
        parsed = json.loads(line)
        assert record.body.encode() == line
        assert record.attributes == {"tether.kind": "decision", "tether.instance": parsed["instance"],
                                     "tether.seq": parsed["seq"]}
        assert record.resource["service.name"] == "tether"
        assert record.resource["service.instance.id"] == parsed["instance"]
        assert record.event_name == "tether.audit.decision" and record.time_unix_nano > 0
    await s.close()


async def test_otlp_receiver_down_and_failing_loses_nothing(otlp: OtlpReceiver,
                                                            tmp_path: Path) -> None:
    s = make_shipping(tmp_path, f"{FAST}  sinks:\n    - {{type: otlp, endpoint: "
                                f"'http://127.0.0.1:{otlp.port}/v1/logs', batch: {{records: 7}}, "
                                f"timeout: 1s, {BACKOFF}}}\n")
    s.write(10)
    await until(lambda: len(otlp.records) == 10)
    await otlp.stop()
    s.write(15)
    await until(lambda: s.sample("tether_audit_records_failed_total", sink="otlp") > 0)
    await otlp.start()  # the same port
    otlp.faults.fail = 3  # then a few 503s
    otlp.faults.status = 503
    s.write(5)
    await until(lambda: set(otlp.lines()) == set(s.lines()), what="every line to arrive")
    assert_at_least_once_in_order(s.lines(), otlp.lines())
    await s.close()


@pytest.fixture
async def batch() -> AsyncIterator[BatchReceiver]:
    receiver = BatchReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


def http_config(receiver: BatchReceiver, extra: str = "") -> str:
    return (f"{FAST}  sinks:\n    - {{name: siem, type: http, url: "
            f"'http://127.0.0.1:{receiver.port}/ingest', bearer_token_env: T_SIEM, "
            f"headers: {{X-Team: sec}}, {BACKOFF}{extra}}}\n")


async def test_http_batches_are_gzip_ndjson(batch: BatchReceiver, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_SIEM", "s3cret")
    s = make_shipping(tmp_path, http_config(batch, ", batch: {records: 4}"))
    s.write(10, arguments=HOSTILE)
    await until(lambda: len(batch.lines) == 10)
    assert batch.lines == s.lines()
    headers = batch.headers[0]
    assert headers["Authorization"] == "Bearer s3cret" and headers["X-Team"] == "sec"
    assert headers["Content-Type"] == "application/x-ndjson"
    assert len(batch.headers) >= 3  # 4 records a batch at most
    await s.close()


@pytest.mark.parametrize("fault", ["500s", "drops", "slow", "down"])
async def test_http_receiver_faults_lose_nothing(batch: BatchReceiver, tmp_path: Path,
                                                 fault: str) -> None:
    s = make_shipping(tmp_path, http_config(batch, ", timeout: 300ms, batch: {records: 5}"))
    s.write(8)
    await until(lambda: len(batch.lines) == 8)
    if fault == "500s":
        batch.faults.fail = 4
    elif fault == "drops":
        batch.faults.drop = 3
    elif fault == "slow":
        batch.faults.delay = 0.6  # past the sink's timeout: the receiver may still store it
    else:
        await batch.stop()
    s.write(20, fault=fault)
    await until(lambda: s.sample("tether_audit_records_failed_total", sink="siem") > 0)
    if fault == "slow":
        batch.faults.delay = 0
    elif fault == "down":
        await batch.start()
    s.write(3)
    await until(lambda: set(batch.lines) == set(s.lines()), what="every line to arrive")
    assert_at_least_once_in_order(s.lines(), batch.lines)
    await s.close()


async def test_every_sink_has_its_own_cursor(batch: BatchReceiver, otlp: OtlpReceiver,
                                             tmp_path: Path) -> None:
    s = make_shipping(tmp_path, f"{FAST}  sinks:\n"
                                f"    - {{name: siem, type: http, url: 'http://127.0.0.1:{batch.port}/',"
                                f" {BACKOFF}}}\n"
                                f"    - {{type: otlp, endpoint: 'http://127.0.0.1:{otlp.port}/v1/logs'}}\n")
    batch.faults.always_fail = True
    s.write(12)
    await until(lambda: len(otlp.records) == 12)  # one sink failing holds no other back
    assert batch.lines == []
    batch.faults.always_fail = False
    await until(lambda: batch.lines == s.lines())
    await s.close()


async def test_syslog_tls_refuses_a_server_it_cannot_verify(tmp_path: Path) -> None:
    server = Rsyslog(tmp_path / "rsyslog", tls=make_fake_ca(tmp_path / "ca"))
    other = make_fake_ca(tmp_path / "other-ca")  # not the CA that signed the server's cert
    server.start()
    try:
        s = make_shipping(tmp_path, f"{FAST}  sinks:\n    - {{name: rs, type: syslog, "
                                    f"host: 127.0.0.1, port: {server.port}, {BACKOFF}, "
                                    f"tls: {{ca_file: '{other.ca_file}', server_name: localhost}}}}\n")
        s.write(2)
        await until(lambda: s.sample("tether_audit_records_failed_total", sink="rs") > 0)
        assert "CERTIFICATE_VERIFY_FAILED" in (s.shipper.workers[0].last_error or "")
        assert server.raw() == []
        s.audit.close()
        await s.shipper.close()
    finally:
        server.stop()


async def test_a_megabyte_record_arrives_whole(rsyslog: Rsyslog, batch: BatchReceiver,
                                               otlp: OtlpReceiver, tmp_path: Path) -> None:
    """A 1 MB argument (what an agent may send) is one record on every wire, byte for byte:
    one syslog message (the receiver's maxMessageSize must allow it), one NDJSON line,
    one LogRecord."""
    s = make_shipping(tmp_path, syslog_config(rsyslog)
                      + f"    - {{name: siem, type: http, url: 'http://127.0.0.1:{batch.port}/'}}\n"
                      + f"    - {{type: otlp, endpoint: 'http://127.0.0.1:{otlp.port}/v1/logs'}}\n")
    s.write(1, arguments={"blob": "\u00e9x" * 350_000})
    s.write(1)
    lines = s.lines()
    assert len(lines[0]) > 1_000_000
    await until(lambda: len(rsyslog.raw()) == 2 and len(batch.lines) == 2
                and len(otlp.records) == 2)
    assert _messages(rsyslog) == lines and batch.lines == lines and otlp.lines() == lines
    await s.close()
