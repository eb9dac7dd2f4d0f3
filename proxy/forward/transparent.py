"""Transparent flows: a name is believed only where the packets were going anyway.

An iptables REDIRECT sent the connection here, and mitmproxy read its original
destination IP:port (SO_ORIGINAL_DST). The request is judged by the same steps
as an HTTP_PROXY request, by name: the TLS SNI (which must agree with the Host
header) or, in plain HTTP, the Host header. A client chooses that name, so
`Claims.claim` accepts it only when tether's own DNS resolves it to a set of
addresses containing the original IP; otherwise the request is refused
(`tether:destination-mismatch`): a Host naming an allowed API while the packets
go elsewhere is never judged by that name. The upstream connection then goes
to the original IP and nowhere else (`Claims.upstream`). LLM names are exempt
from the agreement check, as they are never connected to (their requests go to
the reverse route). A redirected connection whose original destination is
tether itself (its ports) is refused.
"""

from __future__ import annotations

from mitmproxy import connection, http
from mitmproxy.proxy import mode_specs

from .resolve import Resolver, resolve
from .targets import Address, Refusal, Targets, authority, ip_literal, llm_provider, norm_host, same_host


def is_transparent(client: connection.Client) -> bool:
    return isinstance(client.proxy_mode, mode_specs.TransparentMode)


class Claims:
    """What each transparent client connection may reach: the (name, port) targets
    `claim` accepted, kept until the client disconnects (`forget`)."""

    def __init__(self) -> None:
        self.claimed: dict[str, set[tuple[str, int]]] = {}

    async def claim(self, flow: http.HTTPFlow, targets: Targets,
                    resolver: Resolver | None) -> Refusal | None:
        """Name a transparent request by its SNI or Host, after checking that the name
        agrees with the original destination; on success `req.host` is that name (so the
        rest of the request path judges it as an HTTP_PROXY request to the same name)."""
        req, client = flow.request, flow.client_conn
        ip, port = ip_literal(str(client.sockname[0])), int(client.sockname[1])
        if ip is None:
            return Refusal("tether:no-destination", "the original destination is unknown")
        loop = targets.loop(ip, port)
        if loop is not None:
            return loop
        header = req.host_header
        if header is None:
            return Refusal("tether:no-host", "the request has no Host header")
        name, header_port = authority(header)
        if header_port is not None and header_port != port:
            return Refusal("tether:destination-mismatch",
                           f"the Host header names port {header_port}; the connection goes to {port}")
        sni = client.sni if client.tls else None
        if client.tls and sni is None and ip_literal(name) is None:
            return Refusal("tether:no-sni", "the TLS client sent no SNI")
        if not same_host(sni, name):
            return Refusal("tether:host-mismatch",
                           f"TLS SNI {sni!r} and Host header {name!r} must name the same host")
        literal = ip_literal(name)
        if literal is not None:
            agrees = literal == ip
        elif llm_provider(name) is not None:
            agrees = True  # never connected to: the request goes to the reverse route
        else:
            agrees = ip in await resolve(name, port, resolver)
        if not agrees:
            return Refusal("tether:destination-mismatch",
                           f"{norm_host(name)} does not resolve to {ip}, where the connection goes; "
                           "a request is judged by its name only when the name leads there")
        self.claimed.setdefault(client.id, set()).add((norm_host(name), port))
        req.host, req.port = norm_host(name), port
        return None

    def upstream(self, client: connection.Client, host: str, port: int,
                 addresses: list[Address]) -> Refusal | None:
        """A transparent flow's upstream: a target `claim` accepted, reached at the original
        destination (already checked as one of the name's addresses)."""
        original = ip_literal(str(client.sockname[0]))
        if (norm_host(host), port) not in self.claimed.get(client.id, set()) \
                or original is None or original not in addresses or port != client.sockname[1]:
            return Refusal("tether:destination-mismatch",
                           f"{host}:{port} is not the original destination of the connection")
        return None

    def forget(self, client_id: str) -> None:
        self.claimed.pop(client_id, None)
