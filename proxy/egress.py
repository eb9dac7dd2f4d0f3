"""Egress judgement shared by both front ends: the `/apis/{name}/` reverse route
and the forward proxy (HTTP_PROXY) judge a tool-API or cloud request here, so a
request is decided the same way whichever door it came through.

It takes a neutral `HttpRequest` and answers with a `Verdict`; it never
forwards anything and imports neither aiohttp nor mitmproxy. It does await: a
hold waits on the same approvals as the LLM side (`Holds.resolve`). Every
outcome is audited through the Governor: judged requests as decisions,
requests refused whole (ambiguous) through `Governor.reject`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .approvals.context import HoldContext
from .approvals.holds import TETHER, Holds, KeepAlive
from .audit import AuditWriteError
from .audit.outcomes import Outcome, hold_record
from .forward.lookup_settings import LookupSettings
from .governor import AUDIT_ERROR, Governor
from .linked_calls import LinkedCalls
from .model import Action, Decision, Effect, Exchange, HttpRequest, RuleTrace, ToolCall
from .policy.apis_config import Apis, ToolApi
from .policy.cloud import CloudCatalog, CloudOperation, Refused, Unclassified
from .policy.openapi_judge import INVALID_REQUEST, METHOD_OVERRIDE, UNKNOWN_OPERATION, judge
from .policy.tool_apis import NO_DECIDED_CALL
from .sessions.ledger import Entry

if TYPE_CHECKING:
    from .opa.client import OpaClient

log = logging.getLogger("tether.egress")

AMBIGUOUS = "ambiguous_request"
UNKNOWN_CLOUD = "tether:unknown-cloud-operation"
AMBIGUOUS_CLOUD = "tether:ambiguous-request"
LOOKUP_FAILED = "tether:lookup-failed"
CODES = {UNKNOWN_OPERATION: "unknown_operation", INVALID_REQUEST: "invalid_request",
         METHOD_OVERRIDE: "method_override", UNKNOWN_CLOUD: "unknown_cloud_operation",
         LOOKUP_FAILED: "lookup_failed", NO_DECIDED_CALL: "no_decided_call"}


@dataclass(frozen=True, slots=True)
class Egress:
    """What the forward proxy needs beyond its targets to judge tool and cloud traffic."""

    apis: Apis = field(default_factory=Apis)
    catalog: CloudCatalog | None = None
    holds: Holds | None = None          # None: holds end denied (nobody to approve)
    agent_keys: Mapping[str, str] = field(default_factory=dict)
    trust_headers: bool = True
    lookups: LookupSettings = field(default_factory=LookupSettings)  # cloud.lookups
    opa: OpaClient | None = None        # None: no `opa:` section
    linked: LinkedCalls | None = None   # None: no tool call is redeemed (linked_calls.py)


@dataclass(frozen=True, slots=True)
class Who:
    """The request as audited: its id, caller, and `target` (the path, or host + path),
    which the audit's endpoint shows after the method the request was judged as."""

    rid: str
    session: str | None
    agent: str | None
    target: str
    claims: Mapping[str, object] = field(default_factory=dict)  # verified (auth.jwt.claims)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Forward (`allowed`) or answer `status` with `body()`; `operation` names what the
    request was judged as (`jira.createIssue`, `aws.ec2.DeleteVolume`)."""

    allowed: bool
    status: int = 200
    code: str = ""
    message: str = ""
    rule: str | None = None
    rules: tuple[str, ...] = ()
    operation: str | None = None

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "rule": self.rule, "rules": list(self.rules),
                          "code": self.code}}

    def json(self) -> bytes:
        return json.dumps(self.body()).encode()


ALLOWED = Verdict(True)


def deciding_rule(decision: Decision) -> str | None:
    """The rule whose action won (the first, when several did)."""
    for trace in decision.trace:
        if trace.matched and trace.action is decision.action:
            return trace.rule_id
    return decision.rules[0] if decision.rules else None


def api_for_host(apis: Apis, host: str) -> ToolApi | None:
    """The `apis:` entry whose `hosts` name `host` (the first, in config order)."""
    for api in apis.apis.values():
        if api.serves(host):
            return api
    return None


async def judge_api(governor: Governor, holds: Holds | None, api: ToolApi, http: HttpRequest,
                    who: Who, alive: KeepAlive | None, base_path: str = "", *,
                    opa: OpaClient | None = None, linked: LinkedCalls | None = None) -> Verdict:
    """An `apis:` request: operation of the spec (else denied), its parameters and body
    checked, method overrides judged, then the rules (`api: jira.createIssue`)."""
    judged = judge(api.spec, http, base_path)
    if judged.refusal:
        governor.reject(provider=api.provider, status=400, code=AMBIGUOUS, message=judged.refusal,
                        request_id=who.rid, session=who.session, agent=who.agent,
                        endpoint=who.target)
        return Verdict(False, 400, AMBIGUOUS, judged.refusal)
    args = dict(judged.arguments)
    call = ToolCall(id=who.rid, name=judged.tool(api.name),
                    raw_arguments=json.dumps(args, ensure_ascii=False), arguments=args)
    op = judged.operation
    what = f"{judged.method} {judged.path}" + (f" ({op.name})" if op else "")
    return await _decide(governor, holds, call, api.provider, who, judged.method, alive, what,
                         extra=(judged.denial,) if judged.denial else (),
                         api=op.name if op else None, effect=judged.effect, opa=opa,
                         linked=linked)


async def judge_cloud(governor: Governor, holds: Holds | None,
                      found: CloudOperation | Unclassified | Refused, http: HttpRequest,
                      who: Who, alive: KeepAlive | None, *, provider: str,
                      pass_unclassified: bool = False, extra: tuple[RuleTrace, ...] = (),
                      opa: OpaClient | None = None, linked: LinkedCalls | None = None,
                      wire_arguments: Mapping[str, object] | None = None) -> Verdict:
    """A cloud API request, as `proxy.policy.cloud.classify` read it; `extra`: verdicts
    from outside the rules on a named operation (a failed tag lookup). `wire_arguments`:
    the request's own arguments, before a tag lookup added facts (what a linked tool
    call is compared with; default: the operation's arguments)."""
    if isinstance(found, Refused):
        message = f"[tether] The {found.cloud} request was refused: {found.reason}. It was not forwarded."
        governor.reject(provider=provider, status=403, code=AMBIGUOUS_CLOUD, message=message,
                        request_id=who.rid, session=who.session, agent=who.agent,
                        endpoint=f"{http.method} {who.target}")
        return Verdict(False, 403, AMBIGUOUS, message, AMBIGUOUS_CLOUD, (AMBIGUOUS_CLOUD,))
    if isinstance(found, Unclassified):
        name = f"{found.cloud}:{http.method} {http.host}{http.path}"
        extra = () if pass_unclassified else (RuleTrace(
            UNKNOWN_CLOUD, True, f"tether cannot name this {found.cloud} operation ({found.reason}); "
            "it counts as an unknown write", Action.DENY),)
        call = ToolCall(id=who.rid, name=name, raw_arguments="{}", arguments={})
        return await _decide(governor, holds, call, provider, who, http.method, alive,
                             f"{http.method} {http.path}", extra=extra, api=None,
                             effect=Effect.WRITE, opa=opa, linked=linked)
    args = dict(found.arguments)
    call = ToolCall(id=who.rid, name=found.operation,
                    raw_arguments=json.dumps(args, ensure_ascii=False, default=str), arguments=args)
    return await _decide(governor, holds, call, provider, who, http.method, alive, found.api,
                         extra=extra,
                         api=found.api, effect=found.effect, opa=opa, linked=linked,
                         wire=found.arguments if wire_arguments is None else wire_arguments)


