"""``sluice status``: each step's input partitions (owner, watermark, lag) and the live workers.

Thin: what is read and how it fits together is in ``sluicegate.progress_view``;
this module parses flags, runs it and prints. The helpers ``sluice offsets``
shares (steps and partitions checked against the pipeline and the settings,
errors as one line) live here too.

Exit codes follow ``sluicegate.cli``: 0 fine, 1 a service failed, 2 a bad flag
or setting.
"""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import orjson
import psycopg
from psycopg import errors

from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_db import _redacted
from sluicegate.cli_pipeline import resolve_pipeline
from sluicegate.progress_view import (
    PartitionState,
    ProgressView,
    StepInputs,
    gather,
    quiet_libraries,
)
from sluicegate.settings import Settings
from sluicegate.streams.transport import TransportError

T = TypeVar("T")


@click.command("status")
@transport_option
@click.option("--step", "step_name", default=None, metavar="STEP", help="Only this step.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see below).")
def status(transport: str | None, step_name: str | None, as_json: bool) -> None:
    """Who holds each step's input partitions, how far each got, and how far behind it is.

    Per step and input partition (a step reading several topics has one row
    per topic and partition; each topic is its own log with its own
    watermark): the OWNER (NATS: the worker holding the lease; Kafka: the
    group member assigned it; otherwise the last worker that claimed it,
    marked "last claim"), the OFFSET (the watermark: the last offset
    processed; "-" when nothing is), the END of the log (the last offset in
    the partition) and the LAG (END - OFFSET). On NATS offsets are stream
    sequences, which the partitions of one stream share: there the lag is
    an upper bound on the messages waiting. A partition whose stored offset
    is beyond its log's end is STOPPED: workers leave it alone until
    `sluice offsets reset` moves it. Then the live workers: NATS, the
    ownership bucket's heartbeats; Kafka, the members of each step's
    consumer group <prefix>.<step>.

    \b
    --json: {"transport", "prefix", "ownership",
             "workers": [{"worker", "steps", ...}],
             "steps": [{"step", "inputs", "lag", "partitions": [{"partition", "topic",
               "owner", "owner_source", "held", "offset", "lag", "log",
               "log_end", "epoch", "stopped", "updated_at"}]}]}
    """
    settings = load_settings(transport=transport)
    steps = pipeline_steps()
    if step_name is not None:
        steps = [find_step(steps, step_name)]
    view = run_query(settings, lambda: gather(settings, steps))
    if as_json:
        click.echo(orjson.dumps(status_json(view, steps), option=orjson.OPT_INDENT_2).decode())
        return
    for line in status_lines(view, steps):
        click.echo(line)


def status_json(view: ProgressView, steps: Sequence[StepInputs]) -> dict[str, Any]:
    step_docs = []
    for step in steps:
        parts = view.of_step(step.name)
        lags = [p.lag for p in parts if p.lag is not None]
        step_docs.append(
            {
                "step": step.name,
                "inputs": list(step.inputs),
                "lag": sum(lags) if lags else None,
                "partitions": [p.to_json() for p in parts],
            }
        )
    return {
        "transport": view.transport,
        "prefix": view.prefix,
        "ownership": view.ownership,
        "workers": [w.to_json() for w in view.workers],
        "steps": step_docs,
    }


def status_lines(view: ProgressView, steps: Sequence[StepInputs]) -> list[str]:
    lines = [f"{view.transport}, prefix {view.prefix}: {_workers_summary(view)}"]
    if view.workers:
        workers = [
            (w.worker, ", ".join(w.steps), _worker_detail(w.detail, view.transport))
            for w in view.workers
        ]
        lines += ["", *table(("WORKER", "STEPS", _worker_header(view.transport)), workers)]
    rows: list[tuple[str, ...]] = []
    for step in steps:
        for p in view.of_step(step.name):
            rows.append(
                (
                    p.step,
                    p.topic,
                    str(p.partition),
                    owner_text(p),
                    _num(p.offset),
                    _num(p.log_end) if p.log is not None else "no log",
                    "STOPPED" if p.stopped else _num(p.lag),
                    str(p.epoch),
                )
            )
    headers = ("STEP", "TOPIC", "PART", "OWNER", "OFFSET", "END", "LAG", "EPOCH")
    lines += ["", *table(headers, rows)]
    lines += stopped_notes(view.partitions)
    return lines


