"""The request-side check of provider-run tools, for the LLM routes.

Runs after the agent-scope filter and before anything goes upstream. Each
provider-run tool is decided by `Governor.decide` under its canonical name
(policy/provider_tools.py), so it is audited like any call; a tool no rule
mentions follows `defaults.undeclared_tools` (deny by default) rather than
`defaults.action` (policy/engine.py), since no call for it ever comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from ..audit.log import AuditWriteError
from ..governor import Governor
from ..model import Decision, Effect, Exchange, ToolCall
from ..policy.provider_tools import ProviderTools
from ..providers import provider_run
from ..providers.base import ParsedRequest, Route, WireFormat
from ..surrogates import json_text

log = logging.getLogger("tether.server")

type Gate = Callable[[bytes, ProviderTools, provider_run.Judge], provider_run.Gated]

# Wire formats (WireFormat.name) whose requests may declare provider-run tools.
GATES: Mapping[str, Gate] = {
    "openai.responses": provider_run.openai,
    "anthropic.messages": provider_run.anthropic,
    "bedrock.invoke": provider_run.anthropic,  # an Anthropic body in Bedrock's path
    "gemini.generate": provider_run.gemini,
}


def judge_for(governor: Governor, exchange: Exchange, request_id: str) -> provider_run.Judge:
    def judge(name: str, effect: Effect, arguments: Mapping[str, object]) -> Decision:
        asked = replace(exchange, declared_tools=(name,))  # declared: it is in the request
        call = ToolCall(id=f"provider-tool:{name}", name=name,
                        raw_arguments=json_text(dict(arguments)), arguments=arguments)
        return governor.decide(call, asked, request_id=request_id,
                               effect=effect, stage="request")

    return judge


def apply(governor: Governor, settings: ProviderTools, fmt: WireFormat, body: bytes,
          parsed: ParsedRequest, route: Route, exchange: Exchange, request_id: str
          ) -> tuple[bytes, ParsedRequest, Mapping[str, frozenset[str]]]:
    """The body to send (narrowed where needed), its parse, and (OpenAI MCP servers) the
    tools whose approval requests the agent itself asked for. Raises
    `ProviderToolRefused` (400) when a provider-run tool is not allowed."""
    result = gate(governor, settings, fmt.name, body, exchange, request_id)
    if result.body is None:
        return body, parsed, result.agent_approves
    return result.body, fmt.parse_request(result.body, route), result.agent_approves


def gate(governor: Governor, settings: ProviderTools, format_name: str, body: bytes,
         exchange: Exchange, request_id: str) -> provider_run.Gated:
    """What to send: `body` None sends the agent's bytes unchanged."""
    check = GATES.get(format_name)
    if check is None:
        return provider_run.Gated(None)
    result = check(body, settings, judge_for(governor, exchange, request_id))
    if result.body is None:
        return result
    try:  # narrowing is the safe side: a lost record is logged, not fatal
        governor.audit.write({
            "kind": "provider_tools_narrowed", "request_id": request_id,
            "provider": exchange.provider, "endpoint": exchange.endpoint,
            "session": exchange.session, "agent": exchange.agent,
            "narrowed": list(result.narrowed), "policy_revision": governor.engine.revision})
    except AuditWriteError:
        log.exception("audit write failed for narrowed provider tools")
        governor.metrics.audit_write_errors.inc()
    return result
