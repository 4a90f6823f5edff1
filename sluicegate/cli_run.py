"""``sluice run``: run steps of the pipeline in this process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import click

from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_pipeline import pipeline_option, resolve_pipeline, steps_option
from sluicegate.runtime import (
    NotMigratedError,
    configure_telemetry,
    parse_instance,
    run_steps,
    stop_on_signals,
)
from sluicegate.streams.transport import TransportError
from sluicegate.worker_log import configure_logging


@click.command("run")
@transport_option
@pipeline_option
@steps_option
@click.option(
    "--instance",
    default=None,
    metavar="I/N",
    help="Own the partitions of instance I of N (0-based): static assignment, as NATS needs.",
)
@click.option(
    "--engine",
    type=click.Choice(["native", "faust"]),
    default="native",
    show_default=True,
    help="Which stream engine runs the steps.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on this port (SLUICE_METRICS_PORT; "
    "host SLUICE_METRICS_HOST, default 127.0.0.1).",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--library-log-level",
    default="WARNING",
    show_default=True,
    help="Log level of aiokafka, nats, Faust and the other libraries (their INFO is chatter).",
)
def run(
    pipeline_spec: str | None,
    transport: str | None,
    steps: str | None,
    instance: str | None,
    engine: str,
    metrics_port: int | None,
    log_level: str,
    library_log_level: str,
) -> None:
    """Run one, several or all steps of the pipeline until SIGTERM or SIGINT.

    The pipeline is --pipeline MODULE:ATTR (or SLUICE_PIPELINE), imported
    from the current directory; without it, the reference pipeline.

    Many events are in flight at once (SLUICE_MAX_IN_FLIGHT per step; one
    session's events in order). On SIGTERM the worker stops fetching, lets
    what is in flight finish (up to SLUICE_DRAIN_TIMEOUT seconds) and
    checkpoints it; progress and state are in Postgres, so a restarted worker
    resumes where this one stopped.
    With SLUICE_OTLP_ENDPOINT set, traces and metrics are exported over OTLP.
    """
    settings = load_settings(transport=transport, metrics_port=metrics_port)
    if engine == "faust":
        _check_faust_flags(settings.transport, instance)
    app = resolve_pipeline(pipeline_spec)
    try:
        chosen = app.select(steps)
        owned = parse_instance(instance) if instance else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    configure_logging(log_level, library_log_level)

    config = settings.runner_config()

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop, grace=settings.shutdown_grace)
        if engine == "faust":
            # Imported here: Faust is slow to import, and only this engine needs it.
            from sluicegate.faust_engine import run_faust_steps

            names = app.step_names
            await run_faust_steps(chosen, settings, stop=stop, config=config, all_steps=names)
        else:
            await run_steps(
                chosen, settings, stop=stop, instance=owned, config=config, pipeline=app.name
            )

    try:
        telemetry = configure_telemetry(settings, serve_metrics=True)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        asyncio.run(main())
    except (NotMigratedError, TransportError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        # Flushes the spans and metrics still queued for export.
        telemetry.shutdown()


def _check_faust_flags(transport: str, instance: str | None) -> None:
    """Refuse, on one line with exit 2, what the Faust engine cannot do."""
    if transport != "kafka":
        raise click.UsageError(
            f"--engine faust runs on Kafka only, not {transport}: "
            "pass --transport kafka (or set SLUICE_TRANSPORT=kafka)"
        )
    if instance is not None:
        raise click.UsageError(
            "--instance does not apply to --engine faust: Faust's consumer group assigns "
            "partitions (start more workers with the same --steps instead)"
        )