async def _decide(governor: Governor, holds: Holds | None, call: ToolCall, provider: str,
                  who: Who, method: str, alive: KeepAlive | None, what: str, *,
                  extra: tuple[RuleTrace, ...], api: str | None, effect: Effect,
                  opa: OpaClient | None = None, linked: LinkedCalls | None = None,
                  wire: Mapping[str, object] | None = None) -> Verdict:
    exchange = Exchange(provider=provider, model="", declared_tools=(call.name,),
                        session=who.session, agent=who.agent, endpoint=f"{method} {who.target}",
                        claims=who.claims)
    if opa is not None:  # OPA's verdict joins the rules': the strictest wins
        extra = (*extra, await opa.judge(call, exchange, "egress", api=api, effect=effect))
    # The tool call this request carries out, taken from the ledger before deciding (so
    # two requests cannot both redeem it); given back below if the request is not sent.
    entry: Entry | None = None
    if linked is not None:
        redeemed = await linked.redeem(agent=who.agent, session=who.session, operation=api,
                                       arguments=(call.arguments or {}) if wire is None else wire,
                                       effect=effect)
        entry = redeemed.entry
        extra = (*extra, redeemed.trace) if redeemed.trace else extra
    decision = governor.decide(call, exchange, request_id=who.rid, extra=extra, api=api,
                               effect=effect, linked=entry.decision_id if entry else None)
    try:
        verdict = await _resolve(governor, holds, call, exchange, decision, who, alive, what,
                                 api, entry)
    except BaseException:
        if entry is not None and linked is not None:
            await linked.give_back(entry)
        raise
    if entry is not None and linked is not None and not verdict.allowed:
        await linked.give_back(entry)
    return verdict


