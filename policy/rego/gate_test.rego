# Rego unit tests of the reference policies; `sluice policy check` runs them.
# Not part of the enforced bundle (nor of its version): files ending in
# _test.rego are skipped by the gate.
package sluice.gate_test

import data.sluice.gate

base := {
	"tenant": "acme",
	"agent": "assistant",
	"tool": "echo",
	"args_kib": 1,
	"url_host": null,
	"amount": null,
	"pii": [],
	"spend": 0,
	"calls_in_window": 0,
	"usage": null,
}

with_fields(patch) := object.union(base, patch)

test_echo_allowed if {
	d := gate.decision with input as base
	d.decision == "allow"
	d.cost == 1
}

test_unknown_tool_denied if {
	d := gate.decision with input as with_fields({"tool": "deploy"})
	d.decision == "deny"
	"tool_not_allowed" in d.reasons
}

test_dangerous_denied_even_when_listed if {
	d := gate.decision with input as with_fields({"tenant": "globex", "tool": "shell"})
	d.reasons == ["dangerous_tool"]
}

test_unknown_tenant_gets_defaults if {
	allowed := gate.decision with input as with_fields({"tenant": "nobody", "tool": "search"})
	allowed.decision == "allow"
	denied := gate.decision with input as with_fields({"tenant": "nobody", "tool": "http_post", "url_host": "api.acme.example"})
	denied.reasons == ["host_not_allowed", "tool_not_allowed"]
}

test_agent_narrowed if {
	ok := gate.decision with input as with_fields({"agent": "reporter", "tool": "search"})
	ok.decision == "allow"
	no := gate.decision with input as with_fields({"agent": "reporter", "tool": "calculator"})
	no.reasons == ["tool_not_allowed"]
}

test_http_hosts if {
	exact := gate.decision with input as with_fields({"tool": "http_post", "url_host": "api.acme.example"})
	exact.decision == "allow"
	sub := gate.decision with input as with_fields({"tool": "http_post", "url_host": "a.hooks.acme.example"})
	sub.decision == "allow"
	bare := gate.decision with input as with_fields({"tool": "http_post", "url_host": "hooks.acme.example"})
	bare.reasons == ["host_not_allowed"]
	none := gate.decision with input as with_fields({"tool": "http_post", "url_host": null})
	none.reasons == ["host_not_allowed"]
}

test_budget if {
	last := gate.decision with input as with_fields({"spend": 99})
	last.decision == "allow"
	over := gate.decision with input as with_fields({"spend": 100})
	over.reasons == ["budget_exceeded"]
}

usage(session_total) := {"total_tokens": 100, "session_total_tokens": session_total}

# globex: token_budget 20000 per session.
test_token_budget if {
	last := gate.decision with input as with_fields({"tenant": "globex", "usage": usage(20000)})
	last.decision == "allow"
	over := gate.decision with input as with_fields({"tenant": "globex", "usage": usage(20001)})
	over.decision == "deny"
	over.reasons == ["token_budget_exceeded"]
}

test_no_token_budget_is_unlimited if {
	d := gate.decision with input as with_fields({"usage": usage(1000000000)})
	d.decision == "allow"
	unknown := gate.decision with input as with_fields({"tenant": "nobody", "usage": usage(1000000000)})
	unknown.decision == "allow"
}

test_no_usage_spends_no_tokens if {
	d := gate.decision with input as with_fields({"tenant": "globex", "usage": null})
	d.decision == "allow"
}

test_token_budget_fails_closed if {
	# usage not passed at all (a bundle that does not declare it), or a budget
	# that is not a number: denied, never let through.
	missing := gate.decision with input as object.remove(with_fields({"tenant": "globex"}), ["usage"])
	missing.reasons == ["token_budget_exceeded"]
	bad := gate.decision with input as with_fields({"tenant": "globex", "usage": usage(1)})
		with data.gate.tenants.globex.token_budget as "lots"
	bad.reasons == ["token_budget_exceeded"]
}

test_token_budget_with_other_reasons if {
	d := gate.decision with input as with_fields({"tenant": "globex", "spend": 20, "usage": usage(20001)})
	d.reasons == ["budget_exceeded", "token_budget_exceeded"]
}

test_rate if {
	ok := gate.decision with input as with_fields({"calls_in_window": 59})
	ok.decision == "allow"
	limited := gate.decision with input as with_fields({"calls_in_window": 60})
	limited.reasons == ["rate_limited"]
}

test_size if {
	d := gate.decision with input as with_fields({"args_kib": 5})
	d.reasons == ["args_too_large"]
}

test_pii_masks if {
	findings := [
		{"kind": "email", "path": ["to"], "match": "bob@example.com"},
		{"kind": "card", "path": ["text"], "match": "4111 1111 1111 1111", "digits": "4111111111111111", "luhn": true},
		{"kind": "card", "path": ["text"], "match": "4111 1111 1111 1112", "digits": "4111111111111112", "luhn": false},
	]
	d := gate.decision with input as with_fields({"pii": findings})
	d.decision == "redact"
	d.reasons == ["pii_redacted"]
	{"path": ["to"], "match": "bob@example.com", "mask": "[email]"} in d.masks
	{"path": ["text"], "match": "4111 1111 1111 1111", "mask": "[card ****1111]"} in d.masks
	count(d.masks) == 2
}

test_tenant_redacts_only_its_kinds if {
	findings := [{"kind": "email", "path": ["to"], "match": "bob@example.com"}]
	d := gate.decision with input as with_fields({"tenant": "globex", "pii": findings})
	d.decision == "allow"
}

test_missing_input_denies if {
	d := gate.decision with input as {"tool": "echo"}
	d.decision == "deny"
}

test_refund_up_to_threshold_allowed if {
	d := gate.decision with input as with_fields({"tool": "refund", "amount": 100})
	d.decision == "allow"
}

test_refund_over_threshold_held if {
	d := gate.decision with input as with_fields({"tool": "refund", "amount": 250})
	d.decision == "hold"
	d.reasons == ["refund_over_threshold"]
	d.cost == 1
}

test_refund_threshold_per_tenant if {
	d := gate.decision with input as with_fields({"tenant": "globex", "tool": "refund", "amount": 250})
	d.decision == "allow"
	held := gate.decision with input as with_fields({"tenant": "globex", "tool": "refund", "amount": 501})
	held.decision == "hold"
}

test_refund_without_amount_denied if {
	d := gate.decision with input as with_fields({"tool": "refund", "amount": null})
	d.reasons == ["invalid_amount"]
	negative := gate.decision with input as with_fields({"tool": "refund", "amount": -5})
	negative.reasons == ["invalid_amount"]
}

test_deny_wins_over_hold if {
	d := gate.decision with input as with_fields({"tool": "refund", "amount": 250, "spend": 100})
	d.decision == "deny"
	d.reasons == ["budget_exceeded"]
}
