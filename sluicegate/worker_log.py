"""What a worker tells its operator: one startup line, periodic progress, one shutdown line.

An operator on call reads a worker's log before anything else, so it must
say what the worker is (pipeline, transport, steps, partitions, prefix,
schema, policy bundle) and, every ``SLUICE_PROGRESS_INTERVAL`` seconds, what
each step did since the last line, without drowning that in the libraries'
INFO chatter (see :func:`configure_logging`). Workers also refuse a policy
bundle that ``sluice policy check`` rejects (:func:`vet_policies`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from sluicegate import health
from sluicegate.settings import Settings
from sluicegate.streams import metrics
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.step import Processor
from sluicegate.streams.transport import TopicPartition, Transport

log = logging.getLogger("sluicegate.worker")

# Loggers of the libraries a worker runs on: INFO from them is group and
# connection chatter (aiokafka logs every join), not what an operator needs.
# How long a progress line waits for the brokers' log ends ("lag ?" after).
LAG_TIMEOUT_S = 10.0

LIBRARY_LOGGERS = ("aiokafka", "kafka", "nats", "faust", "mode", "asyncio", "opentelemetry")


def configure_logging(level: str, library_level: str = "WARNING") -> None:
    """Our loggers at ``level``, the libraries' at ``library_level``."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level.upper())


def vet_policies(steps: Sequence[Processor]) -> None:
    """Raise ``BundleError`` for a step's policy bundle that ``sluice policy check`` rejects."""
    for step in steps:
        paths = getattr(step, "bundle_paths", None)
        if not paths:
            continue
        from sluicegate.policy.lint import require_sound

        for path in paths:
            require_sound(path)


def bundle_version(steps: Sequence[Processor]) -> str:
    for step in steps:
        policy = getattr(step, "policy", None)
        version = getattr(policy, "version", None)
        if isinstance(version, str):
            return version
    return "none"


def startup_line(
    settings: Settings,
    transport: Transport,
    steps: Sequence[Processor],
    *,
    pipeline: str,
    partitions: Sequence[int] | None,
    engine: str = "native",
) -> str:
    owned = "shared with the group" if partitions is None else ",".join(map(str, partitions))
    return (
        f"worker starting: pipeline {pipeline}, transport {transport.name} ({engine}), "
        f"steps {','.join(s.name for s in steps)}, partitions {settings.partitions} "
        f"(this worker: {owned}), prefix {settings.topic_prefix}, schema {settings.db_schema}, "
        f"policy bundle {bundle_version(steps)}"
    )


@dataclass(slots=True)
class _Seen:
    admitted: int = 0
    outputs: int = 0
    dead_letters: int = 0
    skipped: int = 0


def _admitted(runner: StepRunner) -> int:
    return sum(runner.stats.by_partition.values())


async def log_ends(
    runners: Sequence[StepRunner], transport: Transport, timeout_s: float = LAG_TIMEOUT_S
) -> dict[TopicPartition, int] | None:
    """The log end of every partition the runners own, in one bounded call (None: unknown).

    One call for all steps: on Kafka a log end costs a fetch round trip,
    and a slow broker must delay a progress line by seconds at most.
    """
    tps = sorted({tp for r in runners for tp in r.positions()})
    if not tps:
        return {}
    try:
        return await asyncio.wait_for(transport.log_ends(tps), timeout_s)
    except Exception as exc:  # a progress line must not fail because a broker call did
        log.debug("progress: no log ends (%r); lag unknown", exc)
        return None


def step_lag(
    runner: StepRunner, transport: Transport, ends: Mapping[TopicPartition, int] | None
) -> int | None:
    """Messages behind the end of the runner's owned partitions (None if unknown)."""
    if ends is None:
        return None
    # An empty log's end, and so "nothing done": 0 on NATS (sequences start
    # at 1), -1 on Kafka (offsets start at 0); as in `sluice status`.
    empty_end = 0 if transport.name == "nats" else -1
    lag = 0
    for tp, offset in runner.positions().items():
        end = ends.get(tp)
        if end is None:
            return None
        lag += max(0, end - (empty_end if offset is None else offset))
    return lag


async def progress_lines(
    runners: Sequence[StepRunner], transport: Transport, seen: dict[str, _Seen]
) -> list[str]:
    """One line per step: inputs, outputs, dead letters, skipped since the last line; now."""
    lines, idle = [], []
    ends = await log_ends(runners, transport)
    for runner in runners:
        stats, before = runner.stats, seen.setdefault(runner.processor.name, _Seen())
        now = _Seen(_admitted(runner), stats.outputs, stats.dead_letters, stats.skipped)
        lag = step_lag(runner, transport, ends)
        seen[runner.processor.name] = now
        if now == before and lag == 0 and not runner.in_flight:
            idle.append(runner.processor.name)
            continue
        lines.append(
            f"progress {runner.processor.name}: in {now.admitted - before.admitted}, "
            f"out {now.outputs - before.outputs}, "
            f"dead letters {now.dead_letters - before.dead_letters}, "
            f"skipped {now.skipped - before.skipped}, in flight {runner.in_flight}, "
            f"lag {'?' if lag is None else lag}, partitions {len(runner.positions())}"
        )
    if idle:
        # One line for all idle steps: a quiet worker still shows it is alive.
        lines.append(f"progress idle (nothing new, no lag): {','.join(idle)}")
    return lines


def shutdown_line(runners: Sequence[StepRunner], started: float) -> str:
    parts = [
        f"{r.processor.name} in {_admitted(r)} out {r.stats.outputs} "
        f"dead letters {r.stats.dead_letters} skipped {r.stats.skipped}"
        for r in runners
    ]
    return f"worker stopped after {time.monotonic() - started:.0f} s: {'; '.join(parts)}"


@asynccontextmanager
async def reporting(
    runners: Sequence[StepRunner],
    settings: Settings,
    transport: Transport,
    *,
    pipeline: str = "reference",
    partitions: Sequence[int] | None = None,
    engine: str = "native",
) -> AsyncIterator[None]:
    """Log the startup line, progress every interval, and the shutdown line; track health."""
    started = time.monotonic()
    steps = [r.processor for r in runners]
    log.info(
        startup_line(
            settings, transport, steps, pipeline=pipeline, partitions=partitions, engine=engine
        )
    )
    health.track(runners)
    unwatch = [metrics.watch_skipped(r.processor.name, _skipped_of(r)) for r in runners]
    ticker = asyncio.create_task(_progress(runners, transport, settings.progress_interval))
    try:
        yield
    finally:
        ticker.cancel()
        with suppress(asyncio.CancelledError):
            await ticker
        health.untrack(runners)
        for stop in unwatch:
            stop()
        log.info(shutdown_line(runners, started))


def _skipped_of(runner: StepRunner) -> Callable[[], int]:
    return lambda: runner.stats.skipped


async def _progress(runners: Sequence[StepRunner], transport: Transport, interval: float) -> None:
    if interval <= 0:
        return
    seen: dict[str, _Seen] = {}
    while True:
        await asyncio.sleep(interval)
        for line in await progress_lines(runners, transport, seen):
            log.info(line)
