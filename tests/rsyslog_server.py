"""A real rsyslogd (Debian's rsyslog, with rsyslog-gnutls for TLS) that the tests start and
stop: imtcp on a free loopback port, octet-counted framing (imtcp's default), each message
written twice - as received (%rawmsg%, parsed by the test as RFC 5424) and as rsyslog
parsed it (app-name, msgid, structured data, msg)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakes.tls import FakeCA
from tests.redis_server import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"


def gtls_available() -> bool:
    return any(Path("/usr/lib").rglob("lmnsd_gtls.so"))


@dataclass
class Rsyslog:
    workdir: Path
    tls: FakeCA | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def raw_file(self) -> Path:
        return self.workdir / "raw.log"

    @property
    def parsed_file(self) -> Path:
        return self.workdir / "parsed.log"

    def _config(self) -> str:
        tls_globals = ""
        module = 'module(load="imtcp" maxSessions="100" maxFrameSize="4194304")'
        if self.tls is not None:
            tls_globals = (f' defaultNetstreamDriverCAFile="{self.tls.ca_file}"'
                           f' defaultNetstreamDriverCertFile="{self.tls.cert_file}"'
                           f' defaultNetstreamDriverKeyFile="{self.tls.key_file}"')
            module = ('module(load="imtcp" maxSessions="100" maxFrameSize="4194304" '
                      'streamDriver.name="gtls" '
                      'streamDriver.mode="1" streamDriver.authMode="anon")')
        return f"""
global(workDirectory="{self.workdir}" maxMessageSize="4m"
       parser.escapeControlCharactersOnReceive="off"{tls_globals})
{module}
input(type="imtcp" port="{self.port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
template(name="parsed" type="string" string="%app-name% %msgid% %structured-data% %msg%\\n")
*.* action(type="omfile" file="{self.raw_file}" template="raw")
*.* action(type="omfile" file="{self.parsed_file}" template="parsed")
"""

    def start(self) -> None:
        if not Path(RSYSLOGD).exists():
            pytest.skip("rsyslogd is not installed (make system-deps)")
        if self.tls is not None and not gtls_available():
            pytest.skip("rsyslog-gnutls is not installed (make system-deps)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "rsyslog.conf"
        conf.write_text(self._config())
        with (self.workdir / "rsyslogd.err").open("ab") as err:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")],
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rsyslogd exited: "
                                   + (self.workdir / "rsyslogd.err").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsyslogd did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def raw(self) -> list[bytes]:
        return self.raw_file.read_bytes().split(b"\n")[:-1] if self.raw_file.exists() else []

    def parsed(self) -> list[bytes]:
        return self.parsed_file.read_bytes().split(b"\n")[:-1] if self.parsed_file.exists() \
            else []
