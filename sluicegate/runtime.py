"""Wiring: build transports and checkpoint stores from settings, and run steps.

This is where the application chooses concrete implementations; the
libraries below it only see the ``Transport`` and ``CheckpointStore`` protocols.
It also turns telemetry on from settings (:func:`configure_telemetry`):
``streams.tracing`` and ``streams.metrics`` stay off until it is called.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from sluicegate import worker_log
from sluicegate.cli_errors import redact
from sluicegate.service_security import kafka_security_options, nats_connect_options
from sluicegate.settings import Settings, TransportName
from sluicegate.streams.checkpoint import CheckpointStore
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.partitioning import owned_partitions
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.step import Processor
from sluicegate.streams.transport import Transport

log = logging.getLogger("sluicegate")


def make_transport(
    settings: Settings, kind: TransportName | None = None, *, worker: bool = False
) -> Transport:
    """An unconnected transport of ``kind`` (default: the configured one).

    A ``worker``'s NATS connection keeps reconnecting for as long as it takes:
    how long an outage is ridden out is the runners' outage patience, not the
    client's reconnect budget (after which the connection would be closed
    for good and nothing could recover).
    """
    kind = kind or settings.transport
    if kind == "nats":
        from sluicegate.streams.transports.nats import NatsTransport

        tuning: dict[str, Any] = {"max_reconnect_attempts": -1} if worker else {}
        if settings.nats_url is None:
            # The local stack: bounded retention, so .sluice stays small.
            tuning["max_age"] = settings.local_retention_hours * 3600
        return NatsTransport(
            settings.resolved_nats_url(),
            prefix=settings.topic_prefix,
            partitions=settings.partitions,
            connect_options=nats_connect_options(settings),
            **tuning,
        )
    from sluicegate.streams.transports.kafka import KafkaTransport

    return KafkaTransport(
        settings.resolved_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        partitions=settings.partitions,
        **kafka_security_options(settings),
    )


async def open_store(settings: Settings) -> CheckpointStore:
    from sluicegate.sinks.store import PostgresCheckpointStore

    return await PostgresCheckpointStore.connect(
        settings.resolved_database_url(),
        schema=settings.db_schema,
        connect_timeout_s=settings.db_connect_timeout,
        statement_timeout_s=settings.db_statement_timeout,
    )


class NotMigratedError(SluiceError, RuntimeError):
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


# Full collections: one per this many collections of the middle generation
# (Python's default is 10). See tune_gc.
GC_FULL_EVERY = 1000


def tune_gc() -> None:
    """Garbage-collector settings for a worker, once its steps have started.

    A worker keeps thousands of events, states and ids alive while it
    allocates a few objects per event more, so CPython's default thresholds
    ran a full collection, which walks every live object, every few
    thousand events: 15-30% of a step's CPU in issue 20's profile. What
    start-up built (modules, clients, schemas) is never garbage, so it is
    frozen out of every collection, and full collections run a hundred times
    less often; young cycles are still collected as before.
    """
    young, middle, full = gc.get_threshold()
    if full == GC_FULL_EVERY:
        return  # once per process: a second freeze would pin a finished run's garbage
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, GC_FULL_EVERY)


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
    pipeline: str = "reference",
) -> list[StepRunner]:
    """Run ``steps`` in this process until ``stop`` is set; returns the runners (for stats).

    ``pipeline`` names them in the startup log line.

    ``stop`` set during start-up ends it at once (start-up waits are bounded
    anyway). A runner that gives up (an outage outlasting its patience, a
    permanent store error) stops the others and its error is raised.
    """
    # A bundle `sluice policy check` rejects is refused before anything starts.
    worker_log.vet_policies(steps)
    config = config or settings.runner_config()
    transport = make_transport(settings, kind, worker=True)
    partitions = (
        owned_partitions(instance[0], instance[1], settings.partitions) if instance else None
    )
    runners: list[StepRunner] = []
    stores: list[CheckpointStore] = []

    async def connect() -> None:
        # Bounded: a Postgres that accepts connections and never answers
        # must not hang the worker before its first log line.
        limit = settings.db_connect_timeout + settings.db_statement_timeout
        try:
            async with asyncio.timeout(limit):
                await require_migrated(settings)
        except TimeoutError as exc:
            raise TimeoutError(
                f"Postgres at {redact(settings.resolved_database_url())} did not answer "
                f"within {limit:g}s (SLUICE_DB_CONNECT_TIMEOUT, SLUICE_DB_STATEMENT_TIMEOUT)"
            ) from exc
        await transport.connect()
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

    try:
        if not await _unless_stopped(stop, connect()):
            log.warning("stopped during start-up")
            return runners
        async with worker_log.reporting(
            runners, settings, transport, pipeline=pipeline, partitions=partitions
        ):
            # In parallel: on Kafka each step joins its own consumer group, and
            # one after another the six groups took 6-7 s to start a worker.
            starts = asyncio.gather(*(r.start() for r in runners))
            if not await _unless_stopped(stop, starts):
                log.warning("stopped during start-up")
                return runners
            tune_gc()
            await _run_all(runners, stop)
    finally:
        for runner in runners:
            await runner.close()
        for store in stores:
            await store.close()
        await transport.close()
        await _close_model_sessions()
    return runners


async def _run_all(runners: Sequence[StepRunner], stop: asyncio.Event) -> None:
    """Run every runner until ``stop``; the first to fail stops the rest and its error is raised."""
    try:
        # A task group, not gather: one runner that gives up cancels the
        # others (which then close), instead of leaving them running.
        async with asyncio.TaskGroup() as group:
            for runner in runners:
                group.create_task(runner.run(stop), name=f"run {runner.processor.name}")
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[Any]) -> bool:
    """Await ``work``; False (and ``work`` cancelled) if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            # A cancelled connect or join ends promptly; its error is moot.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # raises what start-up raised
    return True


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group that is not a cancellation (one line for the CLI)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


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


def stop_on_signals(stop: asyncio.Event, *, grace: float | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``: stop fetching, drain, checkpoint, exit.

    With ``grace`` (SLUICE_SHUTDOWN_GRACE): a process still running ``grace``
    seconds after the first signal, or given a second one, exits at once,
    whatever it waits for (a broker or Postgres outage, a retry loop, a
    commit). Nothing committed is lost that way: a checkpoint is one Postgres
    transaction, and what was not checkpointed is fetched again.
    """
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            if grace is not None:
                log.warning("%s: stopping (exiting at the latest in %gs)", sig.name, grace)
                loop.call_later(grace, _exit_now, f"still running {grace:g}s after {sig.name}")
            return
        if grace is not None:
            _exit_now(f"a second {sig.name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)


# The exit status of a worker ended by SIGTERM before it finished (128 + 15).
FORCED_EXIT_CODE = 143


def _exit_now(why: str) -> None:
    """End the process now: the last resort of a shutdown that does not finish."""
    log.error("%s: exiting now; what was not checkpointed is fetched again", why)
    for handler in logging.getLogger().handlers:
        with suppress(Exception):
            handler.flush()
    # os._exit, not sys.exit: whatever the loop waits on (a hung socket, a
    # task that swallows cancellation) must not keep the process alive.
    os._exit(FORCED_EXIT_CODE)
