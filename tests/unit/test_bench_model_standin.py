"""The model stand-in: delays, counting, replies the planner accepts, ordering checks.

Nothing here waits for a delay: the stand-in's sleep and clock are injected,
so the latency distribution is read from what it asked to sleep, and
concurrency is held open by an event, not by time.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sluicegate.agents.openai_planner import OpenAIPlanner, content_of, parse_plan
from sluicegate.agents.rule_planner import RuleBasedPlanner
from sluicegate.agents.schemas import HistoryTurn, TaskAccepted
from sluicegate.bench.model_standin import (
    LogNormalDelay,
    ModelStandin,
    RequestRecord,
    StandinProcess,
    key_order_violations,
    plan_for,
)
from sluicegate.samples import DEMO, generate


class FakeClock:
    """Time that moves only when the stand-in "sleeps"."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def body(prompt: str, earlier: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "plan"}]
    if earlier:
        listing = "\n".join(f"- {p}" for p in earlier)
        messages.append({"role": "user", "content": f"Earlier requests:\n{listing}"})
    messages.append({"role": "user", "content": prompt})
    return {"model": "m", "messages": messages, **extra}


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(session: aiohttp.ClientSession, standin: ModelStandin, payload: Any) -> Any:
    async with session.post(f"{standin.url}/chat/completions", json=payload) as response:
        assert response.status == 200, await response.text()
        return await response.json()


# -- the delays ----------------------------------------------------------------------------


def test_log_normal_delays_have_the_asked_median_and_spread() -> None:
    delays = LogNormalDelay(200.0, sigma=0.5, seed=3)
    samples = [delays.next() for _ in range(20_001)]
    assert statistics.median(samples) == pytest.approx(0.2, rel=0.03)
    # Counting: half below the median, about 84% below median * e^sigma (one sigma).
    below = sum(s < 0.2 for s in samples) / len(samples)
    assert below == pytest.approx(0.5, abs=0.02)
    one_sigma = sum(s < 0.2 * 1.6487 for s in samples) / len(samples)
    assert one_sigma == pytest.approx(0.8413, abs=0.02)
    assert delays.mean_s == pytest.approx(0.2 * 1.1331, rel=1e-3)


def test_median_zero_is_an_instant_model() -> None:
    delays = LogNormalDelay(0.0)
    assert {delays.next() for _ in range(100)} == {0.0}


def test_the_same_seed_draws_the_same_delays() -> None:
    a, b = LogNormalDelay(50.0, seed=11), LogNormalDelay(50.0, seed=11)
    assert [a.next() for _ in range(20)] == [b.next() for _ in range(20)]
    with pytest.raises(ValueError):
        LogNormalDelay(-1.0)


