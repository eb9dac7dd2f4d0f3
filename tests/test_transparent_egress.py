"""Transparent mode refuses the egress tether cannot see, in network namespaces of the
test's own (the set-up of tests/test_transparent.py, plus IPv6, a DNS server and a
UDP sink in the cloud namespace).

    pod namespace (tether-epod-<pid>)                   cloud namespace (tether-ecloud-<pid>)
    tether serve, admin port 9090 (uid 0)                fake EC2 on .2:80/443 (as in
    tether-redirect (TETHER_UID=0)                       test_transparent), the sink: DNS on
    the agent: curl / python as uid 65534, with          .2:53 (UDP and TCP), UDP 9999 and
    unprivileged ping allowed (as containerd and         9998, v4 and v6; .3 a second address
    Docker set up a pod)  --- veth 10.251.N.0/29, fd00:7e7:N::/64 --->

The agent's UDP to any port but DNS, and its ICMP echo, are refused on both
families and never arrive (the sink's log, the cloud's iptables counters); DNS to
the pod's resolver (resolv.conf) still resolves, over UDP and TCP; HTTPS is still
redirected and judged; tether's own uid still reaches everything; the admin port
refuses the agent on every local address; TETHER_ALLOW_EGRESS opens exactly what
it names. Needs root, `ip netns`, iptables, curl and setpriv; skips otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_transparent import (
    DELETE,
    DESCRIBE,
    EC2,
    NOBODY,
    POLICY,
    REDIRECT,
    TPORT,
    Pod,
    free_subnet,
    in_ns,
    preconditions,
    run,
    setup_netns,
    start,
    teardown,
)

ADMIN = 9090
DNS_NAME = "db.tether.test"
SINK_UDP = (53, 9998, 9999)


# -- the sink, run in the cloud namespace --------------------------------------------------------

def dns_answer(query: bytes, answer: str) -> bytes:
    """An answer to one DNS query: `answer` for A queries of names under tether.test."""
    qid = struct.unpack("!H", query[:2])[0]
    i, labels = 12, []
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode())
        i += 1 + query[i]
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
    question = query[12:i + 5]
    ok = ".".join(labels).lower().endswith("tether.test") and qtype == 1
    header = struct.pack("!HHHHHH", qid, 0x8180 if ok else 0x8183, 1, int(ok), 0, 0)
    record = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)) if ok \
        else b""
    return header + question + record


async def _serve_sink(log: Path, answer: str) -> None:
    """UDP on SINK_UDP and DNS over TCP on 53, v4 and v6 (one dual-stack socket each)."""
    def write(record: dict[str, object]) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    class Datagrams(asyncio.DatagramProtocol):
        def __init__(self, port: int) -> None:
            self.port = port
            self.transport: asyncio.DatagramTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.DatagramTransport)
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
            host = str(addr[0])
            write({"kind": "udp", "port": self.port, "from": host.removeprefix("::ffff:"),
                   "data": data.hex()})
            if self.port == 53 and self.transport is not None:
                self.transport.sendto(dns_answer(data, answer), addr)

    async def tcp_dns(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername")[0]).removeprefix("::ffff:")
        write({"kind": "tcp", "port": 53, "from": peer})
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        reply = dns_answer(await reader.readexactly(size), answer)
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()

    loop = asyncio.get_running_loop()
    for port in SINK_UDP:
        await loop.create_datagram_endpoint(lambda port=port: Datagrams(port),  # type: ignore[misc]
                                            local_addr=("::", port))
    await asyncio.start_server(tcp_dns, ["0.0.0.0", "::"], 53)  # v6 sockets here are v6-only
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the pod ---------------------------------------------------------------------------------

@dataclass
class EgressPod:
    p: Pod
    v6: str | None       # "fd00:7e7:N:": ::1 the pod, ::2 the cloud, ::3 a second address

    @property
    def net(self) -> str:
        return self.p.net

    def sink(self) -> list[dict[str, object]]:
        path = self.p.work / "sink.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def received(self, port: int, marker: bytes) -> list[dict[str, object]]:
        return [r for r in self.sink() if r["kind"] == "udp" and r["port"] == port
                and marker.hex() in str(r["data"])]

    def redirect(self, **env: str) -> str:
        done = run(*in_ns(self.p.pod, "sh", str(REDIRECT)), env={
            **os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT), **env})
        return done.stdout

    def as_tether(self, code: str) -> str:
        """Python run in the pod as tether's uid (0 here): never refused."""
        done = run(*in_ns(self.p.pod, sys.executable, "-c", code), check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def echo_requests_seen(self, family: int) -> int:
        """Echo requests the cloud namespace received from the pod (its INPUT counters)."""
        tool = "iptables" if family == 4 else "ip6tables"
        out = run(*in_ns(self.p.cloud, tool, "-L", "INPUT", "-v", "-x", "-n")).stdout
        counts = [int(line.split()[0]) for line in out.splitlines()
                  if re.match(r"\s*\d+\s+\d+\s+ACCEPT", line)]
        assert len(counts) == 1, out
        return counts[0]


def setup_ipv6(p: Pod) -> str | None:
    """fd00:7e7:N::/64 on both ends of the veth, or None where IPv6 is off."""
    if not Path("/proc/sys/net/ipv6").exists():
        return None
    prefix = f"fd00:7e7:{int(p.net.rsplit('.', 1)[1]):x}:"
    pid = os.getpid()
    for ns, dev, hosts in ((p.pod, f"tp{pid}", ("1",)), (p.cloud, f"tc{pid}", ("2", "3"))):
        for h in hosts:
            if run(*in_ns(ns, "ip", "-6", "addr", "add", f"{prefix}:{h}/64", "dev", dev, "nodad"),
                   check=False).returncode != 0:
                return None
    return prefix


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressPod]:
    python = preconditions()
    from tests.fakes.tls import make_fake_ca

    work = tmp_path_factory.mktemp("transparent-egress")
    shared = Path(tempfile.mkdtemp(prefix="tether-egress-"))
    shared.chmod(0o755)
    pid = os.getpid()
    p = Pod(f"tether-epod-{pid}", f"tether-ecloud-{pid}", free_subnet(), python, shared, work)
    try:
        setup_netns(p)
        v6 = setup_ipv6(p)
        # The pod's DNS, as kubelet writes it; `ip netns exec` mounts it over /etc/resolv.conf.
        (Path("/etc/netns") / p.pod / "resolv.conf").write_text(f"nameserver {p.net}.2\n")
        # Unprivileged ICMP echo sockets, as containerd and Docker allow in every pod.
        run(*in_ns(p.pod, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"))
        run(*in_ns(p.cloud, "iptables", "-A", "INPUT", "-s", f"{p.net}.1", "-p", "icmp",
                   "--icmp-type", "echo-request", "-j", "ACCEPT"))
        if v6:
            run(*in_ns(p.cloud, "ip6tables", "-A", "INPUT", "-s", f"{v6}:1", "-p", "ipv6-icmp",
                       "--icmpv6-type", "echo-request", "-j", "ACCEPT"))
        fake_ca = make_fake_ca(work / "fake-ca", names=(EC2,))
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent", "fake",
                       str(work / "fake.jsonl"), str(fake_ca.cert_file), str(fake_ca.key_file)),
              "ready", 15)
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent_egress", "sink",
                       str(work / "sink.jsonl"), f"{p.net}.2"), "ready", 15)
        config = work / "tether.yaml"
        config.write_text(
            f"audit: {{path: {work / 'audit.jsonl'}}}\n"
            "forward:\n"
            f"  ca_dir: {work / 'ca'}\n"
            f"  upstream_ca: {fake_ca.ca_file}\n"
            f"  allow_private: [{EC2}]   # TEST-ONLY: the fake's address is private\n"
            f"{POLICY}")
        start(p, in_ns(p.pod, sys.executable, "-m", "proxy", "serve", "--config", str(config),
                       "--host", "0.0.0.0", "--port", "8080", "--admin-port", str(ADMIN),
                       "--transparent-port", str(TPORT)), "tether: proxy on", 15)
        egress = EgressPod(p, v6)
        assert "--dport 9090 -j REJECT --reject-with tcp-reset" in egress.redirect()
        ca = run(sys.executable, "-m", "proxy", "ca", "export", "--config", str(config),
                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}).stdout
        (shared / "tether-ca.pem").write_text(ca)
        (shared / "tether-ca.pem").chmod(0o644)
        yield egress
    finally:
        teardown(p)


