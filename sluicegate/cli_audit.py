"""``sluice audit verify|show|seal|keygen|export``: check, read, seal and export the audit trail.

Thin: the chain rules live in ``sinks.audit``, the queries in
``sinks.queries``; this module parses flags, opens the connection
(SLUICE_DATABASE_URL, SLUICE_DB_SCHEMA) and prints. Exit codes follow
``sluicegate.cli``: 0 fine, 1 a broken chain or an unreachable database,
2 a bad flag.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
import psycopg

from sluicegate.cli import load_settings
from sluicegate.cli_db import run_on_database
from sluicegate.sinks import queries, seals
from sluicegate.sinks.audit import ChainBreak
from sluicegate.sinks.db import check_schema
from sluicegate.sinks.queries import AUDIT_KINDS, AuditRow, VerifyReport

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Conn = psycopg.AsyncConnection[Any]


@click.group()
def audit() -> None:
    """The audit trail in Postgres: verify its hash chains, show a session's timeline.

    Uses SLUICE_DATABASE_URL (unset: the local stack's Postgres) and the
    schema SLUICE_DB_SCHEMA (default sluice).
    """


def _schema_option(func: F) -> F:
    return click.option(
        "--schema",
        default=None,
        help="Schema holding the tables (default: SLUICE_DB_SCHEMA, else sluice).",
    )(func)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


# --- verify ---------------------------------------------------------------------------


@audit.command("verify")
@click.option(
    "--public-key",
    "public_keys",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="Also hold the trail to every seal, signed by this key (repeat after a rotation).",
)
@_schema_option
@_json_option
@click.pass_context
def verify_command(
    ctx: click.Context, public_keys: tuple[Path, ...], schema: str | None, as_json: bool
) -> None:
    """Recompute every hash chain and name the rows where any breaks.

    With --public-key, also check every seal (`sluice audit seal`): its
    signature, and that each chain head it signed is still the row's hash.
    That catches the database owner who rewrites rows, recomputes the hashes
    and moves the heads, which the chains alone cannot show.

    Reads the whole trail once, a page at a time, in one read-only snapshot
    (safe while workers write). Finds edited rows (hash mismatch), removed
    rows (gap in sequence), re-linked or reordered rows (prev_hash not
    matching), and rows removed from or forged onto the end of a chain (the
    head in audit_chains disagrees). A progress bar goes to stderr on a
    terminal.
    """
    try:
        keys = [seals.load_public_key(path) for path in public_keys]
    except seals.SealError as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from None
    started = time.perf_counter()
    report = _run(schema, _verify)
    sealed, problems = _run(schema, lambda conn: seals.check_seals(conn, keys)) if keys else (0, [])
    elapsed = time.perf_counter() - started
    if as_json:
        out = _report_json(report, elapsed)
        if keys:
            out["ok"] = report.ok and not problems
            out["seals"] = sealed
            out["seal_problems"] = [_seal_problem_json(p) for p in problems]
        click.echo(orjson.dumps(out).decode())
        if not out["ok"]:
            ctx.exit(1)
        return
    for found in report.breaks:
        click.echo(f"BROKEN {found} [{found.problem}]")
    for problem in problems:
        click.echo(f"BROKEN {problem} [{problem.problem}]")
    read = (
        f"{report.rows:,} rows in {elapsed:.1f} s ({report.rows / max(elapsed, 1e-9):,.0f} rows/s)"
    )
    if not report.ok:
        raise click.ClickException(
            f"audit trail broken: {len(report.breaks)} of {report.chains} chains ({read})"
        )
    if problems:
        raise click.ClickException(
            f"audit trail does not match its seals: {len(problems)} problem(s) in {sealed} seals"
        )
    held = f", every one of {sealed} seals holds" if keys else ""
    click.echo(f"audit trail intact: {report.chains} chains, {read}{held}")


def _seal_problem_json(problem: seals.SealProblem) -> dict[str, Any]:
    return {
        "seal_id": problem.seal_id,
        "problem": problem.problem,
        "reason": problem.reason,
        "chain_step": problem.chain_step,
        "chain_partition": problem.chain_partition,
        "seq": problem.seq,
    }


async def _verify(conn: Conn) -> VerifyReport:
    total = await queries.estimate_audit_rows(conn)
    with _progress_bar(total) as advance:
        return await queries.verify_chains(conn, progress=advance)


def _progress_bar(total: int) -> AbstractContextManager[Callable[[int], object] | None]:
    """A tqdm bar on stderr when it is a terminal; nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        return nullcontext(None)
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit="row", unit_scale=True, desc="verifying", leave=False)
    return _BarContext(bar)


class _BarContext:
    """Closes the bar on exit and hands out its ``update`` as the progress callback."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __enter__(self) -> Callable[[int], object]:
        update: Callable[[int], object] = self.bar.update
        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _report_json(report: VerifyReport, elapsed: float) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "chains": report.chains,
        "rows": report.rows,
        "seconds": round(elapsed, 3),
        "breaks": [_break_json(found) for found in report.breaks],
    }


def _break_json(found: ChainBreak) -> dict[str, Any]:
    return {
        "chain_step": found.chain_step,
        "chain_partition": found.chain_partition,
        "seq": found.seq,
        "event_id": found.event_id,
        "problem": found.problem,
        "reason": found.reason,
    }


# --- show ------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``15m``, ``2h``, ``3d`` (that long ago) or an ISO 8601 time (UTC unless it says).

    Raises ``ValueError`` with a message fit for the user.
    """
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 15m, 2h, 3d, 1w) "
            "nor an ISO time (2025-01-31T12:00:00Z)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class SinceType(click.ParamType):
    """``--since``: checked while parsing flags, so a bad value exits 2 before any I/O."""

    name = "duration|time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@audit.command("show")
