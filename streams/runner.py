"""The step runner: consume → process → produce → checkpoint → ack, in batches.

For each fetched batch (DESIGN.md, "The step runner and the commit protocol"):

1. skip messages at or below the partition's stored offset, and events whose
   id this step already processed (a re-produced output after a crash);
   decode the rest; what fails to decode or validate is a dead letter;
2. run the step on each event against its session's keyed state (a step that
   raises is retried a bounded number of times, then dead-lettered; state
   changes of a failed attempt are discarded);
3. produce all outputs and dead letters and wait for the broker's acks;
4. one checkpoint-store transaction: audit rows, changed state, results and
   the last processed offset of every input partition;
5. commit the offsets (Kafka) or ack (NATS).

The loop handles one batch at a time, so a slow broker or Postgres slows
consumption instead of growing memory. State lives in memory for the owned
partitions as canonical JSON bytes, loaded from the store on assignment; a
step gets a fresh dict per event, so a failed attempt leaves no trace and a
change is detected by comparing bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from streams import metrics, tracing
from streams.checkpoint import CheckpointStore, CommitBatch, StaleBatchError
from streams.codec import DataRegistry, DecodeError, EncodeError, decode, encode, headers_for
from streams.envelope import Event
from streams.partitioning import partition_for
from streams.step import AuditRecord, Context, Output, Processor, StateKey, TickContext
from streams.transport import (
    Message,
    OutMessage,
    Subscription,
    TopicPartition,
    Transport,
    TransportError,
)

log = logging.getLogger("sluicegate.runner")

DLQ_TOPIC = "dlq"
# Dead letters keep the original bytes as their body; what went wrong travels
# in these headers, so the poisoned message is preserved exactly.
H_DLQ_REASON = "sluice-dlq-reason"
H_DLQ_ERROR = "sluice-dlq-error"
H_DLQ_MESSAGE = "sluice-dlq-message"
H_DLQ_STEP = "sluice-dlq-step"
H_DLQ_SOURCE = "sluice-dlq-source"  # topic/partition/offset of the original


@dataclass(slots=True)
class RunnerConfig:
    batch_size: int = 500
    fetch_timeout_s: float = 0.25
    max_attempts: int = 3
    retry_backoff_s: float = 0.02
    commit_attempts: int = 5
    tick_interval_s: float = 1.0
    # How many recent input ids per partition are kept to absorb re-produced events.
    dedupe_window: int = 50_000
    max_event_bytes: int = 1024 * 1024
    # Testing aid: SIGKILL this process right after this many checkpoint commits
    # (of all runners in the process), before the broker ack: the narrowest
    # window of the commit protocol.
    crash_after_commits: int | None = None
    # Consecutive broker/store failures run() rides out before giving up.
    max_consecutive_failures: int = 12


@dataclass(slots=True)
class RunnerStats:
    batches: int = 0
    processed: int = 0
    outputs: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    skipped: int = 0
    retries: int = 0
    stale_batches: int = 0
    tick_errors: int = 0
    last_batch_s: float = 0.0
    by_partition: dict[TopicPartition, int] = field(default_factory=dict)


class _Dedupe:
    """A bounded set of recent ids for one partition."""

    __slots__ = ("_limit", "_order", "_seen")

    def __init__(self, limit: int, initial: Iterable[str] = ()) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        for item in initial:
            self.add(item)

    def __contains__(self, item: str) -> bool:
        return item in self._seen

    def add(self, item: str) -> None:
        if item in self._seen:
            return
        self._seen.add(item)
        self._order.append(item)
        if len(self._order) > self._limit:
            self._seen.discard(self._order.popleft())


class _Poison(Exception):
    """Internal: an event that must be dead-lettered, with its reason."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class StepRunner:
    """Runs one step over its input topics until ``stop`` is set."""

    def __init__(
        self,
        processor: Processor,
        transport: Transport,
        store: CheckpointStore,
        *,
        partitions: Sequence[int] | None = None,
        config: RunnerConfig | None = None,
        group: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.processor = processor
        self.transport = transport
        self.store = store
        self.config = config or RunnerConfig()
        self.partitions = partitions
        # Transports namespace groups under their prefix themselves.
        self.group = group or processor.name
        self.stats = RunnerStats()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._registry = _registry_for(processor.accepts)
        self._offsets: dict[TopicPartition, int] = {}
        self._states: dict[StateKey, bytes] = {}
        self._state_partition: dict[StateKey, int] = {}
        self._dedupe: dict[int, _Dedupe] = {}
        self._owned: frozenset[TopicPartition] = frozenset()
        self._sub: Subscription | None = None
        self._outputs = frozenset(processor.outputs)
        self._has_tick = callable(getattr(processor, "tick", None))
        self._last_tick = 0.0
        self._pending_ids: dict[int, set[str]] = {}
        # Observability: the tracer is read once per batch, so with tracing
        # off no event pays more than one ``is None`` check (streams.tracing).
        self._tracer: tracing.Tracer | None = None
        self._hop_site = tracing.HopSite(
            system=transport.name, prefix=transport.prefix, step=processor.name, group=self.group
        )
        self._metrics = metrics.StepMetrics(processor.name, prefix=transport.prefix)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        topics = [*self.processor.inputs, *self.processor.outputs, DLQ_TOPIC]
        await self.transport.ensure_topics(dict.fromkeys(topics))
        self._sub = await self.transport.subscribe(
            list(self.processor.inputs),
            group=self.group,
            partitions=self.partitions,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished first."""
        if self._sub is None:
            await self.start()
        failures = 0
        try:
            while not stop.is_set():
                try:
                    await self.run_once()
                    failures = 0
                except (TransportError, OSError, StoreUnavailableError) as exc:
                    # A broker hiccup or a rebalance error must not end the
                    # worker; the batch in hand was rewound (handle_batch).
                    failures += 1
                    if failures >= self.config.max_consecutive_failures:
                        raise
                    delay = min(5.0, self.config.retry_backoff_s * 2**failures)
                    log.warning(
                        "%s: %s (attempt %d, retrying in %.2fs)",
                        self.processor.name,
                        exc,
                        failures,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            await self.close()

    async def run_once(self) -> int:
        """Fetch and fully handle one batch; returns how many messages it held."""
        assert self._sub is not None, "call start() first"
        messages = await self._sub.fetch(self.config.batch_size, self.config.fetch_timeout_s)
        if messages:
            await self.handle_batch(messages)
        if self._has_tick and time.monotonic() - self._last_tick >= self.config.tick_interval_s:
            self._last_tick = time.monotonic()
            await self.tick()
        return len(messages)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.close()

    # -- partition ownership -------------------------------------------------

    async def _on_assign(self, tps: frozenset[TopicPartition]) -> None:
        self._owned = self._owned | tps
        await self._load(tps)

    async def _on_revoke(self, tps: frozenset[TopicPartition]) -> None:
        self._owned = self._owned - tps
        gone = {tp.partition for tp in tps} - {tp.partition for tp in self._owned}
        for tp in tps:
            self._offsets.pop(tp, None)
        for key, partition in list(self._state_partition.items()):
            if partition in gone:
                del self._state_partition[key]
                self._states.pop(key, None)
        for partition in gone:
            self._dedupe.pop(partition, None)

    async def _load(self, tps: Iterable[TopicPartition]) -> None:
        """Load offsets, state and recent ids from the store, and seek past what is done."""
        tps = list(tps)
        name = self.processor.name
        offsets = await self.store.load_offsets(name, tps)
        partitions = sorted({tp.partition for tp in tps})
        states = await self.store.load_states(name, partitions)
        for key, blob in states.items():
            self._states[key] = blob
        for partition in partitions:
            recent = await self.store.load_recent_ids(name, partition, self.config.dedupe_window)
            self._dedupe[partition] = _Dedupe(self.config.dedupe_window, recent)
        for tp in tps:
            if tp in offsets:
                self._offsets[tp] = offsets[tp]
            else:
                self._offsets.pop(tp, None)
        for key in states:
            self._state_partition[key] = partition_for(
                key.session.encode(), self.transport.partitions
            )
        if self._sub is not None:
            for tp, offset in offsets.items():
                await self._sub.seek(tp, offset + 1)

    # -- the batch ---------------------------------------------------------

    async def handle_batch(self, messages: Sequence[Message]) -> None:
        started = time.perf_counter()
        batch = CommitBatch(step=self.processor.name)
        produce: list[OutMessage] = []
        # State and seen ids change in this overlay until the store has
        # committed, so a failed commit leaves memory equal to Postgres.
        self._pending_ids = {}
        self._tracer = tracing.tracer()
        for msg in messages:
            await self._handle_message(msg, batch, produce)
        try:
            if produce:
                await self.transport.publish_batch(produce)
            if not batch.is_empty():
                await self._commit_with_retry(batch)
        except StaleBatchError as exc:
            # Another worker committed past us (we lost the partition while
            # working): reload the truth and drop this batch. The outputs
            # we produced carry the same ids as theirs and are absorbed
            # downstream.
            log.warning("%s: stale batch, reloading: %s", self.processor.name, exc)
            self.stats.stale_batches += 1
            await self._reload(batch.offsets.keys())
            return
        except Exception as exc:
            # Nothing of this batch is checkpointed: rewind so it is fetched
            # again, and let run() back off and retry.
            await self._rewind(messages)
            if isinstance(exc, TransportError | OSError):
                raise
            raise StoreUnavailableError(f"checkpoint commit failed: {exc}") from exc
        if not batch.is_empty():
            self._apply(batch)
            self._maybe_crash()
        if self._sub is not None:
            try:
                await self._sub.commit(messages)
            except TransportError as exc:
                # Postgres already holds the progress; a restart seeks from it.
                log.warning("%s: broker commit failed (harmless): %s", self.processor.name, exc)
        self.stats.batches += 1
        self.stats.last_batch_s = time.perf_counter() - started
        self._metrics.batch_done(
            batch.audit,
            len(produce),
            self.stats.duplicates,
            self.stats.last_batch_s,
            messages,
            self._sub,
        )

    async def _rewind(self, messages: Sequence[Message]) -> None:
        self._pending_ids = {}
        if self._sub is None:
            return
        first: dict[TopicPartition, int] = {}
        for msg in messages:
            first[msg.tp] = min(first.get(msg.tp, msg.offset), msg.offset)
        for tp, offset in first.items():
            try:
                await self._sub.seek(tp, offset)
            except Exception as exc:  # e.g. the partition was revoked meanwhile
                log.warning("%s: cannot rewind %s: %s", self.processor.name, tp, exc)

    def _maybe_crash(self) -> None:
        global _commits_in_process
        if self.config.crash_after_commits is None:
            return
        _commits_in_process += 1
        if _commits_in_process >= self.config.crash_after_commits:
            log.warning("%s: crashing on purpose after a checkpoint commit", self.processor.name)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _commit_with_retry(self, batch: CommitBatch) -> None:
        """Commit, retrying transient store failures; the transaction is all or nothing."""
        for attempt in range(1, self.config.commit_attempts + 1):
            try:
                await self.store.commit(batch)
                return
            except StaleBatchError:
                raise
            except Exception as exc:
                if attempt == self.config.commit_attempts:
                    raise
                log.warning("%s: checkpoint commit failed, retrying: %s", self.processor.name, exc)
                await asyncio.sleep(self.config.retry_backoff_s * 2**attempt)

    def _apply(self, batch: CommitBatch) -> None:
        """Make the committed batch the runner's in-memory truth."""
        for tp, (_first, last) in batch.offsets.items():
            self._offsets[tp] = last
        for (partition, key), blob in batch.states.items():
            self._states[key] = blob
            self._state_partition[key] = partition
        for partition, ids in self._pending_ids.items():
            seen = self._dedupe.setdefault(partition, _Dedupe(self.config.dedupe_window))
            for event_id in ids:
                seen.add(event_id)

    async def _reload(self, tps: Iterable[TopicPartition]) -> None:
        tps = list(tps)
        partitions = {tp.partition for tp in tps}
        for key, partition in list(self._state_partition.items()):
            if partition in partitions:
                del self._state_partition[key]
                self._states.pop(key, None)
        await self._load(tps)

    async def _handle_message(
        self, msg: Message, batch: CommitBatch, produce: list[OutMessage]
    ) -> None:
        tp = msg.tp
        done = self._offsets.get(tp)
        if done is not None and msg.offset <= done:
            self.stats.skipped += 1
            return
        first_last = batch.offsets.get(tp)
        batch.offsets[tp] = (first_last[0] if first_last else msg.offset, msg.offset)
        self.stats.by_partition[tp] = self.stats.by_partition.get(tp, 0) + 1

        dedupe = self._dedupe.setdefault(msg.partition, _Dedupe(self.config.dedupe_window))
        pending = self._pending_ids.setdefault(msg.partition, set())
        event_id = msg.headers.get("ce_id")
        if event_id is not None and (event_id in dedupe or event_id in pending):
            self.stats.duplicates += 1
            return
        try:
            event = decode(msg.value, max_bytes=self.config.max_event_bytes)
        except DecodeError as exc:
            self._dead_letter(msg, batch, produce, exc.reason, exc, event=None)
            return
        if event.id in dedupe or event.id in pending:
            self.stats.duplicates += 1
            return
        pending.add(event.id)
        hop = None
        if self._tracer is not None:
            hop = tracing.start_hop(self._tracer, self._hop_site, msg, event)
        if hop is None:
            await self._handle_event(msg, event, batch, produce, None)
            return
        with hop:
            # The step sees the input re-stamped with the hop's span, so its
            # outputs, audit rows and results continue the trace from here.
            await self._handle_event(msg, hop.event, batch, produce, hop)

    async def _handle_event(
        self,
        msg: Message,
        event: Event,
        batch: CommitBatch,
        produce: list[OutMessage],
        hop: tracing.Hop | None,
    ) -> None:
        try:
            # A valid envelope with bad data keeps its identity in the dead letter,
            # so the audit trail finds it by session and a replay is deduped.
            data = self._registry.validate(event, strict_types=bool(self.processor.accepts))
        except DecodeError as exc:
            self._dead_letter(msg, batch, produce, exc.reason, exc, event=event, hop=hop)
            return
        try:
            outputs, wire, ctx, changed = await self._process(event, data, msg.partition, batch)
        except _Poison as poison:
            self._dead_letter(
                msg, batch, produce, poison.reason, poison.error, event=event, hop=hop
            )
            return
        if hop is not None:
            hop.annotate(ctx.audit, len(outputs))
        if changed is not None:
            batch.states[(msg.partition, StateKey(event.tenant, event.session))] = changed
        self._collect(ctx, msg.partition, batch)
        batch.audit.append((msg.partition, _processed_row(ctx, event, len(outputs))))
        produce.extend(wire)
        self.stats.processed += 1
        self.stats.outputs += len(outputs)

    async def _process(
        self, event: Event, data: BaseModel | None, partition: int, batch: CommitBatch
    ) -> tuple[list[Output], list[OutMessage], Context, bytes | None]:
        """Run the step, retrying failures.

        Returns the outputs, their wire form, the context and the new state if
        it changed. Encoding happens here so that an output that cannot be
        encoded (too large, not JSON) dead-letters its input like any step error.
        """
        key = StateKey(event.tenant, event.session)
        before = batch.states.get((partition, key)) or self._states.get(key)
        attempt = 0
        while True:
            attempt += 1
            # A fresh dict per attempt: a failed attempt leaves no trace in state.
            state: dict[str, Any] = orjson.loads(before) if before else {}
            ctx = Context(
                step=self.processor.name, event=event, state=state, partition=partition, data=data
            )
            try:
                outputs = await self.processor.process(event, ctx)
                self._check_outputs(outputs)
                wire = self._encode_outputs(outputs)
                after = orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
            except Exception as exc:  # a step's bug must not kill the worker
                if isinstance(exc, _BadOutput) or attempt >= self.config.max_attempts:
                    raise _Poison("step_error", exc) from exc
                self.stats.retries += 1
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
                continue
            if after == (before or b"{}"):
                return outputs, wire, ctx, None
            return outputs, wire, ctx, after

    def _encode_outputs(self, outputs: list[Output]) -> list[OutMessage]:
        try:
            return [_to_wire(out) for out in outputs]
        except (EncodeError, TypeError, ValueError) as exc:
            # Deterministic: the same input would fail the same way again.
            raise _BadOutput(f"an output cannot be encoded: {exc}") from exc

    def _check_outputs(self, outputs: object) -> None:
        if not isinstance(outputs, list):
            raise _BadOutput(
                f"process() must return a list of Output, got {type(outputs).__name__}"
            )
        for out in outputs:
            if not isinstance(out, Output):
                raise _BadOutput(f"process() returned {type(out).__name__}, not Output")
            if out.topic not in self._outputs:
                raise _BadOutput(
                    f"step {self.processor.name!r} emitted to {out.topic!r}, "
                    f"which is not among its declared outputs {sorted(self._outputs)}"
                )

    def _collect(self, ctx: Context, partition: int, batch: CommitBatch) -> None:
        batch.audit.extend((partition, row) for row in ctx.audit)
        batch.results.extend(ctx.results)

    def _dead_letter(
        self,
        msg: Message,
        batch: CommitBatch,
        produce: list[OutMessage],
        reason: str,
        error: BaseException,
        *,
        event: Event | None,
        hop: tracing.Hop | None = None,
    ) -> None:
        if hop is not None:
            hop.dead_letter(reason, error)
        text = (error.detail if isinstance(error, DecodeError) else str(error))[:1000]
        headers = {
            H_DLQ_REASON: reason,
            H_DLQ_ERROR: type(error).__name__,
            H_DLQ_MESSAGE: text,
            H_DLQ_STEP: self.processor.name,
            H_DLQ_SOURCE: f"{msg.topic}/{msg.partition}/{msg.offset}",
        }
        if event is not None:
            headers["ce_id"] = event.id
            if event.traceparent:
                headers["traceparent"] = event.traceparent
        produce.append(OutMessage(DLQ_TOPIC, msg.value, key=msg.key, headers=headers))
        row = AuditRecord(
            kind="dead_letter",
            step=self.processor.name,
            event_id=event.id if event else f"{msg.topic}/{msg.partition}/{msg.offset}",
            event_type=event.type if event else "",
            tenant=event.tenant if event else "",
            session=event.session if event else "",
            causation_id=event.causationid if event else None,
            reasons=(reason,),
            trace_id=_trace_id(event),
            detail={
                "error": type(error).__name__,
                "message": text,
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
            },
        )
        batch.audit.append((msg.partition, row))
        self.stats.dead_letters += 1
        log.warning(
            "%s: dead-lettered %s/%s/%s (%s): %s",
            self.processor.name,
            msg.topic,
            msg.partition,
            msg.offset,
            reason,
            text,
        )

    # -- time-driven work ----------------------------------------------------

    async def tick(self, now: datetime | None = None) -> None:
        """Run the step's ``tick`` once (at ``now``, default the clock) and commit its work.

        A tick that raises or emits to an undeclared topic is logged and its
        work discarded: like ``process``, a step's bug must not kill the worker.
        """
        if not self._has_tick:
            return
        live = {key: orjson.loads(blob) for key, blob in self._states.items()}
        tc = TickContext(step=self.processor.name, states=live)
        tick = self.processor.tick  # type: ignore[attr-defined]
        try:
            outputs: list[Output] = await tick(now or self._clock(), tc)
            self._check_outputs(outputs)
        except Exception:
            log.exception("%s: tick failed; its work is discarded", self.processor.name)
            self.stats.tick_errors += 1
            return
        batch = CommitBatch(step=self.processor.name)
        for key in tc.touched:
            after = orjson.dumps(live[key], option=orjson.OPT_SORT_KEYS)
            if after != self._states.get(key):
                batch.states[(self._state_partition[key], key)] = after
        batch.results.extend(tc.results)
        for row in tc.audit:
            batch.audit.append(
                (self._state_partition.get(StateKey(row.tenant, row.session), 0), row)
            )
        if outputs:
            await self.transport.publish_batch([_to_wire(o) for o in outputs])
        if not batch.is_empty():
            await self._commit_with_retry(batch)
            self._pending_ids = {}
            self._apply(batch)


# Checkpoint commits of every runner in this process (for crash_after_commits).
_commits_in_process = 0


class StoreUnavailableError(RuntimeError):
    """The checkpoint store failed a commit after its retries; the batch was rewound."""


class _BadOutput(TypeError):
    """A step returned something that is not a list of Output to declared topics."""


def _registry_for(accepts: Mapping[str, type[BaseModel]]) -> DataRegistry:
    registry = DataRegistry()
    for event_type, model in accepts.items():
        registry.register(event_type, model)
    return registry


def _to_wire(out: Output) -> OutMessage:
    event = out.event
    return OutMessage(out.topic, encode(event), key=event.key, headers=headers_for(event))


def _trace_id(event: Event | None) -> str | None:
    from streams.step import trace_id_of

    return trace_id_of(event.traceparent) if event is not None else None


def _processed_row(ctx: Context, event: Event, outputs: int) -> AuditRecord:
    return AuditRecord(
        kind="processed",
        step=ctx.step,
        event_id=event.id,
        event_type=event.type,
        tenant=event.tenant,
        session=event.session,
        causation_id=event.causationid,
        trace_id=_trace_id(event),
        detail={**ctx.detail, "outputs": outputs},
    )
