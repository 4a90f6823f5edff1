# `sluice policy check triage/policy` runs these (files ending in _test.rego
# are not part of the enforced bundle).
package sluice.gate_test

import data.sluice.gate

test_routing_is_allowed if {
	d := gate.decision with input as {"tenant": "acme", "tool": "route_ticket", "args": {"urgency": "high"}}
	d.decision == "allow"
}

test_a_calm_ticket_gets_an_automatic_reply if {
	d := gate.decision with input as {"tenant": "acme", "tool": "auto_reply", "args": {"urgency": "low"}}
	d.decision == "allow"
}

test_an_urgent_ticket_goes_to_a_person if {
	d := gate.decision with input as {"tenant": "acme", "tool": "auto_reply", "args": {"urgency": "high"}}
	d.reasons == ["urgent_needs_human"]
}

test_other_tools_are_denied if {
	d := gate.decision with input as {"tenant": "acme", "tool": "shell", "args": {}}
	d.reasons == ["tool_not_allowed"]
}
