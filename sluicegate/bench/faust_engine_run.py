"""The step benchmark on sluicegate's Faust engine (``sluice run --engine faust``).

The bench step as the Faust engine runs it: a Faust agent feeding our
``StepRunner``, with the same Postgres checkpoints and audit rows as the
native run, state mirrored into a Faust Table. It reads the input topic the
native step and the plain Faust agent read, as a step of its own name (so
Postgres holds no offsets for it yet) writing to a topic of its own, where an
observer times it from the first output to the last, as for the plain agent.

It runs in this process, after the native step; Faust is imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import ClassVar

from sluicegate.bench.latency import warmup_count
from sluicegate.bench.step_mode import (
    FaustResult,
    Progress,
    _Deadline,
    observe_outputs,
    rate_after_warmup,
)
from sluicegate.bench.step_work import OUTPUT_TYPE, BenchGateStep, decide
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import RunnerConfig
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import TransportError

OUTPUT_TOPIC = "faust_engine_out"


class FaustEngineBenchStep(BenchGateStep):
    """:class:`BenchGateStep` under its own name, writing to its own topic."""

    name: ClassVar[str] = "bench_gate_faust_engine"
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_TOPIC,)

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        decision = decide(ctx.state, event.tenant, event.data)
        ctx.record("decision", decision=decision["decision"], reasons=decision["reasons"])
        return [ctx.output(OUTPUT_TOPIC, OUTPUT_TYPE, decision)]


async def faust_engine_run(
    settings: Settings, n: int, timeout_s: float, progress: Progress
) -> FaustResult:
    """Run the bench step on the Faust engine until ``n`` outputs are seen, then stop it."""
    from sluicegate.faust_engine.app import FAUST_SETTINGS
    from sluicegate.faust_engine.runtime import run_faust_steps

    settings = settings.model_copy(update={"transport": "kafka"})
    config = RunnerConfig()
    result = FaustResult(settings={**FAUST_SETTINGS, "batch_size": config.batch_size})
    observer_transport = make_transport(settings, "kafka")
    await observer_transport.connect()
    stop = asyncio.Event()
    worker: asyncio.Task[object] | None = None
    try:
        await observer_transport.ensure_topics([OUTPUT_TOPIC])
        observer = await observer_transport.subscribe([OUTPUT_TOPIC], group=None)
        started = time.monotonic_ns()
        worker = asyncio.create_task(
            run_faust_steps([FaustEngineBenchStep()], settings, stop=stop, config=config)
        )
        running = worker

        def alive() -> None:
            if running.done():
                running.result()  # raises what stopped it
                raise RuntimeError("the Faust engine stopped before its last output")

        marks = await observe_outputs(
            observer, result, n, _Deadline(timeout_s, "faust engine"), progress, alive
        )
        await observer.close()
        if marks:
            result.startup_s = (marks[0][1] - started) / 1e9
        result.msgs_per_s = rate_after_warmup(marks, warmup_count(n))
    except (TimeoutError, RuntimeError, OSError, TransportError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        if worker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker, 60)
        await observer_transport.close()
    return result
