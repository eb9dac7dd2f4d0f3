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
mitmproxy never buffers it. Every other host, after the SSRF checks, in
this order of precedence:

1. a host an `apis:` entry names (`hosts`, default the url's host): judged
   exactly as on `/apis/{name}/` (operation allow-list, schema, overrides,
   rules with `api: jira.createIssue`, holds), refused with the same 403 body;
2. a cloud API host (`proxy.policy.cloud`): the operation is classified and
   judged (`api: aws.ec2.DeleteVolume`); one tether cannot name is an unknown
   write, denied unless `forward.pass_hosts` lists that exact host (a wildcard
   entry never does); an ambiguous request is refused; denials come in the
   cloud's own error shape; with `cloud.lookups.aws.tags`, an EC2 call naming
   resources is judged with their tags (`args.Tags`, looked up by tether first:
   `proxy.forward.lookups`; a failed lookup denies, `tether:lookup-failed`);
3. a `forward.pass_hosts` host: forwarded unchanged, no policy;
4. anything else: refused (403).

Transparent flows (an iptables REDIRECT sent the connection here; mitmproxy
read its original destination IP:port with SO_ORIGINAL_DST) are judged by
the same steps, by name: the name is the TLS SNI (which must agree with the
Host header) or, in plain HTTP, the Host header. What differs, in `_claim`:
the destination is the original IP, so the name must resolve (tether's own
DNS) to a set of addresses that contains it, else the request is refused
(`tether:destination-mismatch`): a Host naming an allowed API while the
packets go elsewhere is never judged by that name. The upstream connection
then goes to the original IP and nowhere else (`server_connect`). LLM names
are exempt from the agreement check, as they are never connected to (their
requests go to the reverse route). A redirected connection whose original
destination is tether itself (its ports) is refused, and non-HTTP TCP on a
redirected port is killed: tether cannot name its destination.

Who is asking is settled first, before any name is resolved (`identity.py`):
the CONNECT's or a plain-HTTP request's `Proxy-Authorization` (407 under
`auth.mode: required` when missing or bad), the tunnel's credential for the
requests inside it, `forward.transparent_agent` for transparent flows. The
header is tether's and never goes on; LLM requests carry a handoff ticket to
the reverse route instead (proxy/auth/handoff.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from mitmproxy import connection, http, tcp, udp
from mitmproxy.proxy import mode_specs, server_hooks

from ..approvals.holds import KeepAlive
from ..auth.authenticator import Authenticator, Identity
from ..auth.handoff import HEADER as HANDOFF_HEADER
from ..auth.settings import AuthSettings, JwtIssuer
from ..egress import (
    AMBIGUOUS,
    AMBIGUOUS_CLOUD,
    LOOKUP_FAILED,
    Egress,
    Verdict,
    Who,
    api_for_host,
    judge_api,
    judge_cloud,
)
from ..errors import BadRequest, Unauthorized
from ..governor import Governor
from ..model import Action, HttpRequest, RuleTrace
from ..policy.apis_config import ToolApi
from ..policy.cloud import CloudHost, CloudOperation, classify, cloud_host
from ..server.upstream import canonical_tail
from ..telemetry import Metrics
from .cloud_errors import cloud_error
from .identity import CHALLENGES, PROXY_AUTHORIZATION, ForwardIdentity, Found
from .lookups import LookupFailed, TagLookup
from .targets import Address, Refusal, Targets, ip_literal, llm_provider, norm_host, same_host

log = logging.getLogger("tether.forward")

Resolver = Callable[[str, int], Awaitable[list[Address]]]

PROVIDER = "forward"
IDENTITY_HEADERS = ("x-tether-session", "x-tether-agent")
IDENTITY = "tether_identity"  # flow.metadata: the Identity the request was judged as
INTERNAL = Refusal("tether:internal-error", "internal error in the forward proxy; flow killed")


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
        self.lookup = TagLookup(self.egress.lookups, targets.settings.upstream_ca)
        # Transparent client connection id -> the (name, port) targets `_claim` accepted:
        # the only upstream connections `server_connect` opens for it.
        self.claimed: dict[str, set[tuple[str, int]]] = {}

    # -- hooks ----------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT: refused now when the name alone settles it (a bare IP, an unknown
        host); LLM hosts are never resolved, since they are never connected to. Who is
        asking comes first: an unauthenticated client learns nothing of the targets."""
        try:
            try:
                who = await self.identity.connect(flow.client_conn.id, _lower(flow))
            except Unauthorized as e:
                return self._unauthenticated(flow, e, proxy=True)
            flow.metadata[IDENTITY] = who
            host, port = flow.request.host, flow.request.port
            refusal = self.targets.literal_allowed(host) or self._host_allowed(host)
            if refusal is None and llm_provider(host) is None:
                refusal = await self._resolve_check(host, port)
            if refusal is not None:
                self._refuse(flow, refusal)
        except Exception:  # noqa: BLE001 - an addon error must not let the flow on
            self._crash(flow, "http_connect")

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:  # noqa: BLE001
            self._crash(flow, "request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream every response: governed LLM streams were already filtered on the
        reverse route, and pass hosts are not inspected here."""
        try:
            if flow.response is not None:
                flow.response.stream = True
        except Exception:  # noqa: BLE001
            self._crash(flow, "responseheaders")

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
                    _transparent(data.client) and tuple(data.client.sockname[:2]) == self.reverse):
                return  # a governed LLM request re-addressed by `request` below
            refusal = self.targets.literal_allowed(host)
            if refusal is None:
                addresses = await self._resolve(host, port)
                refusal = self._check_all(host, port, addresses) if addresses else Refusal(
                    "tether:dns", f"{host} does not resolve")
            if refusal is not None:
                self.governor.reject(provider=PROVIDER, status=502, code=refusal.code,
                                     message=refusal.message, request_id=uuid.uuid4().hex,
                                     endpoint=f"connect {host}:{port}")
                server.error = f"{refusal.code}: {refusal.message}"
                return
            if server.tls and server.sni is None:
                server.sni = host
            if _transparent(data.client):
                refusal = self._transparent_upstream(data.client, host, port, addresses)
                if refusal is not None:
                    self.governor.reject(provider=PROVIDER, status=502, code=refusal.code,
                                         message=refusal.message, request_id=uuid.uuid4().hex,
                                         endpoint=f"connect {host}:{port}")
                    server.error = f"{refusal.code}: {refusal.message}"
                    return
                server.address = (str(data.client.sockname[0]), port)
                return
            # One address, already checked; IPv4 first, as most services listen there.
            server.address = (str(min(addresses, key=lambda ip: ip.version)), port)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in server_connect; connection refused")
            self.metrics.fail_closed.labels("forward").inc()
            data.server.error = "tether: internal error"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Raw TCP inside a tunnel is not HTTP, so tether cannot judge it: only pass
        hosts may carry it (never an LLM host, whose governance needs HTTP). Raw TCP
        on a transparent connection has no name at all: always killed."""
        try:
            if _transparent(flow.client_conn):
                self.governor.reject(provider=PROVIDER, status=403, code="tether:not-http",
                                     message="a redirected connection that is not HTTP(S) is refused",
                                     request_id=uuid.uuid4().hex,
                                     endpoint=f"tcp {_address(flow.client_conn.sockname)}")
                return _kill(flow)
            host = str(flow.server_conn.address[0]) if flow.server_conn.address else ""
            if llm_provider(host) is not None or self.targets.host_allowed(host) is not None \
                    or self._governed(host):
                _kill(flow)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in tcp_start")
            _kill(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        _kill(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self.claimed.pop(client.id, None)
        self.identity.forget(client.id)

    # -- the request ----------------------------------------------------------------------

    async def _request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        transparent = _transparent(flow.client_conn)
        if transparent:
            refusal = await self._claim(flow)
            if refusal is not None:
                return self._refuse(flow, refusal)
        try:
            found = await self.identity.request(flow.client_conn.id, _lower(flow),
                                                transparent=transparent,
                                                llm=llm_provider(req.host) is not None)
        except Unauthorized as e:
            return self._unauthenticated(flow, e, proxy=not transparent and
                                         not self.identity.in_tunnel(flow.client_conn.id))
        if found.identity is not None:
            flow.metadata[IDENTITY] = found.identity
        # The credential was tether's (Proxy-Authorization is hop-by-hop): never sent on.
        req.headers.pop(PROXY_AUTHORIZATION, None)
        req.headers.pop(HANDOFF_HEADER, None)
        host = req.host  # inside a tunnel: the CONNECT host; else the absolute URL's host
        header = req.host_header
        if header is None:
            return self._refuse(flow, Refusal("tether:no-host", "the request has no Host header"))
        header_host = _authority_host(header)
        sni = flow.client_conn.sni if flow.client_conn.tls else None
        if flow.client_conn.tls and sni is None and ip_literal(host) is None:  # no SNI for IPs
            return self._refuse(flow, Refusal("tether:no-sni", "the TLS client sent no SNI"))
        if not same_host(host, sni, header_host):
            return self._refuse(flow, Refusal(
                "tether:host-mismatch",
                f"CONNECT host {norm_host(host)!r}, TLS SNI {sni!r} and Host header "
                f"{header_host!r} must name the same host"))
        refusal = self.targets.literal_allowed(host)
        if refusal is not None:
            return self._refuse(flow, refusal)
        provider = llm_provider(host)
        if provider is not None:
            return self._to_reverse(flow, provider, found)
        refusal = self._host_allowed(host) or await self._resolve_check(host, req.port)
        if refusal is not None:
            return self._refuse(flow, refusal)
        if self._governed(host) and not await self._judge(flow, host):
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

    # -- transparent flows ----------------------------------------------------------------

    async def _claim(self, flow: http.HTTPFlow) -> Refusal | None:
        """Name a transparent request by its SNI or Host, after checking that the name
        agrees with the original destination; on success `req.host` is that name (so the
        rest of the request path judges it as an HTTP_PROXY request to the same name)."""
        req, client = flow.request, flow.client_conn
        ip, port = ip_literal(str(client.sockname[0])), int(client.sockname[1])
        if ip is None:
            return Refusal("tether:no-destination", "the original destination is unknown")
        loop = self.targets.loop(ip, port)
        if loop is not None:
            return loop
        header = req.host_header
        if header is None:
            return Refusal("tether:no-host", "the request has no Host header")
        name, header_port = _authority(header)
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
            agrees = ip in await self._resolve(name, port)
        if not agrees:
            return Refusal("tether:destination-mismatch",
                           f"{norm_host(name)} does not resolve to {ip}, where the connection goes; "
                           "a request is judged by its name only when the name leads there")
        self.claimed.setdefault(client.id, set()).add((norm_host(name), port))
        req.host, req.port = norm_host(name), port
        return None

    def _transparent_upstream(self, client: connection.Client, host: str, port: int,
                              addresses: list[Address]) -> Refusal | None:
        """A transparent flow's upstream: a target `_claim` accepted, reached at the original
        destination (already checked as one of the name's addresses)."""
        original = ip_literal(str(client.sockname[0]))
        if (norm_host(host), port) not in self.claimed.get(client.id, set()) \
                or original is None or original not in addresses or port != client.sockname[1]:
            return Refusal("tether:destination-mismatch",
                           f"{host}:{port} is not the original destination of the connection")
        return None

    # -- tool APIs and cloud APIs ---------------------------------------------------------

    def _api(self, host: str) -> ToolApi | None:
        return api_for_host(self.egress.apis, host)

    def _governed(self, host: str) -> bool:
        """An `apis:` host or a cloud API host: judged per request, never passed blind."""
        return self._api(host) is not None or cloud_host(host, self.egress.catalog) is not None

    def _host_allowed(self, host: str) -> Refusal | None:
        return None if self._governed(host) else self.targets.host_allowed(host)

    async def _judge(self, flow: http.HTTPFlow, host: str) -> bool:
        """Judge one tool or cloud API request; False when a reply was set instead."""
        req = flow.request
        rid = uuid.uuid4().hex
        raw_path, _, query = req.path.partition("?")
        fields = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers.fields)
        headers = {k.lower(): v for k, v in fields}
        trust = self.egress.trust_headers
        identity = _identity(flow)
        who = Who(rid, (headers.get("x-tether-session") if trust else None) or None,
                  identity.agent if identity else None, f"{norm_host(host)}{raw_path}",
                  claims=identity.claims if identity else {})
        api = self._api(host)
        provider = api.provider if api else f"{PROVIDER}:{norm_host(host)}"
        http_req = HttpRequest(method=req.method, scheme=req.scheme, host=norm_host(host),
                               port=req.port, path=raw_path, query=query,
                               headers=fields,
                               body=req.get_content(strict=False) or b"")
        known = cloud_host(host, self.egress.catalog)
        service = known.service if isinstance(known, CloudHost) else None
        try:
            canonical_tail(raw_path.removeprefix("/"))
        except BadRequest as e:
            # As `/apis/` answers it (400), or a cloud's denial (403) in the cloud's shape.
            verdict = Verdict(False, 400 if api else 403, AMBIGUOUS, e.message, AMBIGUOUS_CLOUD,
                              (AMBIGUOUS_CLOUD,))
            self.governor.reject(provider=provider, status=verdict.status, code=AMBIGUOUS_CLOUD,
                                 message=e.message, request_id=rid, session=who.session,
                                 agent=who.agent, endpoint=f"{req.method} {who.target}")
            cloud = None if api else (known.cloud if known else "aws", service, http_req)
            return self._outcome(flow, verdict, cloud, rid)
        alive = self._alive(flow)
        if api is not None:
            verdict = await judge_api(self.governor, self.egress.holds, api, http_req, who, alive,
                                      api.base_path, opa=self.egress.opa)
            return self._outcome(flow, verdict, None, rid)
        found = classify(http_req, self.egress.catalog)
        if found is None:  # cloud_host said it was one; classify disagrees: never guess
            self._refuse(flow, Refusal("tether:internal-error", "cloud host not classified"),
                         provider=provider)
            return False
        exact_pass = norm_host(host) in self.egress_pass_hosts()
        extra: tuple[RuleTrace, ...] = ()
        if isinstance(found, CloudOperation):
            found, extra = await self._looked_up(found, http_req)
        verdict = await judge_cloud(self.governor, self.egress.holds, found, http_req, who, alive,
                                    provider=provider, pass_unclassified=exact_pass, extra=extra,
                                    opa=self.egress.opa)
        service = getattr(found, "service", None) or service
        return self._outcome(flow, verdict, (found.cloud, service, http_req), rid)

    async def _looked_up(self, found: CloudOperation,
                         http_req: HttpRequest) -> tuple[CloudOperation, tuple[RuleTrace, ...]]:
        """`found` with the facts `cloud.lookups` asks for (resource tags), or a deny
        verdict when they cannot be had: the rules must never judge without them."""
        try:
            ids = self.lookup.wanted(found)
            if not ids:
                return found, ()
            addresses = await self._resolve(http_req.host, http_req.port)
            refusal = self._check_all(http_req.host, http_req.port, addresses) if addresses else \
                Refusal("tether:dns", f"{http_req.host} does not resolve")
            if refusal is not None:
                raise LookupFailed(refusal.message)
            address = str(min(addresses, key=lambda ip: ip.version))
            args = await self.lookup.tags(found, http_req, ids, address)
        except LookupFailed as e:
            log.warning("tag lookup for %s failed: %s", found.api, e)
            return found, (RuleTrace(LOOKUP_FAILED, True, f"tether could not look up the tags of "
                                     f"the resources it names ({e})", Action.DENY),)
        return replace(found, arguments=args), ()

    def egress_pass_hosts(self) -> frozenset[str]:
        """`forward.pass_hosts` entries that name one host exactly (no wildcard)."""
        return frozenset(h for h in self.targets.settings.pass_hosts if "*" not in h)

    def _outcome(self, flow: http.HTTPFlow, verdict: Verdict,
                 cloud: tuple[str, str | None, HttpRequest] | None, rid: str) -> bool:
        if verdict.allowed:
            return True
        if verdict.status == 499:  # the client left while held: nothing to answer
            if flow.killable:
                _kill(flow)
            return False
        if cloud is None:
            body, headers = verdict.json(), {"content-type": "application/json"}
        else:
            body, headers = cloud_error(cloud[0], cloud[1], cloud[2], verdict.status,
                                        verdict.code, verdict.message, rid)
        headers = {**headers, "x-tether-error": verdict.code, "x-should-retry": "false"}
        flow.response = http.Response.make(verdict.status, body, headers)
        return False

    @staticmethod
    def _alive(flow: http.HTTPFlow) -> KeepAlive:
        """A held request whose client has gone must not run when approved."""

        async def check(_: str) -> None:
            if flow.client_conn.timestamp_end is not None or flow.error is not None:
                raise ConnectionResetError("the client's connection closed")

        return check

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

    # -- checks ---------------------------------------------------------------------------

    async def _resolve(self, host: str, port: int) -> list[Address]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        if self.resolver is not None:
            return await self.resolver(norm_host(host), port)
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

    def _check_all(self, host: str, port: int, addresses: list[Address]) -> Refusal | None:
        """Every address a name resolves to must pass: the connect may pick any of them."""
        for ip in addresses:
            refusal = self.targets.address_allowed(norm_host(host), ip, port)
            if refusal is not None:
                return refusal
        return None

    async def _resolve_check(self, host: str, port: int) -> Refusal | None:
        addresses = await self._resolve(host, port)
        if not addresses:
            return Refusal("tether:dns", f"{norm_host(host)} does not resolve")
        return self._check_all(host, port, addresses)

    # -- outcomes -------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal, provider: str = PROVIDER) -> None:
        req = flow.request
        request_id = uuid.uuid4().hex
        self.governor.reject(
            provider=provider, status=403, code=refusal.code, message=refusal.message,
            request_id=request_id, session=req.headers.get("x-tether-session"),
            agent=self._agent(flow), endpoint=f"{req.method} {req.pretty_host}:{req.port}"
                     + ("" if req.method == "CONNECT" else req.path))
        body = {"error": {"type": "tether_forward_refused", "code": refusal.code,
                          "message": refusal.message, "request_id": request_id}}
        flow.response = http.Response.make(
            403, json.dumps(body).encode(),
            {"content-type": "application/json", "x-tether-refused": refusal.code})

    def _agent(self, flow: http.HTTPFlow) -> str | None:
        """The agent for the audit of a refusal: verified, or the trusted header."""
        identity = _identity(flow)
        if identity is not None and identity.agent is not None:
            return identity.agent
        trusted = self.identity.trust_headers and not _transparent(flow.client_conn)
        return flow.request.headers.get("x-tether-agent") if trusted else None

    def _unauthenticated(self, flow: http.HTTPFlow, e: Unauthorized, *, proxy: bool) -> None:
        """407 with Proxy-Authenticate to an HTTP_PROXY client (the CONNECT itself, or a
        plain-HTTP request); 401 inside a tunnel or to a transparent client, which
        would not answer a proxy's challenge. Audited; nothing is resolved or sent."""
        req = flow.request
        request_id = uuid.uuid4().hex
        status = 407 if proxy else 401
        self.governor.reject(
            provider=PROVIDER, status=status, code=e.code, message=e.message,
            request_id=request_id,
            endpoint=f"{req.method} {req.pretty_host}:{req.port}"
                     + ("" if req.method == "CONNECT" else req.path))
        body = {"error": {"type": "tether_forward_refused", "code": e.code,
                          "message": e.message, "request_id": request_id}}
        challenge = "proxy-authenticate" if proxy else "www-authenticate"
        flow.response = http.Response.make(status, json.dumps(body).encode(), [
            (b"content-type", b"application/json"), (b"x-tether-refused", e.code.encode()),
            *((challenge.encode(), c.encode()) for c in CHALLENGES)])

    def _crash(self, flow: http.HTTPFlow, hook: str) -> None:
        """Fail closed: the flow dies; nothing is sent on."""
        log.exception("forward addon failed in %s; flow killed", hook)
        self.metrics.fail_closed.labels("forward").inc()
        try:
            self.governor.reject(provider=PROVIDER, status=502, code=INTERNAL.code,
                                 message=f"{INTERNAL.message} ({hook})",
                                 request_id=uuid.uuid4().hex,
                                 endpoint=f"{flow.request.method} {flow.request.pretty_url}")
        finally:
            flow.response = None
            if flow.killable:
                _kill(flow)


