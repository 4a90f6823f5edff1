"""``sluice offsets show|reset``: read and rewrite a step's stored progress.

Progress lives in Postgres (``step_offsets``, see ``sinks.progress``), keyed
by the step, the input partition's *log* (transport, full name, incarnation)
and the partition. ``show`` prints it for the current logs, beside where each
log ends, plus what is kept for other logs; ``reset`` rewrites the watermark
of the current log and raises the ownership epoch, which fences any worker
still holding the partition. Reset refuses while a live worker holds a
partition it would move, unless ``--force``.

Exit codes follow ``sluicegate.cli``: 0 done, 1 refused or a service failed,
2 a bad flag (no --to*, two of them, an unknown step, topic or partition).
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any

import click
import orjson

from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_status import (
    check_partition,
    find_step,
    one_line,
    owner_text,
    pipeline_steps,
    run_query,
    stopped_notes,
    table,
)
from sluicegate.progress_view import PartitionState, ProgressView, StepInputs, gather
from sluicegate.settings import Settings
from sluicegate.sinks.db import connect
from sluicegate.sinks.progress import OffsetChange, StoredOffset, reset_offsets


@click.group()
def offsets() -> None:
    """A step's stored progress per input partition: show it, or reset it.

    The offset of a partition is its watermark: the last offset the step
    processed there (Kafka offset, NATS stream sequence). It belongs to one
    log: the topic or stream as it exists now; a recreated one is a new log,
    processed from its start.
    """


def _step_options(func: Any) -> Any:
    func = click.option(
        "--topic",
        default=None,
        metavar="TOPIC",
        help="Only this input topic of the step (for steps that read several).",
    )(func)
    func = click.option(
        "--partition", type=int, default=None, metavar="P", help="Only this partition."
    )(func)
    func = click.option("--step", "step_name", required=True, metavar="STEP", help="The step.")(
        func
    )
    return transport_option(func)


@dataclass(frozen=True, slots=True)
class _Target:
    settings: Settings
    step: StepInputs
    partition: int | None
    topic: str | None


def _target(
    transport: str | None, step_name: str, partition: int | None, topic: str | None
) -> _Target:
    settings = load_settings(transport=transport)
    step = find_step(pipeline_steps(), step_name)
    check_partition(settings, partition)
    if topic is not None and topic not in step.inputs:
        raise click.BadParameter(
            f"step {step.name} does not read {topic!r}; it reads {', '.join(step.inputs)}",
            param_hint="--topic",
        )
    return _Target(settings, step, partition, topic)


async def _view(target: _Target) -> ProgressView:
    return await gather(
        target.settings,
        [target.step],
        partitions=None if target.partition is None else [target.partition],
        topics=None if target.topic is None else [target.topic],
    )


# --- show ---------------------------------------------------------------------------


@offsets.command("show")
@_step_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see below).")
def show_command(
    transport: str | None,
    step_name: str,
    partition: int | None,
    topic: str | None,
    as_json: bool,
) -> None:
    """Stored progress of STEP on the current logs, and rows kept for other logs.

    Per input topic and partition: the current log, the offset (watermark),
    the ownership epoch, the owner (the worker holding it now, else the last
    claimer), when the row last changed, where the log ends and the lag.
    Then rows of the step kept for other logs, each marked: an older
    incarnation of the same topic or stream, the other transport, or a
    legacy row from before progress was keyed by log identity. Those are
    never applied to the current logs.

    \b
    --json: {"step", "transport", "prefix",
             "offsets": [{"topic", "partition", "log", "offset", "epoch",
                          "owner", "owner_source", "held", "updated_at",
                          "log_end", "lag", "stopped"}],
             "other_logs": [{"log", "partition", "offset", "epoch", "owner",
                             "updated_at", "kind"}]}
    """
    target = _target(transport, step_name, partition, topic)
    view = run_query(target.settings, lambda: _view(target))
    if as_json:
        click.echo(orjson.dumps(show_json(view, target.step), option=orjson.OPT_INDENT_2).decode())
        return
    for line in show_lines(view, target.step):
        click.echo(line)


def show_json(view: ProgressView, step: StepInputs) -> dict[str, Any]:
    return {
        "step": step.name,
        "transport": view.transport,
        "prefix": view.prefix,
        "offsets": [p.to_json() for p in view.of_step(step.name)],
        "other_logs": [_other_json(row, kind) for row, kind in view.other],
    }


def _other_json(row: StoredOffset, kind: str) -> dict[str, Any]:
    return {
        "log": row.topic,
        "partition": row.partition,
        "offset": row.last_offset,
        "epoch": row.epoch,
        "owner": row.owner,
        "updated_at": row.updated_at.isoformat(),
        "kind": kind,
    }


def show_lines(view: ProgressView, step: StepInputs) -> list[str]:
    lines = [f"{step.name} on {view.transport} (prefix {view.prefix}), current logs:"]
    rows = [
        (
            p.topic,
            str(p.partition),
            p.log or "no log yet",
            _num(p.offset),
            str(p.epoch),
            owner_text(p),
            _time(p.stored),
            _num(p.log_end),
            "STOPPED" if p.stopped else _num(p.lag),
        )
        for p in view.of_step(step.name)
    ]
    headers = ("TOPIC", "PART", "LOG", "OFFSET", "EPOCH", "OWNER", "UPDATED", "END", "LAG")
    lines += table(headers, rows)
    if view.other:
        lines += ["", "kept for other logs (not applied to the current ones):"]
        other = [
            (
                kind,
                row.topic,
                str(row.partition),
                _num(row.last_offset),
                str(row.epoch),
                row.owner or "-",
                _time(row),
            )
            for row, kind in view.other
        ]
        lines += table(("KIND", "LOG", "PART", "OFFSET", "EPOCH", "OWNER", "UPDATED"), other)
    lines += stopped_notes(view.of_step(step.name))
    return lines


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _time(row: StoredOffset | None) -> str:
    if row is None:
        return "-"
    return row.updated_at.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- reset ---------------------------------------------------------------------------


@offsets.command("reset")
@_step_options
@click.option("--to-earliest", is_flag=True, help="Nothing processed: start at the log's start.")
@click.option("--to-latest", is_flag=True, help="Skip what the log holds now: start after its end.")
@click.option(
    "--to",
    "to_offset",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="The next offset to process is N (the watermark becomes N-1).",
)
@click.option("--force", is_flag=True, help="Reset even partitions a live worker holds.")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
def reset_command(
    transport: str | None,
    step_name: str,
    partition: int | None,
    topic: str | None,
    to_earliest: bool,
    to_latest: bool,
    to_offset: int | None,
    force: bool,
    dry_run: bool,
) -> None:
    """Rewrite the watermark of STEP's partitions on their current logs.

    Every input topic and partition of the step, or those --topic and
    --partition select. Exactly one of: --to-earliest (nothing processed:
    the next owner starts at the log's start; the inputs it processed most
    recently, which it remembers by id, are absorbed rather than redone),
    --to-latest (the log's end: what the partition holds now is skipped,
    and how much is printed), --to N (the next offset processed is N; on
    NATS offsets are stream sequences).

    The ownership epoch goes up by one and the owner becomes "reset by
    <user>@<host>", so a worker still holding the partition is fenced: its
    next checkpoint there is refused and it leaves the partition alone
    until it restarts or the partition moves to another worker. Hence the
    refusal (exit 1, naming the worker) while a live worker holds a
    partition (NATS: its lease; Kafka: a member of the step's group),
    unless --force. Stop the step's workers, reset, start them again.
    """
    chosen = [
        flag
        for flag, on in (
            ("--to-earliest", to_earliest),
            ("--to-latest", to_latest),
            ("--to N", to_offset is not None),
        )
        if on
    ]
    if len(chosen) != 1:
        given = f" (got {' and '.join(chosen)})" if chosen else ""
        raise click.UsageError(f"give exactly one of --to-earliest, --to-latest, --to N{given}")
    target = _target(transport, step_name, partition, topic)
    mode = "earliest" if to_earliest else "latest" if to_latest else "to"
    who = f"reset by {_user()}@{socket.gethostname()}"

    async def work() -> tuple[list[_Plan], list[OffsetChange]]:
        view = await _view(target)
        plans = plan_reset(view.of_step(target.step.name), mode, to_offset, force=force)
        if dry_run:
            return plans, []
        conn = await connect(
            target.settings.resolved_database_url(), schema=target.settings.db_schema
        )
        async with conn:
            changes = await reset_offsets(
                conn,
                target.step.name,
                [(plan.state.log or "", plan.state.partition, plan.new) for plan in plans],
                owner=who,
            )
        return plans, changes

    plans, changes = run_query(target.settings, work)
    after = {(c.topic, c.partition): c for c in changes}
    for plan in plans:
        change = after.get((plan.state.log or "", plan.state.partition))
        click.echo(reset_line(target.step.name, plan, change))
    fenced = [plan.state for plan in plans if plan.state.held]
    for state in fenced:
        holder = state.holder.worker if state.holder is not None else "a live worker"
        click.echo(
            f"warning: {holder} holds {target.step.name} {state.label}: "
            + ("the reset would fence it" if dry_run else "it is fenced")
            + " off the partition (its next checkpoint there is refused) and leaves it alone "
            "until it restarts; restart it to resume",
            err=True,
        )
    if dry_run:
        click.echo("dry run: nothing written", err=True)


@dataclass(frozen=True, slots=True)
class _Plan:
    state: PartitionState
    new: int | None  # the new watermark (None: nothing processed)
    skipped: int | None  # offsets the reset skips (--to-latest, --to N forward)
    back: bool = False  # --to N before the watermark: inputs are delivered again


def plan_reset(
    states: list[PartitionState], mode: str, to_offset: int | None, *, force: bool
) -> list[_Plan]:
    """What each partition's watermark becomes; refuses (ClickException) what must not be done."""
    if not states:
        raise click.ClickException("nothing to reset: no partition matches")
    missing = [s for s in states if s.log is None]
    if missing:
        topics = ", ".join(sorted({s.topic for s in missing}))
        raise click.ClickException(
            f"{states[0].step}: topic {topics} has no log yet (no worker or publisher created "
            "it): there is no offset to reset"
        )
    plans = []
    for s in states:
        if mode == "earliest":
            plans.append(_Plan(s, None, None))
            continue
        if s.log_end is None:
            raise click.ClickException(
                f"cannot tell where {s.step} {s.label} ends on {s.log}; nothing was reset"
            )
        if mode == "latest":
            done = s.offset if s.offset is not None else s.empty_end
            plans.append(_Plan(s, _watermark(s.log_end, s), max(0, s.log_end - done)))
            continue
        assert to_offset is not None
        if to_offset - 1 > s.log_end:
            raise click.BadParameter(
                f"{s.step} {s.label} ends at offset {s.log_end}: N may be at most "
                f"{s.log_end + 1} (the next offset to arrive); use --to-latest to skip everything",
                param_hint="--to",
            )
        new = _watermark(to_offset - 1, s)
        done = s.offset if s.offset is not None else s.empty_end
        ahead = (new if new is not None else s.empty_end) - done
        plans.append(_Plan(s, new, ahead if ahead > 0 else None, back=ahead < 0))
    if not force:
        for s in states:
            if s.held and s.holder is not None:
                how = {
                    "lease": f"live worker {s.holder.worker} holds its NATS lease",
                    "assignment": f"live worker {s.holder.worker} is assigned it",
                    "group": f"a live member of consumer group {s.holder.group} holds it "
                    f"({s.holder.worker})",
                }[s.holder.source]
                raise click.ClickException(
                    f"refusing to reset {s.step} {s.label}: {how}; stop the step's workers "
                    "first, or pass --force (the worker is then fenced off the partition until "
                    "it restarts)"
                )
            if s.held is None:
                raise click.ClickException(
                    f"refusing to reset {s.step} {s.label}: cannot tell whether a live worker "
                    "holds it (this NATS transport has no ownership view); stop the step's "
                    "workers, then pass --force"
                )
    return plans


def _watermark(last: int, state: PartitionState) -> int | None:
    """``last`` as a stored watermark: at or before the first offset, that is "nothing"."""
    return last if last > state.empty_end else None


def reset_line(step: str, plan: _Plan, change: OffsetChange | None) -> str:
    s = plan.state
    old = (
        _num(s.offset)
        if change is None or change.before is None
        else _num(change.before.last_offset)
    )
    new = "none" if plan.new is None else str(plan.new)
    text = f"{step} {s.label}: offset {old} -> {new}"
    if change is not None:
        before = 0 if change.before is None else change.before.epoch
        text += f", epoch {before} -> {change.after.epoch}"
    if plan.new is None:
        text += " (the next owner starts at the log's start)"
    elif s.stopped:
        text += f" (back from {s.offset}, beyond the log's end)"
    elif plan.back:
        text += " (delivered again from there; inputs remembered by id are absorbed)"
    elif plan.skipped == 0:
        text += " (nothing to skip)"
    elif plan.skipped is not None:
        # NATS: a stream's sequences span its partitions, so this is a bound.
        upto = "up to " if (s.log or "").startswith("nats:") else ""
        text += f" (skips {upto}{plan.skipped} message{'s' if plan.skipped != 1 else ''})"
    return text + f"  [{one_line(s.log or '')}]"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
