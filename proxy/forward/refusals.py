"""How the forward proxy says no: audited first, then one recognisable answer.

Every refusal goes through `governor.reject` before the reply is set, so it is
on record even when the client has already gone. tether's own refusals share
one JSON body (`tether_forward_refused`, with `x-tether-refused`), so a client
can tell them from the target's own 403; a governed API's denial instead takes
the `/apis/` body, or the cloud's own error shape, so an SDK raises a readable
error. When the addon itself fails the flow dies: mitmproxy would otherwise
log the exception and carry on with the flow as it is (fail open).
"""

from __future__ import annotations

import json
import logging

from mitmproxy import connection, http, tcp, udp

from ..auth.authenticator import Identity
from ..egress import Verdict
from ..errors import Unauthorized
from ..governor import Governor
from ..ids import new_id
from ..model import HttpRequest
from ..telemetry import Metrics
from .cloud_errors import cloud_error
from .identity import CHALLENGES
from .targets import Refusal
from .transparent import is_transparent

log = logging.getLogger("tether.forward")

PROVIDER = "forward"
IDENTITY = "tether_identity"  # flow.metadata: the Identity the request was judged as
INTERNAL = Refusal("tether:internal-error", "internal error in the forward proxy; flow killed")

# A denied cloud request: (cloud, service, request), what its error shape is built from.
type CloudShape = tuple[str, str | None, HttpRequest]


class Refusals:
    def __init__(self, governor: Governor, metrics: Metrics, trust_headers: bool) -> None:
        """`trust_headers`: whether `X-Tether-Agent` names the agent in the audit of a
        refusal when no verified identity does."""
        self.governor = governor
        self.metrics = metrics
        self.trust_headers = trust_headers

    def refuse(self, flow: http.HTTPFlow, refusal: Refusal, provider: str = PROVIDER) -> None:
        req = flow.request
        request_id = new_id()
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
        identity = judged_as(flow)
        if identity is not None and identity.agent is not None:
            return identity.agent
        trusted = self.trust_headers and not is_transparent(flow.client_conn)
        return flow.request.headers.get("x-tether-agent") if trusted else None

    def unauthenticated(self, flow: http.HTTPFlow, e: Unauthorized, *, proxy: bool) -> None:
        """407 with Proxy-Authenticate to an HTTP_PROXY client (the CONNECT itself, or a
        plain-HTTP request); 401 inside a tunnel or to a transparent client, which
        would not answer a proxy's challenge. Audited; nothing is resolved or sent."""
        req = flow.request
        request_id = new_id()
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

    def connect_refused(self, server: connection.Server, host: str, port: int,
                        refusal: Refusal) -> None:
        """The upstream connection is not opened; the client's request fails (502)."""
        self.governor.reject(provider=PROVIDER, status=502, code=refusal.code,
                             message=refusal.message, request_id=new_id(),
                             endpoint=f"connect {host}:{port}")
        server.error = f"{refusal.code}: {refusal.message}"

    def crash(self, flow: http.HTTPFlow, hook: str) -> None:
        """Fail closed: the flow dies; nothing is sent on."""
        log.exception("forward addon failed in %s; flow killed", hook)
        self.metrics.fail_closed.labels("forward").inc()
        try:
            self.governor.reject(provider=PROVIDER, status=502, code=INTERNAL.code,
                                 message=f"{INTERNAL.message} ({hook})",
                                 request_id=new_id(),
                                 endpoint=f"{flow.request.method} {flow.request.pretty_url}")
        finally:
            flow.response = None
            if flow.killable:
                kill(flow)


def outcome(flow: http.HTTPFlow, verdict: Verdict, cloud: CloudShape | None, rid: str) -> bool:
    """A governed request's verdict: True to send it on, else False with the reply set
    (`cloud`: answer in that cloud's error shape; None: the `/apis/` body)."""
    if verdict.allowed:
        return True
    if verdict.status == 499:  # the client left while held: nothing to answer
        if flow.killable:
            kill(flow)
        return False
    if cloud is None:
        body, headers = verdict.json(), {"content-type": "application/json"}
    else:
        body, headers = cloud_error(cloud[0], cloud[1], cloud[2], verdict.status,
                                    verdict.code, verdict.message, rid)
    headers = {**headers, "x-tether-error": verdict.code, "x-should-retry": "false"}
    flow.response = http.Response.make(verdict.status, body, headers)
    return False


def judged_as(flow: http.HTTPFlow) -> Identity | None:
    found = flow.metadata.get(IDENTITY)
    return found if isinstance(found, Identity) else None


def kill(flow: http.HTTPFlow | tcp.TCPFlow | udp.UDPFlow) -> None:
    flow.kill()  # type: ignore[no-untyped-call]