async def test_the_server_sleeps_log_normal_delays_on_the_injected_clock(
    client: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with ModelStandin(200.0, sigma=0.5, seed=5, clock=clock, sleep=clock.sleep) as standin:
        for i in range(1500):
            await post(client, standin, body(f"echo {i}"))
    assert len(clock.slept) == 1500
    assert statistics.median(clock.slept) == pytest.approx(0.2, rel=0.05)
    # Each record's finish is its arrival plus its delay, on the injected clock.
    for record in list(standin.records)[:50]:
        assert record.finished is not None
        assert record.finished - record.arrived == pytest.approx(record.delay_s)
    stats = standin.stats()
    assert stats.requests == 1500 and stats.errors == 0
    assert stats.delay_ms["count"] == 1500
    assert stats.delay_ms["p50"] == pytest.approx(200.0, rel=0.05)


async def test_an_instant_stand_in_never_sleeps(client: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with ModelStandin(0.0, clock=clock, sleep=clock.sleep) as standin:
        await post(client, standin, body("what time is it"))
    assert clock.slept == []
    assert standin.count == 1


# -- counting ------------------------------------------------------------------------------


async def test_peak_in_flight_counts_concurrent_requests(client: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def held(_: float) -> None:
        await release.wait()

    async with ModelStandin(100.0, sleep=held) as standin:
        calls = [asyncio.create_task(post(client, standin, body(f"echo {i}"))) for i in range(8)]
        for _ in range(500):  # until all eight are inside the handler (not a timing assertion)
            if standin.in_flight == 8:
                break
            await asyncio.sleep(0.01)
        assert standin.in_flight == 8
        release.set()
        replies = await asyncio.gather(*calls)
        assert len(replies) == 8
        assert standin.in_flight == 0 and standin.peak_in_flight == 8 and standin.count == 8
        # Another lone request does not lower the peak; a reset does.
        await post(client, standin, body("echo again later"))
        assert standin.peak_in_flight == 8
        standin.reset()
        assert standin.peak_in_flight == 0 and standin.count == 0 and not standin.records


async def test_bad_requests_are_answered_400_and_counted(client: aiohttp.ClientSession) -> None:
    async with ModelStandin() as standin:
        url = f"{standin.url}/chat/completions"
        async with client.post(url, data=b"{nope") as response:
            assert response.status == 400
            assert "error" in await response.json()
        async with client.post(url, json={"messages": "hi"}) as response:
            assert response.status == 400
        assert standin.errors == 2 and standin.count == 0


async def test_keep_requests_bounds_the_records(client: aiohttp.ClientSession) -> None:
    async with ModelStandin(keep_requests=3) as standin:
        for i in range(5):
            await post(client, standin, body(f"echo {i}"))
    assert [r.prompt for r in standin.records] == ["echo 2", "echo 3", "echo 4"]
    assert standin.count == 5


# -- the reply -----------------------------------------------------------------------------


def prompts() -> list[str]:
    return [s.prompt for s in DEMO] + [t["data"]["prompt"] for t in generate(24)]


async def test_replies_are_chat_completions_the_planner_parses(
    client: aiohttp.ClientSession,
) -> None:
    async with ModelStandin() as standin:
        for i, prompt in enumerate(prompts()):
            reply = await post(client, standin, body(prompt, user=f"acme/s{i}"))
            assert reply["object"] == "chat.completion"
            assert reply["choices"][0]["message"]["role"] == "assistant"
            usage = reply["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
            calls = parse_plan(content_of(reply))
            # The rule-based planner's plan: the same allowed and denied mix downstream.
            task = TaskAccepted(task_id=f"t{i}", prompt=prompt)
            assert calls == await RuleBasedPlanner().plan(task, [])
        assert standin.records[0].user == "acme/s0" and standin.records[0].model == "m"


def test_plans_cover_denied_tools_too() -> None:
    tools = {call["tool"] for p in prompts() for call in plan_for(p)}
    assert {"calculator", "search", "clock", "echo"} <= tools
    assert {"shell", "sql_write", "http_post"} <= tools  # for the policy gate to deny


async def close(planner: OpenAIPlanner) -> None:
    """Close the planner's HTTP client, where it keeps one open."""
    aclose = getattr(planner, "aclose", None)
    if aclose is not None:
        await aclose()


async def test_the_openai_planner_plans_through_the_stand_in() -> None:
    async with ModelStandin(5.0) as standin:
        planner = OpenAIPlanner(standin.url, timeout=10)
        try:
            history = [HistoryTurn(task_id="t0", prompt="what is 6 * 7", tokens=4)]
            again = await planner.plan(TaskAccepted(task_id="t1", prompt="again"), history)
            mixed = await planner.plan(
                TaskAccepted(task_id="t2", prompt="echo hi; run shell: ls"), []
            )
        finally:
            await close(planner)
    assert [(c.tool, c.args) for c in again] == [("calculator", {"expression": "6 * 7"})]
    assert [c.tool for c in mixed] == ["echo", "shell"]
    first, second = standin.records
    assert first.history == ["what is 6 * 7"] and first.prompt == "again"
    assert second.history == [] and second.prompt == "echo hi; run shell: ls"


# -- ordering per key ------------------------------------------------------------------------


def record(index: int, prompt: str, arrived: float, finished: float | None) -> RequestRecord:
    messages = [{"role": "user", "content": prompt}]
    return RequestRecord(index, arrived, messages, finished=finished)


def test_key_order_violations_finds_overlapping_calls_of_one_key() -> None:
    def session_of(r: RequestRecord) -> str | None:
        return r.prompt.split(":")[0] or None

    records = [
        record(0, "a:1", 0.0, 1.0),
        record(1, "b:1", 0.5, 2.0),  # another key: may overlap a's
        record(2, "a:2", 1.0, 1.5),  # right after a:1 finished
        record(3, "a:3", 1.2, 2.5),  # before a:2 finished
        record(4, ":x", 0.0, None),  # no key: ignored
    ]
    bad = key_order_violations(records, session_of)
    assert [(x.index, y.index) for x, y in bad] == [(2, 3)]
    assert key_order_violations(records[:3], session_of) == []


# -- as a child process ------------------------------------------------------------------------


async def test_the_child_process_serves_and_reports_stats_over_http() -> None:
    child = StandinProcess(1.0, keep_requests=-1)
    await child.start()
    try:
        planner = OpenAIPlanner(child.url, timeout=10)
        tasks = [TaskAccepted(task_id=f"t{i}", prompt=f"echo {i}") for i in range(5)]
        plans = await asyncio.gather(*(planner.plan(t, []) for t in tasks))
        assert [p[0].args["text"] for p in plans] == [str(i) for i in range(5)]
        stats = await child.stats()
        assert stats.requests == 5 and stats.in_flight == 0
        assert 1 <= stats.peak_in_flight <= 5 and stats.median_ms == 1.0
        assert sorted(r.prompt for r in await child.records()) == [f"echo {i}" for i in range(5)]
        assert (await child.reset()).requests == 0
        assert child.failure() is None
        await close(planner)
    finally:
        await child.stop()
    assert child.failure() is not None and "exited with 0" in (child.failure() or "")
