"""Where a forwarded request may go: LLM hosts, pass hosts, and the SSRF checks.

Pure functions on names and addresses (no sockets, no DNS): the addon resolves,
then asks here whether each resolved address may be reached. Host patterns are
anchored: `bedrock-runtime.us-east-1.amazonaws.com.evil.net` is not Bedrock.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .settings import ForwardSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Host -> the reverse route prefix whose governance applies. One label per `[^.]+`.
LLM_HOSTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"api\.openai\.com"), "openai"),
    (re.compile(r"[a-z0-9][a-z0-9-]*\.openai\.azure\.com"), "azure"),
    (re.compile(r"api\.anthropic\.com"), "anthropic"),
    (re.compile(r"bedrock-runtime\.[a-z0-9-]+\.amazonaws\.com"), "bedrock"),
    (re.compile(r"generativelanguage\.googleapis\.com"), "gemini"),
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a target is refused: `code` goes into the 403 body and the audit record."""

    code: str
    message: str


def norm_host(host: str) -> str:
    """Lower-case, without the trailing root dot and IPv6 brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def llm_provider(host: str) -> str | None:
    name = norm_host(host)
    for pattern, provider in LLM_HOSTS:
        if pattern.fullmatch(name):
            return provider
    return None


def ip_literal(host: str) -> Address | None:
    try:
        return _unmap(ipaddress.ip_address(norm_host(host)))
    except ValueError:
        return None


def _unmap(ip: Address) -> Address:
    """`::ffff:127.0.0.1` is 127.0.0.1: judged as the IPv4 address it reaches."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    name = norm_host(host)
    for pattern in patterns:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
            return True
    return False


class Targets:
    """The compiled target policy of one forward proxy."""

    def __init__(self, settings: ForwardSettings, own_ports: Iterable[int],
                 named: Callable[[str], bool] | None = None) -> None:
        """`named`: hosts an `apis:` entry names exactly (never by a glob), which may
        resolve to private addresses without `forward.allow_private`."""
        self.settings = settings
        self.own_ports = frozenset(own_ports)
        self.named = named
        self.transparent_port: int | None = None  # set once the transparent listener is bound

    def host_allowed(self, host: str) -> Refusal | None:
        """A host's name alone: an LLM host, a pass host, or refused."""
        if llm_provider(host) is not None or host_matches(host, self.settings.pass_hosts):
            return None
        return Refusal("tether:host-not-allowed",
                       f"{norm_host(host)} is not an LLM API tether governs nor in forward.pass_hosts")

    def literal_allowed(self, host: str) -> Refusal | None:
        """A CONNECT or request naming a bare IP address instead of a host name."""
        ip = ip_literal(host)
        if ip is None:
            return None
        if self._allowed_private(host, ip) or host_matches(host, self.settings.pass_hosts):
            return None
        return Refusal("tether:ip-literal", f"a bare IP address ({ip}) is refused as a target")

    def address_allowed(self, host: str, ip: Address, port: int) -> Refusal | None:
        """One resolved address of `host`: public, or named in forward.allow_private;
        never one of tether's own ports on a non-public address."""
        ip = _unmap(ip)
        if ip.is_global and not ip.is_multicast:
            return None
        if port in self.own_ports:
            return Refusal("tether:own-port", f"{host}:{port} is one of tether's own ports")
        if self._allowed_private(host, ip):
            return None
        kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local
                else "private" if ip.is_private else "non-public")
        return Refusal(f"tether:{kind}-address",
                       f"{host} resolves to {kind} address {ip}; "
                       "name it in forward.allow_private to allow it")

    def loop(self, ip: Address, port: int) -> Refusal | None:
        """A transparent connection whose original destination is tether itself: its
        transparent port on any address (a direct connection, or a redirect that went
        round), or one of its ports on a loopback or other non-public address."""
        ip = _unmap(ip)
        if port == self.transparent_port or (port in self.own_ports and not ip.is_global) \
                or ip.is_unspecified:
            return Refusal("tether:loop", f"{ip}:{port} is tether itself; not forwarded")
        return None

    def _allowed_private(self, host: str, ip: Address) -> bool:
        if host_matches(host, self.settings.allow_hosts):
            return True
        if self.named is not None and ip_literal(host) is None and self.named(host):
            return True
        return any(ip.version == net.version and ip in net for net in self.settings.allow_networks)


def same_host(*names: str | None) -> bool:
    """Every name given (CONNECT host, TLS SNI, Host header) names one host."""
    normed = {norm_host(n) for n in names if n is not None}
    return len(normed) <= 1


def authority(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` -> (host, port or None); a bad port is -1."""
    host, text = authority_host(text), text.strip()
    if text.startswith("["):
        rest = text[text.find("]") + 1:] if "]" in text else ""
    else:
        rest = text[text.find(":"):] if text.count(":") == 1 else ""
    if not rest.startswith(":"):
        return host, None
    return host, int(rest[1:]) if rest[1:].isdigit() else -1


def authority_host(text: str) -> str:
    """`host`, `host:port`, `[v6]:port` -> the host part."""
    text = text.strip()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
