"""Postgres: migrations, the audit writer, the state and offset checkpoint store, queries.

- ``sinks.migrate``: the SQL migrations under ``sinks/migrations`` and ``migrate()``;
- ``sinks.store``: ``PostgresCheckpointStore``, the runner's ``CheckpointStore``;
- ``sinks.audit``: the audit hash chain (canonical JSON, hashing, verification);
- ``sinks.queries``: typed read helpers for the CLI and tests;
- ``sinks.db``: connections with the schema's ``search_path``.

Imports ``streams`` and third-party libraries only, never ``sluicegate``.
"""
