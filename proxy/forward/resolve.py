"""tether resolves every name it forwards to, itself, and checks every answer.

A client's idea of where a name leads is never taken: a name that resolves to a
private or loopback address (or to tether) is an SSRF whichever of its addresses
the connect would pick, so all of them must pass `Targets.address_allowed`. The
connection then goes to one checked address, never to the name again, so a DNS
answer that changes between the check and the connect cannot slip anything in.
Apart from targets.py because this is the I/O half: targets.py stays pure.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from .targets import Address, Refusal, Targets, ip_literal, norm_host

# Replaces the system's DNS (split-horizon deployments, tests): (name, port) -> addresses.
Resolver = Callable[[str, int], Awaitable[list[Address]]]


async def resolve(host: str, port: int, resolver: Resolver | None) -> list[Address]:
    """The addresses `host` leads to (an IP literal: itself); [] when it does not resolve."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    if resolver is not None:
        return await resolver(norm_host(host), port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(norm_host(host), port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ip_literal(str(sockaddr[0]).split("%", 1)[0])
        if ip is not None and ip not in found:
            found.append(ip)
    return found


def check_all(targets: Targets, host: str, port: int, addresses: list[Address]) -> Refusal | None:
    """Every address a name resolves to must pass: the connect may pick any of them."""
    for ip in addresses:
        refusal = targets.address_allowed(norm_host(host), ip, port)
        if refusal is not None:
            return refusal
    return None


async def resolve_check(targets: Targets, resolver: Resolver | None, host: str,
                        port: int) -> Refusal | None:
    addresses = await resolve(host, port, resolver)
    if not addresses:
        return Refusal("tether:dns", f"{norm_host(host)} does not resolve")
    return check_all(targets, host, port, addresses)


def preferred(addresses: list[Address]) -> Address:
    """The one checked address to connect to: IPv4 first, as most services listen there."""
    return min(addresses, key=lambda ip: ip.version)
