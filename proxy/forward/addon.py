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
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from mitmproxy import http, tcp, udp
from mitmproxy.proxy import server_hooks

from ..approvals.holds import KeepAlive
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
from ..errors import BadRequest
from ..governor import Governor
from ..model import Action, HttpRequest, RuleTrace
from ..policy.apis_config import ToolApi
from ..policy.cloud import CloudHost, CloudOperation, classify, cloud_host
from ..server.upstream import canonical_tail
from ..sessions.identity import agent_of
from ..telemetry import Metrics
from .cloud_errors import cloud_error
from .lookups import LookupFailed, TagLookup
from .targets import Address, Refusal, Targets, ip_literal, llm_provider, norm_host, same_host

log = logging.getLogger("tether.forward")

Resolver = Callable[[str, int], Awaitable[list[Address]]]

PROVIDER = "forward"
IDENTITY_HEADERS = ("x-tether-session", "x-tether-agent")
INTERNAL = Refusal("tether:internal-error", "internal error in the forward proxy; flow killed")


class ForwardAddon:
    def __init__(self, governor: Governor, metrics: Metrics, targets: Targets,
                 reverse: tuple[str, int], egress: Egress | None = None,
                 resolver: Resolver | None = None) -> None:
        """`reverse`: tether's reverse-proxy address as seen from this process;
        `egress`: the `apis:` entries, cloud catalog and holds tool traffic is judged by."""
        self.governor = governor
        self.metrics = metrics
        self.targets = targets
        self.reverse = reverse
        self.egress = egress or Egress()
        self.resolver = resolver  # None: the system's DNS (others: split-horizon, tests)
        self.lookup = TagLookup(self.egress.lookups, targets.settings.upstream_ca)

    # -- hooks ----------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT: refused now when the name alone settles it (a bare IP, an unknown
        host); LLM hosts are never resolved, since they are never connected to."""
        try:
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
            if (host, port) == self.reverse and not server.tls:
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
            # One address, already checked; IPv4 first, as most services listen there.
            server.address = (str(min(addresses, key=lambda ip: ip.version)), port)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in server_connect; connection refused")
            self.metrics.fail_closed.labels("forward").inc()
            data.server.error = "tether: internal error"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Raw TCP inside a tunnel is not HTTP, so tether cannot judge it: only pass
        hosts may carry it (never an LLM host, whose governance needs HTTP)."""
        try:
            host = str(flow.server_conn.address[0]) if flow.server_conn.address else ""
            if llm_provider(host) is not None or self.targets.host_allowed(host) is not None \
                    or self._governed(host):
                _kill(flow)
        except Exception:  # noqa: BLE001
            log.exception("forward addon failed in tcp_start")
            _kill(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        _kill(flow)

    # -- the request ----------------------------------------------------------------------

    async def _request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
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
            return self._to_reverse(flow, provider)
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
        who = Who(rid, (headers.get("x-tether-session") if trust else None) or None,
                  agent_of(headers, self.egress.agent_keys, trust),
                  f"{norm_host(host)}{raw_path}")
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
                                      api.base_path)
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
                                    provider=provider, pass_unclassified=exact_pass, extra=extra)
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

    def _to_reverse(self, flow: http.HTTPFlow, provider: str) -> None:
        req = flow.request
        flow.metadata["tether_provider"] = provider
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
            agent=req.headers.get("x-tether-agent"),
            endpoint=f"{req.method} {req.pretty_host}:{req.port}"
                     + ("" if req.method == "CONNECT" else req.path))
        body = {"error": {"type": "tether_forward_refused", "code": refusal.code,
                          "message": refusal.message, "request_id": request_id}}
        flow.response = http.Response.make(
            403, json.dumps(body).encode(),
            {"content-type": "application/json", "x-tether-refused": refusal.code})

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


def _authority_host(authority: str) -> str:
    """`host`, `host:port`, `[v6]:port` -> the host part."""
    text = authority.strip()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
