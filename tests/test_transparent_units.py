"""Transparent mode without namespaces: the config key, the listener, the loop and
Host-authority checks, and `tether-redirect --remove` (in a throwaway namespace, as root).
The end-to-end behaviour (iptables, curl, raw sockets) is tests/test_transparent.py."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.egress import Egress
from proxy.errors import ConfigError
from proxy.forward.master import ForwardStartError, start_forward
from proxy.forward.settings import ForwardSettings
from proxy.forward.targets import Targets, authority
from tests.conftest import MakeStack

REDIRECT = Path(__file__).resolve().parent.parent / "deploy" / "transparent" / "tether-redirect"


def test_transparent_port_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("forward: {transparent_port: 15001}\n")
    assert config_mod.load(cfg).forward.transparent_port == 15001
    cfg.write_text("forward: {}\n")
    assert config_mod.load(cfg).forward.transparent_port is None


@pytest.mark.parametrize("value", ["'15001'", "0", "65536", "true", "-1"])
def test_a_bad_transparent_port_fails_at_load_with_its_line(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"forward:\n  ca_dir: ca\n  transparent_port: {value}\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(cfg)
    assert e.value.key == "forward.transparent_port" and e.value.line == 3


@pytest.mark.parametrize(("header", "want"), [
    ("ec2.us-east-1.amazonaws.com", ("ec2.us-east-1.amazonaws.com", None)),
    ("ec2.us-east-1.amazonaws.com:443", ("ec2.us-east-1.amazonaws.com", 443)),
    ("10.0.0.1:80", ("10.0.0.1", 80)),
    ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
    ("[2001:db8::1]", ("2001:db8::1", None)),
    ("host:http", ("host", -1)),            # a port that is not a number never matches
])
def test_host_header_authority(header: str, want: tuple[str, int | None]) -> None:
    assert authority(header) == want


@pytest.mark.parametrize(("ip", "port", "loop"), [
    ("127.0.0.1", 15001, True),       # a direct connection to the transparent listener
    ("93.184.216.34", 15001, True),   # the transparent port on any address
    ("10.1.2.3", 8080, True),         # tether's proxy port on a private address
    ("127.0.0.1", 9090, True),
    ("0.0.0.0", 80, True),
    ("93.184.216.34", 8080, False),   # a public service that happens to use 8080
    ("10.1.2.3", 80, False),          # an ordinary redirected destination (judged by name)
    ("::ffff:127.0.0.1", 15001, True),
])
def test_loop_detection(ip: str, port: int, loop: bool) -> None:
    targets = Targets(ForwardSettings(), own_ports=(8080, 9090, 15001))
    targets.transparent_port = 15001
    refusal = targets.loop(ipaddress.ip_address(ip), port)
    assert (refusal is not None) is loop
    if refusal is not None:
        assert refusal.code == "tether:loop"


async def test_both_listeners_on_one_port_or_none_are_refused(make_stack: MakeStack,
                                                             tmp_path: Path) -> None:
    stack = await make_stack(extra=f"forward: {{ca_dir: {tmp_path / 'ca'}}}\n")
    gov = stack.tether.governor
    for port, transparent in ((18181, 18181), (None, None)):
        with pytest.raises(ForwardStartError):
            await start_forward(gov, gov.metrics, stack.tether.config.forward, host="127.0.0.1",
                                port=port, transparent_port=transparent,
                                reverse=("127.0.0.1", 1), own_ports=())


async def test_a_direct_connection_to_the_transparent_listener_is_never_forwarded(
        make_stack: MakeStack, tmp_path: Path) -> None:
    """Without a REDIRECT the original destination is the listener itself (or unknown,
    with no conntrack): a loop refusal or a closed connection, never a forwarded request."""
    stack = await make_stack(extra=f"forward: {{ca_dir: {tmp_path / 'ca'}}}\n")
    gov, cfg = stack.tether.governor, stack.tether.config
    with socket.socket() as probe:  # a free port: mitmproxy refuses two listeners on port 0
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    fwd = await start_forward(gov, gov.metrics, cfg.forward, host="127.0.0.1", port=0,
                              transparent_port=free, reverse=("127.0.0.1", 1), own_ports=(),
                              egress=Egress())
    try:
        assert fwd.port and fwd.transparent_port and fwd.port != fwd.transparent_port
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.transparent_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            answer = b""  # no conntrack entry: mitmproxy cannot read a destination, closes
        writer.close()
        assert answer == b"" or (answer.startswith(b"HTTP/1.1 403") and b"tether:loop" in answer)
    finally:
        await fwd.stop()


def _root_netns() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs root, ip and iptables")
    ns = f"tether-units-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace")
    return ns


def test_the_redirect_script_installs_once_and_removes_everything() -> None:
    ns = _root_netns()
    try:
        def sh(*args: str) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "sh", str(REDIRECT), *args],
                                  capture_output=True, text=True, check=True).stdout

        def saved() -> str:
            rules = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"],
                                   capture_output=True, text=True, check=True).stdout
            return "\n".join(r for r in rules.splitlines() if not r.startswith("#"))  # timestamps

        sh()
        once = saved()
        sh()
        assert saved() == once
        assert once.count("-A OUTPUT -p tcp -j TETHER_OUTPUT") == 1
        assert once.count("-A OUTPUT -j TETHER_FILTER") == 1
        assert "--uid-owner 10001 -j RETURN" in once
        assert "--dport 443 -m conntrack --ctstate NEW -j REJECT" in once  # QUIC
        sh("--remove")
        assert "TETHER" not in saved()
        sh("--remove")  # removing twice is fine
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize(("env", "message"), [
    ({"TETHER_UID": "tether"}, "TETHER_UID must be a numeric uid"),
    ({"TETHER_REDIRECT_PORTS": "80 https"}, "'https' is not a port"),
    ({"TETHER_EXCLUDE_CIDRS": "10.0.0.0/8;rm"}, "is not an address or CIDR"),
    ({"TETHER_OTHER_TCP": "maybe"}, "TETHER_OTHER_TCP must be reject or allow"),
])
def test_the_redirect_script_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    done = subprocess.run(["sh", str(REDIRECT), "--dry-run"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})
    assert done.returncode == 1 and message in done.stderr
