"""Schema migrations: plain SQL files under ``sinks/migrations``, applied once each.

A migration is ``NNNN_name.sql``; its version is the file stem
(``0001_initial``). ``migrate`` applies, in version order, every migration not
yet recorded in ``schema_migrations``, each in its own transaction together
with its record, so a failure leaves the schema at the previous version.

Two workers may migrate at once: a session-level advisory lock, keyed by the
schema name, serialises them, and the second finds nothing left to do. An
applied migration whose file changed since is an error, not something to
paper over: the database no longer matches the code that describes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from sluicegate.sinks.db import DEFAULT_SCHEMA, check_schema, connect
from sluicegate.streams.errors import SluiceError

# A data directory without __init__.py (pyproject ships it as package data of
# ``sinks``). Read as the namespace package ``sinks.migrations`` rather than as
# ``files("sinks") / "migrations"``: that also works when ``sinks`` itself is
# imported as a namespace package, as an editable install made before the
# package had an __init__.py does.
MIGRATIONS_PACKAGE = "sluicegate.sinks.migrations"


class MigrationError(SluiceError, RuntimeError):
    """The database's migration record disagrees with the migration files."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    root = resources.files(MIGRATIONS_PACKAGE)
    found = [
        Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in root.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


def advisory_key(schema: str) -> int:
    """A stable signed 64-bit lock key for migrating ``schema``."""
    digest = hashlib.sha256(f"sluicegate.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(conninfo: str, *, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """Bring ``schema`` up to date; return the versions applied (empty when up to date)."""
    check_schema(schema)
    migrations = available_migrations()
    conn = await connect(conninfo, schema=schema, autocommit=True)
    try:
        # Session-level, so it spans the per-migration transactions below; it
        # is released by the unlock or, if we die, by the session ending.
        await conn.execute("SELECT pg_advisory_lock(%s)", (advisory_key(schema),))
        try:
            await _prepare(conn, schema)
            applied = await _applied(conn)
            _check_unchanged(migrations, applied)
            done: list[str] = []
            for migration in migrations:
                if migration.version not in applied:
                    await _apply(conn, migration)
                    done.append(migration.version)
            return done
        finally:
            if not conn.broken:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(schema),))
    finally:
        await conn.close()


async def pending(conninfo: str, *, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """Versions not yet applied to ``schema`` (all of them when it does not exist)."""
    check_schema(schema)
    conn = await connect(conninfo, schema=schema, autocommit=True)
    try:
        cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        applied = await _applied(conn) if row and row[0] else {}
    finally:
        await conn.close()
    return [m.version for m in available_migrations() if m.version not in applied]


async def _prepare(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    # Under the lock: CREATE ... IF NOT EXISTS is not safe against a
    # concurrent creator of the same object.
    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY,"
        " checksum text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )


async def _applied(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
    return {version: checksum for version, checksum in await cur.fetchall()}


def _check_unchanged(migrations: list[Migration], applied: dict[str, str]) -> None:
    for migration in migrations:
        stored = applied.get(migration.version)
        if stored is not None and stored != migration.checksum:
            raise MigrationError(
                f"migration {migration.version} was changed after it was applied "
                "(checksum differs); add a new migration instead of editing an applied one"
            )


async def _apply(conn: psycopg.AsyncConnection[Any], migration: Migration) -> None:
    async with conn.transaction():
        # No parameters: psycopg sends the file as one simple query, which
        # allows the several statements a migration holds.
        await conn.execute(migration.sql.encode())
        await conn.execute(
            "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
            (migration.version, migration.checksum),
        )
