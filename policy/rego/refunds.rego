# Refunds: allowed up to the tenant's threshold (data.json, `refund_threshold`,
# default 100), held for a person above it, denied when the amount is not a
# positive number (a refund of nothing, or of an amount nobody can read, is
# a planner's mistake, not something to approve).
package sluice.gate

reasons contains "invalid_amount" if {
	input.tool == "refund"
	not amount_ok
}

amount_ok if {
	is_number(input.amount)
	input.amount > 0
}

# `holds` are the reasons to ask a person; deny reasons win over them.
holds contains "refund_over_threshold" if {
	input.tool == "refund"
	amount_ok
	not refund_within_threshold
}

# A missing or non-numeric threshold makes this undefined: the refund is held
# (fail towards a person, never towards paying out).
refund_within_threshold if input.amount <= settings.refund_threshold
