"""tether's mitmproxy addon: every forwarded request is judged before it leaves.

The hooks run in this order for one request: `http_connect` (the CONNECT, if
any), `request` (after the client's TLS, with SNI and Host known),
`server_connect` (just before mitmproxy opens the upstream socket),
`responseheaders`. mitmproxy logs an exception raised in an addon and then
carries on with the flow as it is — fail open — so every hook here catches
everything and kills the flow (or the upstream connection) instead.

LLM hosts are not sent on: the request is re-addressed to tether's own
reverse-proxy port on loopback under the provider's prefix (`/openai/...`),
where the same governance as for SDKs pointed at tether applies, streams
included; the response is streamed back (`response.stream = True`), so
mitmproxy never buffers it. Every other host, after the SSRF checks
(`resolve.py`), in this order of precedence:

1. a host an `apis:` entry names (`hosts`, default the url's host): judged
   exactly as on `/apis/{name}/` (operation allow-list, schema, overrides,
   rules with `api: jira.createIssue`, holds), refused with the same 403 body;
2. a cloud API host (`proxy.policy.cloud`): the operation is classified and
   judged (`api: aws.ec2.DeleteVolume`); one tether cannot name is an unknown
   write, denied unless `forward.pass_hosts` lists that exact host (a wildcard
   entry never does); an ambiguous request is refused; denials come in the
   cloud's own error shape; with `cloud.lookups` on, a cloud call naming
   resources is judged with their tags (`args.Tags`, looked up by tether first:
   `proxy.forward.lookups`; a failed lookup denies, `tether:lookup-failed`);
   both in `judge.py`;
3. a `forward.pass_hosts` host: forwarded unchanged, no policy;
4. anything else: refused (403, `refusals.py`).

Transparent flows (an iptables REDIRECT sent the connection here) are judged
by the same steps, by name, once `transparent.py` has checked that the name
leads to the connection's original destination; their upstream connection
goes to that destination and nowhere else. Non-HTTP TCP on a redirected port
is killed: tether cannot name its destination.

Who is asking is settled first, before any name is resolved (`identity.py`):
the CONNECT's or a plain-HTTP request's `Proxy-Authorization` (407 under
`auth.mode: required` when missing or bad), the tunnel's credential for the
requests inside it, `forward.transparent_agent` for transparent flows. The
header is tether's and never goes on; LLM requests carry a handoff ticket to
the reverse route instead (proxy/auth/handoff.py).
"""

from __future__ import annotations

import logging

from mitmproxy import connection, http, tcp, udp
from mitmproxy.proxy import server_hooks

from ..approvals import caller
from ..auth.authenticator import Authenticator
from ..auth.handoff import HEADER as HANDOFF_HEADER
from ..auth.settings import AuthSettings, JwtIssuer
from ..egress import Egress
from ..errors import Unauthorized
from ..governor import Governor
from ..ids import new_id
from ..telemetry import Metrics
from .identity import PROXY_AUTHORIZATION, ForwardIdentity, Found
from .judge import ApiJudge, client_gone, cloud_lookups
from .refusals import IDENTITY, PROVIDER, Refusals, kill
from .resolve import Resolver, check_all, preferred, resolve, resolve_check
from .targets import Refusal, Targets, authority_host, ip_literal, llm_provider, norm_host, same_host
from .transparent import Claims, is_transparent

log = logging.getLogger("tether.forward")

IDENTITY_HEADERS = ("x-tether-session", "x-tether-agent")


