"""``sluice keys create|list|revoke``: the gateway's tenant-scoped API keys.

Thin: the keys live in ``sinks.api_keys`` (table ``api_keys``, migration
0006). A key is printed once, when it is made; only its hash is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson
import psycopg
from psycopg import errors

from sluicegate.cli import load_settings
from sluicegate.sinks import api_keys
from sluicegate.sinks.db import connect

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


@click.group()
def keys() -> None:
    """API keys for `sluice serve`: each belongs to one tenant.

    Uses SLUICE_DATABASE_URL (unset: the local stack's Postgres) and the
    schema SLUICE_DB_SCHEMA (default sluice).
    """


def _run(action: Callable[[Conn], Awaitable[T]]) -> T:
    settings = load_settings()

    async def go() -> T:
        conn = await connect(
            settings.resolved_database_url(),
            schema=settings.db_schema,
            connect_timeout=settings.db_connect_timeout,
        )
        try:
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except errors.UndefinedTable:
        raise click.ClickException(
            f"schema {settings.db_schema!r} has no api_keys table: run `sluice db migrate` first"
        ) from None


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant everything the key does belongs to.")
@click.option("--label", default=None, help="A note to tell keys apart in `sluice keys list`.")
def create(tenant: str, label: str | None) -> None:
    """Make a key for TENANT and print it, once: it is stored only as a hash."""
    try:
        api_keys.check_tenant(tenant)
    except api_keys.ApiKeyError as exc:
        raise click.BadParameter(str(exc), param_hint="'--tenant'") from None
    made = _run(lambda conn: api_keys.create_key(conn, tenant, label=label))
    click.echo(made.key)
    click.echo(
        f"key {made.key_id} for tenant {made.tenant!r}: keep it now, it is not shown again",
        err=True,
    )


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(tenant: str | None, as_json: bool) -> None:
    """Keys, oldest first: id, tenant, label, when made and when revoked (never the key)."""
    found = _run(lambda conn: api_keys.list_keys(conn, tenant=tenant))
    for key in found:
        if as_json:
            line = {
                "key_id": key.key_id,
                "tenant": key.tenant,
                "label": key.label,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }
            click.echo(orjson.dumps(line).decode())
        else:
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M:%S}" if key.revoked_at else "active"
            label = f"  {key.label}" if key.label else ""
            click.echo(
                f"{key.key_id}  {key.tenant}  {key.created_at:%Y-%m-%d %H:%M:%S}  {state}{label}"
            )
    if not found and not as_json:
        click.echo("no keys", err=True)


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke the key KEY_ID (as `sluice keys list` shows it, or the whole key).

    A running gateway stops taking it within SLUICE_GATEWAY_KEY_CACHE seconds.
    """
    parsed = api_keys.parse_key(key_id)
    key_id = parsed[0] if parsed else key_id
    revoked = _run(lambda conn: api_keys.revoke_key(conn, key_id))
    if revoked is None:
        raise click.ClickException(f"no key {key_id!r}")
    click.echo(f"key {revoked.key_id} of tenant {revoked.tenant!r} revoked", err=True)