def needs_v6(pod: EgressPod) -> str:
    if pod.v6 is None:
        pytest.skip("IPv6 is off in this kernel")
    return pod.v6


# -- what the agent runs -----------------------------------------------------------------------

SEND_UDP = """
import socket
u = socket.socket(socket.AF_INET6 if ":" in {ip!r} else socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.connect(({ip!r}, {port}))
try:
    u.send({data!r})
    u.recv(512)
    print("answered")
except TimeoutError:
    print("sent")
except OSError as e:
    print("refused", e.errno)
"""

PING = """
import socket, struct
v6 = ":" in {ip!r}
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(2)
try:
    s.sendto(struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"tether-ping", ({ip!r}, 0))
    s.recv(512)
    print("answered")
except TimeoutError:
    print("timeout")
except OSError as e:
    print("refused", e.errno)
"""

TCP_DNS = """
import socket, struct
q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in {name!r}.split(".")) + b"\\0"
q += struct.pack("!HH", 1, 1)
try:
    s = socket.create_connection(({ip!r}, 53), timeout=5)
except OSError as e:
    print("refused", e.errno)
else:
    s.sendall(struct.pack("!H", len(q)) + q)
    data = b""
    while chunk := s.recv(512):
        data += chunk
    print(socket.inet_ntoa(data[-4:]))
"""