class ForwardAddon:
    def __init__(self, governor: Governor, metrics: Metrics, targets: Targets,
                 reverse: tuple[str, int], egress: Egress | None = None,
                 resolver: Resolver | None = None, auth: Authenticator | None = None) -> None:
        """`reverse`: tether's reverse-proxy address as seen from this process;
        `egress`: the `apis:` entries, cloud catalog and holds tool traffic is judged by;
        `auth`: the reverse route's Authenticator (None: no `auth:` section, agents named
        by static key or trusted header as `egress` says)."""
        self.governor = governor
        self.metrics = metrics
        self.targets = targets
        self.reverse = reverse
        self.egress = egress or Egress()
        self.auth = auth or Authenticator(AuthSettings(), self.egress.agent_keys,
                                          trust_headers=self.egress.trust_headers,
                                          fetch=_no_fetch, metrics=metrics)
        self.identity = ForwardIdentity(self.auth, self.egress.agent_keys,
                                        self.egress.trust_headers,
                                        targets.settings.transparent_agent)
        self.resolver = resolver  # None: the system's DNS (others: split-horizon, tests)
        self.refusals = Refusals(governor, metrics, self.identity.trust_headers)
        self.judge = ApiJudge(governor, self.egress,
                              cloud_lookups(self.egress.lookups, targets.settings.upstream_ca),
                              self.refusals)
        self.claims = Claims()

    # -- hooks ----------------------------------------------------------------------------

    async def done(self) -> None:
        """mitmproxy's shutdown hook (ForwardProxy.stop): the lookups close what they keep."""
        await self.judge.lookup.close()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT: refused now when the name alone settles it (a bare IP, an unknown
        host); LLM hosts are never resolved, since they are never connected to. Who is
        asking comes first: an unauthenticated client learns nothing of the targets."""
        try:
            try:
                who = await self.identity.connect(flow.client_conn.id, _lower(flow))
            except Unauthorized as e:
                return self.refusals.unauthenticated(flow, e, proxy=True)
            flow.metadata[IDENTITY] = who
            host, port = flow.request.host, flow.request.port
            refusal = self.targets.literal_allowed(host) or self._host_allowed(host)
            if refusal is None and llm_provider(host) is None:
                refusal = await resolve_check(self.targets, self.resolver, host, port)
            if refusal is not None:
                self.refusals.refuse(flow, refusal)
        except Exception:  # noqa: BLE001 - an addon error must not let the flow on
            self.refusals.crash(flow, "http_connect")

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            # A hold on this request ends `abandoned` once its client has gone.
            with caller.watching(lambda: client_gone(flow)):
                await self._request(flow)
        except ConnectionResetError:  # the client left while held: nothing goes upstream
            kill(flow)
        except Exception:  # noqa: BLE001
            self.refusals.crash(flow, "request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream every response: governed LLM streams were already filtered on the
        reverse route, and pass hosts are not inspected here."""
        try:
            if flow.response is not None:
                flow.response.stream = True
        except Exception:  # noqa: BLE001
            self.refusals.crash(flow, "responseheaders")

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The last gate: resolve once, check every address, connect to the checked one
        (so a DNS answer that changed since `request` cannot slip a private address in)."""
        try:
            server = data.server
            if server.address is None:
                server.error = "tether: no destination"
                return
            host, port = str(server.address[0]), int(server.address[1])
            if (host, port) == self.reverse and not server.tls and not (
                    is_transparent(data.client) and tuple(data.client.sockname[:2]) == self.reverse):
                return  # a governed LLM request re-addressed by `request` below
            refusal = self.targets.literal_allowed(host)
            if refusal is None:
                addresses = await resolve(host, port, self.resolver)
                refusal = check_all(self.targets, host, port, addresses) if addresses else Refusal(
                    "tether:dns", f"{host} does not resolve")
            if refusal is not None:
                return self.refusals.connect_refused(server, host, port, refusal)
            if server.tls and server.sni is None:
                server.sni = host
            if is_transparent(data.client):
                refusal = self.claims.upstream(data.client, host, port, addresses)
                if refusal is not None:
                    return self.refusals.connect_refused(server, host, port, refusal)
                server.address = (str(data.client.sockname[0]), port)
                return
            server.address = (str(preferred(addresses)), port)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in server_connect; connection refused")
            self.metrics.fail_closed.labels("forward").inc()
            data.server.error = "tether: internal error"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Raw TCP inside a tunnel is not HTTP, so tether cannot judge it: only pass
        hosts may carry it (never an LLM host, whose governance needs HTTP). Raw TCP
        on a transparent connection has no name at all: always killed."""
        try:
            if is_transparent(flow.client_conn):
                self.governor.reject(provider=PROVIDER, status=403, code="tether:not-http",
                                     message="a redirected connection that is not HTTP(S) is refused",
                                     request_id=new_id(),
                                     endpoint=f"tcp {_address(flow.client_conn.sockname)}")
                return kill(flow)
            host = str(flow.server_conn.address[0]) if flow.server_conn.address else ""
            if llm_provider(host) is not None or self.targets.host_allowed(host) is not None \
                    or self.judge.governed(host):
                kill(flow)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in tcp_start")
            kill(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        kill(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self.claims.forget(client.id)
        self.identity.forget(client.id)

    # -- the request ----------------------------------------------------------------------

    async def _request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        transparent = is_transparent(flow.client_conn)
        if transparent:
            refusal = await self.claims.claim(flow, self.targets, self.resolver)
            if refusal is not None:
                return self.refusals.refuse(flow, refusal)
        try:
            found = await self.identity.request(flow.client_conn.id, _lower(flow),
                                                transparent=transparent,
                                                llm=llm_provider(req.host) is not None)
        except Unauthorized as e:
            return self.refusals.unauthenticated(flow, e, proxy=not transparent and
                                                 not self.identity.in_tunnel(flow.client_conn.id))
        if found.identity is not None:
            flow.metadata[IDENTITY] = found.identity
        # The credential was tether's (Proxy-Authorization is hop-by-hop): never sent on.
        req.headers.pop(PROXY_AUTHORIZATION, None)
        req.headers.pop(HANDOFF_HEADER, None)
        host = req.host  # inside a tunnel: the CONNECT host; else the absolute URL's host
        header = req.host_header
        if header is None:
            return self.refusals.refuse(flow, Refusal("tether:no-host",
                                                      "the request has no Host header"))
        header_host = authority_host(header)
        sni = flow.client_conn.sni if flow.client_conn.tls else None
        if flow.client_conn.tls and sni is None and ip_literal(host) is None:  # no SNI for IPs
            return self.refusals.refuse(flow, Refusal("tether:no-sni", "the TLS client sent no SNI"))
        if not same_host(host, sni, header_host):
            return self.refusals.refuse(flow, Refusal(
                "tether:host-mismatch",
                f"CONNECT host {norm_host(host)!r}, TLS SNI {sni!r} and Host header "
                f"{header_host!r} must name the same host"))
        refusal = self.targets.literal_allowed(host)
        if refusal is not None:
            return self.refusals.refuse(flow, refusal)
        provider = llm_provider(host)
        if provider is not None:
            return self._to_reverse(flow, provider, found)
        refusal = self._host_allowed(host) or await resolve_check(self.targets, self.resolver,
                                                                  host, req.port)
        if refusal is not None:
            return self.refusals.refuse(flow, refusal)
        if self.judge.governed(host) and not await self.judge.judge(flow, host, self.targets,
                                                                    self.resolver):
            return None
        for name in IDENTITY_HEADERS:
            req.headers.pop(name, None)
        # `server_connect` pins the upstream connection to the checked address, which
        # changes its address; mitmproxy then never reuses it (it matches connections by
        # address) and allows only five open per address and client, so a sixth request
        # on a kept-alive client connection would wait forever. Asking the upstream to
        # close after each answer frees the slot: one upstream connection per request,
        # the price of resolve-check-connect.
        if req.http_version.startswith("HTTP/1"):
            req.headers["connection"] = "close"
        return None

    def _host_allowed(self, host: str) -> Refusal | None:
        return None if self.judge.governed(host) else self.targets.host_allowed(host)

    def _to_reverse(self, flow: http.HTTPFlow, provider: str, found: Found) -> None:
        req = flow.request
        flow.metadata["tether_provider"] = provider
        if found.handoff is not None:
            name, ticket = self.auth.hand_off(found.handoff)
            req.headers[name] = ticket
        path = req.path if req.path.startswith("/") else "/" + req.path
        req.scheme = "http"
        req.host, req.port = self.reverse
        req.path = f"/{provider}{path}"


async def _no_fetch(issuer: JwtIssuer) -> object:
    raise AssertionError(f"no JWT issuer is configured, yet {issuer.issuer} was asked")


def _lower(flow: http.HTTPFlow) -> dict[str, str]:
    """The request's headers by lower-case name (the first of each)."""
    out: dict[str, str] = {}
    for k, v in flow.request.headers.fields:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _address(address: tuple[str, int] | None) -> str:
    return "?" if address is None else f"{address[0]}:{address[1]}"
