"""Many model calls in flight per worker, each session's calls one at a time and in order.

The reference pipeline on real brokers and Postgres, its planner asking a
loopback OpenAI-compatible stand-in (a real HTTP server) that answers after
about 200 ms. The stand-in records every request: when it arrived and
finished, its prompt and the history the planner sent with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from sluicegate.bench.model_standin import ModelStandin, RequestRecord, key_order_violations
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from tests.integration.pipeline_support import (
    drop_schema,
    prepare_database,
    publish_events,
    results_count,
    running_pipeline,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

SESSIONS = 120
TASKS_PER_SESSION = 3


def task(session: int, index: int) -> Event:
    # Every prompt is unique, so a request names its session and place.
    return Event(
        source="tests",
        type="task.submitted",
        tenant="acme",
        session=f"m-{session}",
        data={"prompt": f"what is {1000 + session} * {index + 2}"},
    )


@asynccontextmanager
async def pipeline(
    settings: Settings, standin: ModelStandin, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """The reference pipeline in this process, planning with ``standin``."""
    monkeypatch.setenv("SLUICE_LLM_URL", standin.url)
    monkeypatch.setenv("SLUICE_LLM_CONCURRENCY", "512")
    await prepare_database(settings)
    try:
        async with running_pipeline(settings):
            yield
    finally:
        await drop_schema(settings)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_model_calls_overlap_across_sessions_and_never_within_one(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )
    events = [task(s, i) for i in range(TASKS_PER_SESSION) for s in range(SESSIONS)]
    place = {e.data["prompt"]: (e.session, i) for i, e in enumerate(events)}
    async with ModelStandin(median_ms=200, sigma=0.3) as standin:
        async with pipeline(settings, standin, monkeypatch):
            await publish_events(settings, events)
            assert await wait_for_results(settings, len(events), timeout_s=180) == len(events)
        records = list(standin.records)

    assert standin.peak_in_flight >= 64, f"only {standin.peak_in_flight} model calls at once"
    assert len(records) == len(events)

    def session_of(record: RequestRecord) -> str:
        return place[record.prompt][0]

    assert key_order_violations(records, session_of) == [], "one session's calls overlapped"
    by_session: dict[str, list[RequestRecord]] = {}
    for record in sorted(records, key=lambda r: r.arrived):
        by_session.setdefault(session_of(record), []).append(record)
    for session, calls in by_session.items():
        prompts = [r.prompt for r in calls]
        # In the order published, each with exactly its session's earlier prompts.
        assert [place[p][1] for p in prompts] == sorted(place[p][1] for p in prompts), session
        for n, call in enumerate(calls):
            assert call.history == prompts[:n], f"{session} call {n} had {call.history}"


class GatedStandin(ModelStandin):
    """Holds requests whose prompt says "slowly" until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(median_ms=0)
        self.release = asyncio.Event()
        self.held = 0

    async def _answer(self, request: web.Request, arrived: float) -> web.Response:
        if b"slowly" in await request.read():  # aiohttp keeps the body for _answer
            self.held += 1
            await self.release.wait()
        return await super()._answer(request, arrived)


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_a_slow_session_does_not_hold_up_the_others_on_its_partition(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
        partitions=1,  # every session on the same partition
    )
    slow = Event(
        source="tests",
        type="task.submitted",
        tenant="acme",
        session="slowpoke",
        data={"prompt": "echo this slowly"},
    )
    others = [task(s, 0) for s in range(40)]
    async with GatedStandin() as standin, pipeline(settings, standin, monkeypatch):
        await publish_events(settings, [slow, *others])

        async def others_done() -> bool:
            return await results_count(settings) >= len(others)

        await eventually(others_done, "the other sessions' results", timeout_s=120)
        assert standin.held == 1
        assert await results_count(settings) == len(others), "the slow task finished early"
        standin.release.set()
        assert await wait_for_results(settings, len(others) + 1, timeout_s=60) == len(others) + 1
