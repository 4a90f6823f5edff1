"""``sluice audit keygen|seal``: sign the audit chains' heads with a key kept elsewhere.

The rules live in ``sinks.seals``; ``sluice audit verify --public-key``
(``cli_audit``) checks the trail against the seals. README, "Sealing the
audit trail", says where to keep the key and how often to seal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
import psycopg

from sluicegate.sinks import seals

Conn = psycopg.AsyncConnection[Any]

ENV_SEAL_KEY = "SLUICE_AUDIT_SEAL_KEY"


@click.command("keygen")
@click.option(
    "--private-key",
    "private_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the private key (PEM, mode 0600). Keep it off the database host.",
)
@click.option(
    "--public-key",
    "public_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the public key (PEM), for `sluice audit verify --public-key`.",
)
def keygen_command(private_path: Path, public_path: Path) -> None:
    """Make a new Ed25519 key pair for sealing the audit trail."""
    try:
        kid = seals.generate_keys(private_path, public_path)
    except (seals.SealError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"key {kid}: private {private_path}, public {public_path}")


@click.command("seal")
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=ENV_SEAL_KEY,
    required=True,
    help=f"The Ed25519 private key (PEM), default ${ENV_SEAL_KEY}.",
)
@click.option(
    "--schema", default=None, help="Schema holding the tables (default: SLUICE_DB_SCHEMA)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the seal as one JSON object.")
def seal_command(key_path: Path, schema: str | None, as_json: bool) -> None:
    """Sign every chain's current head and append the seal to audit_seals.

    Prints the seal: keep a copy outside the database too (a log shipper, a
    ticket, another store), so removing seals from the table shows.
    """
    from sluicegate.cli import load_settings
    from sluicegate.cli_audit import _run

    try:
        key = seals.load_private_key(key_path)
    except (seals.SealError, ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from None
    db_schema = load_settings(db_schema=schema).db_schema

    async def work(conn: Conn) -> tuple[int, bytes, str]:
        try:
            return await seals.seal(conn, key, schema=db_schema, now=datetime.now(UTC))
        except seals.SealError as exc:
            raise click.ClickException(str(exc)) from None

    seal_id, signed, signature = _run(schema, work)
    doc = orjson.loads(signed)
    if as_json:
        click.echo(orjson.dumps({"id": seal_id, "document": doc, "signature": signature}).decode())
        return
    click.echo(
        f"seal {seal_id}: {len(doc['heads'])} chain heads signed by key {doc['key_id']} "
        f"at {doc['sealed_at']}"
    )