def _workers_summary(view: ProgressView) -> str:
    if view.ownership == "unknown":
        return (
            "live workers unknown (this NATS transport has no ownership view); "
            "owners are the last claimers"
        )
    n = len(view.workers)
    what = "consumer group members" if view.ownership == "groups" else "live workers"
    return f"{n} {what}" if n != 1 else f"1 {what[:-1]}"


def _worker_header(transport: str) -> str:
    return "LAST HEARTBEAT" if transport == "nats" else "PARTITIONS"


def _worker_detail(detail: dict[str, Any], transport: str) -> str:
    if transport == "nats":
        text = str(detail.get("last_heartbeat", "-"))
        return text + ("  (fixed --instance)" if detail.get("static") else "")
    held = detail.get("partitions")
    return "not reported by the broker" if held is None else ", ".join(held) or "-"


def owner_text(p: PartitionState) -> str:
    if p.owner_source in ("lease", "assignment"):
        return p.owner or "-"
    if p.holder is not None:  # a live Kafka group that does not report assignments
        return f"{p.owner or '?'} (last claim; group live)"
    if p.owner is not None:
        return f"{p.owner} (last claim)"
    return "-"


def stopped_notes(parts: Sequence[PartitionState]) -> list[str]:
    notes = []
    for p in parts:
        if p.stopped:
            notes.append(
                f"{p.step} {p.label}: stored offset {p.offset} is beyond the end of its log "
                f"({p.log_end}); reset it with `sluice offsets reset --step {p.step} "
                f"--partition {p.partition} --to-latest` (or --to-earliest, --to N)"
            )
    return ["", *notes] if notes else []


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as aligned plain-text columns, header first (greppable, never wrapped)."""
    cells = [tuple(headers), *(tuple(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]


# --- shared with `sluice offsets` ------------------------------------------------------


def pipeline_steps() -> list[StepInputs]:
    """The pipeline's steps, as names and input topics.

    The pipeline is SLUICE_PIPELINE's (as for `sluice run`), else the reference one.
    The steps themselves are dropped here, in the thread that built them:
    the policy gate's engine (regorus) must not be freed on another thread,
    and its objects sit in reference cycles, hence the collection.
    """
    # A bad SLUICE_PIPELINE, or a bad SLUICE_* variable of a step: one line, exit 2.
    steps = list(resolve_pipeline(None).steps)
    infos = [StepInputs(s.name, tuple(s.inputs)) for s in steps]
    del steps
    gc.collect()
    return infos


def find_step(steps: Sequence[StepInputs], name: str) -> StepInputs:
    for step in steps:
        if step.name == name:
            return step
    valid = ", ".join(s.name for s in steps)
    raise click.BadParameter(
        f"unknown step {name!r}; the pipeline has {valid}", param_hint="--step"
    )


def check_partition(settings: Settings, partition: int | None) -> None:
    if partition is not None and not 0 <= partition < settings.partitions:
        raise click.BadParameter(
            f"unknown partition {partition}; topics have partitions 0..{settings.partitions - 1} "
            f"(SLUICE_PARTITIONS={settings.partitions})",
            param_hint="--partition",
        )


def run_query(settings: Settings, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh event loop, every service failure as one line (exit 1)."""
    url = settings.resolved_database_url()

    async def main() -> T:
        return await work()

    try:
        with quiet_libraries():
            return asyncio.run(main())
    except TransportError as exc:
        raise click.ClickException(one_line(str(exc))) from None
    except psycopg.OperationalError as exc:
        raise click.ClickException(
            f"cannot reach Postgres at {_redacted(url)}: {one_line(str(exc))}"
        ) from None
    except (errors.UndefinedTable, errors.UndefinedColumn):
        raise click.ClickException(
            f"schema {settings.db_schema} lacks sluicegate's tables or columns; "
            "run `sluice db migrate` first"
        ) from None
    except psycopg.Error as exc:
        raise click.ClickException(f"Postgres query failed: {one_line(str(exc))}") from None
    except OSError as exc:
        raise click.ClickException(one_line(str(exc))) from None


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
