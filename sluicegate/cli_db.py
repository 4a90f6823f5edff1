"""``sluice db migrate``: bring the Postgres schema up to date.

Thin: the work is in ``sinks.migrate``; this module loads settings
(SLUICE_DATABASE_URL, SLUICE_DB_SCHEMA), runs it and prints the outcome.
"""

from __future__ import annotations

import asyncio

import click
import psycopg

from sluicegate.cli import load_settings
from sluicegate.sinks.db import check_schema
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