def _kill(flow: http.HTTPFlow | tcp.TCPFlow | udp.UDPFlow) -> None:
    flow.kill()  # type: ignore[no-untyped-call]


async def _no_fetch(issuer: JwtIssuer) -> object:
    raise AssertionError(f"no JWT issuer is configured, yet {issuer.issuer} was asked")


def _lower(flow: http.HTTPFlow) -> dict[str, str]:
    """The request's headers by lower-case name (the first of each)."""
    out: dict[str, str] = {}
    for k, v in flow.request.headers.fields:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _identity(flow: http.HTTPFlow) -> Identity | None:
    found = flow.metadata.get(IDENTITY)
    return found if isinstance(found, Identity) else None


def _transparent(client: connection.Client) -> bool:
    return isinstance(client.proxy_mode, mode_specs.TransparentMode)


def _address(address: tuple[str, int] | None) -> str:
    return "?" if address is None else f"{address[0]}:{address[1]}"


def _authority(authority: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` -> (host, port or None); a bad port is -1."""
    host, text = _authority_host(authority), authority.strip()
    if text.startswith("["):
        rest = text[text.find("]") + 1:] if "]" in text else ""
    else:
        rest = text[text.find(":"):] if text.count(":") == 1 else ""
    if not rest.startswith(":"):
        return host, None
    return host, int(rest[1:]) if rest[1:].isdigit() else -1


def _authority_host(authority: str) -> str:
    """`host`, `host:port`, `[v6]:port` -> the host part."""
    text = authority.strip()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
