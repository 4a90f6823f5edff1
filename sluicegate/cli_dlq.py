"""``sluice dlq list|show|replay``: the dead letters, and putting them back.

Thin: the queries and the replay live in ``sluicegate.dlq``; this module
parses flags, opens Postgres (and the broker for show and replay) and prints.
Exit codes follow ``sluicegate.cli``: 0 fine, 1 a failure (or a dead letter
whose bytes are gone), 2 a bad flag or an unknown id.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_audit import SinceType, _run
from sluicegate.dlq import DeadLetter, Filters, find_messages, list_dead_letters, replay
from sluicegate.runtime import make_transport, open_store
from sluicegate.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def dlq() -> None:
    """Dead letters: inputs a step could not process, kept with their original bytes.

    Each has an id <step>/<partition>/<seq> (its audit row). `list` reads the
    audit trail; `show` and `replay` also read the dlq topic for the bytes.
    A replay republishes the original bytes to their source topic, once
    (again only with --again), and is audited (kind dlq_replay); the step
    processes a replayed input even though its id was dead-lettered before.
    """


def _filters(func: F) -> F:
    for option in reversed(
        [
            click.option("--reason", default=None, help="Only this reason (e.g. step_error)."),
            click.option("--step", default=None, help="Only dead letters of this step."),
            click.option("--tenant", default=None, help="Only this tenant."),
            click.option("--session", default=None, help="Only this session."),
            click.option(
                "--since",
                type=SinceType(),
                default=None,
                help="Only from then on: a duration ago (15m, 2h, 3d) or an ISO time.",
            ),
        ]
    ):
        func = option(func)
    return func


def _make_filters(
    reason: str | None,
    step: str | None,
    tenant: str | None,
    session: str | None,
    since: datetime | None,
    *,
    ids: tuple[str, ...] = (),
    limit: int | None = None,
) -> Filters:
    return Filters(reason, step, tenant, session, since, ids, limit)


@dlq.command("list")
@_filters
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def list_command(
    reason: str | None,
    step: str | None,
    tenant: str | None,
    session: str | None,
    since: datetime | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """The dead letters, oldest first, with how often each was replayed."""
    filters = _make_filters(reason, step, tenant, session, since, limit=limit)
    rows = _run(None, lambda conn: list_dead_letters(conn, filters))
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row.as_json()).decode())
        return
    if not rows:
        click.echo("no dead letters match", err=True)
        return
    table = Table(title=f"{len(rows)} dead letter(s)", title_justify="left")
    for column in ("id", "time (UTC)", "reason", "source", "tenant/session", "event", "replays"):
        table.add_column(column, no_wrap=column != "event")
    table.add_column("error", overflow="fold")
    for row in rows:
        table.add_row(
            row.id,
            row.time.strftime("%Y-%m-%d %H:%M:%S"),
            row.reason,
            row.source,
            escape(f"{row.tenant or '?'}/{row.session or '?'}"),
            escape(row.event_id),
            str(row.replays),
            escape(f"{row.error}: {row.message}"[:160]),
        )
    _console().print(table)


@dlq.command("show")
@transport_option
@click.argument("dead_letter_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show_command(transport: str | None, dead_letter_id: str, as_json: bool) -> None:
    """One dead letter: its audit row and the original message from the dlq topic."""
    settings = load_settings(transport=transport)
    dead = _one(dead_letter_id)
    found = asyncio.run(_find(settings, dead))
    body = found.value if found is not None else None
    if as_json:
        out = dead.as_json()
        out["headers"] = dict(found.headers) if found is not None else None
        out["body"] = _body_json(body)
        click.echo(orjson.dumps(out).decode())
    else:
        table = Table(show_header=False, title=f"dead letter {dead.id}", title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for name, value in dead.as_json().items():
            table.add_row(name, escape("" if value is None else str(value)))
        if found is not None:
            table.add_row("dlq position", f"dlq/{found.partition}/{found.offset}")
            table.add_row("body", escape(_body_text(found.value)))
        _console().print(table)
    if found is None:
        raise click.ClickException(
            f"the original bytes of {dead.id} are no longer on the dlq topic "
            f"({settings.transport}, prefix {settings.topic_prefix}): it cannot be replayed"
        )


@dlq.command("replay")
@transport_option
@_filters
@click.option("--id", "ids", multiple=True, metavar="ID", help="This dead letter (repeatable).")
@click.option("--again", is_flag=True, help="Also dead letters that were replayed before.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; publish nothing.")
def replay_command(
    transport: str | None,
    reason: str | None,
    step: str | None,
    tenant: str | None,
    session: str | None,
    since: datetime | None,
    ids: tuple[str, ...],
    again: bool,
    dry_run: bool,
) -> None:
    """Republish the original bytes of matching dead letters to their source topics.

    Each is replayed once; one replayed before is skipped unless --again.
    Give at least one filter or --id: replaying everything is rarely meant.
    """
    if not (reason or step or tenant or session or since or ids):
        raise click.UsageError(
            "say which dead letters: --id ID, --reason, --step, --tenant, --session or --since"
        )
    settings = load_settings(transport=transport)
    filters = _make_filters(reason, step, tenant, session, since, ids=ids)
    rows = _run(None, lambda conn: list_dead_letters(conn, filters))
    unknown = sorted(set(ids) - {row.id for row in rows})
    if unknown:
        raise click.BadParameter(f"no dead letter {', '.join(unknown)}", param_hint="--id")
    outcome = asyncio.run(_replay(settings, rows, again=again, dry_run=dry_run))
    verb = "would replay" if dry_run else "replayed"
    for dead in outcome.replayed:
        click.echo(f"{verb} {dead.id} ({dead.reason}) to {dead.topic}: {dead.event_id}")
    for dead in outcome.already:
        click.echo(f"skipped {dead.id}: replayed {dead.replays} time(s) before (--again)")
    for dead in outcome.missing:
        click.echo(f"missing {dead.id}: its bytes are no longer on the dlq topic")
    click.echo(
        f"{verb} {len(outcome.replayed)}, skipped {len(outcome.already)} replayed before, "
        f"{len(outcome.missing)} missing",
        err=True,
    )
    if outcome.missing:
        raise click.exceptions.Exit(1)


def _one(dead_letter_id: str) -> DeadLetter:
    rows = _run(None, lambda conn: list_dead_letters(conn, Filters(ids=(dead_letter_id,))))
    if not rows:
        raise click.BadParameter(
            f"no dead letter {dead_letter_id!r} (ids look like intake/0/12; see `sluice dlq list`)",
            param_hint="ID",
        )
    return rows[0]


async def _find(settings: Settings, dead: DeadLetter) -> Any:
    transport = make_transport(settings)
    await transport.connect()
    try:
        return (await find_messages(transport, [dead])).get(dead.id)
    finally:
        await transport.close()


async def _replay(settings: Settings, rows: list[DeadLetter], *, again: bool, dry_run: bool) -> Any:
    transport = make_transport(settings)
    await transport.connect()
    try:
        store = await open_store(settings)
        try:
            return await replay(transport, store, rows, again=again, dry_run=dry_run)
        finally:
            await store.close()
    finally:
        await transport.close()


def _body_json(body: bytes | None) -> Any:
    if body is None:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return {"text": body.decode()}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(body).decode()}


def _body_text(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(body[:2000])


def _console() -> Console:
    # A pipe or CI has no terminal width: 160 columns keep the table readable.
    return Console(highlight=False, width=None if Console().is_terminal else 160)
