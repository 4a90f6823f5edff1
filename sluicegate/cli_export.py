"""``sluice audit export --format opa``: the gate's decisions as OPA decision-log lines.

The event shape is ``sinks.opa_export``'s; this writes one JSON object per
line to stdout (or ``--output``), oldest first.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click
import orjson
import psycopg

from sluicegate.sinks import opa_export

Conn = psycopg.AsyncConnection[Any]


def _since_type() -> click.ParamType:
    from sluicegate.cli_audit import SinceType

    return SinceType()


@click.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["opa"]),
    required=True,
    help="opa: OPA decision-log events, one JSON object per line.",
)
@click.option(
    "--since",
    type=_since_type(),
    default=None,
    help="Only decisions from then on: a duration ago (15m, 2h, 3d) or an ISO time.",
)
@click.option("--tenant", default=None, help="Only this tenant's decisions.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file instead of stdout.",
)
@click.option(
    "--schema", default=None, help="Schema holding the tables (default: SLUICE_DB_SCHEMA)."
)
def export_command(
    fmt: str, since: datetime | None, tenant: str | None, output: Path | None, schema: str | None
) -> None:
    """Export the policy gate's decisions from the audit trail.

    PII the policy masks stays masked, and the event lists where (``masked``).
    """
    from sluicegate.cli_audit import _run

    def write(sink: IO[bytes]) -> int:
        async def work(conn: Conn) -> int:
            n = 0
            async for doc in opa_export.events(conn, since=since, tenant=tenant):
                sink.write(orjson.dumps(doc) + b"\n")
                n += 1
            return n

        return _run(schema, work)

    if output is None:
        written = write(click.get_binary_stream("stdout"))
    else:
        try:
            with output.open("wb") as sink:
                written = write(sink)
        except OSError as exc:
            raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
        click.echo(f"{written} decisions written to {output}", err=True)
