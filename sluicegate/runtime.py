"""Wiring: build transports and checkpoint stores from settings, and run steps.

This is where the application chooses concrete implementations; the
libraries below it only see the ``Transport`` and ``CheckpointStore`` protocols.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from contextlib import suppress

from sluicegate.settings import Settings, TransportName
from streams.checkpoint import CheckpointStore
from streams.partitioning import owned_partitions
from streams.runner import RunnerConfig, StepRunner
from streams.step import Processor
from streams.transport import Transport

log = logging.getLogger("sluicegate")


def make_transport(settings: Settings, kind: TransportName | None = None) -> Transport:
    """An unconnected transport of ``kind`` (default: the configured one)."""
    kind = kind or settings.transport
    if kind == "nats":
        from streams.transports.nats import NatsTransport

        return NatsTransport(
            settings.resolved_nats_url(),
            prefix=settings.topic_prefix,
            partitions=settings.partitions,
        )
    from streams.transports.kafka import KafkaTransport

    return KafkaTransport(
        settings.resolved_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        partitions=settings.partitions,
    )


async def open_store(settings: Settings) -> CheckpointStore:
    from sinks.store import PostgresCheckpointStore

    return await PostgresCheckpointStore.connect(
        settings.resolved_database_url(), schema=settings.db_schema
    )


class NotMigratedError(RuntimeError):
    """The database schema lacks migrations this version needs."""


async def require_migrated(settings: Settings) -> None:
    """Refuse to start workers on a schema that ``sluice db migrate`` has not prepared.

    Workers do not migrate themselves: they may run under a role that can only
    write rows (see README, "Audit trail").
    """
    from sinks.migrate import pending

    missing = await pending(settings.resolved_database_url(), schema=settings.db_schema)
    if missing:
        raise NotMigratedError(
            f"schema {settings.db_schema!r} lacks migrations {', '.join(missing)}: "
            "run `sluice db migrate` first"
        )


def parse_instance(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based i) → (i, n), with a message naming what is wrong."""
    try:
        left, right = text.split("/")
        instance, instances = int(left), int(right)
    except ValueError:
        raise ValueError(f"--instance takes i/n such as 0/3, got {text!r}") from None
    if instances < 1 or not 0 <= instance < instances:
        raise ValueError(f"--instance {text}: i must be in 0..n-1 and n at least 1")
    return instance, instances


async def run_steps(
    steps: Sequence[Processor],
    settings: Settings,
    *,
    stop: asyncio.Event,
    instance: tuple[int, int] | None = None,
    kind: TransportName | None = None,
    config: RunnerConfig | None = None,
) -> list[StepRunner]:
    """Run ``steps`` in this process until ``stop`` is set; returns the runners (for stats)."""
    await require_migrated(settings)
    transport = make_transport(settings, kind)
    await transport.connect()
    partitions = (
        owned_partitions(instance[0], instance[1], settings.partitions) if instance else None
    )
    runners: list[StepRunner] = []
    stores: list[CheckpointStore] = []
    loop = asyncio.get_running_loop()
    for step in steps:
        # The policy gate reloads its bundle on SIGHUP.
        install = getattr(step, "install_sighup", None)
        if callable(install):
            with suppress(NotImplementedError, RuntimeError):
                install(loop)
    try:
        for step in steps:
            store = await open_store(settings)
            stores.append(store)
            runner = StepRunner(step, transport, store, partitions=partitions, config=config)
            await runner.start()
            runners.append(runner)
        await asyncio.gather(*(r.run(stop) for r in runners))
    finally:
        for runner in runners:
            await runner.close()
        for store in stores:
            await store.close()
        await transport.close()
    return runners


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT finish the batch in hand, then stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
