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
    ({"TETHER_ADMIN_PORT": "admin"}, "TETHER_ADMIN_PORT is not a port"),
    ({"TETHER_DNS": "10.0.0.10 $(id)"}, "TETHER_DNS: '$(id)' is not an address"),
    ({"TETHER_ALLOW_EGRESS": "sctp/9"}, "the protocol must be tcp, udp or icmp"),
    ({"TETHER_ALLOW_EGRESS": "udp/"}, "a port must follow the /"),
    ({"TETHER_ALLOW_EGRESS": "udp/9:1"}, "'9:1' is not a port or P:LAST"),
    ({"TETHER_ALLOW_EGRESS": "icmp/8"}, "icmp has no ports"),
    ({"TETHER_ALLOW_EGRESS": "udp/53@10.0.0.0/8;x"}, "is not an address or CIDR"),
])
def test_the_redirect_script_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    done = subprocess.run(["sh", str(REDIRECT), "--dry-run"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})
    assert done.returncode == 1 and message in done.stderr


def _dry_run(**env: str) -> list[str]:
    """The commands the script would run, for both families (so both tools must exist)."""
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("needs iptables and ip6tables (the dry run names the families it finds)")
    done = subprocess.run(["sh", str(REDIRECT), "--dry-run"], capture_output=True, text=True,
                          check=True, env={"PATH": os.environ["PATH"], **env})
    return done.stdout.splitlines()


def test_the_filter_refuses_all_but_dns_and_what_is_allowed_in_this_order() -> None:
    """Order is the policy: tether's uid first, then the admin port before loopback, the
    openings, and a REJECT of everything (any protocol) last, in both families."""
    for tool in ("iptables", "ip6tables"):
        rules = [r.split(" -A TETHER_FILTER ", 1)[1] for r in _dry_run(TETHER_DNS="10.0.0.10 fd00::a")
                 if r.startswith(f"{tool} -t filter -A TETHER_FILTER ")]
        loopback = "-d 127.0.0.0/8 -j RETURN" if tool == "iptables" else "-d ::1/128 -j RETURN"
        dns = "10.0.0.10" if tool == "iptables" else "fd00::a"
        assert rules[:4] == [
            "-m owner --uid-owner 10001 -j RETURN",
            "-p tcp -m addrtype --dst-type LOCAL --dport 9090 -j REJECT --reject-with tcp-reset",
            loopback,
            "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"]
        assert rules[4:7] == [f"-d {dns} -p udp --dport 53 -j RETURN",
                              f"-d {dns} -p tcp --dport 53 -j RETURN",
                              "-p udp --dport 443 -m conntrack --ctstate NEW -j REJECT"]
        assert rules[-2:] == ["-p tcp -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset",
                              "-j REJECT"]
        assert (tool == "ip6tables") == any("neighbour-solicitation" in r for r in rules)


@pytest.mark.parametrize(("allow", "v4", "v6"), [
    ("udp/123", ["-p udp --dport 123 -j RETURN"], ["-p udp --dport 123 -j RETURN"]),
    ("udp/123@10.0.0.5", ["-d 10.0.0.5 -p udp --dport 123 -j RETURN"], []),
    ("tcp/5432@fd00::/8", [], ["-d fd00::/8 -p tcp --dport 5432 -j RETURN"]),
    ("udp/60000:61000", ["-p udp --dport 60000:61000 -j RETURN"],
     ["-p udp --dport 60000:61000 -j RETURN"]),
    ("icmp", ["-p icmp -j RETURN"], ["-p ipv6-icmp -j RETURN"]),
    ("udp", ["-p udp -j RETURN"], ["-p udp -j RETURN"]),
])
def test_allow_egress_entries_become_rules(allow: str, v4: list[str], v6: list[str]) -> None:
    lines = _dry_run(TETHER_ALLOW_EGRESS=allow, TETHER_DNS="")
    for tool, want in (("iptables", v4), ("ip6tables", v6)):
        rules = [r.split(" -A TETHER_FILTER ", 1)[1] for r in lines
                 if r.startswith(f"{tool} -t filter -A TETHER_FILTER ")]
        opened = [r for r in rules if r.endswith("-j RETURN") and "--uid-owner" not in r
                  and not r.startswith(("-d 127.", "-d ::1", "-m conntrack")) and "icmpv6-type" not in r]
        assert opened == want, tool


def test_the_admin_port_and_dns_settings() -> None:
    assert not [r for r in _dry_run(TETHER_ADMIN_PORT="") if "addrtype" in r]
    assert [r for r in _dry_run(TETHER_ADMIN_PORT="19090") if "--dport 19090 -j REJECT" in r]
    assert not [r for r in _dry_run(TETHER_DNS="") if "--dport 53" in r]
    any_dns = [r for r in _dry_run(TETHER_DNS="any") if "--dport 53" in r]
    assert "iptables -t filter -A TETHER_FILTER -p udp --dport 53 -j RETURN" in any_dns
    assert "iptables -t nat -A TETHER_OUTPUT -p tcp --dport 53 -j RETURN" in any_dns  # not redirected
