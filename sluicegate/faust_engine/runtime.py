"""``run_faust_steps``: run steps in this process on a Faust worker until ``stop`` is set.

The same ``StepRunner`` as the native engine runs each step (decode, dead
letters, retries, dedupe against the audit log, the Postgres transaction,
``tick``), over a ``FaustTransport``: Faust does the consuming, group
membership, partition assignment, offset commits, producing and the state
tables; sluicegate's runner does everything per event. That is why audit
rows, results and outputs are the same whichever engine ran.

Lifecycle: topics are created first (Tansu would create a missing topic with
its own partition count when Faust asks for its metadata), then each step's
runner subscribes (declaring its agent and table), the runners' loops start,
and then the Faust app, whose first rebalance hands the runners their
partitions. On ``stop`` the runners finish their batch in hand, then Faust
stops (committing what was acked and leaving the group).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import faust

from sluicegate import worker_log
from sluicegate.faust_engine.app import app_id, build_app, table_name
from sluicegate.faust_engine.rebalance import RebalanceBridge
from sluicegate.faust_engine.state import MirroredStore, SessionTable
from sluicegate.faust_engine.transport import FaustTransport
from sluicegate.runtime import first_error, open_store, require_migrated
from sluicegate.service_security import kafka_security_options
from sluicegate.settings import Settings
from sluicegate.streams.checkpoint import CheckpointStore
from sluicegate.streams.runner import DLQ_TOPIC, RunnerConfig, StepRunner
from sluicegate.streams.step import Processor
from sluicegate.streams.transport import TransportError
from sluicegate.streams.transports.kafka import KafkaTransport

log = logging.getLogger("sluicegate.faust")

# How often the worker checks that Faust has not crashed.
_WATCH_INTERVAL_S = 0.5


class FaustEngineError(TransportError):
    """The Faust app crashed; the worker stops (its progress is in Postgres)."""


async def run_faust_steps(
    steps: Sequence[Processor],
    settings: Settings,
    *,
    stop: asyncio.Event,
    config: RunnerConfig | None = None,
    all_steps: Sequence[str] | None = None,
) -> list[StepRunner]:
    """Run ``steps`` as agents of one Faust app until ``stop``; returns the runners.

    ``all_steps`` names the steps of the whole pipeline (default: ``steps``),
    so that a worker running all of it gets the short group id ``<prefix>.faust``.
    """
    if settings.transport != "kafka":
        raise TransportError(f"the Faust engine runs on Kafka only, not {settings.transport}")
    worker_log.vet_policies(steps)
    await require_migrated(settings)
    # A batch barrier under Faust: its rebalances wait for the batch in hand
    # (the subscription's "turn"); a batch's keys still run concurrently.
    config = replace(config or settings.runner_config(), pipelined=False)
    names = [step.name for step in steps]
    pipeline = list(all_steps) if all_steps is not None else names
    security = kafka_security_options(settings)
    admin = KafkaTransport(
        settings.resolved_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        partitions=settings.partitions,
        **security,
    )
    with tempfile.TemporaryDirectory(prefix="sluice-faust-") as datadir:
        app = build_app(
            app_id=app_id(settings.topic_prefix, names, pipeline),
            bootstrap=settings.resolved_kafka_bootstrap(),
            partitions=settings.partitions,
            datadir=Path(datadir),
            security=security,
        )
        # Twice a batch: the runner always finds its next batch waiting.
        transport = FaustTransport(app, admin, queue_capacity=2 * config.batch_size)
        worker = _Worker(app, transport, settings, config)
        try:
            await worker.run(steps, stop)
        finally:
            await worker.close()
        return worker.runners


class _Worker:
    """The runners, their stores and tables, and the Faust app of one process."""

    def __init__(
        self, app: faust.App, transport: FaustTransport, settings: Settings, config: RunnerConfig
    ) -> None:
        self.app = app
        self.transport = transport
        self.settings = settings
        self.config = config
        self.bridge = RebalanceBridge(app, transport.names)
        self.runners: list[StepRunner] = []
        self._stores: list[CheckpointStore] = []
        self._app_started = False

    async def run(self, steps: Sequence[Processor], stop: asyncio.Event) -> None:
        await self.transport.connect()
        topics = {t for step in steps for t in (*step.inputs, *step.outputs)} | {DLQ_TOPIC}
        await self.transport.ensure_topics(sorted(topics))
        _install_sighup(steps)
        for step in steps:
            await self._add(step)
        self.bridge.connect()
        # One task group for the runners and the crash watch. A member that
        # fails sets ``stop`` rather than cancelling its siblings at once, so
        # they drain and checkpoint what is in flight before Faust goes away;
        # the group then raises the failure (the first one, for the CLI).
        failures: list[BaseException] = []

        async def member(work: Awaitable[None]) -> None:
            try:
                await work
            except Exception as exc:
                failures.append(exc)
                stop.set()

        try:
            await self.app.start()
            self._app_started = True
            log = worker_log.reporting(self.runners, self.settings, self.transport, engine="faust")
            async with log, asyncio.TaskGroup() as group:
                for r in self.runners:
                    group.create_task(member(r.run(stop)), name=f"runner {r.processor.name}")
                group.create_task(member(self._watch(stop)), name="faust watch")
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        finally:
            stop.set()
        if failures:
            raise failures[0]

    async def _add(self, step: Processor) -> None:
        table = SessionTable(
            self.app.Table(
                table_name(step.name),
                default=None,
                partitions=self.settings.partitions,
                value_type=bytes,
                help=f"session states of step {step.name}, mirrored from Postgres step_state",
            ),
            self.settings.partitions,
        )
        store = MirroredStore(await open_store(self.settings), table)
        self._stores.append(store)
        runner = StepRunner(step, self.transport, store, config=self.config)
        await runner.start()  # subscribes: declares the step's agent
        self.runners.append(runner)
        self.bridge.add(self.transport.subscriptions[-1], table)

    async def _watch(self, stop: asyncio.Event) -> None:
        """End the worker when Faust crashes (say, a failed rebalance commit)."""
        while not stop.is_set():
            if self.app.crashed:
                raise FaustEngineError(f"the Faust app crashed: {self.app.crash_reason!r}")
            await asyncio.sleep(_WATCH_INTERVAL_S)

    async def close(self) -> None:
        for runner in self.runners:
            await runner.close()
        if self._app_started or self.app.started:
            await self.app.stop()
        for store in self._stores:
            await store.close()
        await self.transport.close()


def _install_sighup(steps: Sequence[Processor]) -> None:
    """The policy gate reloads its bundle on SIGHUP, as under the native runtime."""
    loop = asyncio.get_running_loop()
    for step in steps:
        install = getattr(step, "install_sighup", None)
        if callable(install):
            with suppress(NotImplementedError, RuntimeError):
                install(loop)
