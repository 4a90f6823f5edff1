"""Wiring: build transports and checkpoint stores from settings, and run steps.

This is where the application chooses concrete implementations; the
libraries below it only see the ``Transport`` and ``CheckpointStore`` protocols.
It also turns telemetry on from settings (:func:`configure_telemetry`):
``streams.tracing`` and ``streams.metrics`` stay off until it is called.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from sluicegate import worker_log
from sluicegate.settings import Settings, TransportName
from sluicegate.streams.checkpoint import CheckpointStore
from sluicegate.streams.partitioning import owned_partitions
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.step import Processor
from sluicegate.streams.transport import Transport

log = logging.getLogger("sluicegate")


def make_transport(settings: Settings, kind: TransportName | None = None) -> Transport:
    """An unconnected transport of ``kind`` (default: the configured one)."""
    kind = kind or settings.transport
    if kind == "nats":
        from sluicegate.streams.transports.nats import NatsTransport

        return NatsTransport(
            settings.resolved_nats_url(),
            prefix=settings.topic_prefix,
            partitions=settings.partitions,
        )
    from sluicegate.streams.transports.kafka import KafkaTransport

    return KafkaTransport(
        settings.resolved_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        partitions=settings.partitions,
    )


async def open_store(settings: Settings) -> CheckpointStore:
    from sluicegate.sinks.store import PostgresCheckpointStore

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
    from sluicegate.sinks.migrate import pending

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
    # A bundle `sluice policy check` rejects is refused before anything starts.
    worker_log.vet_policies(steps)
    await require_migrated(settings)
    config = config or settings.runner_config()
    transport = make_transport(settings, kind)
    await transport.connect()
    partitions = (
        owned_partitions(instance[0], instance[1], settings.partitions) if instance else None
    )
    runners: list[StepRunner] = []
    stores: list[CheckpointStore] = []
    try:
        for step in steps:
            store = await open_store(settings)
            stores.append(store)
            # One name for this worker in the NATS lease bucket and in
            # step_offsets.owner, so `sluice status` can join the two.
            owner = getattr(transport, "worker_id", None)
            runner = StepRunner(
                step, transport, store, partitions=partitions, config=config, owner=owner
            )
            runners.append(runner)
        async with worker_log.reporting(runners, settings, transport, partitions=partitions):
            # In parallel: on Kafka each step joins its own consumer group, and
            # one after another the six groups took 6-7 s to start a worker.
            await asyncio.gather(*(r.start() for r in runners))
            await asyncio.gather(*(r.run(stop) for r in runners))
    finally:
        for runner in runners:
            await runner.close()
        for store in stores:
            await store.close()
        await transport.close()
        await _close_model_sessions()
    return runners


async def _close_model_sessions() -> None:
    """Close the pooled HTTP session of model clients, if any step made one."""
    # Looked up, not imported: a pipeline without model calls never loads aiohttp.
    model_client = sys.modules.get("sluicegate.agents.model_client")
    if model_client is not None:
        await model_client.aclose_shared()


@dataclass(slots=True)
class Telemetry:
    """What :func:`configure_telemetry` turned on; :meth:`shutdown` flushes and stops it."""

    tracing: bool = False
    metrics: bool = False
    # Where Prometheus scrapes, when sluice run serves metrics.
    metrics_url: str | None = None
    _server: Any = None

    def shutdown(self) -> None:
        from sluicegate.streams import metrics, tracing

        if self.tracing:
            tracing.shutdown()
        if self.metrics:
            metrics.shutdown()
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()


def configure_telemetry(
    settings: Settings, *, serve_metrics: bool = False, service_name: str = "sluicegate"
) -> Telemetry:
    """Turn on tracing and metrics as the settings say; nothing when nothing is configured.

    ``SLUICE_OTLP_ENDPOINT`` set: spans (sampled parent-based at
    ``SLUICE_TRACE_SAMPLE_RATIO``) and metrics go there over OTLP/HTTP, from
    background threads. ``serve_metrics`` with ``SLUICE_METRICS_PORT`` set
    (``sluice run --metrics-port``): a Prometheus endpoint on
    ``SLUICE_METRICS_HOST`` (loopback unless told otherwise) serves the same
    metrics. Long-lived commands serve metrics; one-shot ones (``sluice
    publish``) only export. The providers become the process's global ones, so
    spans and metrics that steps record through the OpenTelemetry API go the
    same way.
    """
    from sluicegate.streams import metrics, tracing

    telemetry = Telemetry()
    endpoint = settings.otlp_endpoint
    resource = {
        "sluice.transport": settings.transport,
        "sluice.topic_prefix": settings.topic_prefix,
    }
    if endpoint is not None:
        tracing.configure(
            endpoint=endpoint,
            sample_ratio=settings.trace_sample_ratio,
            service_name=service_name,
            set_global=True,
            resource_attributes=resource,
        )
        telemetry.tracing = True
        log.info(
            "tracing to %s (sample ratio %g for new traces)", endpoint, settings.trace_sample_ratio
        )
    readers: list[Any] = []
    port = settings.metrics_port if serve_metrics else None
    if port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        from sluicegate import health

        # A registry of our own: no process-wide default collectors, and a
        # second configuration in one process does not collide with the first.
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        try:
            # /metrics, and the /healthz and /readyz probes beside it.
            server = health.serve(settings.metrics_host, port, registry)
        except OSError as exc:
            telemetry.shutdown()
            raise OSError(
                f"cannot serve metrics on {settings.metrics_host}:{port}: {exc.strerror or exc}"
            ) from exc
        telemetry._server = server
        telemetry.metrics_url = f"http://{settings.metrics_host}:{port}/metrics"
        log.info("serving Prometheus metrics on %s", telemetry.metrics_url)
    if readers or endpoint is not None:
        metrics.configure(
            readers=readers,
            endpoint=endpoint,
            service_name=service_name,
            set_global=True,
            resource_attributes=resource,
        )
        telemetry.metrics = True
    return telemetry


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT finish the batch in hand, then stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
