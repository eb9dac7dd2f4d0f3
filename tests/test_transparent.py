"""Transparent mode end to end, in network namespaces of the test's own: an agent that
ignores HTTP_PROXY (NO_PROXY=*, curl, raw sockets) is still governed by tether.

    pod namespace (tether-pod-<pid>)                cloud namespace (tether-cloud-<pid>)
    tether serve --transparent-port 15001 (uid 0)    fake EC2 on .2:80, .2:443 (TLS), .2:8080,
    tether-redirect (TETHER_UID=0)                   UDP .2:443; .3 is a second address
    curl / python as uid 65534  ----- veth 10.251.N.0/29 ----->

The fake cloud is `FakeUpstream` (tests/test_forward_egress.py), run in the cloud
namespace by this module's `__main__`; it logs every connection and request to a file,
so "denied" also means "the fake never saw it". The pod's /etc/hosts (iproute2's
/etc/netns/<ns>/hosts) maps ec2.us-east-1.amazonaws.com to the fake, for the agent and
tether alike, as a pod's DNS would. The one test-only allowance is explicit in the
config: `forward.allow_private` names that host, as the fake's address is private.
Needs root, `ip netns`, iptables, curl and setpriv; skips otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIRECT = ROOT / "deploy" / "transparent" / "tether-redirect"
EC2 = "ec2.us-east-1.amazonaws.com"
NOBODY = "65534"
TPORT = 15001
DESCRIBE = "/?Action=DescribeVolumes&Version=2016-11-15"
DELETE = "/?Action=DeleteVolume&VolumeId=vol-prod&Version=2016-11-15"
POLICY = """
rules:
  - id: no-volume-deletes
    match: {api: aws.ec2.DeleteVolume}
    action: deny
    message: Agents never delete volumes
