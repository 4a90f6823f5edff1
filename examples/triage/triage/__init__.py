"""Support-ticket triage: a small sluicegate app (see ../README.md)."""