CONNECT = """
import socket
try:
    socket.create_connection(({ip!r}, {port}), timeout=5).close()
    print("connected")
except OSError as e:
    print("refused", e.errno)
"""

# A REJECT in OUTPUT: the sender's own send fails (EPERM) or the ICMP answer comes back
# (ECONNREFUSED); a TCP SYN is answered by a reset (ECONNREFUSED). A ping socket is told
# of neither (no IPV6_RECVERR): it times out; the cloud's counters say nothing arrived.
REFUSED = ("refused 1", "refused 111")
PING_REFUSED = (*REFUSED, "timeout")


# -- the tests ---------------------------------------------------------------------------------

def test_udp_to_any_port_but_dns_is_refused_and_never_arrives(pod: EgressPod) -> None:
    cloud = f"{pod.net}.2"
    for port in (9999, 9998):  # the sink listens there: a refusal is not a closed port
        out = pod.p.raw(SEND_UDP.format(ip=cloud, port=port, data=b"exfil-v4-%d" % port))
        assert out.strip() in REFUSED, (port, out)
    # DNS goes to the resolver only: port 53 at another address is refused too.
    out = pod.p.raw(SEND_UDP.format(ip=f"{pod.net}.3", port=53, data=b"exfil-53"))
    assert out.strip() in REFUSED, out
    assert [r for r in pod.sink() if str(r.get("data", "")).startswith(b"exfil".hex())] == []


def test_udp_on_loopback_still_works(pod: EgressPod) -> None:
    out = pod.p.raw("""
import socket
a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.bind(("127.0.0.1", 0))
b.sendto(b"local", a.getsockname())
a.settimeout(2)
print(a.recv(10).decode())
""")
    assert out.strip() == "local"


def test_icmp_echo_from_the_agent_is_refused_while_tether_can_ping(pod: EgressPod) -> None:
    cloud = f"{pod.net}.2"
    before = pod.echo_requests_seen(4)
    out = pod.p.raw(PING.format(ip=cloud))
    assert out.strip() in PING_REFUSED, out
    assert pod.echo_requests_seen(4) == before
    assert pod.as_tether(PING.format(ip=cloud)).strip() == "answered"   # tether's uid: untouched
    assert pod.echo_requests_seen(4) == before + 1


def test_ipv6_udp_and_icmp_are_refused_too(pod: EgressPod) -> None:
    v6 = needs_v6(pod)
    cloud = f"{v6}:2"
    # tether's uid first: it needs neighbour discovery, which the rules must let out.
    seen = pod.echo_requests_seen(6)
    assert pod.as_tether(PING.format(ip=cloud)).strip() == "answered"
    assert pod.echo_requests_seen(6) == seen + 1
    out = pod.p.raw(PING.format(ip=cloud))
    assert out.strip() in PING_REFUSED, out
    assert pod.echo_requests_seen(6) == seen + 1
    out = pod.p.raw(SEND_UDP.format(ip=cloud, port=9999, data=b"exfil-v6"))
    assert out.strip() in REFUSED, out
    assert pod.received(9999, b"exfil-v6") == []
    sent = pod.as_tether(SEND_UDP.format(ip=cloud, port=9999, data=b"tether-v6"))
    assert sent.strip() == "sent" and pod.received(9999, b"tether-v6")


def test_dns_to_the_pods_resolver_still_resolves_over_udp_and_tcp(pod: EgressPod) -> None:
    out = pod.p.raw(f"import socket; print(socket.getaddrinfo({DNS_NAME!r}, 80, socket.AF_INET,"
                    " socket.SOCK_STREAM)[0][4][0])")
    assert out.strip() == f"{pod.net}.2"
    assert [r for r in pod.sink() if r["kind"] == "udp" and r["port"] == 53
            and r["from"] == f"{pod.net}.1"]
    out = pod.p.raw(TCP_DNS.format(ip=f"{pod.net}.2", name=DNS_NAME))
    assert out.strip() == f"{pod.net}.2"  # answered by the sink: not redirected to tether
    assert [r for r in pod.sink() if r["kind"] == "tcp"]
    out = pod.p.raw(TCP_DNS.format(ip=f"{pod.net}.3", name=DNS_NAME))
    assert out.strip() == "refused 111"


