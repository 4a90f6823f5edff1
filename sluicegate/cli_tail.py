"""``sluice tail``: follow a topic as an observer that never disturbs the pipeline.

This module owns the command's flags, signal handling and exit codes; how
messages are inspected, filtered and printed lives in ``sluicegate.tailing``.

Exit codes: 0 when ``--count`` events were shown; 130 when stopped by Ctrl-C
(SIGINT) and 143 by SIGTERM, the codes a shell reports for a command ended by
those signals, so a script can tell "got N events" from "was stopped"; 1 the
broker failed; 2 bad flags or an unknown topic.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime

import click

from sluicegate.cli import load_settings, transport_option
from sluicegate.cli_audit import SinceType
from sluicegate.cli_pipeline import pipeline_option, resolve_pipeline
from sluicegate.loading import ENV_PIPELINE
from sluicegate.pipeline import TOPICS
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.dead_letters import DLQ_TOPIC
from sluicegate.streams.transport import TransportError
from sluicegate.tailing import Filter, Seen, follow, renderer

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number


@dataclass(frozen=True, slots=True)
class Position:
    """Where tail starts: which partitions (None: all), at which offset or end."""

    partitions: list[int] | None = None
    offset: int | None = None
    from_beginning: bool = False

    def describe(self) -> str:
        which = "all partitions" if self.partitions is None else f"partition {self.partitions[0]}"
        if self.offset is not None:
            return f"{which} from offset {self.offset}"
        return f"{which}, " + ("from the beginning" if self.from_beginning else "new events only")


def type_warning(topic: str, event_type: str) -> str | None:
    """A warning when no step of the reference pipeline puts ``event_type`` on ``topic``.

    Known types of a topic are what the steps reading it accept (they take
    what the steps before them emit); a topic no step reads (results) is not
    checked. A typo in --type would otherwise wait forever, silently.
    """
    known = topic_types().get(topic)
    if not known or event_type in known:
        return None
    return (
        f"no step of the pipeline puts type {event_type!r} on {topic} "
        f"(it carries {', '.join(sorted(known))}): nothing may match"
    )


def topic_types() -> dict[str, set[str]]:
    from sluicegate.agents.topics import DLQ
    from sluicegate.pipeline import reference
    from sluicegate.streams.codec import ANY_TYPE

    types: dict[str, set[str]] = {}
    for step in reference().steps:
        for name in step.inputs:
            accepted = set(step.accepts)
            if ANY_TYPE in accepted or not accepted:
                types[name] = set()  # takes anything: nothing to check against
            elif types.get(name, accepted):
                types[name] = types.get(name, set()) | accepted
    types.pop(DLQ, None)
    return types


@click.command("tail")
@transport_option
@pipeline_option
@click.argument("topic", default=None, required=False, metavar="[TOPIC]")
@click.option(
    "--from-beginning", is_flag=True, help="Start at the oldest event kept (default: new only)."
)
@click.option("--session", default=None, help="Only events of this session.")
@click.option("--tenant", default=None, help="Only events of this tenant.")
@click.option("--type", "event_type", default=None, help="Only events of this type.")
@click.option(
    "--partition",
    type=click.IntRange(min=0),
    default=None,
    help="Only this partition (default: all).",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=None,
    help="Start at this offset of each partition read (use with --partition).",
)
@click.option(
    "--since",
    type=SinceType(),
    default=None,
    help="Only messages the broker took in from then on: a duration ago (15m, 2h) or an ISO "
    "time; reads from the beginning to find them.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="Stop after N matching events."
)
def tail(
    transport: str | None,
    pipeline_spec: str | None,
    topic: str | None,
    from_beginning: bool,
    session: str | None,
    tenant: str | None,
    event_type: str | None,
    partition: int | None,
    offset: int | None,
    since: datetime | None,
    as_json: bool,
    count: int | None,
) -> None:
    """Follow TOPIC (default: results) and print its events as they arrive.

    TOPIC is one of the pipeline's (--pipeline MODULE:ATTR or SLUICE_PIPELINE;
    default the reference pipeline), or dlq; with --pipeline the default is
    the first topic its steps write and none reads.

    tail is an observer: it joins no consumer group and commits nothing, so
    it never takes partitions from, or moves the offsets of, running workers.
    It creates the topic if it does not exist yet, as a worker would, so it
    can be started before the pipeline.

    Each event is one line: time (UTC), partition:offset, type,
    tenant/session, the end of its id, and a summary of its data. --json
    prints the CloudEvent as on the wire instead, plus its partition and
    offset; on dlq, {"dlq": {reason, error, message, step, source}, "event":
    ...}, with the raw body instead of "event" when it is not JSON.

    Exit 0 after --count events; 130 on Ctrl-C (143 on SIGTERM).
    """
    topic = _topic(pipeline_spec, topic)
    settings = load_settings(transport=transport)
    if partition is not None and partition >= settings.partitions:
        raise click.BadParameter(
            f"{partition} is not a partition: topics have {settings.partitions} "
            f"(SLUICE_PARTITIONS), 0..{settings.partitions - 1}",
            param_hint="--partition",
        )
    if event_type is not None:
        warning = type_warning(topic, event_type)
        if warning:
            click.echo(f"warning: {warning}", err=True)
    since_ms = None if since is None else int(since.timestamp() * 1000)
    match = Filter(tenant=tenant, session=session, type=event_type, since_ms=since_ms)
    where = Position(
        partitions=None if partition is None else [partition],
        offset=offset,
        from_beginning=from_beginning or since is not None,
    )
    render = renderer(as_json)
    stopped_by: list[signal.Signals] = []
    try:
        asyncio.run(
            _tail(settings, topic, where, count, match, render, stopped_by),
        )
    except KeyboardInterrupt:  # a second Ctrl-C while closing
        raise click.exceptions.Exit(EXIT_CODES[signal.SIGINT]) from None
    except BrokenPipeError:
        # The reader went away (`sluice tail | head`): that is a normal end.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    except TransportError as exc:
        raise click.ClickException(str(exc)) from None
    if stopped_by:
        raise click.exceptions.Exit(EXIT_CODES[stopped_by[0]])


def _topic(spec: str | None, topic: str | None) -> str:
    """TOPIC, checked against the pipeline's topics (the reference's unless one is named)."""
    topics: tuple[str, ...] = TOPICS
    default = "results"
    if spec or os.environ.get(ENV_PIPELINE, "").strip():
        app = resolve_pipeline(spec)
        topics = (*app.topics, DLQ_TOPIC)
        read = {t for s in app.steps for t in s.inputs}
        default = next((t for t in app.topics if t not in read), DLQ_TOPIC)
    if topic is None:
        return default
    if topic not in topics:
        raise click.BadParameter(
            f"{topic!r} is not a topic of the pipeline ({', '.join(map(repr, topics))})",
            param_hint="'[TOPIC]'",
        )
    return topic


async def _tail(
    settings: Settings,
    topic: str,
    where: Position,
    count: int | None,
    match: Filter,
    render: Callable[[Seen], str],
    stopped_by: list[signal.Signals],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()
        # A second Ctrl-C gets Python's default (KeyboardInterrupt), in case
        # closing the connection hangs.
        loop.remove_signal_handler(sig)

    installed: list[signal.Signals] = []
    for sig in EXIT_CODES:
        with suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    out = sys.stdout

    def emit(seen: Seen) -> None:
        out.write(render(seen) + "\n")

    shown = 0
    transport = make_transport(settings)
    try:
        await transport.connect()
        await transport.ensure_topics([topic])
        # group=None: an observer, never a member of the workers' groups.
        subscription = await transport.subscribe(
            [topic],
            group=None,
            partitions=where.partitions,
            start="earliest" if where.from_beginning else "latest",
        )
        try:
            if where.offset is not None:
                for tp in sorted(subscription.assignment()):
                    await subscription.seek(tp, where.offset)
            start = where.describe()
            click.echo(
                f"following {topic} on {transport.name} (prefix {settings.topic_prefix}), "
                f"{start}; Ctrl-C to stop",
                err=True,
            )
            shown = await follow(
                subscription, match=match, emit=emit, flush=out.flush, stop=stop, count=count
            )
        finally:
            await subscription.close()
    finally:
        await transport.close()
        for sig in installed:
            with suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    if stopped_by:
        click.echo(f"stopped after {shown} event(s)", err=True)
