# Which tools an agent of a tenant may call, and where http_post may go.
package sluice.gate

# Allowed when the tenant lists the tool and, if the tenant narrows this agent
# to its own list, that list has it too.
tool_ok if {
	input.tool in settings.tools
	agent_ok
}

agent_ok if not settings.agents[input.agent]

agent_ok if input.tool in settings.agents[input.agent]

# Dangerous tools are denied even when a tenant lists them. Binding the list
# first makes missing data fail closed instead of "not in nothing".
tool_safe if {
	dangerous := data.gate.tools.dangerous
	not input.tool in dangerous
}

host_ok if input.tool != "http_post"

# input.url_host is the lower-cased host of args.url when it is an http(s)
# URL (userinfo skipped, so "https://api.acme.example@evil.example/" is judged
# by evil.example), else null: parsed by the gate, since regex in Rego is slow.
host_ok if {
	input.tool == "http_post"
	host_allowed(input.url_host)
}

host_allowed(host) if host in settings.http_hosts

# "*.example.org" allows every subdomain of example.org, not example.org itself.
# is_string first: the interpreter raises on endswith(null), where the RVM
# is merely undefined.
host_allowed(host) if {
	is_string(host)
	some pattern in settings.http_hosts
	startswith(pattern, "*.")
	endswith(host, substring(pattern, 1, -1))
}
