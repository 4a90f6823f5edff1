"""``sluice bench``: measure the transports, a stateful step and the whole pipeline.

Thin: options, settings and output live here; the measuring is in
``sluicegate.bench``. Modes are looked up in ``MODES``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click

from sluicegate.cli import load_settings
from sluicegate.cli_pipeline import pipeline_option, resolve_pipeline
from sluicegate.loading import ENV_PIPELINE, pipeline_spec
from sluicegate.pipeline import DEFAULT_PIPELINE
from sluicegate.settings import Settings, TransportName

TRANSPORTS: tuple[TransportName, ...] = ("nats", "kafka")
MODE_NAMES = ("transport", "step", "pipeline")


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """The flags of one invocation, as every mode runner receives them."""

    kinds: tuple[TransportName, ...]
    messages: int
    sizes: tuple[int, ...]
    rate: float | None
    batch: int
    timeout_s: float
    faust: bool
    faust_timeout_s: float
    # Pipeline mode: the model stand-in's median (None: the rule-based planner) and spread,
    # and the sessions the tasks spread over (None: the mode's default).
    model_latency_ms: float | None = None
    model_sigma: float = 0.5
    sessions: int | None = None


Progress = Callable[[int], object]
ModeRunner = Callable[[Settings, BenchOptions, Progress], Coroutine[Any, Any, dict[str, Any]]]


async def _transport_mode(
    settings: Settings, options: BenchOptions, progress: Progress
) -> dict[str, Any]:
    from sluicegate.bench.report import build_transport_report
    from sluicegate.bench.transport_mode import LoadModel, run_transport_mode

    load = LoadModel(rate=options.rate, batch=options.batch)
    rows = await run_transport_mode(
        settings,
        options.kinds,
        messages=options.messages,
        sizes=options.sizes,
        load=load,
        timeout_s=options.timeout_s,
        progress=progress,
    )
    meta = await _meta(settings, options, {"load_model": load.name, "rate": load.rate})
    return build_transport_report(rows, meta)


async def _step_mode(
    settings: Settings, options: BenchOptions, progress: Progress
) -> dict[str, Any]:
    from sluicegate.bench.report import build_step_report
    from sluicegate.bench.step_mode import run_step_mode

    results = await run_step_mode(
        settings,
        options.kinds,
        messages=options.messages,
        timeout_s=options.timeout_s,
        faust=options.faust,
        faust_timeout_s=options.faust_timeout_s,
        progress=progress,
    )
    from sluicegate.streams.runner import RunnerConfig

    config = RunnerConfig()
    extra = {"runner_batch_size": config.batch_size, "fetch_timeout_s": config.fetch_timeout_s}
    return build_step_report(results, await _meta(settings, options, extra))


async def _pipeline_mode(
    settings: Settings, options: BenchOptions, progress: Progress
) -> dict[str, Any]:
    from sluicegate.bench.pipeline_mode import (
        DEFAULT_RATE,
        SESSIONS,
        pipeline_settings,
        pipeline_warmup,
        run_pipeline_mode,
    )
    from sluicegate.bench.report import build_pipeline_report

    if options.model_latency_ms is not None:
        return await _model_latency_mode(settings, options, progress)
    rate = options.rate if options.rate is not None else DEFAULT_RATE
    sessions = options.sessions or SESSIONS
    results = await run_pipeline_mode(
        settings,
        options.kinds,
        tasks=options.messages,
        rate=rate,
        timeout_s=options.timeout_s,
        progress=progress,
        sessions=sessions,
    )
    extra = {
        **pipeline_settings(rate, "subprocess", sessions),
        "warmup_messages": pipeline_warmup(options.messages),
    }
    return build_pipeline_report(results, await _pipeline_meta(settings, options, extra))


async def _model_latency_mode(
    settings: Settings, options: BenchOptions, progress: Progress
) -> dict[str, Any]:
    """``--mode pipeline --model-latency MS``: an instant and a slow model, per transport."""
    import os
    from dataclasses import replace

    from sluicegate.bench.model_latency import (
        DEFAULT_RATE,
        budget_for,
        client_concurrency,
        model_latency_settings,
        run_model_latency_mode,
        sessions_for,
    )
    from sluicegate.bench.pipeline_mode import ModelSpec, pipeline_settings, pipeline_warmup
    from sluicegate.bench.report import PERCENTILE_RULE, build_model_latency_report

    assert options.model_latency_ms is not None
    spec = ModelSpec(options.model_latency_ms, options.model_sigma)
    rate = options.rate if options.rate is not None else DEFAULT_RATE
    sessions = options.sessions or sessions_for(rate, spec)
    spec = replace(spec, concurrency=client_concurrency(os.environ, sessions))
    pairs = await run_model_latency_mode(
        settings,
        options.kinds,
        tasks=options.messages,
        rate=rate,
        timeout_s=options.timeout_s,
        spec=spec,
        sessions=sessions,
        progress=progress,
    )
    extra = {
        **pipeline_settings(rate, "subprocess", sessions),
        **model_latency_settings(spec),
        "rate_rule": (
            f"--rate, else {DEFAULT_RATE:g}/s: above the pipeline's capacity, so the "
            "instant run saturates (sluicegate.bench.model_latency)"
        ),
        "percentile_rule": PERCENTILE_RULE,
        "warmup_messages": pipeline_warmup(options.messages),
    }
    meta = await _pipeline_meta(settings, options, extra)
    return build_model_latency_report(pairs, meta, budget_for(spec.median_ms))


async def _pipeline_meta(
    settings: Settings, options: BenchOptions, extra: dict[str, Any]
) -> dict[str, Any]:
    meta = await _meta(settings, options, extra)
    for unused in ("size_bytes", "sizes", "batch"):  # transport-mode knobs
        meta["settings"].pop(unused, None)
    return meta


# Mode name -> runner.
MODES: dict[str, ModeRunner] = {
    "transport": _transport_mode,
    "step": _step_mode,
    "pipeline": _pipeline_mode,
}


async def _meta(settings: Settings, options: BenchOptions, extra: dict[str, Any]) -> dict[str, Any]:
    """Settings, versions, machine and date: what makes the figures comparable."""
    from sluicegate.bench import environment
    from sluicegate.bench.latency import warmup_count

    brokers: dict[str, Any] = {}
    if "nats" in options.kinds:
        url = settings.resolved_nats_url()
        version = await environment.nats_server_version(url)
        brokers["nats"] = {"software": "nats-server", "version": version, "url": url}
    if "kafka" in options.kinds:
        brokers["kafka"] = environment.kafka_broker(settings.resolved_kafka_bootstrap())
    return {
        "date": environment.today(),
        "settings": {
            "transports": list(options.kinds),
            "messages": options.messages,
            "size_bytes": options.sizes[0],
            "sizes": list(options.sizes),
            "batch": options.batch,
            "partitions": settings.partitions,
            "warmup_messages": warmup_count(options.messages),
            "warmup_rule": "max(5% of messages, 1000), at most half",
            **extra,
        },
        "versions": {"clients": environment.client_versions(), "brokers": brokers},
        "machine": environment.machine(),
    }


def _choose_pipeline(spec: str | None, model_latency_ms: float | None) -> None:
    """Check the pipeline pipeline mode is to run; its worker reads it from SLUICE_PIPELINE.

    The mode publishes reference tasks and times their ``task.completed``
    results, so a pipeline of its own must take and answer those.
    """
    if not (spec or os.environ.get(ENV_PIPELINE, "").strip()):
        return
    chosen = pipeline_spec(spec)
    app = resolve_pipeline(chosen)
    takes_tasks = "task.submitted" in app.upstream.get("tasks", {})
    if not takes_tasks or "results" not in app.topics:
        raise click.BadParameter(
            f"{chosen}: pipeline mode publishes task.submitted on tasks and times task.completed "
            "on results; this pipeline does not take tasks or answer on results",
            param_hint="'--pipeline'",
        )
    if model_latency_ms is not None and chosen != DEFAULT_PIPELINE:
        raise click.UsageError(
            "--model-latency slows the reference planner's model; it does not apply to --pipeline"
        )
    # The worker (a `sluice run` child, or run_steps in this process) runs this one.
    os.environ[ENV_PIPELINE] = chosen


def _parse_kinds(text: str) -> tuple[TransportName, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRANSPORTS]
    if unknown or not names:
        raise click.BadParameter(
            f"expected a comma-separated list of {', '.join(TRANSPORTS)}, got {text!r}",
            param_hint="--transport",
        )
    return tuple(cast(TransportName, name) for name in dict.fromkeys(names))


def _parse_sizes(text: str | None, size: int) -> tuple[int, ...]:
    if text is None:
        return (size,)
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected sizes such as 64,256,1024, got {text!r}") from None
    if not sizes or any(s < 16 for s in sizes):
        raise click.BadParameter(
            "sizes must be at least 16 bytes (the stamp)", param_hint="--sizes"
        )
    return sizes


@click.command("bench")
@click.option(
    "--transport",
    "transports",
    default="nats,kafka",
    show_default=True,
    help="Comma-separated transports to measure (nats means NATS core and JetStream).",
)
@click.option(
    "--mode",
    type=click.Choice(MODE_NAMES),
    default="transport",
    show_default=True,
    help=(
        "transport: publish/consume vs the raw clients; step: one stateful step vs a bare loop; "
        "pipeline: every step end to end at --rate tasks/s (default 100; 600 with "
        "--model-latency)."
    ),
)
@click.option("--messages", type=click.IntRange(min=10), default=20_000, show_default=True)
@click.option(
    "--size",
    type=click.IntRange(min=16),
    default=256,
    show_default=True,
    help="Message size in bytes (transport mode).",
)
@click.option("--sizes", default=None, help="Sweep sizes, e.g. 64,256,1024,4096 (transport mode).")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=(
        "Fixed rate in msgs/s, open loop (default: max throughput; pipeline mode: 100 tasks/s, "
        "600 with --model-latency)."
    ),
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Messages per publish and per fetch (transport mode).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds one case may take (pipeline mode: after its last task was due).",
)
@click.option(
    "--no-faust",
    is_flag=True,
    help="Step mode: skip the Faust runs (plain agent and engine) on Kafka.",
)
@click.option("--faust-timeout", "faust_timeout_s", type=click.FloatRange(min=1), default=120.0)
@click.option(
    "--model-latency",
    "model_latency_ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=(
        "Pipeline mode: the planner asks a loopback model stand-in answering after log-normal "
        "delays around MS milliseconds, beside the same load with an instant model; reports "
        "their tasks/s ratio against the budget (default --rate 600)."
    ),
)
@click.option(
    "--model-sigma",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="With --model-latency: the spread of the delays' logarithm (0.5: p99 ~ 3.2x median).",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=None,
    help=(
        "Pipeline mode: sessions the tasks spread over (default 50; with --model-latency, "
        "4 x rate x mean model delay)."
    ),
)
@pipeline_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench(
    transports: str,
    mode: str,
    messages: int,
    size: int,
    sizes: str | None,
    rate: float | None,
    batch: int,
    timeout_s: float,
    no_faust: bool,
    faust_timeout_s: float,
    model_latency_ms: float | None,
    model_sigma: float,
    sessions: int | None,
    pipeline_spec: str | None,
    json_path: Path | None,
    plot_path: Path | None,
) -> int:
    """Benchmark NATS and Kafka: transports, one stateful step, or the whole pipeline.

    Every figure is measured beside its baseline in the same run, since these
    machines are shared: read ratios, not absolute rates. Pipeline mode runs
    every step with the policy gate and Postgres sinks at a fixed offered rate
    and reports tasks/s and end-to-end latency; with --model-latency MS the planner
    asks a loopback model stand-in answering in about MS milliseconds, beside an
    instant one, and the ratio of their tasks/s is checked against the budget
    (>= 0.9 at 200 ms, >= 0.8 at 2 s). Uses SLUICE_NATS_URL,
    SLUICE_KAFKA_BOOTSTRAP, SLUICE_DATABASE_URL (step and pipeline modes) and
    SLUICE_PARTITIONS; everything it creates lives under a unique prefix (and
    schema) and is deleted afterwards. Pipeline mode runs the reference pipeline,
    or --pipeline MODULE:ATTR (SLUICE_PIPELINE) if it takes task.submitted on
    tasks and answers task.completed on results as the reference does.
    """
    kinds = _parse_kinds(transports)
    if mode == "pipeline":
        _choose_pipeline(pipeline_spec, model_latency_ms)
    else:
        for flag, value in (
            ("--model-latency", model_latency_ms),
            ("--sessions", sessions),
            ("--pipeline", pipeline_spec),
        ):
            if value is not None:
                raise click.UsageError(f"{flag} applies to --mode pipeline only")
    runner = MODES.get(mode)
    if runner is None:
        raise click.UsageError(
            f"--mode {mode} is not implemented yet (it will run the whole pipeline and report "
            "tasks_per_s and latency_ms); use --mode transport or --mode step"
        )
    settings = load_settings()
    options = BenchOptions(
        kinds=kinds,
        messages=messages,
        sizes=_parse_sizes(sizes, size),
        rate=rate,
        batch=batch,
        timeout_s=timeout_s,
        faust=not no_faust,
        faust_timeout_s=faust_timeout_s,
        model_latency_ms=model_latency_ms,
        model_sigma=model_sigma,
        sessions=sessions,
    )
    report = _run(runner, settings, options, _total(mode, options))

    from sluicegate.bench.report import render_table

    click.echo(render_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        from sluicegate.bench.plot import write_plot

        write_plot(report, plot_path)
        click.echo(f"wrote {plot_path}")
    return 1 if _failed(report) else 0


def _total(mode: str, options: BenchOptions) -> int:
    """Messages the progress bar counts: each case consumes all of them."""
    if mode == "transport":
        from sluicegate.bench.transport_mode import cases_per_size

        return options.messages * len(options.sizes) * cases_per_size(options.kinds)
    if mode == "pipeline":
        # One result per task per transport, twice with a model (instant, then slow).
        runs = 1 if options.model_latency_ms is None else 2
        return options.messages * len(options.kinds) * runs
    faust_runs = 2 if options.faust and "kafka" in options.kinds else 0  # agent and engine
    return options.messages * (2 * len(options.kinds) + faust_runs)


def _run(
    runner: ModeRunner, settings: Settings, options: BenchOptions, total: int
) -> dict[str, Any]:
    import psycopg
    from tqdm import tqdm

    from sluicegate.streams.transport import TransportError

    # Only on a terminal: piped or captured output gets the table alone.
    with tqdm(
        total=total, file=sys.stderr, unit="msg", disable=not sys.stderr.isatty(), leave=False
    ) as bar:
        try:
            return asyncio.run(runner(settings, options, bar.update))
        except (TransportError, psycopg.OperationalError, OSError) as exc:
            raise click.ClickException(f"benchmark failed: {exc}") from None


def _failed(report: dict[str, Any]) -> bool:
    """Whether any case failed (timed out, lost messages), as opposed to a slow result."""
    objects: list[dict[str, Any]] = []
    for obj in report.get("transports", {}).values():
        objects.append(obj)
        for inner in ("core", "zero_latency"):  # NATS core; the instant-model run
            if inner in obj:
                objects.append(obj[inner])
    return any(obj.get("error") for obj in objects)


__all__: Sequence[str] = ("MODES", "bench")
