# An example tether policy for Open Policy Agent (or tether's embedded rego-cpp).
#
# tether asks for data.tether.decision with the input document described in the
# docs/opa.md (the input document): version, source, agent, claims, session, provider,
# model, endpoint, tool, arguments, raw_arguments, effect, api, declared_tools,
# budget. An answer allows only when it is true or has allow: true;
# action: hold sends the call to a human; reason is shown to the agent.
#
#   reads      allowed
#   writes     denied unless the agent is a writer (named in data.json, or its
#              verified claims carry the writer role)
#   big writes by writers (size_gb over the limit, or a session that has spent
#              more than hold_cost_usd) wait for a human
#
# The logic is a function of the input (`decide`), so tests call it with a
# document directly: rego-cpp 1.5.2 mis-evaluates `with input as {...}` over
# rules that depend on other input-dependent rules.
package tether

import rego.v1

decision := decide(input)

decide(inp) := {"allow": true} if {
	inp.effect == "read"
} else := {"allow": false, "reason": reason} if {
	inp.effect == "write"
	not writer(inp)
	reason := sprintf("agent %v may not make write calls: it needs the %v role",
		[object.get(inp, "agent", null), data.tether_config.writer_role])
} else := {"allow": false, "action": "hold", "reason": concat("; ", sort(reasons))} if {
	inp.effect == "write"
	reasons := expensive(inp)
	count(reasons) > 0
} else := {"allow": true} if {
	inp.effect == "write"
} else := {"allow": false, "reason": "no OPA rule allows this call"}

writer(inp) if inp.agent in data.tether_config.writers

writer(inp) if data.tether_config.writer_role in object.get(inp.claims, "roles", [])

# Why a write is big enough to need a human (empty: it is not).
expensive(inp) := {r | inp.arguments.size_gb > data.tether_config.hold_size_gb
	r := sprintf("size_gb %v is over %v", [inp.arguments.size_gb, data.tether_config.hold_size_gb])} | {r |
	inp.budget.used.cost_usd > data.tether_config.hold_cost_usd
	r := sprintf("the session has spent $%v, over $%v", [inp.budget.used.cost_usd, data.tether_config.hold_cost_usd])}
