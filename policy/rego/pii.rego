# PII in arguments: which findings to mask, and with what.
#
# The gate finds the candidates before evaluation (input.pii), with the
# patterns of this bundle's data (data.gate.pii.patterns, Python `re` syntax):
# regorus compiles a regex on every call (35-600 us each, measured), which
# alone would cost more than the whole decision budget. Each finding is
# {"kind", "path", "match"}, plus "digits" and "luhn" (checksum passed) for the
# kinds listed under data.gate.pii.checksums. Which kinds a tenant redacts,
# and how the mask reads, is decided here.
package sluice.gate

masks contains {"path": f.path, "match": f.match, "mask": sprintf("[%s]", [f.kind])} if {
	some f in input.pii
	f.kind != "card"
	f.kind in settings.redact
}

# Card numbers only when they pass the Luhn check, so order numbers and the
# like are left alone; the mask keeps the last four digits.
masks contains {"path": f.path, "match": f.match, "mask": sprintf("[card ****%s]", [last4])} if {
	some f in input.pii
	f.kind == "card"
	"card" in settings.redact
	f.luhn == true
	last4 := substring(f.digits, count(f.digits) - 4, 4)
}
