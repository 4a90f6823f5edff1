"""``sluice db migrate``: bring the Postgres schema up to date.

Thin: the work is in ``sinks.migrate``; this module loads settings
(SLUICE_DATABASE_URL, SLUICE_DB_SCHEMA), runs it and prints the outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import psycopg
from psycopg import errors

from sluicegate.cli import load_settings
from sluicegate.settings import Settings
from sluicegate.sinks.db import check_schema, connect
from sluicegate.sinks.migrate import MigrationError, migrate


@click.group()
def db() -> None:
    """The Postgres side: schema migrations.

    Uses SLUICE_DATABASE_URL (unset: the local stack's Postgres) and the
    schema SLUICE_DB_SCHEMA (default sluice), where every table lives.
    """


@db.command("migrate")
@click.option(
    "--schema",
    default=None,
    help="Schema to migrate (default: SLUICE_DB_SCHEMA, else sluice).",
)
def migrate_command(schema: str | None) -> None:
    """Apply the migrations the database has not seen yet, each in its own transaction.

    Safe to run again (it then applies nothing) and from several workers at
    once (they take turns on an advisory lock).
    """
    if schema is not None:
        try:
            check_schema(schema)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--schema") from None
    settings = load_settings(db_schema=schema)
    url = settings.resolved_database_url()
    try:
        applied = asyncio.run(migrate(url, schema=settings.db_schema))
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"cannot reach Postgres at {_redacted(url)}: {exc}") from None
    except (MigrationError, psycopg.Error) as exc:
        raise click.ClickException(f"migration failed: {exc}") from None
    if not applied:
        click.echo(f"schema {settings.db_schema}: up to date")
        return
    for version in applied:
        click.echo(f"schema {settings.db_schema}: applied {version}")


T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


def run_on_database(
    settings: Settings,
    work: Callable[[Conn], Awaitable[T]],
    *,
    tables: str,
    what: str,
    refusals: tuple[type[Exception], ...] = (),
) -> T:
    """Run ``work`` on a connection to ``settings``' schema, every failure as one line.

    The commands that read or write the database (audit, approvals) share it:
    unreachable Postgres, a schema without ``tables`` (not migrated), a failed
    query (``what`` failed), and the command's own ``refusals`` (their message
    as it is) each become a ``ClickException``.
    """
    url = settings.resolved_database_url()

    async def main() -> T:
        try:
            conn = await connect(url, schema=settings.db_schema)
        except psycopg.OperationalError as exc:
            raise click.ClickException(
                f"cannot reach Postgres at {_redacted(url)}: {exc}"
            ) from None
        async with conn:
            return await work(conn)

    try:
        return asyncio.run(main())
    except refusals as exc:
        raise click.ClickException(str(exc)) from None
    except errors.UndefinedTable:
        raise click.ClickException(
            f"schema {settings.db_schema} has no {tables}; run `sluice db migrate` first"
        ) from None
    except psycopg.Error as exc:
        raise click.ClickException(f"{what} failed: {exc}") from None


def _redacted(url: str) -> str:
    """``url`` without a password, for error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid SLUICE_DATABASE_URL>"
    host = info.get("host", "localhost")
    port = info.get("port", 5432)
    name = info.get("dbname", "")
    return f"{host}:{port}/{name}"
