# Tests for tether.rego, OPA style: `tether opa-test rules/opa` (or `opa test rules/opa`).
# They call tether.decide(document) rather than `decision with input as ...`: rego-cpp
# 1.5.2, which tether embeds, mis-evaluates `with input as` over dependent rules.
package tether_test

import rego.v1

import data.tether

read := {"version": 1, "source": "llm", "agent": "janitor", "claims": {}, "effect": "read",
	"tool": "list_volumes", "arguments": {}}

write(agent, claims, args) := {"version": 1, "source": "llm", "agent": agent, "claims": claims,
	"effect": "write", "tool": "resize_volume", "arguments": args}

test_read_is_allowed if {
	tether.decide(read) == {"allow": true}
}

test_write_without_the_role_is_denied_with_a_reason if {
	d := tether.decide(write("janitor", {}, {"size_gb": 10}))
	d.allow == false
	not d.action
	contains(d.reason, "needs the deployer role")
	contains(d.reason, "janitor")
}

test_write_by_a_named_writer_is_allowed if {
	tether.decide(write("deployer-bot", {}, {"size_gb": 10})) == {"allow": true}
}

test_write_by_a_claimed_role_is_allowed if {
	tether.decide(write("someone", {"roles": ["deployer"]}, {"size_gb": 10})) == {"allow": true}
}

test_a_role_of_another_name_is_not_enough if {
	not tether.decide(write("someone", {"roles": ["viewer"]}, {"size_gb": 10})).allow
}

test_big_write_is_held if {
	d := tether.decide(write("deployer-bot", {}, {"size_gb": 900}))
	d.action == "hold"
	contains(d.reason, "size_gb 900 is over 500")
}

test_write_in_an_expensive_session_is_held if {
	inp := object.union(write("deployer-bot", {}, {"size_gb": 1}), {"budget": {"used": {"cost_usd": 2.5}}})
	d := tether.decide(inp)
	d.action == "hold"
	contains(d.reason, "spent $2.5")
}

test_unparsed_arguments_are_judged_by_effect_alone if {
	inp := object.union(write("janitor", {}, {}), {"arguments": null, "raw_arguments": "{not json"})
	not tether.decide(inp).allow
}

test_an_unknown_effect_is_denied if {
	d := tether.decide({"effect": "other"})
	d.allow == false
	d.reason == "no OPA rule allows this call"
}