"""


# -- the fake cloud, run in the cloud namespace --------------------------------------------

async def _serve_fake(log: Path, cert: Path, key: Path) -> None:
    from aiohttp import web

    from tests.test_forward_egress import FakeUpstream

    def write(record: dict[str, object]) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        write({"kind": "request", "local": f"{sock[0]}:{sock[1]}" if sock else "?",
               "method": request.method, "path": request.path_qs,
               "host": request.headers.get("host", ""), "body": (await request.read()).decode()})
        response: web.StreamResponse = await handler(request)
        return response

    app = FakeUpstream().app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    factory = runner.server
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()

    def counted(port: int) -> Any:
        def make() -> Any:
            write({"kind": "connection", "port": port})
            return factory()
        return make

    class Datagrams(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            write({"kind": "datagram", "port": 443, "data": data.decode(errors="replace")})

    for port, context in ((80, None), (443, tls), (8080, None)):
        await loop.create_server(counted(port), "0.0.0.0", port, ssl=context)
    await loop.create_datagram_endpoint(Datagrams, local_addr=("0.0.0.0", 443))
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- namespaces, processes, cleanup ----------------------------------------------------------

def run(*args: str, check: bool = True, timeout: float = 10,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout,
                          env=env)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def free_subnet() -> str:
    """A 10.251.N.0/29 that no address or route on this machine mentions."""
    used = run("ip", "-4", "addr").stdout + run("ip", "-4", "route").stdout
    for n in range(os.getpid() % 200 + 20, 256):
        if f"10.251.{n}." not in used:
            return f"10.251.{n}"
    pytest.skip("no free 10.251.N.0/29 test subnet")


def wait_line(proc: subprocess.Popen[str], want: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if want in line:
                return line
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"{want!r} never printed (exit {proc.poll()}); see the stderr-*.log files")


def preconditions() -> str:
    """The agent's python (uid 65534 must be able to run it), or a skip."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("transparent mode test needs root on Linux (network namespaces, iptables)")
    for tool in ("ip", "iptables", "curl", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    probe = f"tether-probe-{os.getpid()}"
    if run("ip", "netns", "add", probe, check=False).returncode != 0:
        pytest.skip("cannot create network namespaces (ip netns add failed)")
    try:
        nat = run(*in_ns(probe, "iptables", "-t", "nat", "-S"), check=False)
        if nat.returncode != 0:
            pytest.skip(f"iptables nat table unusable: {nat.stderr.strip()}")
    finally:
        run("ip", "netns", "del", probe, check=False)
    for python in ("/usr/bin/python3", shutil.which("python3") or ""):
        if python and run("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          python, "-c", "import socket", check=False).returncode == 0:
            return python
    pytest.skip("no python that uid 65534 can run (for the raw-socket agent)")


@dataclass
class Pod:
    pod: str
    cloud: str
    net: str            # "10.251.N": .1 the pod, .2 the fake cloud, .3 a second cloud address
    python: str         # the agent's interpreter
    shared: Path        # world-readable: the tether CA for curl
    work: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    made_etc_netns: bool = False

    @property
    def fake_ip(self) -> str:
        return f"{self.net}.2"

    def agent(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """A command in the pod as uid 65534 with no proxy settings at all."""
        return run(*in_ns(self.pod, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin", "NO_PROXY=*",
                          "no_proxy=*", *args), check=False, timeout=timeout)

    def curl(self, url: str, *extra: str) -> tuple[int, str, dict[str, str]]:
        done = self.agent("curl", "-sS", "--max-time", "5", "-D", "-", "-o", "-", *extra, url)
        head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
        if not head.startswith("HTTP/"):
            return 0, done.stderr, {}
        lines = head.splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        return int(lines[0].split()[1]), body, headers

    def raw(self, code: str) -> str:
        """Python (stdlib only) run by the agent in the pod; returns its stdout."""
        done = self.agent(self.python, "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def fake_log(self) -> list[dict[str, Any]]:
        path = self.work / "fake.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def seen(self, marker: str) -> list[dict[str, Any]]:
        return [r for r in self.fake_log() if r["kind"] == "request" and marker in r["path"]]

    def audit(self) -> list[dict[str, Any]]:
        path = self.work / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def setup_netns(p: Pod) -> None:
    pid, net = os.getpid(), p.net
    veth_pod, veth_cloud = f"tp{pid}", f"tc{pid}"
    run("ip", "netns", "add", p.pod)
    run("ip", "netns", "add", p.cloud)
    run("ip", "link", "add", veth_pod, "netns", p.pod, "type", "veth", "peer", "name", veth_cloud,
        "netns", p.cloud)
    for ns, dev, addrs in ((p.pod, veth_pod, (f"{net}.1/29",)),
                           (p.cloud, veth_cloud, (f"{net}.2/29", f"{net}.3/29"))):
        for addr in addrs:
            run(*in_ns(ns, "ip", "addr", "add", addr, "dev", dev))
        run(*in_ns(ns, "ip", "link", "set", dev, "up"))
        run(*in_ns(ns, "ip", "link", "set", "lo", "up"))
    etc = Path("/etc/netns") / p.pod  # `ip netns exec` mounts these over /etc: the pod's DNS
    p.made_etc_netns = not etc.parent.exists()
    etc.mkdir(parents=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{p.fake_ip} {EC2}\n")


def start(p: Pod, args: list[str], want: str, timeout: float) -> subprocess.Popen[str]:
    log = p.work / f"stderr-{len(p.procs)}.log"  # a file: a full pipe would stall the process
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    p.procs.append(proc)
    wait_line(proc, want, timeout)
    return proc


def teardown(p: Pod) -> None:
    for proc in p.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in p.procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    for ns in (p.pod, p.cloud):
        run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(Path("/etc/netns") / p.pod, ignore_errors=True)
    if p.made_etc_netns:
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty: another user's entries stay
    shutil.rmtree(p.shared, ignore_errors=True)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    python = preconditions()
    from tests.fakes.tls import make_fake_ca

    work = tmp_path_factory.mktemp("transparent")
    shared = Path(tempfile.mkdtemp(prefix="tether-transparent-"))
    shared.chmod(0o755)
    pid = os.getpid()
    p = Pod(f"tether-pod-{pid}", f"tether-cloud-{pid}", free_subnet(), python, shared, work)
    try:
        setup_netns(p)
        fake_ca = make_fake_ca(work / "fake-ca", names=(EC2,))
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent", "fake",
                       str(work / "fake.jsonl"), str(fake_ca.cert_file), str(fake_ca.key_file)),
              "ready", 15)
        config = work / "tether.yaml"
        config.write_text(
            f"audit: {{path: {work / 'audit.jsonl'}}}\n"
            "forward:\n"
            f"  ca_dir: {work / 'ca'}\n"
            f"  upstream_ca: {fake_ca.ca_file}\n"
            "  # TEST-ONLY: the fake cloud's name resolves, in the test's pod namespace, to a\n"
            "  # private test address; without this tether refuses it as SSRF.\n"
            f"  allow_private: [{EC2}]\n"
            f"{POLICY}")
        start(p, in_ns(p.pod, sys.executable, "-m", "proxy", "serve", "--config", str(config),
                       "--host", "127.0.0.1", "--port", "8080", "--admin-port", "9090",
                       "--transparent-port", str(TPORT)), "tether: proxy on", 15)
        redirect = run(*in_ns(p.pod, "sh", str(REDIRECT)),
                       env={**os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT)})
        assert "REDIRECT --to-ports 15001" in redirect.stdout
        ca = run(sys.executable, "-m", "proxy", "ca", "export", "--config", str(config),
                 env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        (shared / "tether-ca.pem").write_text(ca)
        (shared / "tether-ca.pem").chmod(0o644)
        yield p
    finally:
        teardown(p)


# -- the tests ---------------------------------------------------------------------------------

def test_a_delete_by_curl_without_any_proxy_is_denied_in_ec2s_shape(pod: Pod) -> None:
    status, body, headers = pod.curl(f"http://{EC2}{DELETE}")
    assert status == 403, body
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>')
    assert "<Code>Tether" in body and "no-volume-deletes" in body
    assert headers.get("x-tether-error")
    assert pod.seen("DeleteVolume") == []
    decisions = [r for r in pod.audit() if r.get("kind") == "decision"]
    assert any("no-volume-deletes" in json.dumps(r) for r in decisions)


def test_an_allowed_describe_goes_through_and_the_fake_sees_it(pod: Pod) -> None:
    status, body, _ = pod.curl(f"http://{EC2}{DESCRIBE}")
    assert status == 200, body
    assert "<DescribeVolumesResponse" in body
    seen = pod.seen("DescribeVolumes")
    assert seen and seen[-1]["host"] == EC2 and seen[-1]["local"] == f"{pod.fake_ip}:80"


def test_https_with_the_tether_ca_is_governed_the_same_way(pod: Pod) -> None:
    ca = str(pod.shared / "tether-ca.pem")
    status, body, _ = pod.curl(f"https://{EC2}{DELETE}&https=1", "--cacert", ca)
    assert status == 403, body
    assert "<Response><Errors><Error><Code>Tether" in body
    assert pod.seen("https=1") == []
    status, body, _ = pod.curl(f"https://{EC2}{DESCRIBE}&https=2", "--cacert", ca)
    assert status == 200, body
    seen = pod.seen("https=2")
    assert seen and seen[-1]["local"] == f"{pod.fake_ip}:443"


def test_https_without_trusting_tether_fails_and_nothing_reaches_the_fake(pod: Pod) -> None:
    status, err, _ = pod.curl(f"https://{EC2}{DESCRIBE}&https=3")
    assert status == 0 and "certificate" in err.lower()
    assert pod.seen("https=3") == []


def test_a_host_naming_the_api_while_packets_go_elsewhere_is_refused(pod: Pod) -> None:
    other = f"{pod.net}.3"
    status, body, headers = pod.curl(f"http://{EC2}{DESCRIBE}&mismatch=1",
                                     "--resolve", f"{EC2}:80:{other}")
    assert status == 403, body
    assert headers.get("x-tether-refused") == "tether:destination-mismatch"
    assert pod.seen("mismatch=1") == []


def test_an_ip_literal_url_is_refused(pod: Pod) -> None:
    status, body, headers = pod.curl(f"http://{pod.fake_ip}{DESCRIBE}&literal=1")
    assert status == 403, body
    assert headers.get("x-tether-refused") == "tether:ip-literal"
    assert pod.seen("literal=1") == []


RAW_HTTP = """
import socket
s = socket.create_connection(({ip!r}, 80), timeout=5)
s.sendall(b"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode(errors="replace"))
"""


def test_a_raw_socket_cannot_bypass(pod: Pod) -> None:
    out = pod.raw(RAW_HTTP.format(ip=pod.fake_ip, path=DELETE + "&raw=1", host=EC2))
    assert out.startswith("HTTP/1.1 403"), out
    assert "<Code>Tether" in out
    assert pod.seen("raw=1") == []
    out = pod.raw(RAW_HTTP.format(ip=pod.fake_ip, path=DESCRIBE + "&raw=2", host=EC2))
    assert out.startswith("HTTP/1.1 200"), out
    assert pod.seen("raw=2")


def test_raw_tcp_that_is_not_http_is_killed(pod: Pod) -> None:
    before = [r for r in pod.fake_log() if r["kind"] == "connection" and r["port"] == 80]
    out = pod.raw(f"""
import socket
s = socket.create_connection(({pod.fake_ip!r}, 80), timeout=5)
s.sendall(b"\\x00\\x01 not http at all\\n")
try:
    print(repr(s.recv(100)))
except OSError as e:
    print("error", e)
""")
    assert out.strip() in ("b''", "error [Errno 104] Connection reset by peer"), out
    after = [r for r in pod.fake_log() if r["kind"] == "connection" and r["port"] == 80]
    assert len(after) == len(before)
    assert any(r.get("code") == "tether:not-http" for r in pod.audit())


def test_other_tcp_ports_and_quic_are_rejected(pod: Pod) -> None:
    out = pod.raw(f"""
import socket
try:
    socket.create_connection(({pod.fake_ip!r}, 8080), timeout=5)
    print("connected")
except OSError as e:
    print("refused", e.errno)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.connect(({pod.fake_ip!r}, 443))
try:
    u.send(b"quic-initial")
    u.recv(10)
    print("udp answered")
except OSError as e:
    print("udp refused", e.errno)
""")
    # A REJECT in OUTPUT: the TCP SYN is answered by a reset (ECONNREFUSED), the UDP
    # send fails locally (EPERM) or its ICMP answer comes back (ECONNREFUSED).
    tcp, udp = out.splitlines()
    assert tcp == "refused 111", out
    assert udp in ("udp refused 1", "udp refused 111"), out
    log = pod.fake_log()
    assert not [r for r in log if r["kind"] == "connection" and r["port"] == 8080]
    assert not [r for r in log if r["kind"] == "datagram"]


def test_a_direct_connection_to_the_transparent_port_is_refused_as_a_loop(pod: Pod) -> None:
    out = pod.raw(RAW_HTTP.format(ip="127.0.0.1", path=DESCRIBE + "&loop=1", host=EC2)
                  .replace(", 80)", f", {TPORT})"))
    assert out.startswith("HTTP/1.1 403"), out
    assert "tether:loop" in out
    assert pod.seen("loop=1") == []


def test_the_redirect_script_is_idempotent_and_removable(pod: Pod) -> None:
    env = {**os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT)}
    def saved() -> list[str]:  # without iptables-save's timestamped comments
        return [r for r in run(*in_ns(pod.pod, "iptables-save")).stdout.splitlines()
                if not r.startswith("#")]

    rules = saved()
    again = run(*in_ns(pod.pod, "sh", str(REDIRECT)), env=env)
    assert saved() == rules and "-A OUTPUT -p tcp -j TETHER_OUTPUT" in rules
    assert "# iptables: installed\n-A OUTPUT -p tcp -j TETHER_OUTPUT\n-N" in again.stdout
    dry = run("sh", str(REDIRECT), "--dry-run", env=env).stdout
    assert "iptables -t nat -A OUTPUT -p tcp -j TETHER_OUTPUT" in dry
    assert f"--dport 443 -j REDIRECT --to-ports {TPORT}" in dry


def main(argv: list[str]) -> None:
    if argv[:1] == ["fake"]:
        asyncio.run(_serve_fake(Path(argv[1]), Path(argv[2]), Path(argv[3])))


if __name__ == "__main__":
    main(sys.argv[1:])
