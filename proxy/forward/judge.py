"""Tool and cloud API requests met on the forward proxy, judged as on the reverse routes.

An agent that reaches Jira or EC2 through HTTP_PROXY must meet the same policy
as one sent to `/apis/jira/`: the same `judge_api` and `judge_cloud`, the same
holds, the same audit. Only the edges differ: the request comes from a
mitmproxy flow, and a denial is set as the flow's reply (the `/apis/` body, or
the cloud's own error shape). A cloud operation whose rules need its
resources' tags is judged with the tags tether looked up itself, from an
address checked as any other; a lookup that fails denies
(`tether:lookup-failed`): the rules never judge without the facts they name.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from mitmproxy import http
from mitmproxy.connection import ConnectionState

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
from ..ids import new_id
from ..model import Action, HttpRequest, RuleTrace
from ..paths import canonical_tail
from ..policy.apis_config import ToolApi
from ..policy.cloud import CloudHost, CloudOperation, classify, cloud_host
from .lookup_settings import LookupSettings
from .lookups import CloudLookup, LookupFailed, Lookups
from .lookups_aws import AwsTagLookup
from .lookups_azure import AzureTagLookup
from .lookups_gcp import GcpLabelLookup
from .refusals import PROVIDER, Refusals, judged_as, outcome
from .resolve import Resolver, check_all, preferred, resolve
from .settings import ForwardSettings
from .targets import Refusal, Targets, norm_host

log = logging.getLogger("tether.forward")


def cloud_lookups(settings: LookupSettings, upstream_ca: str | None) -> Lookups:
    """The lookups of every cloud `cloud.lookups` configures (each does nothing until
    its `tags: true`)."""
    by_cloud: dict[str, CloudLookup] = {"aws": AwsTagLookup(settings, upstream_ca)}
    if settings.azure is not None:
        by_cloud["azure"] = AzureTagLookup(settings.azure, upstream_ca)
    if settings.gcp is not None:
        by_cloud["gcp"] = GcpLabelLookup(settings.gcp, upstream_ca)
    return Lookups(by_cloud)


class ApiJudge:
    def __init__(self, governor: Governor, egress: Egress, lookup: Lookups,
                 refusals: Refusals) -> None:
        self.governor = governor
        self.egress = egress
        self.lookup = lookup
        self.refusals = refusals

    def api(self, host: str) -> ToolApi | None:
        return api_for_host(self.egress.apis, host)

    def governed(self, host: str) -> bool:
        """An `apis:` host or a cloud API host: judged per request, never passed blind."""
        return self.api(host) is not None or cloud_host(host, self.egress.catalog) is not None

    async def judge(self, flow: http.HTTPFlow, host: str, targets: Targets,
                    resolver: Resolver | None) -> bool:
        """Judge one tool or cloud API request; False when a reply was set instead."""
        req = flow.request
        rid = new_id()
        raw_path, _, query = req.path.partition("?")
        fields = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers.fields)
        headers = {k.lower(): v for k, v in fields}
        trust = self.egress.trust_headers
        identity = judged_as(flow)
        who = Who(rid, (headers.get("x-tether-session") if trust else None) or None,
                  identity.agent if identity else None, f"{norm_host(host)}{raw_path}",
                  claims=identity.claims if identity else {})
        api = self.api(host)
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
            return outcome(flow, verdict, cloud, rid)
        alive = _alive(flow)
        if api is not None:
            verdict = await judge_api(self.governor, self.egress.holds, api, http_req, who, alive,
                                      api.base_path, opa=self.egress.opa,
                                      linked=self.egress.linked)
            return outcome(flow, verdict, None, rid)
        found = classify(http_req, self.egress.catalog)
        if found is None:  # cloud_host said it was one; classify disagrees: never guess
            self.refusals.refuse(flow, Refusal("tether:internal-error", "cloud host not classified"),
                                 provider=provider)
            return False
        exact_pass = norm_host(host) in exact_pass_hosts(targets.settings)
        extra: tuple[RuleTrace, ...] = ()
        wire = None  # the request's own arguments, before a lookup adds tags
        if isinstance(found, CloudOperation):
            wire = found.arguments
            found, extra = await self._looked_up(found, http_req, targets, resolver)
        verdict = await judge_cloud(self.governor, self.egress.holds, found, http_req, who, alive,
                                    provider=provider, pass_unclassified=exact_pass, extra=extra,
                                    opa=self.egress.opa, linked=self.egress.linked,
                                    wire_arguments=wire)
        service = getattr(found, "service", None) or service
        return outcome(flow, verdict, (found.cloud, service, http_req), rid)

    async def _looked_up(self, found: CloudOperation, http_req: HttpRequest, targets: Targets,
                         resolver: Resolver | None) -> tuple[CloudOperation, tuple[RuleTrace, ...]]:
        """`found` with the facts `cloud.lookups` asks for (resource tags), or a deny
        verdict when they cannot be had: the rules must never judge without them."""
        try:
            ids = self.lookup.wanted(found)
            if not ids:
                return found, ()
            host, port = self.lookup.where(found, http_req)
            addresses = await resolve(host, port, resolver)
            refusal = check_all(targets, host, port, addresses) if addresses \
                else Refusal("tether:dns", f"{host} does not resolve")
            if refusal is not None:
                raise LookupFailed(refusal.message)
            address = str(preferred(addresses))
            args = await self.lookup.tags(found, http_req, ids, address)
        except LookupFailed as e:
            log.warning("tag lookup for %s failed: %s", found.api, e)
            return found, (RuleTrace(LOOKUP_FAILED, True, f"tether could not look up the tags of "
                                     f"the resources it names ({e})", Action.DENY),)
        return replace(found, arguments=args), ()


def exact_pass_hosts(settings: ForwardSettings) -> frozenset[str]:
    """`forward.pass_hosts` entries that name one host exactly (no wildcard): only
    these let an operation tether cannot name through."""
    return frozenset(h for h in settings.pass_hosts if "*" not in h)


def client_gone(flow: http.HTTPFlow) -> bool:
    """The client closed (or half-closed: mitmproxy keeps the task open to write, but an
    HTTP client that sent FIN will not read an answer it no longer waits for)."""
    client = flow.client_conn
    return (client.timestamp_end is not None or flow.error is not None
            or not (client.state & ConnectionState.CAN_READ))


def _alive(flow: http.HTTPFlow) -> KeepAlive:
    """A held request whose client has gone must not run when approved."""

    async def check(_: str) -> None:
        if client_gone(flow):
            raise ConnectionResetError("the client's connection closed")

    return check
