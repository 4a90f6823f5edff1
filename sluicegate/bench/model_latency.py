"""``sluice bench --mode pipeline --model-latency MS``: what a slow model costs the pipeline.

DESIGN.md's budget: with a model that answers in 200 ms, the pipeline keeps
at least 0.9 of the tasks/s it reaches with an instant model, in the same
run (and, per issue 14, at least 0.8 with a 2 s model). This module runs
that comparison. Per transport, one after the other, two pipeline cases
(``sluicegate.bench.pipeline_mode.run_pipeline_case``) with the same load:

1. the planner asks the model stand-in (``sluicegate.bench.model_standin``,
   a child process serving ``POST /v1/chat/completions`` on loopback) with
   median 0, an instant model: ``zero_latency_tasks_per_s``;
2. the same, with log-normal delays around ``MS`` (``--model-sigma``, 0.5
   by default: p99 about 3.2 times the median): ``tasks_per_s``,
   ``latency_ms``, ``model_peak_in_flight``.

``model_latency_ratio`` is the second's tasks/s over the first's. Both runs
use the same HTTP planner, so the ratio isolates the model's latency: the
cost of the HTTP call itself is in both. ``tasks_per_s`` runs to the last
result, so the slow run also pays its last tasks' model latency once: a
rounding error at 200 ms, but with a 2 s model the last results come
several seconds late (p99 of the delays is 6.4 s), about a tenth of a
20,000-task run. ``mid_run_ratio`` compares the completion rates between
the 10% and 90% marks of the results instead (``mid_run_rate``), which a
saturated pipeline holds at its capacity whatever the latency; the table
gives both, each with its verdict.

Why the offered rate defaults to 600 tasks/s here (100 in plain pipeline
mode): the budget compares the tasks/s the pipeline *reaches*, that is
its capacity. At an offered rate below the capacity both runs complete at
the offered rate, and the ratio is about 1 whatever the model does, as
long as the backlog does not grow: it would say "this load is carried",
not "this much capacity is kept". So the instant run must saturate. One
worker process runs all six steps; on the 2-core development machine, with
the concurrent runner and the planner asking the stand-in over HTTP, it
reached about 350 tasks/s on NATS (1,500 tasks, an otherwise idle
machine; 190-275 tasks/s with the earlier one-batch-at-a-time runner).
600/s is about 1.7 times that: above the capacity by a margin that
survives a quieter machine, so the instant run is saturated, but not so
far that the broker backlog (the worker pulls it at its own pace, within
its in-flight bound: nothing piles up in the worker) makes a run mostly
drain. The open-loop publisher and ``tasks_per_s`` are the pipeline mode's
(completions over the window from the first measured task's due time to
the last result, which above capacity is the rate the pipeline works its
backlog off at); latency is then mostly queueing in the broker and says
little: read the ratio. The table flags an instant run that kept up with
the offered rate ("raise --rate"): its ratio is bounded by the offered
load, not by the capacity. On a faster machine, pass a higher ``--rate``.

Sessions: one (tenant, session) key is processed one event at a time, so a
session's next task waits for its previous plan. With few sessions the
model's latency, not the pipeline, would set the rate (50 sessions and a
2 s model allow at most 25 tasks/s). Unless ``--sessions`` says otherwise,
the tasks spread over ``4 x rate x mean model delay`` sessions (at least
50): at the offered rate a session has a task in the planner at most a
quarter of the time, so a task rarely waits for its own session's previous
call. 200 ms at 600/s: 544 sessions; 2 s: 5,440. The same in both runs.

The model client's own bound on requests in flight
(``SLUICE_LLM_CONCURRENCY``, 64 by default) would cap the rate at that
bound over the mean delay (64 / 2.27 s: 28 tasks/s with a 2 s model), and
the bench would measure the client's setting rather than the pipeline. So
unless the environment sets it, the worker gets one as large as the number
of sessions (the most calls the keys allow in flight); the value is in the
report (``settings.model.client_concurrency``), and so is the stand-in's
peak in flight. The runner's own bound (``SLUICE_MAX_IN_FLIGHT``) is left
as the environment has it. A rate limit (``SLUICE_LLM_RPM``) is switched
off for the stand-in.

The worker's resident memory is sampled every second in both runs
(``worker_rss_mb``): with a slow model, backpressure must slow consumption,
not grow memory.

How long it takes: two cases per transport, each about 10 s of set-up
(worker and stand-in start, primer), the schedule (``tasks / rate``: 33 s
for 20,000 tasks at 600/s) and the drain at the pipeline's capacity; at
about 350 tasks/s that is some 70 s a case, so 20,000 tasks with a 200 ms
model on both transports (four cases) take about 5 minutes, and the same
with a 2 s model a little more (the last tasks wait for the model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sluicegate.bench.model_standin import DEFAULT_SEED, DEFAULT_SIGMA, LogNormalDelay
from sluicegate.bench.pipeline_mode import (
    SESSIONS,
    ModelSpec,
    PipelineResult,
    Progress,
    WorkerKind,
    run_pipeline_case,
)
from sluicegate.settings import Settings, TransportName

DEFAULT_RATE = 600.0
# Per-session utilisation of the planner at the offered rate (see the module docstring).
SESSION_HEADROOM = 4.0

# (model median ms, least model_latency_ratio): DESIGN.md's 200 ms budget and issue 14's 2 s one.
BUDGETS: tuple[tuple[float, float], ...] = ((200.0, 0.9), (2000.0, 0.8))
BUDGET_RULE = (
    ">= 0.9 up to 200 ms (DESIGN.md), >= 0.8 up to 2 s (issue 14): a model at most as slow "
    "as a budgeted one must do at least as well; none above 2 s"
)


def budget_for(median_ms: float) -> float | None:
    """The least ``model_latency_ratio`` a model of this median must keep; None above 2 s."""
    for limit_ms, ratio in BUDGETS:
        if median_ms <= limit_ms:
            return ratio
    return None


def client_concurrency(env: Mapping[str, str], sessions: int) -> int | None:
    """``SLUICE_LLM_CONCURRENCY`` for the worker: the environment's, else ``sessions``.

    None when the environment's value is not a whole number: the worker is
    then left to refuse it, naming it, as it would for ``sluice run``.
    """
    raw = (env.get("SLUICE_LLM_CONCURRENCY") or "").strip()
    if not raw:
        return sessions
    try:
        return int(raw)
    except ValueError:
        return None


def sessions_for(rate: float, spec: ModelSpec) -> int:
    """Sessions enough that a session's tasks rarely queue behind its own model calls."""
    mean_s = LogNormalDelay(spec.median_ms, spec.sigma, spec.seed).mean_s
    return max(SESSIONS, math.ceil(SESSION_HEADROOM * rate * mean_s))


