"""Who a forwarded request is: the forward proxy's side of agent authentication.

Through HTTP_PROXY the agent presents its tether key or JWT as
`Proxy-Authorization: Bearer TOKEN`, or Basic with the token as the password
(`HTTPS_PROXY=http://agent:TOKEN@tether:8081`, which every HTTP client
understands). An HTTPS request sends it once, on the CONNECT: the tunnel is
then bound to that credential, and every request inside is judged as its
agent (the credential is verified again per request, so a token that expires
does not keep a long-lived tunnel open). A plain-HTTP request carries it on
each request. Under `auth.mode: required` a CONNECT or plain-HTTP request
without a valid credential is answered 407 with `Proxy-Authenticate`, before
any name is resolved or anything is sent; inside a tunnel (a token that has
since expired) it is 401. `X-Tether-Agent` never names an agent then.

A transparent client cannot send Proxy-Authorization: it does not know there
is a proxy. `forward.transparent_agent` names the agent all transparent
traffic is (in the sidecar deployment the pod is the agent). Without it,
under `required`, transparent requests to tool, cloud and pass hosts are
refused 401; LLM requests still reach the reverse route, where the SDK's own
API key must then be a tether credential (as for an SDK pointed at tether).

LLM requests are not verified here: they go to tether's reverse route with
a handoff ticket (proxy/auth/handoff.py) for the tunnel's credential or the
identity established here, so policy, audit and a refusal (401 in the
provider's own shape) are the reverse route's, as for any SDK.

With `auth.mode: optional` and no proxy credential, the agent is named as
before: by a configured static key in the request's own headers, else by
`X-Tether-Agent` where the config trusts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..auth.authenticator import ANONYMOUS, Authenticator, Identity
from ..auth.credentials import Credential, from_proxy_authorization
from ..auth.verify import Reason, refuse
from ..errors import Unauthorized
from ..sessions.identity import agent_of

PROXY_AUTHORIZATION = "proxy-authorization"
CHALLENGES = ('Bearer realm="tether"', 'Basic realm="tether"')


@dataclass(frozen=True, slots=True)
class Found:
    """`identity`: who the request is, as far as the forward proxy knows (None: an LLM
    request whose identity the reverse route establishes); `handoff`: what to hand
    the reverse route with an LLM request (None: it reads the request's own key)."""

    identity: Identity | None
    handoff: Identity | Credential | None = None


class ForwardIdentity:
    def __init__(self, auth: Authenticator, agent_keys: Mapping[str, str], trust_headers: bool,
                 transparent_agent: str | None = None) -> None:
        self.auth = auth
        self.agent_keys = dict(agent_keys)
        self.trust_headers = trust_headers and not auth.settings.required
        self.transparent_agent = transparent_agent
        # Client connection id -> the credential its CONNECT presented (and that verified).
        self.tunnels: dict[str, Credential] = {}

    @property
    def required(self) -> bool:
        return self.auth.settings.required

    def in_tunnel(self, client_id: str) -> bool:
        return client_id in self.tunnels

    def forget(self, client_id: str) -> None:
        self.tunnels.pop(client_id, None)

    async def connect(self, client_id: str, headers: Mapping[str, str]) -> Identity:
        """A CONNECT: the tunnel is bound to a credential that verified. Raises
        Unauthorized (answered 407) when one is required and missing or bad."""
        cred = self._proxy_credential(headers)
        if cred is None:
            if self.required:
                raise self._missing()
            return ANONYMOUS
        identity = await self.auth.identify({}, "", credential=cred)
        if identity.agent is not None:
            self.tunnels[client_id] = cred
        return identity

    async def request(self, client_id: str, headers: Mapping[str, str], *, transparent: bool,
                      llm: bool) -> Found:
        """One request (`headers` with lower-case names). Raises Unauthorized."""
        if transparent:
            return self._transparent(headers, llm)
        tunnel = self.tunnels.get(client_id)
        if tunnel is not None:
            if llm:  # verified by the reverse route, refused there in the provider's shape
                return Found(None, tunnel)
            return Found(await self.auth.identify({}, "", credential=tunnel))
        cred = self._proxy_credential(headers)
        if cred is not None:
            identity = await self.auth.identify({}, "", credential=cred)
            if identity.agent is not None:
                return Found(identity, identity)
        elif self.required:
            raise self._missing()
        return Found(None) if llm else Found(self._in_band(headers))

    def _proxy_credential(self, headers: Mapping[str, str]) -> Credential | None:
        try:
            return from_proxy_authorization(headers.get(PROXY_AUTHORIZATION))
        except Unauthorized as e:
            self._count(e.reason)
            raise

    def _count(self, reason: str) -> None:
        if self.auth.metrics is not None:
            self.auth.metrics.auth_failures.labels(reason).inc()

    def _transparent(self, headers: Mapping[str, str], llm: bool) -> Found:
        if self.transparent_agent is not None:
            identity = Identity(self.transparent_agent, {}, "transparent")
            return Found(identity, identity)
        if llm:
            return Found(None)
        if self.required:
            raise self._missing("a transparent connection carries no identity and "
                                "auth.mode is required; set forward.transparent_agent to the "
                                "agent this pod runs")
        return Found(self._in_band(headers))

    def _in_band(self, headers: Mapping[str, str]) -> Identity:
        """Optional mode without a proxy credential: a configured static key among the
        request's own headers, else the trusted header, else nobody."""
        named = agent_of(headers, self.agent_keys, self.trust_headers)
        return Identity(named, {}, "header") if named else ANONYMOUS

    def _missing(self, message: str = "proxy authentication is required: send your tether "
                 "key or token as Proxy-Authorization (Bearer), or as the password of the "
                 "proxy URL (http://agent:TOKEN@host:port)") -> Unauthorized:
        self._count(Reason.MISSING.value)
        return refuse(Reason.MISSING, message)
