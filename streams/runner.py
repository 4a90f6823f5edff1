"""The step runner: many events in flight, each key in order, checkpointed as one.

Agent steps wait on models and tools, so a runner keeps many inputs in flight
(DESIGN.md and docs/architecture.md, "The commit protocol"):

1. **admit** each fetched input: skip what the stored watermark already
   covers, absorb ids this step already processed (a re-produced output
   after a crash), decode (what fails is a dead letter), and queue the event
   behind its key (tenant, session);
2. **process**: each key with work has one task that runs its events one at
   a time and in order against the session's keyed state, so different keys
   run concurrently and a slow event holds back only its own key. A step
   that raises is retried a bounded number of times, then dead-lettered
   (state changes of a failed attempt are discarded);
3. **checkpoint** (group commit): each event's outputs are sent as soon as
   it completes (``streams.outbox``); what completed since the last
   checkpoint is taken at once: the acks of the outputs sent so far are
   awaited, then one Postgres transaction writes the audit rows, changed
   state, results and the new per-partition watermarks (the highest offset
   below which every input is done); then the broker offsets are committed /
   NATS acked up to the watermarks, by a task of their own while ``run``
   runs (advisory: a restart seeks from Postgres). While one checkpoint
   runs, completions gather for the next, so Postgres round trips do not
   grow with concurrency;
4. **backpressure**: at most ``max_in_flight`` inputs are fetched and not yet
   passed by their partition's watermark (not yet acked to the broker);
   fetching waits for room, so a slow model slows consumption instead of
   growing memory. Counting done-above-gap inputs too bounds what a restart
   fetches again, so the recent-ids window that absorbs it can be bounded.

Inputs done above a gap (a slow key below them) are checkpointed with their
batch; after a crash they are fetched again and absorbed by id. A failed or
stale checkpoint resets the runner: in-flight work is dropped, positions go
back to the first unfinished input and state, offsets and recent ids are
reloaded from the store, so memory always restarts from what Postgres holds.

``run`` keeps fetching while there is room (``pipelined``); ``run_once``
handles one fetched batch to the end (its keys still run concurrently), which
is what the Faust engine and tests drive. State lives in memory for the owned
partitions as canonical JSON bytes; a step gets a fresh dict per event, and a
change is detected by comparing bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from sluicegate.streams import health, metrics, tracing
from sluicegate.streams.approvals import ApprovalDesk
from sluicegate.streams.checkpoint import (
    CheckpointStore,
    CommitBatch,
    Progress,
    StaleBatchError,
    StorePermanentError,
)
from sluicegate.streams.codec import (
    DataRegistry,
    DecodeError,
    EncodeError,
    decode,
    encode,
    headers_for,
)
from sluicegate.streams.dead_letters import (
    DLQ_TOPIC,
    H_DLQ_ERROR,
    H_DLQ_MESSAGE,
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    H_DLQ_STEP,
    H_REPLAY,
    dead_letter,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.errors import SluiceError, is_retriable
from sluicegate.streams.inflight import Pending, Slot, Watermarks
from sluicegate.streams.outbox import Outbox
from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.stalls import PartitionView, StallWatch
from sluicegate.streams.step import (
    AuditRecord,
    Context,
    DeadLetter,
    Output,
    Processor,
    StateKey,
    TickContext,
    trace_id_of,
)
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    Subscription,
    TopicPartition,
    Transport,
    TransportError,
)

log = logging.getLogger("sluicegate.runner")

__all__ = [
    "DLQ_TOPIC",
    "H_DLQ_ERROR",
    "H_DLQ_MESSAGE",
    "H_DLQ_REASON",
    "H_DLQ_SOURCE",
    "H_DLQ_STEP",
    "OutageError",
    "RunnerConfig",
    "RunnerStats",
    "StepRunner",
    "StoreUnavailableError",
]

# The default bound on inputs in flight per step runner. Measured with the
# planner on a 200 ms model (sluice bench --mode pipeline --model-latency):
# see README "Benchmarks". Each input in flight costs a few kB.
DEFAULT_MAX_IN_FLIGHT = 4096


@dataclass(slots=True)
class RunnerConfig:
    # Most messages one fetch asks for (also bounded by the room left in flight).
    batch_size: int = 500
    fetch_timeout_s: float = 0.25
    # Inputs fetched and not yet passed by their partition's watermark (not
    # yet acked to the broker), per runner (SLUICE_MAX_IN_FLIGHT).
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # How long a checkpoint waits for more completions to join it once one
    # is there (SLUICE_COMMIT_INTERVAL_MS). Under load completions gather while
    # the previous checkpoint runs anyway; this only coalesces a trickle.
    commit_interval_s: float = 0.002
    # False: run() handles one fetched batch to the end before fetching again
    # (the Faust engine, whose rebalances expect a batch barrier).
    pipelined: bool = True
    # On stop or revoke: how long in-flight events may take to finish.
    drain_timeout_s: float = 10.0
    max_attempts: int = 3
    retry_backoff_s: float = 0.02
    commit_attempts: int = 5
    tick_interval_s: float = 1.0
    # How many recent input ids per partition are kept to absorb re-produced
    # events; None: twice max_in_flight. After a restart a partition fetches
    # again at most max_in_flight inputs it may have done; the rest of the
    # window absorbs an upstream step's replayed outputs.
    dedupe_window: int | None = None
    max_event_bytes: int = 1024 * 1024
    # How long run() rides out consecutive broker or store failures (backing
    # off, at most 5 s between attempts) before it gives up with an
    # OutageError (SLUICE_OUTAGE_PATIENCE). Permanent store errors end it at once.
    outage_patience_s: float = 300.0
    # A partition with lag and no progress for this long is reported as
    # stalled (log, metric, /readyz) and its reader repaired
    # (SLUICE_STALL_TIMEOUT); 0 turns the watch off.
    stall_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dedupe_window is not None and self.dedupe_window < 0:
            raise ValueError(f"dedupe_window must not be negative, got {self.dedupe_window}")

    @property
    def recent_ids(self) -> int:
        """The dedupe window in effect, per partition."""
        if self.dedupe_window is not None:
            return self.dedupe_window
        return 2 * self.max_in_flight


@dataclass(slots=True)
class RunnerStats:
    batches: int = 0  # checkpoints
    processed: int = 0
    outputs: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    skipped: int = 0
    retries: int = 0
    stale_batches: int = 0
    resets: int = 0
    tick_errors: int = 0
    last_batch_s: float = 0.0
    # Most inputs in flight at once, and most processed concurrently.
    peak_in_flight: int = 0
    peak_concurrency: int = 0
    by_partition: dict[TopicPartition, int] = field(default_factory=dict)


class _Dedupe:
    """A bounded set of recent ids for one partition, and which of them were dead-lettered.

    ``dead`` holds the ids whose latest fate in this step is a dead letter:
    a replay of one of those (``sluice dlq replay``) is processed, every
    other copy of a seen id is absorbed.
    """

    __slots__ = ("_limit", "_order", "_seen", "dead")

    def __init__(self, limit: int, initial: Iterable[str] = (), dead: Iterable[str] = ()) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        for item in initial:
            self.add(item)
        self.dead: set[str] = {item for item in dead if item in self._seen}

    def __contains__(self, item: str) -> bool:
        return item in self._seen

    def add(self, item: str) -> None:
        if item in self._seen:
            return
        self._seen.add(item)
        self._order.append(item)
        if len(self._order) > self._limit:
            gone = self._order.popleft()
            self._seen.discard(gone)
            self.dead.discard(gone)

    def absorbs(self, item: str, replay: bool) -> bool:
        """Whether a message with id ``item`` is a copy to absorb.

        A replay is let through once when the id was dead-lettered: from
        then on it is in flight (or done), so a second copy is absorbed.
        """
        if item not in self._seen:
            return False
        if replay and item in self.dead:
            self.dead.discard(item)
            return False
        return True


class _Poison(Exception):
    """Internal: an event that must be dead-lettered, with its reason."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


