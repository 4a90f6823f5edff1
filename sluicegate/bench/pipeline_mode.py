"""``sluice bench --mode pipeline``: the reference pipeline end to end, at a fixed offered rate.

This module owns the pipeline measurement: for each transport, a fresh topic
prefix and a freshly migrated Postgres schema; the reference pipeline
(``sluicegate.pipeline.build_steps``: intake, context, planner, the Rego
policy gate, tools, responder, with the Postgres sinks) running as a worker;
an open-loop publisher; an observer on ``results``; and the clean-up (the
worker stopped, topics deleted, schema dropped).

How one case runs:

1. migrate ``bench_<tag>``, create every pipeline topic under
   ``<prefix>-bench-<tag>`` and subscribe the observer to ``results``
   (``group=None``: it joins no group and moves no offsets, like
   ``sluice tail``);
2. start the worker: by default ``python -m sluicegate run`` as a child
   process (see "Why a child process" below), or ``run_steps`` in a task of
   this event loop (``worker="in-process"``);
3. prime: publish a few tasks and wait for their results, so that every
   step has joined its group, loaded its state and compiled its policy
   before the clock starts (primer tasks are not measured);
4. publish ``n`` generated tasks (``sluicegate.samples.generate``: allowed,
   denied, redacted and partial ones) open loop: task ``i`` is due at
   ``t0 + i/rate``, its event ``time`` is that due time, and what falls due
   while a send waits for its acks goes out in the next send, still
   carrying its due time, so a stall shows as latency (no coordinated
   omission);
5. the observer records, per task id, when its ``task.completed`` arrives;
   meanwhile the worker's resident memory (``VmRSS``) is sampled once a
   second (``sluicegate.bench.rss``), from the first scheduled task to the
   last result.

With a model (``model=ModelSpec(...)``, what ``--model-latency`` runs, see
``sluicegate.bench.model_latency``): before the worker starts, a model
stand-in (``sluicegate.bench.model_standin``) is started as another child
process and the worker is pointed at it through ``SLUICE_LLM_URL``, so the
planner step asks it over HTTP for every plan; its counters are reset after
the primer, and read (requests, peak in flight, the delays drawn) after the
last result.

Latency is arrival minus due time (both ``time.monotonic_ns`` of this
process), for the tasks after the warm-up. ``tasks_per_s`` is those tasks
over the time from the first one's due time to the last one's result
(:func:`completion_rate`): below saturation it follows the offered rate,
above it the rate the pipeline sustains while its backlog grows. A run
"kept up" (``sustained``) when that is at least 90% of the offered rate;
the last task's latency counts against it, so short runs (a few seconds of
schedule) read low. The worker's CPU time over the same window gives
``worker_cpu_ms_per_task`` and ``worker_cores``: on a shared machine they
tell a pipeline that is busy from one that is starved by its neighbours.

Why a child process: the brokers, Postgres, the worker and this process
share two cores here. In-process, the six steps, the publisher and the
observer share one event loop (and one GIL), so a step's batch delays both
the scheduled sends and the observer's arrival stamps: latency then
includes our own measuring, and the publisher's work is charged to the
pipeline's CPU. A child process is also how the pipeline is deployed
(``sluice run``), and it keeps this process idle enough to stamp arrivals
on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import orjson

from sluicegate.agents.openai_planner import DEFAULT_TIMEOUT_S as PLANNER_TIMEOUT_S
from sluicegate.agents.pipeline import reference_steps
from sluicegate.agents.planner import make_planner
from sluicegate.agents.topics import RESULTS
from sluicegate.bench.endpoints import delete_kafka_prefix, delete_nats_streams
from sluicegate.bench.latency import CURVE_PERCENTILES, LatencyRecorder, Percentiles
from sluicegate.bench.model_standin import (
    DEFAULT_SEED,
    DEFAULT_SIGMA,
    MODEL_NAME,
    StandinProcess,
    StandinStats,
)
from sluicegate.bench.rss import RssSampler, RssSeries
from sluicegate.loading import load_pipeline, pipeline_spec
from sluicegate.pipeline import TOPICS, task_registry
from sluicegate.policy.gate import PolicyGate
from sluicegate.runtime import make_transport, run_steps
from sluicegate.samples import generate
from sluicegate.settings import Settings, TransportName
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.queries import count_results
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.transport import Message, Subscription

Progress = Callable[[int], object]
WorkerKind = Literal["subprocess", "in-process"]
T = TypeVar("T")

# Offered load when --rate is not given. One worker process runs all six
# steps; on the 2-core development machine, shared with NATS, Tansu,
# Postgres and other sessions' tests, it saturated at about 120-240 tasks/s
# depending on the neighbours' load, and kept up with 100/s on both
# transports in every run. 200/s is at the knee there, so it is not the default.
DEFAULT_RATE = 100.0
SESSIONS = 50  # sessions the generated tasks spread over (keyed state, partitions)
PRIMER_TASKS = 12
PRIMER_TIMEOUT_S = 90.0  # worker start-up: imports, group joins (Kafka), state loads
# The most tasks one publish carries when the publisher has fallen behind.
MAX_SEND_BATCH = 500
OBSERVE_BATCH = 1000
OBSERVE_WAIT_S = 0.05
STOP_GRACE_S = 20.0
CLEANUP_TIMEOUT_S = 30.0

# Warm-up: the first tasks pay for first calls (policy evaluation paths,
# pydantic validators, connection buffers), which a steady figure must not
# include. The transport mode's rule (at least 1000 messages) is sized for
# tens of thousands of messages per second; at a few hundred tasks per
# second it would discard many seconds, so this mode uses its own.
WARMUP_FRACTION = 0.1
WARMUP_TASKS = 100
WARMUP_RULE = "max(10% of tasks, 100), at most half (after the primer tasks)"

# Offered load counts as sustained when the pipeline completes at least this
# share of it. Not closer to 1: the last task's latency is inside the window,
# so with 2000 tasks at 100/s a 1 s tail alone costs 5%.
SUSTAINED_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The model stand-in a case's planner asks: log-normal delays around ``median_ms``."""

    median_ms: float
    sigma: float = DEFAULT_SIGMA
    seed: int = DEFAULT_SEED
    # The model client's bound on requests in flight (SLUICE_LLM_CONCURRENCY); None: its default.
    concurrency: int | None = None

    def planner_timeout_s(self) -> float:
        """The planner's HTTP timeout: far beyond the delays drawn (20x the median is 6 sigma)."""
        return max(PLANNER_TIMEOUT_S, 20.0 * self.median_ms / 1000.0)

    def worker_env(self, url: str) -> dict[str, str]:
        """What makes the worker's planner the OpenAI planner asking the stand-in at ``url``.

        No request-rate limit (``SLUICE_LLM_RPM`` blank): one set for a real
        endpoint would measure itself here, not the pipeline.
        """
        env = {
            "SLUICE_LLM_URL": url,
            "SLUICE_LLM_MODEL": MODEL_NAME,
            "SLUICE_LLM_API_KEY": "",  # never send a real key to the stand-in
            "SLUICE_LLM_TIMEOUT": f"{self.planner_timeout_s():g}",
            "SLUICE_LLM_RPM": "",
        }
        if self.concurrency is not None:
            env["SLUICE_LLM_CONCURRENCY"] = str(self.concurrency)
        return env