@click.option("--session", default=None, help="The session whose timeline to show.")
@click.option("--tenant", default=None, help="Only this tenant's rows.")
@click.option(
    "--kind", type=click.Choice(AUDIT_KINDS), default=None, help="Only rows of this kind."
)
@click.option(
    "--since",
    type=SinceType(),
    default=None,
    help="Only rows from then on: a duration ago (15m, 2h, 3d) or an ISO time.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most N rows, without --session.",
)
@_schema_option
@_json_option
def show_command(
    session: str | None,
    tenant: str | None,
    kind: str | None,
    since: datetime | None,
    limit: int,
    schema: str | None,
    as_json: bool,
) -> None:
    """Print a session's audit timeline, or every row of one --kind, oldest first.

    Give --session, or --kind (e.g. --kind dead_letter) to see that kind
    across sessions. A table (time, step, kind, event type, task or event
    id, decision, policy version, trace id, reasons), or with --json one JSON
    object per row with every column.
    """
    if session is None and kind is None:
        raise click.UsageError("give --session S, or --kind K to list one kind across sessions")

    async def fetch(conn: Conn) -> list[AuditRow]:
        if session is None:
            assert kind is not None
            return await queries.audit_by_kind(conn, kind, tenant=tenant, since=since, limit=limit)
        return await queries.session_audit(conn, session, tenant=tenant, kind=kind, since=since)

    rows = _run(schema, fetch)
    if as_json:
        for row in rows:
            click.echo(row_json(row))
        return
    if not rows:
        what = f"session {session!r}" if session is not None else f"kind {kind}"
        click.echo(f"no audit rows for {what} with these filters", err=True)
        return
    for line in format_table(rows):
        click.echo(line)


_HEADERS = (
    "TIME",
    "STEP",
    "KIND",
    "EVENT TYPE",
    "TASK/EVENT ID",
    "DECISION",
    "POLICY",
    "TRACE ID",
    "REASONS",
)


def format_table(rows: Sequence[AuditRow]) -> list[str]:
    """Rows as an aligned plain-text table, header first.

    Plain columns rather than a box-drawing table: the output is grepped and
    piped as often as read, and does not wrap at the terminal's width.
    Reasons come last because they are the one unbounded column.
    """
    cells = [_HEADERS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_HEADERS) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
        for line in cells
    ]


def _cells(row: AuditRow) -> tuple[str, ...]:
    return (
        _time_text(row.time),
        row.step,
        row.kind,
        row.event_type or "-",
        _task_or_event(row),
        row.decision or "-",
        _short_version(row.policy_version),
        row.trace_id or "-",
        _reasons_text(row),
    )


def _reasons_text(row: AuditRow) -> str:
    """The reasons; for an approval also who decided and why (its point in a timeline)."""
    text = "; ".join(row.reasons) or "-"
    detail = row.detail if isinstance(row.detail, dict) else {}
    if row.kind == "approval" and detail.get("by"):
        text += f" (by {detail['by']}: {detail.get('reason') or '-'})"
    return text


def _task_or_event(row: AuditRow) -> str:
    """The task a row is about when it says (the id an upstream system knows), else its event."""
    task = row.detail.get("task_id") if isinstance(row.detail, dict) else None
    return f"task {task}" if isinstance(task, str) and task else row.event_id


def _time_text(value: datetime) -> str:
    """UTC, to the millisecond: a table row needs no more."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _short_version(version: str | None) -> str:
    """``sha256:`` and 12 hex digits, like a short git hash (--json has it whole)."""
    if version is None:
        return "-"
    algorithm, sep, digest = version.partition(":")
    return f"{algorithm}:{digest[:12]}" if sep and len(digest) > 12 else version


def row_json(row: AuditRow) -> str:
    """One row as a JSON line: every column, the time in RFC 3339 UTC."""
    doc = {name: getattr(row, name) for name in AuditRow.__dataclass_fields__}
    doc["time"] = row.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return orjson.dumps(doc).decode()


# --- the database ------------------------------------------------------------------


def _run(schema: str | None, work: Callable[[Conn], Awaitable[T]]) -> T:
    """Run ``work`` on a connection to the configured schema, with errors as one line."""
    if schema is not None:
        try:
            check_schema(schema)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--schema") from None
    settings = load_settings(db_schema=schema)
    return run_on_database(settings, work, tables="audit tables", what="audit query")


# `keygen`, `seal` and `export` live in their own modules; they belong to this group.
def _add_commands() -> None:
    from sluicegate.cli_export import export_command
    from sluicegate.cli_seal import keygen_command, seal_command

    audit.add_command(keygen_command)
    audit.add_command(seal_command)
    audit.add_command(export_command)


_add_commands()
