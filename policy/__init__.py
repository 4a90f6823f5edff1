"""The policy gate (a step), the Rego engine wrapper and the decision model."""