@dataclass(slots=True)
class ModelLatencyPair:
    """One transport's two runs: the instant model, then the slow one."""

    key: TransportName
    zero: PipelineResult
    model: PipelineResult

    @property
    def ratio(self) -> float | None:
        """``tasks_per_s / zero_latency_tasks_per_s``; None when either run failed."""
        if self.zero.error or self.model.error:
            return None
        if self.zero.tasks_per_s <= 0 or self.model.tasks_per_s <= 0:
            return None
        return self.model.tasks_per_s / self.zero.tasks_per_s

    @property
    def mid_run_ratio(self) -> float | None:
        """The same between the 10% and 90% marks of the results (see ``mid_run_rate``)."""
        if self.zero.error or self.model.error:
            return None
        zero, slow = self.zero.mid_run_tasks_per_s, self.model.mid_run_tasks_per_s
        return slow / zero if zero > 0 and slow > 0 else None

    @property
    def zero_saturated(self) -> bool:
        """Whether the instant run fell short of the offered rate (so it measured capacity)."""
        return not self.zero.sustained


async def run_model_latency_mode(
    settings: Settings,
    kinds: Sequence[TransportName],
    *,
    tasks: int,
    rate: float,
    timeout_s: float,
    spec: ModelSpec,
    sessions: int,
    worker: WorkerKind = "subprocess",
    progress: Progress = lambda _: None,
) -> list[ModelLatencyPair]:
    """Per transport, the instant run then the ``spec`` run, one case at a time."""
    pairs = []
    for kind in kinds:
        runs = [
            await run_pipeline_case(
                settings,
                kind,
                tasks=tasks,
                rate=rate,
                timeout_s=timeout_s,
                worker=worker,
                progress=progress,
                sessions=sessions,
                model=model,
            )
            for model in (replace(spec, median_ms=0.0), spec)
        ]
        pairs.append(ModelLatencyPair(kind, runs[0], runs[1]))
    return pairs


def model_latency_settings(spec: ModelSpec) -> dict[str, Any]:
    """What ``--model-latency`` adds to the report's ``settings``."""
    return {
        "model": {
            "median_ms": spec.median_ms,
            "sigma": spec.sigma,
            "seed": spec.seed,
            "distribution": "log-normal",
            "standin": "subprocess",
            "planner_timeout_s": spec.planner_timeout_s(),
            "client_concurrency": spec.concurrency,
        },
        "budget_ratio": budget_for(spec.median_ms),
        "budget_rule": BUDGET_RULE,
        "session_rule": (
            f"max({SESSIONS}, {SESSION_HEADROOM:g} x rate x mean model delay) unless --sessions"
        ),
    }


__all__: Sequence[str] = (
    "BUDGETS",
    "DEFAULT_RATE",
    "DEFAULT_SEED",
    "DEFAULT_SIGMA",
    "ModelLatencyPair",
    "budget_for",
    "client_concurrency",
    "model_latency_settings",
    "run_model_latency_mode",
    "sessions_for",
)