def pipeline_warmup(n: int) -> int:
    """Tasks excluded from the figures at the start of the schedule."""
    return min(max(int(n * WARMUP_FRACTION), WARMUP_TASKS), n // 2)


@dataclass(slots=True)
class PipelineResult:
    """One transport's pipeline run. Rates are per second, latencies in ms."""

    key: TransportName
    offered_rate: float
    tasks: int
    warmup: int
    worker: WorkerKind = "subprocess"
    # Where the case ran (both deleted afterwards): its topic prefix and Postgres schema.
    topic_prefix: str = ""
    db_schema: str = ""
    published: int = 0
    completed: int = 0  # tasks (of ``tasks``) whose result the observer saw
    duplicates: int = 0  # results seen again for a task already completed
    statuses: dict[str, int] = field(default_factory=dict)
    tasks_per_s: float = 0.0
    # Completions per second between the 10th and 90th percentile of arrivals: the
    # rate mid-run, without the ramp-up and the drain's last latency (mid_run_rate).
    mid_run_tasks_per_s: float = 0.0
    publish_rate: float = 0.0  # what the publisher achieved against its schedule
    publish_lag_ms: float = 0.0  # the furthest a send fell behind its due time
    latency: Percentiles = field(default_factory=Percentiles.empty)
    curve: list[tuple[float, float]] = field(default_factory=list)
    results_rows: int | None = None  # rows in Postgres ``results`` after the run
    # CPU the worker used from the first scheduled task to the last result:
    # a cost per task that the neighbours' load on a shared machine moves
    # far less than it moves rates and latencies.
    worker_cpu_s: float | None = None
    worker_wall_s: float = 0.0  # the wall time ``worker_cpu_s`` was taken over
    # The 1-minute load average before and after the case: on a shared
    # machine it says how much the neighbours took.
    load_before: float | None = None
    load_after: float | None = None
    primer_s: float = 0.0  # worker start to the primer's last result
    seconds: float = 0.0
    sessions: int = 0  # sessions the tasks spread over
    # The worker's RSS from the first scheduled task to the last result.
    rss: RssSeries | None = None
    # With a model stand-in: what it was asked for, and what it counted after the primer.
    model_spec: ModelSpec | None = None
    model: StandinStats | None = None
    error: str | None = None

    @property
    def worker_cpu_ms_per_task(self) -> float | None:
        if self.worker_cpu_s is None or self.completed <= 0:
            return None
        return self.worker_cpu_s * 1000.0 / self.completed

    @property
    def worker_cores(self) -> float | None:
        """Cores the worker kept busy on average: near 1.0, it was the bottleneck itself."""
        if self.worker_cpu_s is None or self.worker_wall_s <= 0:
            return None
        return self.worker_cpu_s / self.worker_wall_s

    @property
    def sustained(self) -> bool:
        """Whether the pipeline kept up with the offered rate (no error, no growing backlog)."""
        return self.error is None and self.tasks_per_s >= SUSTAINED_SHARE * self.offered_rate


# -- what the observer sees ------------------------------------------------------------


class Tally:
    """What was scheduled, sent and observed, by task index; kept up to the moment a case fails."""

    def __init__(self, n: int) -> None:
        self.due_ns = [0] * n
        self.arrived_ns = [0] * n
        self.index: dict[str, int] = {}
        self.statuses: Counter[str] = Counter()
        self.completed = 0
        self.duplicates = 0
        # (first index, monotonic ns) per send, then (n, end ns) once all are sent.
        self.sends: list[tuple[int, int]] = []
        self.published = 0
        self.worst_lag_ns = 0  # the furthest a send fell behind its due time

    def expect(self, task_id: str, index: int, due_ns: int) -> None:
        self.index[task_id] = index
        self.due_ns[index] = due_ns

    def observe(self, bodies: Sequence[bytes], now_ns: int) -> int:
        """Record ``bodies`` (``task.completed`` events) as arrived at ``now_ns``; returns new."""
        fresh = 0
        for body in bodies:
            task_id, status = result_of(body)
            i = self.index.get(task_id) if task_id is not None else None
            if i is None:  # a primer task's result
                continue
            if self.arrived_ns[i]:
                self.duplicates += 1
                continue
            self.arrived_ns[i] = now_ns
            self.statuses[status or "unknown"] += 1
            fresh += 1
        self.completed += fresh
        return fresh


def result_of(body: bytes) -> tuple[str | None, str | None]:
    """``(task_id, status)`` of a ``task.completed`` body; ``None`` for what is not one.

    Plain orjson instead of the envelope model: the observer only needs two
    fields, and must not fall behind the results it is timing.
    """
    try:
        event = orjson.loads(body)
        data = event["data"]
        task_id, status = data.get("task_id"), data.get("status")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None, None
    return (
        task_id if isinstance(task_id, str) else None,
        status if isinstance(status, str) else None,
    )


def summarise(result: PipelineResult, tally: Tally) -> None:
    """Fill in ``result``'s figures from what was scheduled, sent and observed."""
    n, w = result.tasks, result.warmup
    result.completed = tally.completed
    result.duplicates = tally.duplicates
    result.statuses = dict(sorted(tally.statuses.items()))
    measured = [i for i in range(w, n) if tally.arrived_ns[i]]
    recorder = LatencyRecorder()
    recorder.record_many_ns(tally.arrived_ns[i] - tally.due_ns[i] for i in measured)
    result.latency = recorder.percentiles()
    result.curve = recorder.curve_ms(CURVE_PERCENTILES)
    result.tasks_per_s = completion_rate(measured, tally.due_ns, tally.arrived_ns)
    result.mid_run_tasks_per_s = mid_run_rate([tally.arrived_ns[i] for i in measured])
    result.published = tally.published
    result.publish_lag_ms = tally.worst_lag_ns / 1e6
    sends = tally.sends
    if len(sends) >= 2 and sends[-1][0] == n:  # every task sent
        result.publish_rate = _rate(n, sends[-1][1] - sends[0][1])
    if result.completed < n and result.error is None:
        result.error = f"{n - result.completed} of {n} tasks have no result"


def completion_rate(
    measured: Sequence[int], due_ns: Sequence[int], arrived_ns: Sequence[int]
) -> float:
    """Tasks completed per second over the steady window (``measured``: the task indexes).

    The measured tasks over the time from the first one's due time to the
    last one's result, as the transport mode computes its end-to-end
    throughput: at an offered rate the pipeline keeps up with, this is that
    rate less one latency's worth of time at the end; beyond it, the rate at
    which the pipeline works off its growing backlog. (A rate between two
    arrival times would read a stall followed by a catch-up burst as more
    than the offered load.)
    """
    if not measured:
        return 0.0
    first_due = min(due_ns[i] for i in measured)
    last_arrival = max(arrived_ns[i] for i in measured)
    return _rate(len(measured), last_arrival - first_due)


MID_RUN = (0.1, 0.9)


def mid_run_rate(arrivals_ns: Sequence[int], window: tuple[float, float] = MID_RUN) -> float:
    """Completions per second between two quantiles of the arrival times (0 for < 10 tasks).

    ``tasks_per_s`` ends at the last result, so it carries one latency's
    worth of drain: negligible for a 200 ms model over a minute's run, but a
    2 s log-normal model's last tasks add several seconds (their p99 is
    about 6.4 s), which costs a 20,000-task run about a tenth of its rate.
    Between the 10% and 90% marks of the arrivals a saturated pipeline
    completes at its capacity, whatever its latency: the rate the budget
    means by "the tasks/s it reaches".
    """
    m = len(arrivals_ns)
    if m < 10:
        return 0.0
    ordered = sorted(arrivals_ns)
    lo, hi = int(window[0] * (m - 1)), math.ceil(window[1] * (m - 1))
    return _rate(hi - lo, ordered[hi] - ordered[lo])


def _rate(count: int, elapsed_ns: int) -> float:
    return count / (elapsed_ns / 1e9) if count > 0 and elapsed_ns > 0 else 0.0


# -- the load ------------------------------------------------------------------------


def task_objects(n: int, *, seed: int = 7, sessions: int = SESSIONS) -> list[dict[str, Any]]:
    """``n`` upstream tasks as ``sluice publish --generate`` makes them."""
    return list(generate(n, sessions=sessions, seed=seed))


async def publish_at_rate(
    publisher: Publisher,
    tasks: Sequence[Mapping[str, Any]],
    rate: float,
    tally: Tally,
    *,
    max_batch: int = MAX_SEND_BATCH,
) -> None:
    """Open loop: task ``i`` is due at ``t0 + i/rate``; sends and lag go into ``tally``.

    Each event is completed (id, ``time`` = its due time) and validated as it
    falls due, the way an upstream system would publish it. One send at a
    time, as in the transport mode (aiokafka's batch timeout misbehaves with
    concurrent sends on one producer); what falls due meanwhile goes next.
    """
    n = len(tasks)
    interval_ns = 1e9 / rate
    t0 = time.monotonic_ns()
    wall0 = datetime.now(UTC)
    sent = 0
    while sent < n:
        now = time.monotonic_ns()
        due = min(n, int((now - t0) / interval_ns) + 1, sent + max_batch)
        if due <= sent:
            await asyncio.sleep((t0 + sent * interval_ns - now) / 1e9)
            continue
        tally.worst_lag_ns = max(tally.worst_lag_ns, now - (t0 + int(sent * interval_ns)))
        tally.sends.append((sent, now))
        events = []
        for i in range(sent, due):
            offset_ns = int(i * interval_ns)
            when = wall0 + timedelta(microseconds=offset_ns // 1000)
            event = publisher.prepare({**tasks[i], "time": when})
            tally.expect(event.id, i, t0 + offset_ns)
            events.append(event)
        await publisher.publish(events)
        tally.published += len(events)
        sent = due
    tally.sends.append((n, time.monotonic_ns()))


async def observe(
    sub: Subscription, tally: Tally, n: int, progress: Progress, stop: asyncio.Event
) -> None:
    """Stamp results as they arrive, until every task has one (or ``stop`` is set)."""
    while tally.completed < n and not stop.is_set():
        messages = await sub.fetch(OBSERVE_BATCH, OBSERVE_WAIT_S)
        if messages:
            fresh = tally.observe([m.value for m in messages], time.monotonic_ns())
            if fresh:
                progress(fresh)


async def prime(publisher: Publisher, sub: Subscription, count: int, timeout_s: float) -> None:
    """Publish ``count`` tasks and wait for all their results: the worker is up and warm."""
    events = [publisher.prepare(task) for task in task_objects(count, seed=1)]
    waiting = {e.id for e in events}
    await publisher.publish(events)
    deadline = time.monotonic() + timeout_s
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the pipeline gave {count - len(waiting)} of {count} primer results "
                f"in {timeout_s:g}s"
            )
        messages: list[Message] = await sub.fetch(OBSERVE_BATCH, 0.25)
        for message in messages:
            task_id, _ = result_of(message.value)
            waiting.discard(task_id or "")


# -- the worker ------------------------------------------------------------------------


class Worker(Protocol):
    """The pipeline's steps, running somewhere until ``stop``."""

    async def start(self) -> None: ...

    def failure(self) -> str | None:
        """Why the worker is gone, if it is."""
        ...

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the worker has used so far, if it can be read."""
        ...

    def pid(self) -> int | None:
        """The process the worker runs in (for its RSS), once started."""
        ...

    async def stop(self) -> None: ...


def worker_env(settings: Settings, kind: TransportName) -> dict[str, str]:
    """The SLUICE_* variables that make ``sluice run`` in a child use ``settings``."""
    return {
        "SLUICE_TRANSPORT": kind,
        "SLUICE_NATS_URL": settings.resolved_nats_url(),
        "SLUICE_KAFKA_BOOTSTRAP": settings.resolved_kafka_bootstrap(),
        "SLUICE_DATABASE_URL": settings.resolved_database_url(),
        "SLUICE_TOPIC_PREFIX": settings.topic_prefix,
        "SLUICE_DB_SCHEMA": settings.db_schema,
        "SLUICE_PARTITIONS": str(settings.partitions),
    }


class SubprocessWorker:
    """``python -m sluicegate run`` as a child; its log goes to a temporary file."""

    def __init__(
        self, settings: Settings, kind: TransportName, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.env = {**os.environ, **worker_env(settings, kind), **(extra_env or {})}
        fd, name = tempfile.mkstemp(prefix="sluice-bench-pipeline-", suffix=".log")
        os.close(fd)  # reopened by start(); only the unique name is wanted here
        self.log = Path(name)
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # A file, not a pipe: nobody reads a pipe while the case runs, and a full one stalls.
        with self.log.open("wb") as sink:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sluicegate",
                "run",
                "--log-level",
                "WARNING",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )

    def failure(self) -> str | None:
        proc = self._proc
        if proc is None or proc.returncode is None:
            return None
        return f"the worker exited with {proc.returncode}: {self.log_tail()}"

    def cpu_seconds(self) -> float | None:
        return None if self._proc is None else process_cpu_seconds(self._proc.pid)

    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return " | ".join(text.splitlines()[-lines:]) or "(empty log)"

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # finishes the batch in hand, then exits
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            self.log.unlink()


class InProcessWorker:
    """``run_steps`` in a task of this event loop (for comparison; see the module docstring)."""

    def __init__(
        self, settings: Settings, kind: TransportName, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.extra_env = dict(extra_env or {})
        self._stop = asyncio.Event()
        self._task: asyncio.Task[list[StepRunner]] | None = None

    async def start(self) -> None:
        if self.extra_env:  # the planner from these variables, as a child would read them
            env = {**os.environ, **self.extra_env}
            steps = reference_steps(planner=make_planner(env), make_gate=PolicyGate)
        else:
            steps = list(load_pipeline(pipeline_spec(None)).steps)
        self._task = asyncio.create_task(
            run_steps(steps, self.settings, stop=self._stop, kind=self.kind)
        )

    def failure(self) -> str | None:
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        exc = task.exception()
        return f"the worker stopped: {exc!r}" if exc else "the worker stopped"

    def cpu_seconds(self) -> float | None:
        # The whole process: in-process, the publisher and observer are charged too.
        return time.process_time()

    def pid(self) -> int | None:
        return os.getpid()  # likewise: this whole process

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_S)
            except TimeoutError:
                self._task.cancel()
            except Exception:  # already reported by failure()
                pass
            await asyncio.gather(self._task, return_exceptions=True)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from ``/proc`` (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def make_worker(
    kind: WorkerKind,
    settings: Settings,
    transport: TransportName,
    extra_env: Mapping[str, str] | None = None,
) -> Worker:
    if kind == "in-process":
        return InProcessWorker(settings, transport, extra_env)
    return SubprocessWorker(settings, transport, extra_env)


# -- one case --------------------------------------------------------------------------


async def _watch(worker: Worker, stop: asyncio.Event) -> str:
    """Return once the worker has died (its reason) or ``stop`` is set (empty string)."""
    while not stop.is_set():
        problem = worker.failure()
        if problem is not None:
            return problem
        await asyncio.sleep(0.2)
    return ""


async def run_pipeline_case(
    settings: Settings,
    kind: TransportName,
    *,
    tasks: int,
    rate: float,
    timeout_s: float,
    worker: WorkerKind = "subprocess",
    progress: Progress = lambda _: None,
    sessions: int = SESSIONS,
    model: ModelSpec | None = None,
) -> PipelineResult:
    """The pipeline on ``kind`` with a fresh prefix and schema; never raises for a slow pipeline.

    Services that cannot be reached at all raise (as in the other modes, the
    command turns that into "benchmark failed"); whatever goes wrong once
    the case is set up (a worker that dies, a primer or drain that times
    out, a broker error mid-run) is the case's ``error``.

    ``timeout_s`` bounds the drain: the case gives up ``timeout_s`` after the
    last task fell due (the schedule itself takes ``tasks / rate`` seconds),
    and the primer has its own limit.

    ``model``: the planner asks a model stand-in (see the module docstring)
    instead of planning by rules.
    """
    n = tasks
    result = PipelineResult(kind, rate, n, pipeline_warmup(n), worker=worker, sessions=sessions)
    result.model_spec = model
    tag = uuid.uuid4().hex[:10]
    settings = settings.model_copy(
        update={
            "transport": kind,
            "topic_prefix": f"{settings.topic_prefix}-bench-{tag}",
            "db_schema": f"bench_{tag}",
        }
    )
    result.topic_prefix, result.db_schema = settings.topic_prefix, settings.db_schema
    result.load_before = load_average()
    started = time.monotonic()
    tally = Tally(n)
    # Before anything exists: an unreachable Postgres leaves nothing to clean up.
    await migrate(settings.resolved_database_url(), schema=settings.db_schema)
    transport = make_transport(settings, kind)
    running: Worker | None = None
    standin: StandinProcess | None = None
    connected = False
    try:
        await transport.connect()
        connected = True
        # Every topic up front: the observer subscribes before the worker
        # starts, and NATS needs the stream to exist to subscribe to it.
        await transport.ensure_topics(TOPICS)
        sub = await transport.subscribe([RESULTS], group=None, start="earliest")
        publisher = Publisher(transport, source="sluice-bench", registry=task_registry())
        rss: RssSampler | None = None
        try:
            extra_env: dict[str, str] = {}
            if model is not None:
                standin = StandinProcess(model.median_ms, sigma=model.sigma, seed=model.seed)
                await standin.start()
                extra_env = model.worker_env(standin.url)
            running = make_worker(worker, settings, kind, extra_env)
            await running.start()
            primer_started = time.monotonic()
            await _guarded(running, prime(publisher, sub, PRIMER_TASKS, PRIMER_TIMEOUT_S))
            result.primer_s = time.monotonic() - primer_started
            if standin is not None:
                await standin.reset()  # count the measured tasks' calls only
            load = task_objects(n, sessions=sessions)
            rss = RssSampler(running.pid())
            rss.start()
            cpu_before, wall_before = running.cpu_seconds(), time.monotonic()
            await _measure(running, publisher, sub, load, rate, tally, timeout_s, progress)
            cpu_after = running.cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                result.worker_cpu_s = cpu_after - cpu_before
                result.worker_wall_s = time.monotonic() - wall_before
        except TimeoutError as exc:
            result.error = str(exc) or f"timed out after {timeout_s:g}s"
        except Exception as exc:  # a failing broker or worker is this case's result
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if rss is not None:
                result.rss = await rss.stop()
            await sub.close()
            if standin is not None:
                await _read_model(standin, result)
    finally:
        if running is not None:
            await running.stop()
        if standin is not None:
            await standin.stop()
        await transport.close()
        result.results_rows = await _count_results(settings)
        result.seconds = time.monotonic() - started
        result.load_after = load_average()
        await _cleanup(settings, kind, topics=connected)
    summarise(result, tally)
    return result


async def _read_model(standin: StandinProcess, result: PipelineResult) -> None:
    """The stand-in's counters into ``result``; a stand-in that died is the case's error.

    A dead stand-in does not stop the pipeline (the planner fails closed into
    an echo saying so), so without this check its results would look fine.
    """
    problem = standin.failure()
    if problem is None:
        try:
            result.model = await standin.stats()
        except Exception as exc:
            problem = f"the model stand-in's stats could not be read: {exc}"
    if problem is not None and result.error is None:
        result.error = problem


async def _guarded(worker: Worker, work: Awaitable[T]) -> T:
    """Await ``work`` unless the worker dies first (then raise with its reason)."""
    stop = asyncio.Event()
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_watch(worker, stop))
    try:
        await asyncio.wait([job, watch], return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        raise RuntimeError(watch.result())
    finally:
        stop.set()
        for pending in (job, watch):
            pending.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)


async def _measure(
    worker: Worker,
    publisher: Publisher,
    sub: Subscription,
    tasks: Sequence[Mapping[str, Any]],
    rate: float,
    tally: Tally,
    timeout_s: float,
    progress: Progress,
) -> None:
    """Publish on schedule while observing; wait for every result or the drain limit."""
    n = len(tasks)
    stop = asyncio.Event()
    observer = asyncio.create_task(observe(sub, tally, n, progress, stop))
    try:
        await _guarded(worker, publish_at_rate(publisher, tasks, rate, tally))
        try:
            await asyncio.wait_for(_guarded(worker, asyncio.shield(observer)), timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"{n - tally.completed} of {n} tasks had no result {timeout_s:g}s after "
                "the last one was due"
            ) from None
    finally:
        stop.set()
        await asyncio.gather(observer, return_exceptions=True)


async def _count_results(settings: Settings) -> int | None:
    """Rows in the sinks' ``results`` table: the Postgres side of what the observer counted."""
    try:
        conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    except Exception:
        return None
    try:
        return await count_results(conn)
    except Exception:
        return None
    finally:
        await conn.close()


async def _cleanup(settings: Settings, kind: TransportName, *, topics: bool = True) -> None:
    """Delete the run's topics (or streams) and drop its schema; best effort, bounded in time.

    Bounded because nats-py retries an unreachable server for ever on a
    first connect: a broker that went away must not hang the command.
    ``topics=False`` when the broker was never reached (so nothing was made).
    """
    if topics:
        deleting: Awaitable[object]
        if kind == "nats":
            deleting = delete_nats_streams(settings.resolved_nats_url(), settings.topic_prefix)
        else:
            bootstrap = settings.resolved_kafka_bootstrap()
            deleting = delete_kafka_prefix(bootstrap, settings.topic_prefix)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(deleting, CLEANUP_TIMEOUT_S)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(_drop_schema(settings), CLEANUP_TIMEOUT_S)


async def _drop_schema(settings: Settings) -> None:
    conn = await connect(settings.resolved_database_url(), schema="public")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


async def run_pipeline_mode(
    settings: Settings,
    kinds: Sequence[TransportName],
    *,
    tasks: int,
    rate: float,
    timeout_s: float,
    worker: WorkerKind = "subprocess",
    progress: Progress = lambda _: None,
    sessions: int = SESSIONS,
) -> list[PipelineResult]:
    """One case per transport, one after another (they would compete for the cores)."""
    return [
        await run_pipeline_case(
            settings,
            kind,
            tasks=tasks,
            rate=rate,
            timeout_s=timeout_s,
            worker=worker,
            progress=progress,
            sessions=sessions,
        )
        for kind in kinds
    ]


def pipeline_settings(rate: float, worker: WorkerKind, sessions: int = SESSIONS) -> dict[str, Any]:
    """What this mode adds to the report's ``settings``."""
    return {
        "load_model": "fixed_rate",
        "rate": rate,
        "worker": worker,
        "primer_tasks": PRIMER_TASKS,
        "sessions": sessions,
        "warmup_rule": WARMUP_RULE,
        "sustained_share": SUSTAINED_SHARE,
        "steps": load_pipeline(pipeline_spec(None)).step_names,
    }


__all__: Sequence[str] = (
    "DEFAULT_RATE",
    "SESSIONS",
    "ModelSpec",
    "PipelineResult",
    "Tally",
    "mid_run_rate",
    "pipeline_settings",
    "pipeline_warmup",
    "run_pipeline_case",
    "run_pipeline_mode",
    "summarise",
)
