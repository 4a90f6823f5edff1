"""``sluice demo``: run the pipeline on the local stack and print a summary (see ``demo``)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sluicegate.agents.graph import Pipeline
from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_pipeline import pipeline_option, resolve_pipeline
from sluicegate.demo import DemoOutcome, run_demo
from sluicegate.loading import ENV_PIPELINE
from sluicegate.pipeline import check_step_settings
from sluicegate.runtime import configure_telemetry
from sluicegate.samples import DEMO, DEMO_HELD
from sluicegate.settings import Settings


@click.command("demo")
@transport_option
@pipeline_option
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for results.")
def demo(transport: str | None, pipeline_spec: str | None, timeout: float) -> None:
    """The whole pipeline on the local stack, with sample tasks and a summary.

    With --pipeline MODULE:ATTR (or SLUICE_PIPELINE), that pipeline runs
    instead, on the samples it carries (Pipeline(samples=...)); each sample
    is done when a step stored a result for it (ctx.result with the sample's
    event id as task id).

    Starts what SLUICE_* does not configure, runs every step in this process,
    publishes tasks (some denied or redacted by policy) and one malformed
    line, waits for every result, verifies the audit chains, prints a
    summary, and leaves nothing running. Exit 0 when all of that held.
    """
    settings = load_settings(transport=transport)
    if pipeline_spec or os.environ.get(ENV_PIPELINE, "").strip():
        _demo_pipeline(settings, resolve_pipeline(pipeline_spec), timeout)
        return
    try:
        # The demo builds its steps inside the event loop, where a bad
        # SLUICE_LLM_* value would end in a traceback: check them first.
        check_step_settings()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    # A log or CI has no terminal width: 140 columns keep the tables readable.
    console = Console(highlight=False, width=None if Console().is_terminal else 140)
    logging.basicConfig(level=logging.ERROR)
    console.print(f"[bold]sluicegate demo[/bold] on {settings.transport}")
    telemetry = configure_telemetry(settings)
    spans = None
    if settings.otlp_endpoint is None:
        # Nothing to export to: keep the spans in memory, so the summary can
        # still show one task's trace and how many hops it has.
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from sluicegate.streams import tracing

        spans = InMemorySpanExporter()
        tracing.configure(exporter=spans, batch=False)
    try:
        outcome = asyncio.run(
            run_demo(settings, transport=settings.transport, timeout_s=timeout, say=console.print)
        )
    finally:
        telemetry.shutdown()
    render(console, outcome, spans)
    if not outcome.ok:
        raise click.exceptions.Exit(1)


def _demo_pipeline(settings: Settings, app: Pipeline, timeout: float) -> None:
    from sluicegate.demo_pipeline import SampleError, run_pipeline_demo

    console = Console(highlight=False, width=None if Console().is_terminal else 140)
    logging.basicConfig(level=logging.ERROR)
    console.print(f"[bold]sluicegate demo[/bold] of {app.name} on {settings.transport}")
    try:
        outcome = asyncio.run(
            run_pipeline_demo(
                settings, app, transport=settings.transport, timeout_s=timeout, say=console.print
            )
        )
    except SampleError as exc:
        raise click.BadParameter(str(exc), param_hint="'--pipeline'") from None
    table = Table(title="Results", title_justify="left")
    for column in ("topic", "session", "status", "answer"):
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=60)
    for topic, event in outcome.published:
        result = outcome.results.get(event.id)
        answer = escape(orjson.dumps(result.answer).decode()) if result else ""
        status = result.status if result else "[red]missing[/red]"
        table.add_row(topic, event.session, status, answer)
    console.print(table)
    letters = "; ".join(f"{k} x{n}" for k, n in outcome.dead_letters.items()) or "none"
    chains = "intact" if outcome.chains_ok else f"[red]BROKEN[/red]: {outcome.chain_problem}"
    console.print(f"dead letters: {escape(letters)}")
    console.print(f"audit: {outcome.audit_rows} rows, chains {chains}")
    console.print(f"took {outcome.elapsed_s:.1f} s")
    console.print(f"demo {'[green]OK[/green]' if outcome.ok else '[red]FAILED[/red]'}")
    if not outcome.ok:
        raise click.exceptions.Exit(1)


def render(console: Console, outcome: DemoOutcome, spans: Any = None) -> None:
    results = Table(title="Results", title_justify="left")
    results.add_column("tenant", min_width=6)
    results.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=32)
    results.add_column("expected", no_wrap=True, overflow="ellipsis", max_width=26)
    results.add_column("status", min_width=9)
    results.add_column("answer", no_wrap=True, overflow="ellipsis", max_width=50)
    for sample, event in zip((*DEMO, *DEMO_HELD), outcome.published, strict=True):
        result = outcome.results.get(event.id)
        status = result.status if result else "[red]missing[/red]"
        answer = _outcome_line(result.answer) if result else ""
        # Answers hold masks such as "[email]", which rich would read as markup.
        results.add_row(sample.tenant, escape(sample.prompt), sample.expect, status, escape(answer))
    console.print(results)

    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    statuses = ", ".join(
        f"{s} {n}" for s, n in sorted(_count(r.status for r in outcome.results.values()).items())
    )
    summary.add_row("tasks / results", f"{len(outcome.published)} / {len(outcome.results)}")
    summary.add_row("results by status", statuses)
    summary.add_row(
        "policy decisions",
        ", ".join(f"{k} {v}" for k, v in sorted(outcome.decisions.items())) or "none",
    )
    summary.add_row(
        "deny/redact/hold reasons",
        ", ".join(f"{k} {v}" for k, v in sorted(outcome.reasons.items())) or "none",
    )
    summary.add_row(
        "held for approval",
        "; ".join(f"{tool} of task {task} approved by the demo" for tool, task in outcome.approved)
        or "none",
    )
    summary.add_row(
        "dead letters",
        "; ".join(f"{step}: {reason}" for step, reason in outcome.dead_letters) or "none",
    )
    chains = (
        f"{outcome.chains} chains, {outcome.audit_rows} rows, all intact"
        if outcome.chains_ok
        else f"[red]BROKEN[/red]: {outcome.chain_problem}"
    )
    summary.add_row("audit chains", chains)
    trace = next((r.trace_id for r in outcome.results.values() if r.trace_id), None)
    summary.add_row("one trace", _trace_hint(trace, spans))
    summary.add_row("took", f"{outcome.elapsed_s:.1f} s")
    console.print(summary)
    verdict = "[green]OK[/green]" if outcome.ok else "[red]FAILED[/red]"
    console.print(f"demo {verdict}")


def _count(items: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:  # type: ignore[attr-defined]
        counts[item] = counts.get(item, 0) + 1
    return counts


def _outcome_line(answer: object) -> str:
    """The answer's per-action lines (its headline says what the status already does)."""
    text = answer.get("text", "") if isinstance(answer, dict) else str(answer)
    lines = str(text).splitlines()
    return " | ".join(lines[1:] or lines)


def _trace_hint(trace_id: str | None, spans: Any) -> str:
    if trace_id is None:
        return "no trace recorded"
    if spans is not None:
        hops = [
            s.name for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
        ]
        return (
            f"{trace_id}: {len(hops)} spans ({', '.join(hops)}), kept in memory; "
            "set SLUICE_OTLP_ENDPOINT to export them (compose/ has a collector and Jaeger)"
        )
    return f"{trace_id}: in Jaeger at http://127.0.0.1:16686/trace/{trace_id} (with compose/)"