def test_https_is_still_redirected_and_judged(pod: EgressPod) -> None:
    ca = str(pod.p.shared / "tether-ca.pem")
    status, body, _ = pod.p.curl(f"https://{EC2}{DELETE}&egress=1", "--cacert", ca)
    assert status == 403 and "<Code>Tether" in body, body
    assert pod.p.seen("egress=1") == []
    status, body, _ = pod.p.curl(f"https://{EC2}{DESCRIBE}&egress=2", "--cacert", ca)
    assert status == 200, body
    assert pod.p.seen("egress=2")


@contextlib.contextmanager
def v6_admin_stand_in(pod: EgressPod) -> Iterator[list[str]]:
    """tether listens on IPv4 here; as its uid, something listens on [::]:ADMIN, so that
    an IPv6 refusal is the rule's, not a closed port."""
    if pod.v6 is None:
        yield []
        return
    code = (f"import socket\ns = socket.create_server(('::', {ADMIN}), family=socket.AF_INET6)\n"
            "print('listening', flush=True)\nimport time\ntime.sleep(60)")
    proc = subprocess.Popen(in_ns(pod.p.pod, sys.executable, "-c", code), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield ["::1", f"{pod.v6}:1"]
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_agent_cannot_reach_the_admin_port_on_any_local_address(pod: EgressPod) -> None:
    with v6_admin_stand_in(pod) as v6_targets:
        for ip in ["127.0.0.1", f"{pod.net}.1", *v6_targets]:
            out = pod.p.raw(CONNECT.format(ip=ip, port=ADMIN))
            assert out.strip() == "refused 111", (ip, out)
            # something listens there: the refusal is the rule's, not a closed port
            assert pod.as_tether(CONNECT.format(ip=ip, port=ADMIN)).strip() == "connected", ip
    status, err, _ = pod.p.curl(f"http://127.0.0.1:{ADMIN}/healthz")
    assert status == 0 and "(7) Failed to connect" in err, err
    # tether's uid (probes exec'd in its container, its CLI) still gets there ...
    health = pod.as_tether(f"import urllib.request; print(urllib.request.urlopen("
                           f"'http://127.0.0.1:{ADMIN}/healthz', timeout=5).read().decode())")
    assert json.loads(health) == {"status": "ok"}
    # ... and the agent keeps its way out: the proxy port on loopback.
    status, body, _ = pod.p.curl("http://127.0.0.1:8080/no-such-route")
    assert status == 404, body


def test_a_pod_that_serves_still_answers(pod: EgressPod) -> None:
    """Replies to connections from outside are packets of an accepted connection."""
    server = subprocess.Popen(
        in_ns(pod.p.pod, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
              pod.p.python, "-c",
              "import socket\ns = socket.create_server(('0.0.0.0', 8000))\nprint('listening', "
              "flush=True)\nc, _ = s.accept()\nc.sendall(b'served')\nc.close()"),
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        got = run(*in_ns(pod.p.cloud, sys.executable, "-c",
                         f"import socket; print(socket.create_connection(({pod.net + '.1'!r}, 8000),"
                         " timeout=5).recv(10).decode())")).stdout
        assert got.strip() == "served"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def test_allow_egress_opens_exactly_what_it_names(pod: EgressPod) -> None:
    cloud = f"{pod.net}.2"
    try:
        rules = pod.redirect(TETHER_ALLOW_EGRESS=f"udp/9999@{cloud} icmp")
        assert f"-d {cloud}/32 -p udp -m udp --dport 9999 -j RETURN" in rules
        out = pod.p.raw(SEND_UDP.format(ip=cloud, port=9999, data=b"opened"))
        assert out.strip() == "sent", out
        assert pod.received(9999, b"opened")
        for ip, port in ((cloud, 9998), (f"{pod.net}.3", 9999)):  # another port, another host
            out = pod.p.raw(SEND_UDP.format(ip=ip, port=port, data=b"still-closed"))
            assert out.strip() in REFUSED, (ip, port, out)
        assert pod.received(9998, b"still-closed") == []
        assert pod.p.raw(PING.format(ip=cloud)).strip() == "answered"
        out = pod.p.raw(SEND_UDP.format(ip=cloud, port=443, data=b"quic"))
        assert out.strip() in REFUSED, out   # TETHER_BLOCK_UDP_PORTS wins over an opening
    finally:
        pod.redirect()  # back to the defaults: the chains are rebuilt, not appended to
    out = pod.p.raw(SEND_UDP.format(ip=cloud, port=9999, data=b"closed-again"))
    assert out.strip() in REFUSED, out
    assert pod.received(9999, b"closed-again") == []


def main(argv: list[str]) -> None:
    if argv[:1] == ["sink"]:
        asyncio.run(_serve_sink(Path(argv[1]), argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
