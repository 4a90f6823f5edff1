"""``sluice bench --mode step``: one stateful step on our runtime, against a bare loop and Faust.

For each transport, in one run and on the same input topic (``n`` proposed
actions, published before any clock starts):

- ``baseline``: a bare consume→produce loop on the same ``Transport``:
  ``fetch`` → ``publish_batch`` → ``commit``; no decoding, no state, no
  Postgres. It is the most a step could get out of this client;
- ``step``: :class:`~sluicegate.bench.step_work.BenchGateStep` on the real
  ``StepRunner`` with a ``PostgresCheckpointStore`` in a throwaway schema
  (migrated by ``sinks.migrate``): decode and validate, keyed state, one
  output, one decision audit row, one checkpoint transaction per batch;
- ``faust`` (Kafka only): the same step as a Faust agent with a Table, in a
  child process (``benchmarks/faust_step.py``), timed by an observer on its
  output topic from the first output to the last;
- ``faust_engine`` (Kafka only): the same step on sluicegate's Faust engine
  (``sluice run --engine faust``: Faust consumes, our runner checkpoints to
  Postgres), timed the same way (``sluicegate.bench.faust_engine_run``).

Each reader is its own consumer group on its own connection, run one after
another. Rates exclude the warm-up, like the transport mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluicegate.bench.endpoints import delete_kafka_prefix, delete_nats_streams
from sluicegate.bench.latency import warmup_count
from sluicegate.bench.step_work import INPUT_TOPIC, OUTPUT_TOPIC, BenchGateStep, input_events
from sluicegate.runtime import make_transport, tune_gc
from sluicegate.settings import Settings, TransportName
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.store import PostgresCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.transport import OutMessage, Subscription, Transport

Progress = Callable[[int], object]

BARE_OUTPUT_TOPIC = "bare_out"
FAUST_OUTPUT_TOPIC = "faust_out"
# The Faust app; outside the package, like every benchmark (DESIGN.md, layout).
FAUST_APP = Path(__file__).resolve().parents[2] / "benchmarks" / "faust_step.py"
# Not --loglevel warn: see benchmarks/faust_step.py (the spinner's DEBUG root logger).
FAUST_WORKER_ARGS = ("worker", "--loglevel", "info")
BUDGET_RATIO = 0.5  # DESIGN.md: step >= 0.5 x bare loop
FAUST_BUDGET_RATIO = 5.0  # DESIGN.md: native Kafka >= 5 x Faust
# How often the step loop samples the runner's progress.
_SAMPLE_S = 0.005

# (messages done, monotonic ns) after each batch.
Marks = list[tuple[int, int]]


@dataclass(slots=True)
class FaustResult:
    msgs_per_s: float = 0.0
    received: int = 0
    startup_s: float = 0.0  # spawn to first output: imports, group join, recovery
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(slots=True)
class StepResult:
    key: str  # the transport
    messages: int
    warmup: int
    step_msgs_per_s: float = 0.0
    baseline_msgs_per_s: float = 0.0
    faust: FaustResult | None = None
    faust_engine: FaustResult | None = None
    runner_stats: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline_msgs_per_s <= 0 or self.step_msgs_per_s <= 0:
            return None
        return self.step_msgs_per_s / self.baseline_msgs_per_s


def rate_after_warmup(marks: Sequence[tuple[int, int]], warmup: int) -> float:
    """msgs/s from the first mark at or past ``warmup`` messages to the last mark."""
    if len(marks) < 2:
        return 0.0
    start = next(((c, t) for c, t in marks if c >= warmup), marks[0])
    if start == marks[-1]:  # the warm-up ended with the last batch: use it all
        start = marks[0]
    count, elapsed_ns = marks[-1][0] - start[0], marks[-1][1] - start[1]
    return count / (elapsed_ns / 1e9) if count > 0 and elapsed_ns > 0 else 0.0


class _Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def check(self, done: int, n: int) -> None:
        if time.monotonic() > self.at:
            raise TimeoutError(f"{self.what}: {done} of {n} messages in {self.seconds:g}s")


async def publish_inputs(transport: Transport, n: int, chunk: int = 1000) -> None:
    events = input_events(n)
    for start in range(0, n, chunk):
        await transport.publish_batch(
            [
                OutMessage(INPUT_TOPIC, encode(e), key=e.key, headers=headers_for(e))
                for e in events[start : start + chunk]
            ]
        )


async def bare_loop(
    transport: Transport, n: int, config: RunnerConfig, timeout_s: float, progress: Progress
) -> Marks:
    """fetch → publish_batch → commit, as a step with nothing to do would."""
    sub = await transport.subscribe([INPUT_TOPIC], group="bare")
    deadline = _Deadline(timeout_s, "bare loop")
    try:
        marks: Marks = [(0, time.monotonic_ns())]
        done = 0
        while done < n:
            messages = await sub.fetch(config.batch_size, config.fetch_timeout_s)
            if not messages:
                deadline.check(done, n)
                continue
            await transport.publish_batch(
                [
                    OutMessage(BARE_OUTPUT_TOPIC, m.value, key=m.key, headers=m.headers)
                    for m in messages
                ]
            )
            await sub.commit(messages)
            done += len(messages)
            marks.append((done, time.monotonic_ns()))
            progress(len(messages))
        return marks
    finally:
        await sub.close()


async def step_loop(
    runner: StepRunner, n: int, timeout_s: float, progress: Progress
) -> tuple[Marks, dict[str, Any]]:
    """The runner as a worker runs it (``run``: many in flight) until every input is handled.

    Progress is sampled every few milliseconds from the runner's counts; the
    last mark is taken after the runner stopped, so the final checkpoint is in.
    """
    await runner.start()
    deadline = _Deadline(timeout_s, "step runner")
    stats = runner.stats
    marks: Marks = [(0, time.monotonic_ns())]
    done = 0
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        while done < n:
            await asyncio.wait({task}, timeout=_SAMPLE_S)
            if task.done():
                task.result()  # raises what ended it
                raise RuntimeError("the step runner stopped before handling every input")
            now_done = stats.processed + stats.dead_letters + stats.duplicates + stats.skipped
            if now_done == done:
                deadline.check(done, n)
                continue
            marks.append((now_done, time.monotonic_ns()))
            progress(now_done - done)
            done = now_done
        stop.set()
        await task
        # The last inputs are done once the final checkpoint is in: their
        # mark moves to now (a second mark with the same count would read as
        # a stretch with nothing done).
        marks[-1] = (done, time.monotonic_ns())
    finally:
        stop.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.close()
    summary = {
        "processed": stats.processed,
        "dead_letters": stats.dead_letters,
        "duplicates": stats.duplicates,
        "outputs": stats.outputs,
        "batches": stats.batches,
        "peak_in_flight": stats.peak_in_flight,
    }
    return marks, summary


# -- Faust ------------------------------------------------------------------------


async def faust_run(
    settings: Settings, n: int, timeout_s: float, progress: Progress
) -> FaustResult:
    """Run the Faust app in a child process; an observer times its outputs."""
    result = FaustResult()
    if not FAUST_APP.is_file():
        result.error = f"{FAUST_APP} not found (the benchmarks/ folder ships with the source)"
        return result
    observer_transport = make_transport(settings, "kafka")
    await observer_transport.connect()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-faust-"))
    log_path, settings_path = workdir / "faust.log", workdir / "settings.json"
    prefix = settings.topic_prefix
    env = {
        **os.environ,
        "FAUST_STEP_BOOTSTRAP": settings.resolved_kafka_bootstrap(),
        "FAUST_STEP_APP_ID": f"{prefix}-faust",
        "FAUST_STEP_INPUT": f"{prefix}.{INPUT_TOPIC}",
        "FAUST_STEP_OUTPUT": f"{prefix}.{FAUST_OUTPUT_TOPIC}",
        "FAUST_STEP_PARTITIONS": str(settings.partitions),
        "FAUST_STEP_DATADIR": str(workdir / "data"),
        "FAUST_STEP_SETTINGS_OUT": str(settings_path),
    }
    proc: asyncio.subprocess.Process | None = None
    try:
        await observer_transport.ensure_topics([FAUST_OUTPUT_TOPIC])
        observer = await observer_transport.subscribe([FAUST_OUTPUT_TOPIC], group=None)
        with log_path.open("wb") as log:
            spawned = time.monotonic_ns()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(FAUST_APP),
                *FAUST_WORKER_ARGS,
                env=env,
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        running = proc

        def alive() -> None:
            if running.returncode is not None:
                raise RuntimeError(f"the Faust worker exited with {running.returncode}")

        marks = await observe_outputs(
            observer, result, n, _Deadline(timeout_s, "faust"), progress, alive
        )
        await observer.close()
        if marks:
            result.startup_s = (marks[0][1] - spawned) / 1e9
        result.msgs_per_s = rate_after_warmup(marks, warmup_count(n))
    except (TimeoutError, RuntimeError, OSError) as exc:
        result.error = f"{exc}; log: {_tail(log_path)}"
    finally:
        if proc is not None:
            await _stop(proc)
        await observer_transport.close()
        with contextlib.suppress(OSError, ValueError):
            result.settings = json.loads(settings_path.read_text())
        result.settings["worker_args"] = list(FAUST_WORKER_ARGS)
        if result.error is None:
            shutil.rmtree(workdir, ignore_errors=True)  # else keep the log for a look
    return result


async def observe_outputs(
    observer: Subscription,
    result: FaustResult,
    n: int,
    deadline: _Deadline,
    progress: Progress,
    alive: Callable[[], None],
) -> Marks:
    """Count ``n`` outputs on ``observer`` into ``result``.

    ``alive`` raises when whatever produces them has died.
    """
    marks: Marks = []
    while result.received < n:
        messages = await observer.fetch(1000, 0.25)
        if messages:
            result.received += len(messages)
            marks.append((result.received, time.monotonic_ns()))
            progress(len(messages))
        else:
            alive()
            deadline.check(result.received, n)
    return marks


async def _stop(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the mode ---------------------------------------------------------------------


async def run_step_case(
    settings: Settings,
    kind: TransportName,
    *,
    messages: int,
    timeout_s: float,
    faust: bool,
    faust_timeout_s: float,
    progress: Progress = lambda _: None,
) -> StepResult:
    """Bare loop, then step (then Faust on Kafka), on one fresh topic prefix and schema."""
    n = messages
    # The bench process collects garbage as a worker does (both loops alike).
    tune_gc()
    config = RunnerConfig()
    result = StepResult(kind, n, warmup_count(n), batch_size=config.batch_size)
    tag = uuid.uuid4().hex[:10]
    settings = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}-bench-{tag}",
            "db_schema": f"bench_{tag}",
        }
    )
    database_url = settings.resolved_database_url()
    await migrate(database_url, schema=settings.db_schema)
    try:
        setup = make_transport(settings, kind)
        await setup.connect()
        try:
            await setup.ensure_topics([INPUT_TOPIC, OUTPUT_TOPIC, BARE_OUTPUT_TOPIC])
            await publish_inputs(setup, n)
        finally:
            await setup.close()

        transport = make_transport(settings, kind)
        await transport.connect()
        try:
            marks = await bare_loop(transport, n, config, timeout_s, progress)
        finally:
            await transport.close()
        result.baseline_msgs_per_s = rate_after_warmup(marks, result.warmup)

        transport = make_transport(settings, kind)
        await transport.connect()
        store = await PostgresCheckpointStore.connect(database_url, schema=settings.db_schema)
        try:
            runner = StepRunner(BenchGateStep(), transport, store, config=config)
            marks, result.runner_stats = await step_loop(runner, n, timeout_s, progress)
        finally:
            await store.close()
            await transport.close()
        result.step_msgs_per_s = rate_after_warmup(marks, result.warmup)

        if kind == "kafka" and faust:
            result.faust = await faust_run(settings, n, faust_timeout_s, progress)
            from sluicegate.bench.faust_engine_run import faust_engine_run

            result.faust_engine = await faust_engine_run(settings, n, faust_timeout_s, progress)
    except TimeoutError as exc:
        result.error = str(exc)
    finally:
        await _cleanup(settings, kind)
    return result


async def _cleanup(settings: Settings, kind: TransportName) -> None:
    with contextlib.suppress(Exception):
        if kind == "nats":
            await delete_nats_streams(settings.resolved_nats_url(), settings.topic_prefix)
        else:
            await delete_kafka_prefix(settings.resolved_kafka_bootstrap(), settings.topic_prefix)
    conn = await connect(settings.resolved_database_url(), schema="public")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


async def run_step_mode(
    settings: Settings,
    kinds: Sequence[TransportName],
    *,
    messages: int,
    timeout_s: float,
    faust: bool = True,
    faust_timeout_s: float = 120.0,
    progress: Progress = lambda _: None,
) -> list[StepResult]:
    return [
        await run_step_case(
            settings,
            kind,
            messages=messages,
            timeout_s=timeout_s,
            faust=faust,
            faust_timeout_s=faust_timeout_s,
            progress=progress,
        )
        for kind in kinds
    ]
