"""``sluice publish``: JSON lines (or synthetic tasks) into a topic, for upstream systems.

This module owns the command's flags, its terminal output (a progress bar on
a terminal, a one-line summary otherwise, one line per rejected input line)
and its exit codes. Reading, validating, batching and pacing live in
``sluicegate.publishing``.

Exit codes: 0 every line published; 1 a line was rejected (or, with
``--strict``, publishing stopped at it) or the broker failed; 2 bad flags;
130 interrupted (Ctrl-C), after saying how much was published.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import click

from sluicegate.agents.graph import Pipeline
from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_pipeline import pipeline_option, resolve_pipeline
from sluicegate.loading import ENV_PIPELINE
from sluicegate.pipeline import TOPICS
from sluicegate.publishing import (
    Item,
    LineReader,
    PublishStats,
    Rejection,
    generated_chunks,
    line_limit,
    reader_chunks,
    run_publish,
)
from sluicegate.runtime import configure_telemetry, make_transport
from sluicegate.samples import generate
from sluicegate.settings import Settings
from sluicegate.streams.dead_letters import DLQ_TOPIC
from sluicegate.streams.transport import TransportError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


@click.command("publish")
@transport_option
@pipeline_option
@click.option(
    "--topic",
    default=None,
    metavar="TOPIC",
    help="Topic to publish into (default: the pipeline's upstream topic; tasks for the "
    "reference pipeline). On an upstream topic data must fit the pipeline's schema for "
    "its type; on others only the envelope is checked and type is required.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="N",
    help="Pace to N events per second (default: as fast as the broker acknowledges).",
)
@click.option(
    "--generate",
    "generate_n",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Publish N synthetic tasks instead of reading input.",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    metavar="N",
    help="With --generate: spread the tasks over N sessions, named afresh on every run.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Stop at the first invalid line; the valid lines before it are published.",
)
@click.argument(
    "file",
    required=False,
    metavar="[FILE|-]",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
)
def publish(
    transport: str | None,
    pipeline_spec: str | None,
    topic: str | None,
    rate: float | None,
    generate_n: int | None,
    sessions: int,
    strict: bool,
    file: str | None,
) -> None:
    """Publish JSON lines from FILE (or stdin: - or piped in) as events on a topic.

    Each line is one JSON object: an event, of which only tenant, session and
    data are required (type defaults to task.submitted on tasks; id, time and
    source are filled in). Every line is validated against the envelope and,
    on tasks, the task.submitted schema. Invalid lines are reported on stderr
    as "line N: reason: detail" and not published; blank lines are skipped.
    Input is streamed and sent in batches, so files of any size work.

    On tasks (the reference pipeline) data is a task.submitted:
    {"prompt": text (required, 1-8000 characters), "agent": a name (default
    assistant), "metadata": an object (optional, up to 4 KiB)}; nothing else.
    For example: {"tenant": "acme", "session": "alice", "data": {"prompt":
    "what is 6 * 7"}}.

    Exit 0 when every line was published, 1 when any was rejected.

    \b
    Examples:
      sluice publish tasks.jsonl
      producer | sluice publish - --rate 200
      sluice publish --generate 1000
    """
    if generate_n is not None and file is not None:
        raise click.UsageError("give FILE (or -) or --generate N, not both")
    if generate_n is None and file is None:
        if sys.stdin.isatty():
            raise click.UsageError(
                "missing FILE: give a JSON-lines file, - for stdin, or --generate N"
            )
        file = "-"  # input is piped in: read it, as cat and jq do
    app = _pipeline(pipeline_spec)
    topic = _topic(app, topic)
    settings = load_settings(transport=transport)
    # With SLUICE_OTLP_ENDPOINT set, each event starts its task's trace; spans
    # are exported (never served: this command is short-lived) and flushed at the end.
    telemetry = configure_telemetry(settings)
    try:
        stats = _publish(settings, topic, rate, strict, file, generate_n, app, sessions)
        # Before the telemetry flush, which may take seconds if the collector is away.
        click.echo(stats.summary(), err=True)
        if stats.stopped_at is not None:
            before = (
                f"the {stats.published} valid line(s) before it were published, nothing after it"
                if stats.published
                else "nothing was published"
            )
            click.echo(f"stopped at line {stats.stopped_at} (--strict): {before}", err=True)
    finally:
        telemetry.shutdown()
    if stats.rejected:
        raise click.exceptions.Exit(1)


def _publish(
    settings: Settings,
    topic: str,
    rate: float | None,
    strict: bool,
    file: str | None,
    generate_n: int | None,
    app: Pipeline | None,
    sessions: int = 50,
) -> PublishStats:
    """Run the publishing; an interrupt or a broker failure ends the command here."""
    stats = PublishStats()
    chunks = _input(file, generate_n, sessions)
    with _progress(total=generate_n) as bar:

        def report(rejection: Rejection) -> None:
            _say(str(rejection), bar)

        try:
            asyncio.run(
                run_publish(
                    make_transport(settings),
                    chunks,
                    stats,
                    topic=topic,
                    rate=rate,
                    strict=strict,
                    on_reject=report,
                    on_sent=bar.update if bar is not None else lambda n: None,
                    pipeline=app,
                )
            )
        except KeyboardInterrupt:
            _say(f"interrupted: {stats.summary()}", bar)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except (TransportError, OSError) as exc:
            _say(stats.summary(), bar)
            raise click.ClickException(
                f"{exc} ({stats.published} events were published before the failure)"
            ) from None
    return stats


def _pipeline(spec: str | None) -> Pipeline | None:
    """The pipeline --pipeline or SLUICE_PIPELINE names; None: the reference's tasks.

    The reference pipeline is not built for publishing: its steps read model
    settings that have nothing to do with what upstream may publish.
    """
    if not (spec or os.environ.get(ENV_PIPELINE, "").strip()):
        return None
    return resolve_pipeline(spec)


def _topic(app: Pipeline | None, topic: str | None) -> str:
    """``--topic``, or the pipeline's (first) upstream topic; one of its topics either way."""
    topics = (*app.topics, DLQ_TOPIC) if app is not None else TOPICS
    if topic is None:
        upstream = list(app.upstream) if app is not None else ["tasks"]
        if not upstream:
            raise click.UsageError("the pipeline has no upstream topic: give --topic")
        return upstream[0]
    if topic not in topics:
        raise click.BadParameter(
            f"{topic!r} is not a topic of the pipeline ({', '.join(map(repr, topics))})",
            param_hint="'--topic'",
        )
    return topic


def _input(
    file: str | None, generate_n: int | None, sessions: int = 50
) -> AsyncGenerator[list[Item] | None, None]:
    """The chunks to publish: generated tasks, or the lines of FILE or stdin."""
    if generate_n is not None:
        # Fresh session names per run (see samples.generate).
        return generated_chunks(generate(generate_n, sessions=sessions, run=secrets.token_hex(3)))
    return reader_chunks(LineReader(None if file == "-" else file, line_limit=line_limit()))


@contextmanager
def _progress(total: int | None) -> Iterator[Any]:
    """A tqdm bar with events/s on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, file=sys.stderr, unit="ev", leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _say(line: str, bar: Any) -> None:
    """A line on stderr that does not garble the progress bar (a tqdm, or None)."""
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        click.echo(line, err=True)
