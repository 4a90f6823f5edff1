"""Postgres: migrations, the audit writer, the state and offset checkpoint store, queries."""
