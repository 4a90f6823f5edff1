# The policy gate's entry point: one decision document per proposed action.
#
# The gate queries `data.sluice.gate.decision` and accepts exactly these shapes
# (anything else, or no value at all, is a deny with `policy_error`):
#
#   {"decision": "allow",  "reasons": [],                 "cost": N, "masks": []}
#   {"decision": "redact", "reasons": ["pii_redacted"],   "cost": N, "masks": [MASK, ...]}
#   {"decision": "deny",   "reasons": ["<code>", ...],       "masks": [MASK, ...]}
#   {"decision": "hold",   "reasons": ["<code>", ...], "cost": N, "masks": [MASK, ...]}
#
# A hold waits for a person (`sluice approvals approve|deny`) or its deadline
# (SLUICE_APPROVAL_TIMEOUT, then denied with `approval_timeout`); its masks are
# applied before anyone sees the arguments, and its cost is charged if approved.
#
# MASK is {"path": [key or index, ...], "match": "<substring>", "mask": "<replacement>"}:
# the gate replaces `match` by `mask` in the string at `path` of the arguments
# (of a denied action too, so PII does not travel on the denied topic either).
#
# The input (built by the gate, see policy/features.py) carries exactly what
# the policy may read, because the gate caches decisions keyed on it: the
# fields listed in data.gate.input. `args` (the raw arguments) is available
# when listed; it is not here, so decisions are reused across argument texts
# that give the same facts:
#
#   tenant, agent, tool              from the action.proposed event
#   args_kib                         size of args as compact JSON, KiB rounded up
#   url_host                         host of args.url if an http(s) URL, else null
#   amount                           args.amount if a number, else null (refunds)
#   pii                              PII candidates found in args (see pii.rego)
#   spend                            spent so far in this session (gate state)
#   calls_in_window                  allowed calls in the sliding rate window (gate state)
#   usage                            model tokens behind the plan, from the planner:
#                                    {"total_tokens", "session_total_tokens"} or null
#
# Style: every deny reason is the negation of a positive check (`not x_ok`).
# The RVM turns runtime errors (bad types, missing data) into "undefined", and
# `not undefined` is true, so a broken check denies instead of letting through.
package sluice.gate

# Settings of the tenant, over the defaults; unknown tenants get the defaults.
settings := object.union(data.gate.defaults, object.get(data.gate.tenants, input.tenant, {}))

reasons contains "tool_not_allowed" if not tool_ok

reasons contains "dangerous_tool" if not tool_safe

reasons contains "host_not_allowed" if not host_ok

reasons contains "args_too_large" if not size_ok

reasons contains "budget_exceeded" if not budget_ok

reasons contains "token_budget_exceeded" if not tokens_ok

reasons contains "rate_limited" if not rate_ok

# Deny wins over hold, hold over redact, redact over allow.
decision := {"decision": "deny", "reasons": sort(reasons), "masks": masks} if {
	count(reasons) > 0
} else := {"decision": "hold", "reasons": sort(holds), "cost": cost, "masks": masks} if {
	count(holds) > 0
} else := {"decision": "redact", "reasons": ["pii_redacted"], "cost": cost, "masks": masks} if {
	count(masks) > 0
} else := {"decision": "allow", "reasons": [], "cost": cost, "masks": []}
