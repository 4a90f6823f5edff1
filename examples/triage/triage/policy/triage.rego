# The triage app's own policy. The gate queries `data.sluice.gate.decision`
# (see sluicegate's policy/rego/gate.rego for the shapes it accepts) with the
# input fields data.json lists: tenant, tool and args.
package sluice.gate

tools := {"route_ticket", "auto_reply"}

reasons contains "tool_not_allowed" if not tool_ok

# The rule of this app: a machine answers only tickets that are not urgent;
# an urgent one goes to a person.
reasons contains "urgent_needs_human" if not reply_ok

tool_ok if input.tool in tools

reply_ok if input.tool != "auto_reply"

reply_ok if input.args.urgency == "low"

decision := {"decision": "deny", "reasons": sort(reasons), "masks": []} if {
	count(reasons) > 0
} else := {"decision": "allow", "reasons": [], "cost": 0, "masks": []}
