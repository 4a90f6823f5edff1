"""Migrations on the real Postgres: idempotent, safe concurrently; the append-only trigger."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import MigrationError, available_migrations, migrate
from sluicegate.sinks.store import PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord

pytestmark = pytest.mark.integration

TABLES = {
    "schema_migrations",
    "step_offsets",
    "step_state",
    "results",
    "audit_log",
    "audit_chains",
    "approvals",
    "api_keys",
    "audit_seals",
}


@pytest.fixture
async def fresh_schema(database_url: str) -> AsyncIterator[str]:
    """A schema name no test used before (not created); dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


async def tables_in(conn: psycopg.AsyncConnection[Any], schema: str) -> set[str]:
    cur = await conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    )
    return {name for (name,) in await cur.fetchall()}


def test_migrations_ship_in_version_order() -> None:
    versions = [m.version for m in available_migrations()]
    assert versions and versions == sorted(versions)
    assert all(re.fullmatch(r"\d{4}_[a-z0-9_]+", v) for v in versions)


async def test_migrate_applies_once_then_is_up_to_date(
    database_url: str, fresh_schema: str
) -> None:
    everything = [m.version for m in available_migrations()]
    assert await migrate(database_url, schema=fresh_schema) == everything
    assert await migrate(database_url, schema=fresh_schema) == []
    conn = await connect(database_url, schema=fresh_schema)
    async with conn:
        assert await tables_in(conn, fresh_schema) == TABLES
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [v for (v,) in await cur.fetchall()] == everything


async def test_concurrent_migrations_take_turns(database_url: str, fresh_schema: str) -> None:
    outcomes = await asyncio.gather(*(migrate(database_url, schema=fresh_schema) for _ in range(4)))
    everything = [m.version for m in available_migrations()]
    assert sorted(outcomes, key=len) == [[], [], [], everything]


async def test_an_edited_applied_migration_is_refused(database_url: str, fresh_schema: str) -> None:
    await migrate(database_url, schema=fresh_schema)
    conn = await connect(database_url, schema=fresh_schema)
    async with conn:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited'")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(database_url, schema=fresh_schema)


async def test_schemas_are_independent(database_url: str, fresh_schema: str) -> None:
    other = f"{fresh_schema}_b"
    try:
        await migrate(database_url, schema=fresh_schema)
        assert await migrate(database_url, schema=other) != []
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other))
            )


def test_cli_db_migrate(database_url: str, fresh_schema: str) -> None:
    from click.testing import CliRunner

    from sluicegate.cli_db import db

    env = {"SLUICE_DATABASE_URL": database_url, "SLUICE_DB_SCHEMA": fresh_schema}
    first = CliRunner().invoke(db, ["migrate"], env=env)
    assert first.exit_code == 0, first.output
    assert first.output == (
        f"schema {fresh_schema}: applied 0001_initial\n"
        f"schema {fresh_schema}: applied 0002_writer_role\n"
        f"schema {fresh_schema}: applied 0003_ownership_epochs\n"
        f"schema {fresh_schema}: applied 0004_dlq_replay\n"
        f"schema {fresh_schema}: applied 0005_approvals\n"
        f"schema {fresh_schema}: applied 0006_api_keys\n"
        f"schema {fresh_schema}: applied 0007_audit_seals\n"
    )
    again = CliRunner().invoke(db, ["migrate", "--schema", fresh_schema], env=env)
    assert (again.exit_code, again.output) == (0, f"schema {fresh_schema}: up to date\n")
    bad = CliRunner().invoke(db, ["migrate", "--schema", "No-Such"], env=env)
    assert bad.exit_code == 2
    env["SLUICE_DATABASE_URL"] = "postgresql://postgres:secret@127.0.0.1:9/postgres"
    down = CliRunner().invoke(db, ["migrate"], env=env)
    assert down.exit_code == 1
    assert "cannot reach Postgres at 127.0.0.1:9/postgres" in down.output
    assert "secret" not in down.output


@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("UPDATE audit_log SET decision = 'allow'", "UPDATE"),
        ("UPDATE audit_log SET decision = 'allow' WHERE false", "UPDATE"),
        ("DELETE FROM audit_log", "DELETE"),
        ("TRUNCATE audit_log", "TRUNCATE"),
    ],
)
async def test_audit_log_is_append_only(
    database_url: str, fresh_schema: str, statement: str, operation: str
) -> None:
    await migrate(database_url, schema=fresh_schema)
    store = await PostgresCheckpointStore.connect(database_url, schema=fresh_schema)
    try:
        audit = AuditRecord(
            kind="processed", step="s", event_id="e1", event_type="t", tenant="a", session="b"
        )
        await store.commit(CommitBatch(step="s", audit=[(0, audit)]))
    finally:
        await store.close()
    conn = await connect(database_url, schema=fresh_schema)
    async with conn:
        with pytest.raises(errors.InsufficientPrivilege, match=f"append-only: {operation}"):
            await conn.execute(statement.encode())
        cur = await conn.execute("SELECT count(*), min(decision) FROM audit_log")
        assert await cur.fetchone() == (1, None)
