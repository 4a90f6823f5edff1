# Spend budget, rate limit and argument size.
#
# Spend and the rate window live in the gate's keyed state, which the runtime
# keys per (tenant, session): `session_budget` is therefore a budget per
# session of a tenant, not across all of the tenant's sessions.
package sluice.gate

cost := object.get(data.gate.tools.costs, input.tool, data.gate.tools.default_cost)

budget_ok if input.spend + cost <= settings.session_budget

# `calls_in_window` counts the allowed calls in the sliding minute before this
# event's time; this call would be one more.
rate_ok if input.calls_in_window < settings.rate_per_minute

size_ok if input.args_kib <= settings.max_args_kib