# One key's queue: its admitted events, in order.
_KeyQueue = deque[tuple[Slot, Event, BaseModel | None]]


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
        owner: str | None = None,
    ) -> None:
        self.processor = processor
        # Who claims the partitions (step_offsets.owner): this worker process.
        self.owner = owner or default_owner()
        self.transport = transport
        self.store = store
        self.config = config or RunnerConfig()
        self.partitions = partitions
        # Transports namespace groups under their prefix themselves.
        self.group = group or processor.name
        self.stats = RunnerStats()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._registry = _registry_for(processor.accepts)
        # Committed truth (as of the last checkpoint) and working state.
        self._offsets: dict[TopicPartition, int] = {}
        self._states: dict[StateKey, bytes] = {}
        self._state_partition: dict[StateKey, int] = {}
        self._dedupe: dict[int, _Dedupe] = {}
        self._owned: frozenset[TopicPartition] = frozenset()
        # Ownership epochs claimed on assignment; partitions another worker
        # claimed since (a refused checkpoint told us) are fenced: their
        # messages are left to the new owner until the transport revokes them.
        self._epochs: dict[TopicPartition, int] = {}
        self._fenced: set[TopicPartition] = set()
        # Partitions between assignment and the end of their load, and those
        # being revoked: their messages are left unadmitted. Kafka fetches a
        # newly assigned partition (from the group's committed offset) while
        # on_assign still loads its progress and recent ids, so admitting
        # them would redo work done above the last watermark; the seek that
        # ends the load moves the position back and they are fetched again.
        self._loading: set[TopicPartition] = set()
        # Partitions whose load on assignment failed: retried by the fetch loop.
        self._load_failed: set[TopicPartition] = set()
        self._revoking: set[TopicPartition] = set()
        # What admission lets in: owned, less fenced, loading and revoking
        # (one set lookup per message; _update_admitting keeps it current).
        self._admitting: frozenset[TopicPartition] = frozenset()
        # Progress identity: each input topic's log (transport, full name,
        # incarnation); the store keys progress by it, so a recreated topic
        # or another transport's log never inherits these offsets.
        self._logs: dict[str, str] = {}
        # Partitions whose stored offset lies beyond the end of their log:
        # stopped (nothing processed) until an operator resets them.
        self._stopped: set[TopicPartition] = set()
        self._seeks: dict[TopicPartition, int] = {}
        self._sub: Subscription | None = None
        self._outputs = frozenset(processor.outputs)
        self._has_tick = processor.ticks
        self._opened = False
        self._last_tick = 0.0
        # In flight: admitted inputs, the keys with work, their tasks.
        self._marks = Watermarks()
        self._pending = Pending(CommitBatch(step=processor.name))
        # Outputs go out as their events complete; a checkpoint waits for their acks.
        # (Through self.transport at each send, not its bound method now.)
        self._outbox: Outbox[OutMessage] = Outbox(self._publish, f"{processor.name} outputs")
        self._keys: dict[StateKey, _KeyQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._busy = 0  # events inside process() right now
        self._skipped_acks: list[Message] = []
        # Broker acks of checkpointed inputs, sent by a task of their own
        # while ``run`` runs: Postgres holds the progress once a checkpoint
        # is in, so the broker's copy (a Kafka group offset, a JetStream ack
        # floor) is advisory and a restart seeks from Postgres. Awaiting it
        # in the checkpoint cost a broker round trip each (100-300 ms on
        # Tansu under load, issue 20), holding up the next one. In
        # checkpoint order, so a Kafka group offset only moves forward.
        self._acks: Outbox[Message] = Outbox(self._ack_advisory, f"{processor.name} broker acks")
        # Serialises checkpoints with resets, so a reload never misses a commit.
        self._commit_lock = asyncio.Lock()
        # Set when work completes (the committer's cue) and when room frees up
        # or the committer fails (the fetch loop's cue).
        self._completed = asyncio.Event()
        self._wake = asyncio.Event()
        self._broken: BaseException | None = None
        self._needs_reset = False
        self._rewind_to: dict[TopicPartition, int] = {}
        self._running = False
        # Observability: the tracer is read once per fetch, so with tracing
        # off no event pays more than one ``is None`` check (streams.tracing).
        self._tracer: tracing.Tracer | None = None
        self._hop_site = tracing.HopSite(
            system=transport.name, prefix=transport.prefix, step=processor.name, group=self.group
        )
        self._metrics = metrics.StepMetrics(processor.name, prefix=transport.prefix)
        # Failure paths: when the current run of failures began (outage
        # patience), and the watch for partitions that stall silently.
        self._failing_since = 0.0
        self._batches_at_failure = 0
        stall = self.config.stall_timeout_s
        self._stalls = StallWatch(stall) if stall > 0 else None
        self._next_stall_check = 0.0
        self._ends_task: asyncio.Task[dict[TopicPartition, int]] | None = None
        self._ends_asked: dict[TopicPartition, int | None] = {}

    @property
    def in_flight(self) -> int:
        """Inputs fetched and not yet checkpointed."""
        return self._in_flight

    @property
    def ready(self) -> bool:
        """Subscribed and done loading what it was given.

        ``subscribe`` returns after the first assignment round (a Kafka
        group's join, a NATS ownership round, a static set), so a runner
        that holds its subscription has been offered its partitions, also
        when its share is none (more workers than partitions).
        """
        return self._sub is not None and not self._loading

    def positions(self) -> dict[TopicPartition, int | None]:
        """The partitions owned now, each with its stored offset (None: nothing done yet)."""
        return {tp: self._offsets.get(tp) for tp in sorted(self._owned)}

    # -- lifecycle ---------------------------------------------------------

    def _topics(self) -> list[str]:
        return [*self.processor.inputs, *self.processor.outputs, DLQ_TOPIC]

    async def start(self) -> None:
        if not self._opened:
            # Before anything is fetched: the step's clients are ready for
            # its first event; close() undoes it.
            await self.processor.open()
            self._opened = True
        topics = [*self.processor.inputs, *self.processor.outputs, DLQ_TOPIC]
        await self.transport.ensure_topics(dict.fromkeys(topics))
        self._sub = await self.transport.subscribe(
            list(self.processor.inputs),
            group=self.group,
            partitions=self.partitions,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        await self._apply_seeks()

    async def run(self, stop: asyncio.Event) -> None:
        """Process until ``stop`` is set, then drain what is in flight and checkpoint it."""
        if self._sub is None:
            await self.start()
        try:
            if self.config.pipelined:
                await self._run_pipelined(stop)
            else:
                await self._run_batches(stop)
        finally:
            await self.close()

    async def _run_batches(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self.run_once()
                failures = self._healthy(failures)
            except Exception as exc:
                # A broker hiccup or a rebalance error must not end the
                # worker; the batch in hand was rewound (handle_batch).
                # What says retrying cannot help (SluiceError.retriable) does.
                if not (is_retriable(exc) or isinstance(exc, OSError)):
                    raise
                failures = await self._back_off(failures, exc)

    async def _run_pipelined(self, stop: asyncio.Event) -> None:
        self._running = True
        committer = asyncio.create_task(self._committer(), name=f"{self.processor.name} commits")
        failures = 0
        drain = True
        try:
            while not stop.is_set():
                try:
                    if self._broken is not None or self._needs_reset:
                        await self._recover()
                    if committer.done():
                        committer = asyncio.create_task(
                            self._committer(), name=f"{self.processor.name} commits"
                        )
                    if self._load_failed:
                        await self._retry_loads()
                    await self._fetch_and_admit(stop)
                    await self._maybe_tick()
                    if not failures:  # (during an outage nothing progresses anyway)
                        await self._watch_stalls()
                    failures = self._healthy(failures)
                except Exception as exc:
                    # Whatever fails on the way (broker, store, a rebalance
                    # callback's error re-raised by fetch) is retried with
                    # backoff until it works or the outage patience runs out:
                    # never swallowed, never a silent stop. Our errors that
                    # say retrying cannot help (a refused store, the patience
                    # spent: SluiceError.retriable false) end the runner.
                    if isinstance(exc, SluiceError) and not exc.retriable:
                        raise
                    failures = await self._back_off(failures, exc)
        except asyncio.CancelledError:
            # Cancelled, not stopped: no waiting for events in flight.
            drain = False
            raise
        finally:
            self._running = False
            await self._drain(committer, wait=drain)

    async def _back_off(self, failures: int, exc: BaseException) -> int:
        """Wait before the next attempt; give up once failing outlasts the outage patience."""
        refused = _permanent(exc)
        if refused is not None:
            raise refused
        name, now = self.processor.name, time.monotonic()
        if failures == 0:
            self._failing_since = now
        failures += 1
        self._batches_at_failure = self.stats.batches
        down = now - self._failing_since
        patience = self.config.outage_patience_s
        if down >= patience:
            raise OutageError(
                f"step {name!r} gave up after {down:.0f}s of failures "
                f"(outage patience {patience:g}s, SLUICE_OUTAGE_PATIENCE): {_one_line(exc)}"
            ) from exc
        delay = min(5.0, self.config.retry_backoff_s * 2**failures)
        # Short: /readyz joins the reasons of every step.
        health.outage(name, f"failing for {down:.0f}s: {_one_line(exc)[:160]}")
        # The first attempts, then about one line a minute: an outage of
        # minutes must not flood the log.
        if failures <= 3 or failures % 12 == 0:
            log.warning(
                "%s: %s (attempt %d, failing for %.0fs, giving up after %gs; retrying in %.2fs)",
                name,
                _one_line(exc),
                failures,
                down,
                patience,
                delay,
            )
        await asyncio.sleep(delay)
        return failures

    def _healthy(self, failures: int) -> int:
        """A loop turn succeeded: the run of failures is over if work got through.

        A turn that only fetched is not enough: with a store or broker that
        fails every checkpoint, fetching and resetting succeed in turn, and
        the outage would never outlast the patience. So a checkpoint must
        have landed since the last failure, or nothing be left in flight.
        """
        if failures and self._in_flight and self.stats.batches == self._batches_at_failure:
            return failures
        if failures:
            down = time.monotonic() - self._failing_since
            log.warning(
                "%s: recovered after %d failed attempts (%.1fs)",
                self.processor.name,
                failures,
                down,
            )
            health.outage(self.processor.name, None)
        return 0

    async def _watch_stalls(self) -> None:
        """Report and repair partitions with lag and no progress (see stalls.py).

        The log ends are read by a task of their own (on Kafka that takes a
        fetch per partition), so the fetch loop never waits for them; the
        turn after they arrive judges and repairs.
        """
        watch, sub = self._stalls, self._sub
        if watch is None or sub is None:
            return
        task = self._ends_task
        if task is None:
            now = time.monotonic()
            if now < self._next_stall_check:
                return
            # A third of the timeout: a stall is seen within about 4/3 of it.
            # Not more often: on Kafka each read of the ends is a consumer of
            # its own (Tansu's ListOffsets is off by a batch).
            self._next_stall_check = now + max(0.2, watch.timeout_s / 3)
            if self._in_flight >= self.config.max_in_flight:
                watch.pause(now)
                health.stalled(self.processor.name, ())
                return
            asked = {tp: self._offsets.get(tp) for tp in self._admitting - self._stopped}
            if asked:
                self._ends_asked = asked
                self._ends_task = asyncio.create_task(self.transport.log_ends(sorted(asked)))
            return
        if not task.done():
            return
        self._ends_task = None
        broker = f"{self.processor.name} broker"
        try:
            ends = task.result()
        except Exception as exc:
            # The broker is away: not ready, even while nothing else fails
            # (an idle consumer's fetches do not raise while it reconnects).
            if broker not in health.outages():
                log.warning("%s: cannot read the log ends: %s", self.processor.name, exc)
            health.outage(broker, f"cannot read the log ends: {_one_line(exc)[:160]}")
            return
        health.outage(broker, None)
        asked, now = self._ends_asked, time.monotonic()
        judged = [tp for tp in sorted(asked) if tp in self._admitting and tp not in self._stopped]
        if any(_shorter(ends.get(tp), asked[tp]) for tp in judged):
            # A log shorter than what was committed on it: made again.
            await self._follow_new_logs()
            return
        busy = self._marks.first_offsets()
        views = {
            tp: PartitionView(
                self._offsets.get(tp), ends.get(tp), self.stats.by_partition.get(tp, 0), tp in busy
            )
            for tp in judged
        }
        before = watch.stalled
        stalled = watch.check(now, views)
        health.stalled(self.processor.name, stalled)
        self._metrics.stalled(len(stalled))
        if stalled:
            await self._follow_new_logs()
        for tp in sorted(stalled & self._admitting):
            committed = self._offsets.get(tp)
            log.warning(
                "%s: %s[%d] stalled: its log ends at %s, %s committed, no progress for %gs%s; "
                "repairing its reader",
                self.processor.name,
                tp.topic,
                tp.partition,
                ends.get(tp),
                "nothing" if committed is None else f"offset {committed}",
                watch.timeout_s,
                " (again)" if tp in before else "",
            )
            # Back to the first input not done: recreates what the transport
            # needs to deliver again (a failure is retried by the loop).
            await sub.seek(tp, 0 if committed is None else committed + 1)
            watch.repaired(time.monotonic(), (tp,))

    async def _fetch_and_admit(self, stop: asyncio.Event) -> None:
        assert self._sub is not None, "call start() first"
        room = self.config.max_in_flight - self._in_flight
        if room <= 0:
            # Backpressure: wait for a checkpoint to free room (or to fail).
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    (waiter, stopper),
                    timeout=self.config.fetch_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
                stopper.cancel()
            return
        messages = await self._sub.fetch(
            min(self.config.batch_size, room), self.config.fetch_timeout_s
        )
        if messages and not stop.is_set():
            # (Fetched after a stop: left unacked, the next owner reads them.)
            self._admit_all(messages)
            # A fetch from the client's buffer completes without suspending:
            # let the admitted keys (and the committer) run before the next
            # one, instead of fetching up to the in-flight bound first.
            await asyncio.sleep(0)

    async def _recover(self) -> None:
        """After a failed or stale checkpoint: reset to what the store holds."""
        broken, self._broken = self._broken, None
        if isinstance(broken, StorePermanentError):
            self._broken = broken  # so the drain does not try it once more
            raise broken
        if isinstance(broken, StaleBatchError):
            log.warning("%s: stale checkpoint, reloading: %s", self.processor.name, broken)
            self.stats.stale_batches += 1
        elif broken is not None:
            log.warning(
                "%s: checkpoint failed, resetting: %s", self.processor.name, _one_line(broken)
            )
        await self._reset_or_raise()
        if isinstance(broken, TransportError):
            # A broker that lost its log: outputs and inputs need their topics
            # back, and inputs are read on the new log (best effort: what
            # fails is tried again on the next failure or stall).
            try:
                await self.transport.ensure_topics(dict.fromkeys(self._topics()))
                await self._follow_new_logs()
            except (TransportError, OSError) as exc:
                log.debug("%s: checking the topics failed: %s", self.processor.name, exc)
        if broken is not None and not isinstance(broken, StaleBatchError):
            # Back off like any failure, after the positions were rewound.
            if isinstance(broken, TransportError | OSError):
                raise broken
            raise StoreUnavailableError(f"checkpoint commit failed: {broken}") from broken

    async def run_once(self) -> int:
        """Fetch one batch and handle it to the end; returns how many messages it held."""
        assert self._sub is not None, "call start() first"
        if self._needs_reset:
            await self._reset_or_raise()
        messages = await self._sub.fetch(self.config.batch_size, self.config.fetch_timeout_s)
        if messages:
            await self.handle_batch(messages)
        await self._maybe_tick(commit=True)
        return len(messages)

    async def handle_batch(self, messages: Sequence[Message]) -> None:
        """Process ``messages`` (keys concurrently, each key in order) and checkpoint them."""
        self._admit_all(messages)
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
        if self._broken is not None:
            broken, self._broken = self._broken, None
            raise broken
        try:
            async with self._commit_lock:
                await self._checkpoint()
        except StaleBatchError as exc:
            # Another worker committed past us (we lost the partition while
            # working): reload the truth and drop this batch. The outputs
            # we produced carry the same ids as theirs and are absorbed
            # downstream.
            log.warning("%s: stale batch, reloading: %s", self.processor.name, exc)
            self.stats.stale_batches += 1
            await self._reset_or_raise()
        except Exception as exc:
            # Nothing of this batch is checkpointed: rewind so it is fetched
            # again, and let run() back off and retry.
            await self._reset_or_raise()
            if isinstance(exc, TransportError | OSError | StorePermanentError):
                raise
            raise StoreUnavailableError(f"checkpoint commit failed: {exc}") from exc

    async def close(self) -> None:
        health.forget(self.processor.name)
        health.forget(f"{self.processor.name} broker")
        if self._ends_task is not None:
            self._ends_task.cancel()
            await asyncio.gather(self._ends_task, return_exceptions=True)
            self._ends_task = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._outbox.discard()
        await self._flush_broker_acks()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.close()
        if self._opened:
            self._opened = False
            await self.processor.close()

    async def _drain(self, stop_committer: asyncio.Task[None], *, wait: bool) -> None:
        """Shutdown: let in-flight events finish (bounded), checkpoint them, stop committing."""
        if self._tasks and wait:
            log.info(
                "%s: draining %d events in flight (up to %gs)",
                self.processor.name,
                self._in_flight,
                self.config.drain_timeout_s,
            )
            await asyncio.wait(list(self._tasks), timeout=self.config.drain_timeout_s)
        unfinished = len(self._tasks)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        stop_committer.cancel()
        await asyncio.gather(stop_committer, return_exceptions=True)
        if self._broken is None and not self._needs_reset:
            try:
                # Bounded like the drain: with the broker or store away, a
                # checkpoint would wait out every ack and statement timeout
                # while the shutdown grace runs out.
                async with asyncio.timeout(max(1.0, self.config.drain_timeout_s)):
                    async with self._commit_lock:
                        await self._checkpoint()
            except Exception as exc:  # the next owner fetches it again
                log.warning("%s: final checkpoint failed: %s", self.processor.name, _one_line(exc))
                # Not again on the revokes of close(): it would wait as long.
                self._broken = self._broken or exc
        if unfinished:
            log.info(
                "%s: %d keys still busy at shutdown; their inputs are fetched again",
                self.processor.name,
                unfinished,
            )

    # -- partition ownership -------------------------------------------------

    async def _on_assign(self, tps: frozenset[TopicPartition]) -> None:
        self._owned = self._owned | tps
        self._loading |= tps
        self._update_admitting()
        try:
            await self._load(tps, seek=True, claim=True)
        except BaseException:
            # Unadmitted until a load succeeds: the fetch loop tries again
            # (_retry_loads) where the transport keeps the assignment (Kafka);
            # NATS revokes them and its next rebalance assigns them again.
            self._load_failed |= tps
            raise
        self._loading -= tps
        self._load_failed -= tps
        self._update_admitting()

    async def _on_revoke(self, tps: frozenset[TopicPartition]) -> None:
        # Nothing new is admitted from them: the next owner fetches it.
        self._revoking |= tps
        self._load_failed -= tps
        self._update_admitting()
        try:
            if self._running:
                # Let what is in flight on them finish and be checkpointed first.
                await self._finish(tps)
        finally:
            self._revoking -= tps
        self._owned = self._owned - tps
        self._loading -= tps
        self._in_flight -= self._marks.drop(tps)
        gone = {tp.partition for tp in tps} - {tp.partition for tp in self._owned}
        for tp in tps:
            self._offsets.pop(tp, None)
            self._epochs.pop(tp, None)
            self._fenced.discard(tp)
            self._stopped.discard(tp)
        for key, partition in list(self._state_partition.items()):
            if partition in gone:
                del self._state_partition[key]
                self._states.pop(key, None)
        for partition in gone:
            self._dedupe.pop(partition, None)
        self._update_admitting()
        self._wake.set()

    async def _retry_loads(self) -> None:
        """Load partitions whose load failed on assignment (claim, seek), then admit them."""
        tps = frozenset(self._load_failed & self._owned)
        self._load_failed -= tps
        if not tps:
            return
        try:
            await self._load(tps, seek=True, claim=True)
        except BaseException:
            self._load_failed |= tps
            raise
        self._loading -= tps
        self._update_admitting()
        log.warning("%s: loaded %s after a failed assignment", self.processor.name, sorted(tps))

    def _update_admitting(self) -> None:
        self._admitting = self._owned - self._fenced - self._loading - self._revoking

    async def _finish(self, tps: frozenset[TopicPartition]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self._marks.undone(tps) and loop.time() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # (not wait_for: see memory.py)
                    await self._wake.wait()
        if self._broken is None:
            try:
                # Bounded: a revoke (or a shutdown) must not wait out every
                # ack and statement timeout of a broker or store that is away.
                async with asyncio.timeout(max(1.0, self.config.drain_timeout_s)):
                    async with self._commit_lock:
                        await self._checkpoint()
            except Exception as exc:
                log.warning(
                    "%s: checkpoint before revoke failed: %s", self.processor.name, _one_line(exc)
                )
                self._broken = exc
        # The group's offsets of what is given away, before the next owner reads them.
        await self._flush_broker_acks()

    async def _load(self, tps: Iterable[TopicPartition], *, seek: bool, claim: bool) -> None:
        """Load progress, state and recent ids from the store; ``seek`` past what is done.

        With ``claim`` (a new assignment) the partitions' ownership epochs are
        raised and become ours; without (a reset), a partition whose epoch
        moved on was claimed by another worker meanwhile and is fenced.
        """
        tps = list(tps)
        name = self.processor.name
        if claim:
            self._logs.update(await self._current_logs())
        logged = {self._log_tp(tp): tp for tp in tps}
        if claim:
            legacy = {log_tp: tp for log_tp, tp in logged.items() if log_tp != tp}
            stored = await self.store.claim(name, list(logged), self.owner, legacy=legacy)
            progress = {logged[log_tp]: p for log_tp, p in stored.items()}
            for tp in tps:
                self._epochs[tp] = progress[tp].epoch
                self._fenced.discard(tp)
            await self._check_ends(progress)
        else:
            stored = await self.store.load_progress(name, list(logged))
            progress = {logged[log_tp]: p for log_tp, p in stored.items()}
            for tp in tps:
                now, mine = progress.get(tp), self._epochs.get(tp)
                if tp in self._fenced or mine is None or now is None or now.epoch == mine:
                    continue
                log.warning(
                    "%s: lost %s[%d] to %s (ownership epoch %d, now %d); leaving it to them",
                    name,
                    tp.topic,
                    tp.partition,
                    now.owner or "another worker",
                    mine,
                    now.epoch,
                )
                self._fenced.add(tp)
        self._update_admitting()
        offsets = {tp: p.offset for tp, p in progress.items() if p.offset is not None}
        partitions = sorted({tp.partition for tp in tps})
        states = await self.store.load_states(name, partitions)
        for key, blob in states.items():
            self._states[key] = blob
        for partition in partitions:
            recent = await self.store.load_recent_ids(name, partition, self.config.recent_ids)
            dead = await self.store.load_dead_lettered_ids(name, partition, self.config.recent_ids)
            self._dedupe[partition] = _Dedupe(self.config.recent_ids, recent, dead)
        for tp in tps:
            if tp in offsets:
                self._offsets[tp] = offsets[tp]
            else:
                self._offsets.pop(tp, None)
        for key in states:
            self._state_partition[key] = partition_for(
                key.session.encode(), self.transport.partitions
            )
        if seek:
            for tp in tps:
                if tp in self._stopped:
                    continue  # left where it is: what arrives is counted as skipped
                # Postgres is the truth: nothing stored means the log's start,
                # whatever position the broker kept (a recreated topic's group
                # offsets, a durable consumer of an older stream).
                self._seeks[tp] = offsets[tp] + 1 if tp in offsets else 0
            await self._apply_seeks()

    async def _apply_seeks(self) -> None:
        """Seek where ``_load`` decided; kept until the subscription exists.

        Transports announce a static assignment from inside ``subscribe``,
        before the runner holds the subscription.
        """
        if self._sub is None:
            return
        seeks, self._seeks = self._seeks, {}
        for tp, offset in seeks.items():
            if tp in self._owned:
                await self._sub.seek(tp, offset)

    async def _current_logs(self) -> dict[str, str]:
        """The input topics' logs as the broker has them now, made again if it lost them.

        A broker that came back without its log (Kafka on memory storage, a
        wiped JetStream) has no topic for a while, or one that nothing made
        with our partition count; keeping the old log's identity then would
        compare new offsets with old progress. So a missing topic is made
        again here, as ``start`` made it, and its new identity read.
        """
        inputs = list(self.processor.inputs)
        ids = await self.transport.log_ids(inputs)
        missing = [t for t in inputs if t not in ids]
        if missing:
            log.warning("%s: topics %s are gone; making them again", self.processor.name, missing)
            await self.transport.ensure_topics(missing)
            ids = await self.transport.log_ids(inputs)
            if any(t not in ids for t in inputs):
                raise TransportError(f"topics {missing} are gone and could not be made again")
        return ids

    async def _follow_new_logs(self) -> None:
        """Owned partitions whose topic was made again (a new log) start over on it.

        Their progress under the old log is kept (it is another log's); the new
        one is claimed and processed from its start, as on a new assignment.
        """
        if not self._owned:
            return
        ids = await self._current_logs()
        changed = {t for t, i in ids.items() if self._logs.get(t, i) != i}
        if not changed:
            return
        tps = frozenset(tp for tp in self._owned if tp.topic in changed)
        log.warning(
            "%s: %s made again (the broker lost its log): processing the new log from its start",
            self.processor.name,
            sorted(changed),
        )
        self._loading |= tps
        self._update_admitting()
        self._in_flight -= self._marks.drop(tps)
        await self._load(tps, seek=True, claim=True)
        self._loading -= tps
        self._update_admitting()

    def _log_tp(self, tp: TopicPartition) -> TopicPartition:
        """Where the store keeps ``tp``'s progress: its log, not its logical name."""
        return TopicPartition(self._logs.get(tp.topic, tp.topic), tp.partition)

    async def _check_ends(self, progress: Mapping[TopicPartition, Progress]) -> None:
        """Stop partitions whose stored offset lies beyond the end of their log.

        The same log (same incarnation) cannot have lost messages it had
        already delivered, so this is a store or broker fault to look at, not
        something to guess around: skipping ahead, or starting over, could lose
        or redo work. The partition is left alone until an operator resets it.
        """
        stored = {tp: p.offset for tp, p in progress.items() if p.offset is not None}
        # Nothing stored (a new log): nothing to be beyond.
        self._stopped.difference_update(set(progress) - set(stored))
        ends = await self.transport.log_ends(list(stored)) if stored else {}
        for tp, offset in stored.items():
            end = ends.get(tp)
            if end is None or offset <= end:
                self._stopped.discard(tp)
                continue
            self._stopped.add(tp)
            log.error(
                "%s: stopped %s[%d]: its stored offset %d is beyond the end of its log %s "
                "(last offset %d); reset it with `sluice offsets reset --step %s --partition %d "
                "--to-latest` (or --to-earliest, --to N)",
                self.processor.name,
                tp.topic,
                tp.partition,
                offset,
                self._logs.get(tp.topic, tp.topic),
                end,
                self.processor.name,
                tp.partition,
            )

    @property
    def stopped(self) -> frozenset[TopicPartition]:
        """Partitions stopped because their stored offset is beyond their log's end."""
        return frozenset(self._stopped)

    async def _reset_or_raise(self) -> None:
        """``_reset``; a store failure on the way is a ``StoreUnavailableError`` (retried)."""
        try:
            await self._reset()
        except (TransportError, OSError, StorePermanentError):
            raise
        except Exception as exc:
            raise StoreUnavailableError(f"cannot reload from the store: {exc}") from exc

    async def _reset(self) -> None:
        """Drop everything in flight, rewind to it, and reload the truth from the store.

        Marked as needed first: if the store or broker fails half way, the
        next ``run_once`` or loop turn starts it over before fetching, with
        the positions to go back to kept in ``_rewind_to``.
        """
        self._needs_reset = True
        self.stats.resets += 1
        async with self._commit_lock:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._keys.clear()
            await self._outbox.discard()
            self._pending = Pending(CommitBatch(step=self.processor.name))
            self._skipped_acks.clear()
            # Where to resume: kept until a reset succeeds, so a store that
            # fails half way leaves the way back known (nothing is fetched
            # while a reset is due).
            for tp, offset in self._marks.first_offsets().items():
                self._rewind_to[tp] = min(offset, self._rewind_to.get(tp, offset))
            self._marks.drop()
            # (Re)set here, not decremented: every admitted input is now dropped.
            self._in_flight = 0
            self._states.clear()
            self._state_partition.clear()
            self._dedupe.clear()
            self._offsets.clear()
            await self._load(self._owned, seek=False, claim=False)
            if self._sub is not None:
                for tp, offset in self._rewind_to.items():
                    if tp not in self._owned:
                        continue
                    # After a stale checkpoint another worker stored more: skip that.
                    stored = self._offsets.get(tp)
                    await self._sub.seek(tp, offset if stored is None else max(offset, stored + 1))
            self._rewind_to.clear()
        self._needs_reset = False
        self._wake.set()

    # -- admission -------------------------------------------------------------

    def _admit_all(self, messages: Sequence[Message]) -> None:
        self._tracer = tracing.tracer()
        for msg in messages:
            self._admit(msg)
        if self._in_flight > self.stats.peak_in_flight:
            self.stats.peak_in_flight = self._in_flight

    def _admit(self, msg: Message) -> None:
        tp = msg.tp
        if tp not in self._admitting:
            # Revoked (a fetch can still hand out what was buffered before
            # the rebalance), being assigned or revoked (see _loading), or
            # claimed by another worker: not ours to process or ack now.
            return
        if tp in self._stopped:
            # Not processed, not acked: counted, and its error was logged at assignment.
            self.stats.skipped += 1
            return
        done = self._offsets.get(tp)
        if done is not None and msg.offset <= done:
            self.stats.skipped += 1
            self._skipped_acks.append(msg)
            return
        slot = Slot(msg)
        self._marks.add(tp, slot)
        self._in_flight += 1
        self.stats.by_partition[tp] = self.stats.by_partition.get(tp, 0) + 1
        dedupe = self._dedupe.get(msg.partition)
        if dedupe is None:
            dedupe = self._dedupe[msg.partition] = _Dedupe(self.config.recent_ids)
        event_id = msg.headers.get("ce_id")
        replay = H_REPLAY in msg.headers
        if event_id is not None and event_id in dedupe and not (replay and event_id in dedupe.dead):
            self._absorb(slot)
            return
        try:
            # An event without ``time`` gets the broker's timestamp: the
            # same on every delivery, so a redelivered input is the same event.
            event = decode(
                msg.value, max_bytes=self.config.max_event_bytes, default_time_ms=msg.timestamp_ms
            )
        except DecodeError as exc:
            self._dead_letter(slot, exc.reason, exc, event=None)
            return
        if dedupe.absorbs(event.id, replay):
            self._absorb(slot)
            return
        # Seen from now on: a copy arriving while this one is in flight is
        # absorbed too. A reset reloads the ids from the store.
        dedupe.add(event.id)
        try:
            # Bad data is a dead letter at once, in offset order; a valid
            # envelope keeps its identity in it, so the audit trail finds it
            # by session and a replay is deduped.
            data = self._registry.validate(event, strict_types=bool(self.processor.accepts))
        except DecodeError as exc:
            self._dead_letter_traced(slot, event, exc)
            return
        key = StateKey(event.tenant, event.session)
        queue = self._keys.get(key)
        if queue is not None:
            queue.append((slot, event, data))
            return
        queue = self._keys[key] = deque(((slot, event, data),))
        task = asyncio.create_task(self._run_key(key, queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dead_letter_traced(self, slot: Slot, event: Event, exc: DecodeError) -> None:
        hop = None
        if self._tracer is not None:
            hop = tracing.start_hop(self._tracer, self._hop_site, slot.msg, event)
        if hop is None:
            self._dead_letter(slot, exc.reason, exc, event=event)
            return
        with hop:
            self._dead_letter(slot, exc.reason, exc, event=hop.event, hop=hop)

    def _absorb(self, slot: Slot) -> None:
        self.stats.duplicates += 1
        self._complete(slot)

    def _complete(self, slot: Slot) -> None:
        slot.done = True
        self._pending.inputs += 1
        self._completed.set()
        self._wake.set()

    # -- one key's events, in order --------------------------------------------

    async def _run_key(self, key: StateKey, queue: _KeyQueue) -> None:
        try:
            while queue:
                slot, event, data = queue[0]
                if not slot.dropped:
                    await self._handle_event(slot, event, data)
                queue.popleft()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A runner bug, not a step's (those are dead letters): the key
            # would stall its partition's watermark, so reset loudly.
            log.exception("%s: internal error on key %s", self.processor.name, key)
            self._broken = self._broken or exc
            self._needs_reset = True
            self._wake.set()
        finally:
            if self._keys.get(key) is queue:
                del self._keys[key]

    async def _handle_event(self, slot: Slot, event: Event, data: BaseModel | None) -> None:
        hop = None
        if self._tracer is not None:
            hop = tracing.start_hop(self._tracer, self._hop_site, slot.msg, event)
        if hop is None:
            await self._handle(slot, event, data, None)
            return
        with hop:
            # The step sees the input re-stamped with the hop's span, so its
            # outputs, audit rows and results continue the trace from here.
            await self._handle(slot, hop.event, data, hop)

    async def _handle(
        self, slot: Slot, event: Event, data: BaseModel | None, hop: tracing.Hop | None
    ) -> None:
        msg = slot.msg
        self._busy += 1
        if self._busy > self.stats.peak_concurrency:
            self.stats.peak_concurrency = self._busy
        try:
            outputs, wire, ctx, changed = await self._process(event, data, msg.partition)
        except _Poison as poison:
            if not slot.dropped:
                self._dead_letter(slot, poison.reason, poison.error, event=event, hop=hop)
            return
        finally:
            self._busy -= 1
        if slot.dropped:
            return  # given up meanwhile (revoked, or the runner reset)
        if hop is not None:
            hop.annotate(ctx.audit, len(outputs))
        batch = self._pending.batch
        if changed is not None:
            key = StateKey(event.tenant, event.session)
            self._states[key] = changed
            self._state_partition[key] = msg.partition
            batch.states[(msg.partition, key)] = changed
        partition = msg.partition
        batch.audit.extend((partition, row) for row in ctx.audit)
        batch.results.extend(ctx.results)
        batch.approvals.extend(ctx.approvals)
        batch.audit.append((partition, _processed_row(ctx, event, len(outputs))))
        self._outbox.send(wire)
        self._pending.sent += len(wire)
        self.stats.processed += 1
        self.stats.outputs += len(outputs)
        self._complete(slot)

    async def _process(
        self, event: Event, data: BaseModel | None, partition: int
    ) -> tuple[list[Output], list[OutMessage], Context, bytes | None]:
        """Run the step, retrying failures.

        Returns the outputs, their wire form, the context and the new state if
        it changed. Encoding happens here so that an output that cannot be
        encoded (too large, not JSON) dead-letters its input like any step error.
        """
        key = StateKey(event.tenant, event.session)
        before = self._states.get(key)
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
            except DeadLetter as exc:
                # The step says retrying cannot help: dead-letter now, with its reason.
                raise _Poison(exc.reason, exc) from exc
            except Exception as exc:  # a step's bug must not kill the worker
                # Deterministic failures (a bad output, our errors that say
                # retrying cannot help: bad data, a plan that does not parse)
                # are dead-lettered at once; anything else may be transient.
                final = isinstance(exc, _BadOutput) or attempt >= self.config.max_attempts
                if final or (isinstance(exc, SluiceError) and not exc.retriable):
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

    def _dead_letter(
        self,
        slot: Slot,
        reason: str,
        error: BaseException,
        *,
        event: Event | None,
        hop: tracing.Hop | None = None,
    ) -> None:
        if hop is not None:
            hop.dead_letter(reason, error)
        msg = slot.msg
        out, row = dead_letter(msg, self.processor.name, reason, error, event)
        if event is not None:
            # Its latest fate: a replay of it (sluice dlq replay) is processed.
            dedupe = self._dedupe.get(msg.partition)
            if dedupe is not None and event.id in dedupe:
                dedupe.dead.add(event.id)
        self._pending.produce.append(out)
        self._pending.batch.audit.append((msg.partition, row))
        self.stats.dead_letters += 1
        log.warning(
            "%s: dead-lettered %s/%s/%s (%s): %s",
            self.processor.name,
            msg.topic,
            msg.partition,
            msg.offset,
            reason,
            row.detail["message"],
        )
        self._complete(slot)

    # -- checkpoints -------------------------------------------------------------

    async def _committer(self) -> None:
        """Checkpoint whatever completed, one checkpoint at a time, until cancelled."""
        interval = self.config.commit_interval_s
        while True:
            await self._completed.wait()
            if interval > 0:
                await asyncio.sleep(interval)
            self._completed.clear()
            try:
                async with self._commit_lock:
                    await self._checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The fetch loop resets the runner and starts a new committer.
                self._broken = exc
                self._wake.set()
                return

    async def _checkpoint(self) -> None:
        """Produce, commit and ack what completed since the last checkpoint (holding the lock)."""
        if self._needs_reset:
            return
        pending, self._pending = self._pending, Pending(CommitBatch(step=self.processor.name))
        moved = self._marks.passable()
        acks, self._skipped_acks = self._skipped_acks, []
        if pending.is_empty() and not moved and not acks:
            return
        started = time.perf_counter()
        batch = pending.batch
        for tp, passed in moved.items():
            batch.offsets[self._log_tp(tp)] = (passed[0].offset, passed[-1].offset)
        batch.epochs = {
            self._log_tp(tp): e for tp, e in self._epochs.items() if tp not in self._fenced
        }
        # Its outputs were sent as their events completed: all acked first.
        await self._outbox.flush()
        if pending.produce:
            await self.transport.publish_batch(pending.produce)
        if not batch.is_empty():
            await self._commit_with_retry(batch)
            for hook in _commit_hooks:
                hook(self.processor.name)
        self._marks.release(moved)
        for tp, passed in moved.items():
            self._offsets[tp] = passed[-1].offset
        # Room frees up as the watermarks pass inputs, not as they complete.
        self._in_flight -= sum(len(passed) for passed in moved.values())
        self._wake.set()
        committed = [m for passed in moved.values() for m in passed]
        committed.extend(acks)
        if self._sub is not None and committed:
            if self._running:
                self._acks.send(committed)
            else:
                await self._ack_broker(committed)
        self.stats.batches += 1
        self.stats.last_batch_s = time.perf_counter() - started
        self._metrics.batch_done(
            batch.audit,
            len(pending.produce) + pending.sent,
            self.stats.duplicates,
            self.stats.last_batch_s,
            committed,
            self._sub,
        )
        self._metrics.load(self._in_flight, max(map(len, self._keys.values()), default=0))

    async def _ack_broker(self, messages: list[Message]) -> None:
        if self._sub is None:
            return
        try:
            await self._sub.commit(messages)
        except TransportError as exc:
            # Postgres already holds the progress; a restart seeks from it.
            log.warning("%s: broker commit failed (harmless): %s", self.processor.name, exc)

    async def _publish(self, messages: list[OutMessage]) -> None:
        await self.transport.publish_batch(messages)

    async def _ack_advisory(self, messages: list[Message]) -> None:
        try:
            await self._ack_broker(messages)
        except Exception as exc:  # a closed client on shutdown, say: advisory anyway
            log.warning("%s: broker commit failed (harmless): %s", self.processor.name, exc)

    async def _flush_broker_acks(self) -> None:
        """Let the acks in progress finish (bounded), before a revoke or close."""
        try:
            async with asyncio.timeout(max(1.0, self.config.drain_timeout_s)):
                await self._acks.flush()
        except TimeoutError:
            await self._acks.discard()

    async def _commit_with_retry(self, batch: CommitBatch) -> None:
        """Commit, retrying transient store failures; the transaction is all or nothing."""
        for attempt in range(1, self.config.commit_attempts + 1):
            try:
                await self.store.commit(batch)
                return
            except (StaleBatchError, StorePermanentError):
                raise
            except Exception as exc:
                if attempt == self.config.commit_attempts:
                    raise
                name = self.processor.name
                log.warning("%s: checkpoint commit failed, retrying: %s", name, _one_line(exc))
                await asyncio.sleep(self.config.retry_backoff_s * 2**attempt)

    # -- time-driven work ----------------------------------------------------

    async def _maybe_tick(self, *, commit: bool = False) -> None:
        if not self._has_tick:
            return
        if time.monotonic() - self._last_tick < self.config.tick_interval_s:
            return
        self._last_tick = time.monotonic()
        await self.tick(commit=commit)

    async def tick(self, now: datetime | None = None, *, commit: bool = True) -> None:
        """Run the step's ``tick`` once (at ``now``, default the clock) on the idle keys.

        Keys with events in flight are left out (their next tick sees them),
        so a tick never races an event of its session. Its work joins the next
        checkpoint; with ``commit`` it is checkpointed at once. A tick that
        raises or emits to an undeclared topic is logged and its work
        discarded: like ``process``, a step's bug must not kill the worker.
        """
        if not self._has_tick:
            return
        idle = {key: blob for key, blob in self._states.items() if key not in self._keys}
        desk = self.store if isinstance(self.store, ApprovalDesk) else None
        tc = TickContext(step=self.processor.name, blobs=idle, approvals=desk)
        try:
            outputs = await self.processor.tick(now or self._clock(), tc)
            self._check_outputs(outputs)
            wire = [_to_wire(o) for o in outputs]
        except Exception:
            log.exception("%s: tick failed; its work is discarded", self.processor.name)
            self.stats.tick_errors += 1
            return
        batch = self._pending.batch
        # A key whose state moved on while the tick awaited (an event of it
        # admitted or processed, the key revoked, a reset reloading it): the
        # tick's change to the old state is not kept, so nothing else it did
        # for that key is either (no audit row or output without its state);
        # a later tick, here or at the key's new owner, does it again with
        # the same ids.
        gone = {
            key for key in tc.touched if key in self._keys or self._states.get(key) != idle[key]
        }
        for key in tc.touched - gone:
            after = orjson.dumps(tc.state_of(key), option=orjson.OPT_SORT_KEYS)
            if after != self._states.get(key):
                self._states[key] = after
                batch.states[(self._state_partition[key], key)] = after
        batch.results.extend(r for r in tc.results if StateKey(r.tenant, r.session) not in gone)
        for row in tc.audit:
            key = StateKey(row.tenant, row.session)
            if key not in gone:
                batch.audit.append((self._state_partition.get(key, 0), row))
        self._pending.produce.extend(
            message
            for out, message in zip(outputs, wire, strict=True)
            if StateKey(out.event.tenant, out.event.session) not in gone
        )
        if commit:
            async with self._commit_lock:
                await self._checkpoint()
        elif not self._pending.is_empty():
            self._completed.set()


def default_owner() -> str:
    """This worker's name in ``step_offsets.owner``: host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


# Called with the step's name after each checkpoint commit lands in Postgres,
# before the outputs' inputs are acked to the broker: the narrowest window of
# the commit protocol. The crash tests install one that SIGKILLs the worker
# there (tests/integration/crash_worker.py); nothing in the product does.
CommitHook = Callable[[str], None]
_commit_hooks: list[CommitHook] = []


def add_commit_hook(hook: CommitHook) -> None:
    """Call ``hook(step)`` after every checkpoint commit of every runner in this process."""
    _commit_hooks.append(hook)


class StoreUnavailableError(SluiceError, RuntimeError):
    """The checkpoint store failed a commit after its retries; the batch was rewound."""

    retriable = True


class OutageError(SluiceError, RuntimeError):
    """Failures lasted longer than the outage patience: the runner gave up (one-line message)."""


def _permanent(exc: BaseException) -> StorePermanentError | None:
    """The ``StorePermanentError`` behind ``exc`` (itself, or what it wraps), if any."""
    seen: BaseException | None = exc
    for _ in range(8):  # causes chain; a short walk finds a wrapped one
        if seen is None:
            return None
        if isinstance(seen, StorePermanentError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _shorter(end: int | None, committed: int | None) -> bool:
    """A log that ends before what was committed on it (so it was made again)."""
    return end is not None and committed is not None and end < committed


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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


def _processed_row(ctx: Context, event: Event, outputs: int) -> AuditRecord:
    return AuditRecord(
        kind="processed",
        step=ctx.step,
        event_id=event.id,
        event_type=event.type,
        tenant=event.tenant,
        session=event.session,
        causation_id=event.causationid,
        trace_id=trace_id_of(event.traceparent),
        detail={**ctx.detail, "outputs": outputs},
    )
