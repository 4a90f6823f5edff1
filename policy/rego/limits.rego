# Spend budget, token budget, rate limit and argument size.
#
# Spend and the rate window live in the gate's keyed state, which the runtime
# keys per (tenant, session): `session_budget` is therefore a budget per
# session of a tenant, not across all of the tenant's sessions. The same goes
# for `token_budget`: the tokens come from the planner's keyed state, also per
# (tenant, session).
package sluice.gate

cost := object.get(data.gate.tools.costs, input.tool, data.gate.tools.default_cost)

budget_ok if input.spend + cost <= settings.session_budget

# `calls_in_window` counts the allowed calls in the sliding minute before this
# event's time; this call would be one more.
rate_ok if input.calls_in_window < settings.rate_per_minute

size_ok if input.args_kib <= settings.max_args_kib

# Model tokens. `input.usage` is what the planner reported for the model call
# that made this plan: `session_total_tokens` is the session's running total
# after that call (null usage: planned without a model, e.g. the rule-based
# planner, which spends none). A tenant's `token_budget` caps that total; a
# tenant without one (the default) is unlimited. Every action of the plan
# whose call passed the budget is denied, and so is every later one of the
# session: the tokens are spent already, what is refused is acting on them.
tokens_ok if object.get(settings, "token_budget", null) == null

tokens_ok if input.usage == null

# is_number first: a budget of the wrong type compares with anything (Rego
# orders values across types), and must deny, not let through.
tokens_ok if {
	is_number(settings.token_budget)
	input.usage.session_total_tokens <= settings.token_budget
}
