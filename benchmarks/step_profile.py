"""Where the step benchmark's time goes: wall-clock phases of the StepRunner's batches.

Runs what ``sluice bench --mode step`` runs for the step (BenchGateStep on the
real StepRunner with a PostgresCheckpointStore in a throwaway schema), with
timers around the runner's awaits: ``fetch``, ``publish_batch``, the store's
``commit``, and the broker ``commit``/ack. What is left of each batch is the
runner's own Python work (decode, validate, process, encode, audit rows).
For a CPU profile of that remainder run it under py-spy::

    py-spy record -r 250 -f raw -o step.raw -- \\
        python benchmarks/step_profile.py --transport kafka --messages 40000

Uses SLUICE_NATS_URL, SLUICE_KAFKA_BOOTSTRAP and SLUICE_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from sluicegate.bench.step_mode import _cleanup, publish_inputs
from sluicegate.bench.step_work import INPUT_TOPIC, OUTPUT_TOPIC, BenchGateStep
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.store import PostgresCheckpointStore
from sluicegate.streams.runner import RunnerConfig, StepRunner

Phases = defaultdict[str, float]


def timed(phases: Phases, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - started

    return wrapper


async def main(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:10]
    base = Settings()
    settings = base.model_copy(
        update={"topic_prefix": f"{base.topic_prefix}-prof-{tag}", "db_schema": f"bench_{tag}"}
    )
    url = settings.resolved_database_url()
    await migrate(url, schema=settings.db_schema)
    try:
        setup = make_transport(settings, args.transport)
        await setup.connect()
        await setup.ensure_topics([INPUT_TOPIC, OUTPUT_TOPIC])
        await publish_inputs(setup, args.messages)
        await setup.close()

        phases: Phases = defaultdict(float)
        transport = make_transport(settings, args.transport)
        await transport.connect()
        store = await PostgresCheckpointStore.connect(url, schema=settings.db_schema)
        config = RunnerConfig(batch_size=args.batch)
        runner = StepRunner(BenchGateStep(), transport, store, config=config)
        await runner.start()
        sub = runner._sub
        assert sub is not None
        # Instance attributes shadow the methods the runner calls.
        sub.fetch = timed(phases, "fetch", sub.fetch)  # type: ignore[method-assign]
        sub.commit = timed(phases, "broker commit/ack", sub.commit)  # type: ignore[method-assign]
        transport.publish_batch = timed(phases, "publish_batch", transport.publish_batch)  # type: ignore[method-assign]
        store.commit = timed(phases, "store.commit (Postgres)", store.commit)  # type: ignore[method-assign]
        started, cpu = time.perf_counter(), time.process_time()
        while runner.stats.processed < args.messages:
            await runner.run_once()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        await runner.close()
        await store.close()
        await transport.close()
        print(
            f"{args.transport}: {args.messages} events in {wall:.2f}s = "
            f"{args.messages / wall:,.0f}/s; this process's CPU {cpu:.2f}s ({cpu / wall:.0%})"
        )
        accounted = sum(phases.values())
        for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<26} {seconds:7.2f}s {seconds / wall:6.1%}")
        rest = wall - accounted
        print(f"  {'runner work (the rest)':<26} {rest:7.2f}s {rest / wall:6.1%}")
        per_event, work = wall / args.messages * 1e6, rest / args.messages * 1e6
        print(f"  per event: {per_event:.0f} us, runner work {work:.0f} us")
    finally:
        await _cleanup(settings, args.transport)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transport", choices=["nats", "kafka"], default="nats")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    asyncio.run(main(parser.parse_args()))