def _linked_release(governor: Governor, call: ToolCall, exchange: Exchange, held: Decision,
                    entry: Entry) -> Decision:
    """A hold answered by the approval of the tool call this request carries out: no
    second human, and the hold's record names the LLM-side decision."""
    final = Decision(Action.ALLOW, held.rules,
                     f"the tool call {entry.tool} it carries out was {entry.approved_by} "
                     f"(decision {entry.decision_id})", held.on_deny, held.effect,
                     decision_id=held.decision_id)
    record = hold_record(call, exchange, held, final, Outcome.APPROVED, by=TETHER,
                         reason=f"the approved tool call {entry.tool} "
                                f"(decision {entry.decision_id})")
    record["linked_decision"] = entry.decision_id
    try:
        governor.audit.write(record)
    except AuditWriteError:
        log.exception("audit write failed for the end of a hold")
        governor.metrics.fail_closed.labels("audit").inc()
        return Decision(Action.DENY, held.rules + (AUDIT_ERROR,),
                        "approved, but the audit log cannot be written", held.on_deny,
                        held.effect, decision_id=held.decision_id)
    return final


async def _resolve(governor: Governor, holds: Holds | None, call: ToolCall, exchange: Exchange,
                   decision: Decision, who: Who, alive: KeepAlive | None, what: str,
                   api: str | None, entry: Entry | None) -> Verdict:
    if decision.action is Action.HOLD and entry is not None and entry.approved_by:
        decision = _linked_release(governor, call, exchange, decision, entry)
    if decision.action is Action.HOLD:
        if holds is None:
            held, why = decision, "held, but no approvals are available on this front end"
            decision = Decision(Action.DENY, held.rules, why, effect=held.effect,
                                trace=held.trace, decision_id=held.decision_id)
            try:
                governor.audit.write(hold_record(call, exchange, held, decision, Outcome.DENIED,
                                                 by=TETHER, reason=why))
            except AuditWriteError:
                log.exception("audit write failed for the end of a hold")
        else:
            try:
                # The approver sees the operation as decisions name it (`aws.ec2.DeleteVolume`);
                # a request has no conversation, so no user request or model text.
                [decision] = await holds.resolve([call], [decision], exchange, alive,
                                                 [HoldContext(api=api or call.name)])
            except ConnectionResetError:
                log.info("the client disconnected while its request was held (%s)", who.rid)
                return Verdict(False, 499, "client_gone", "the client disconnected while waiting",
                               operation=api)
    if decision.allowed:
        return Verdict(True, operation=api)
    rule = deciding_rule(decision)
    message = (f"[tether] The request {what} was denied by {rule or 'policy'}: "
               f"{decision.message or 'it is not allowed'}. It was not forwarded.")
    return Verdict(False, 403, CODES.get(rule or "", "request_denied"), message, rule,
                   decision.rules, api)
