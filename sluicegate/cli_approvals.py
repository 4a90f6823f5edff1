"""``sluice approvals list|approve|deny``: the actions the policy gate holds for a person.

Thin: the table and its rules live in ``sinks.approvals``. Deciding writes
the decision to Postgres only; the worker that owns the action's session
picks it up within about a second (the gate's tick), runs or refuses the
action and writes the decision, who made it and why to the audit trail.
Who decides is ``--as NAME``, else the OS user at this host. Exit codes:
0 fine, 1 an unknown or already decided action or an unreachable database,
2 a bad flag.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson
import psycopg

from sluicegate.cli import load_settings
from sluicegate.cli_db import run_on_database
from sluicegate.dlq import operator
from sluicegate.sinks import approvals as table
from sluicegate.sinks.db import check_schema
from sluicegate.streams.approvals import PENDING, ApprovalError

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


@click.group()
def approvals() -> None:
    """Held actions: list them, approve or deny one.

    Uses SLUICE_DATABASE_URL (unset: the local stack's Postgres) and the
    schema SLUICE_DB_SCHEMA (default sluice).
    """


@approvals.command("list")
@click.option("--tenant", default=None, help="Only this tenant's actions.")
@click.option("--all", "show_all", is_flag=True, help="Decided actions too, not only pending.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per held action.")
def list_command(tenant: str | None, show_all: bool, limit: int, as_json: bool) -> None:
    """Held actions waiting for a decision, oldest first."""

    async def fetch(conn: Conn) -> list[table.Approval]:
        status = None if show_all else PENDING
        return await table.list_approvals(conn, status=status, tenant=tenant, limit=limit)

    rows = _run(fetch)
    now = datetime.now(UTC)
    if as_json:
        for row in rows:
            doc = row.as_json()
            # Past its deadline but not yet timed out (no worker has ticked on it since).
            doc["expired"] = row.status == PENDING and row.deadline <= now
            click.echo(orjson.dumps(doc).decode())
        return
    if not rows:
        click.echo("no held actions" if not show_all else "no approvals", err=True)
        return
    for row in rows:
        args = orjson.dumps(row.args).decode()
        line = (
            f"{row.id}  {row.status}  tenant={row.tenant} session={row.session} "
            f"task={row.task_id}  {row.tool} {args}  reasons={','.join(row.reasons)}  "
            f"deadline={_time(row.deadline)}"
        )
        if row.status != PENDING:
            line += f"  by={row.decided_by}: {row.decided_reason}"
        elif row.deadline <= now:
            line += "  (past its deadline: denied at the next tick, or if decided now)"
        click.echo(line)


def _decide_command(approved: bool) -> Callable[..., None]:
    verb = "approve" if approved else "deny"

    @click.argument("approval_id", metavar="ID")
    @click.option("--reason", required=True, help="Why; recorded in the audit trail.")
    @click.option(
        "--as", "as_name", default=None, help="Who decides (default: the OS user at this host)."
    )
    def command(approval_id: str, reason: str, as_name: str | None) -> None:
        if not reason.strip():
            raise click.BadParameter("must not be empty", param_hint="--reason")
        who = (as_name or "").strip() or operator()

        async def decide(conn: Conn) -> table.Approval:
            return await table.decide(
                conn,
                approval_id,
                approved=approved,
                by=who,
                reason=reason.strip(),
                now=datetime.now(UTC),
            )

        row = _run(decide)
        click.echo(
            f"{row.id}: {row.status} by {row.decided_by} ({row.tool} of task {row.task_id}); "
            "the gate resumes it within a few seconds"
        )

    command.__doc__ = f"{verb.capitalize()} the held action ID, with --reason."
    return approvals.command(verb)(command)


approve_command = _decide_command(True)
deny_command = _decide_command(False)


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(work: Callable[[Conn], Awaitable[T]]) -> T:
    """Run ``work`` on a connection to the configured schema, with errors as one line."""
    settings = load_settings()
    check_schema(settings.db_schema)
    return run_on_database(
        settings,
        work,
        tables="approvals table",
        what="approvals query",
        refusals=(ApprovalError,),
    )
