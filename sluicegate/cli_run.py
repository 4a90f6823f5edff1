"""``sluice run``: run steps of the pipeline in this process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os

import click

from sluicegate.cli import load_settings, transport_option
from sluicegate.pipeline import build_steps, select_steps
from sluicegate.runtime import NotMigratedError, parse_instance, run_steps, stop_on_signals
from streams.runner import RunnerConfig
from streams.transport import TransportError


@click.command("run")
@transport_option
@click.option("--steps", default=None, help="Comma-separated step names (default: all).")
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
@click.option("--log-level", default="INFO", show_default=True)
def run(
    transport: str | None, steps: str | None, instance: str | None, engine: str, log_level: str
) -> None:
    """Run one, several or all steps of the pipeline until SIGTERM or SIGINT.

    Each batch in hand is finished before the worker exits; progress and state
    are in Postgres, so a restarted worker resumes where this one stopped.
    """
    settings = load_settings(transport=transport)
    try:
        chosen = select_steps(build_steps(), steps)
        owned = parse_instance(instance) if instance else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if engine == "faust":
        raise click.ClickException("--engine faust is not available yet; use --engine native")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")

    config = RunnerConfig()
    crash_after = os.environ.get("SLUICE_TEST_CRASH_AFTER_COMMITS")
    if crash_after:
        # For the crash tests: die right after a checkpoint commit, before the ack.
        config.crash_after_commits = int(crash_after)

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_steps(chosen, settings, stop=stop, instance=owned, config=config)

    try:
        asyncio.run(main())
    except (NotMigratedError, TransportError) as exc:
        raise click.ClickException(str(exc)) from None
