"""The model client against a real loopback endpoint: retries, limits, pooling, usage.

No assertion here is about elapsed time: waits go through an injected
``sleep`` (recorded, returns at once) or a hand-driven clock, and the tests
assert on what the server saw and what the client was asked to wait.
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from sluicegate.agents.model_client import (
    ModelCallError,
    ModelClient,
    SessionPool,
    Usage,
    retry_after_s,
)
from sluicegate.agents.model_limits import LimitRegistry
from tests.metrics_support import metric_points
from tests.model_endpoint import (
    USAGE,
    Endpoint,
    ManualClock,
    RecordingSleep,
    Reply,
    completion,
    serve,
    settle,
    until,
)

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def server() -> AsyncIterator[Endpoint]:
    async with serve() as endpoint:
        yield endpoint


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    pool = SessionPool()
    yield pool
    await pool.aclose()


def client_for(
    server: Endpoint, pool: SessionPool, sleep: RecordingSleep | None = None, **options: Any
) -> ModelClient:
    """A client with its own pool and limits, so tests never share either."""
    options.setdefault("limits", LimitRegistry())
    return ModelClient(server.url, pool=pool, sleep=sleep or RecordingSleep(), **options)


async def test_usage_is_parsed_and_one_session_is_reused(
    server: Endpoint, pool: SessionPool
) -> None:
    client = client_for(server, pool)
    results = [await client.complete(BODY) for _ in range(3)]
    for result in results:
        assert result.usage == Usage(prompt_tokens=11, completion_tokens=7, total_tokens=18)
        assert result.content == "hi"
        assert (result.report.model, result.report.attempts, result.report.error) == (
            "tiny-1",
            1,
            None,
        )
    assert server.bodies == [BODY] * 3
    # One session, one keep-alive connection for three sequential calls.
    assert pool.opened == 1
    assert len(server.peers) == 1
    assert pool.session() is pool.session()
    detail = results[0].report.as_detail()
    assert {k: detail[k] for k in USAGE} == USAGE
    assert (detail["model"], detail["attempts"]) == ("tiny-1", 1)
    assert isinstance(detail["latency_ms"], int)


async def test_usage_absent_or_partial(server: Endpoint, pool: SessionPool) -> None:
    client = client_for(server, pool)
    server.script = [
        Reply(json=completion(usage=None)),
        Reply(json=completion(usage={"prompt_tokens": 5, "completion_tokens": 2})),
    ]
    assert (await client.complete(BODY)).usage is None
    assert (await client.complete(BODY)).usage == Usage(5, 2, 7)
    server.script = [Reply(json=completion(usage=None))]
    assert "prompt_tokens" not in (await client.complete(BODY)).report.as_detail()


async def test_a_closed_session_is_replaced(server: Endpoint, pool: SessionPool) -> None:
    client = client_for(server, pool)
    await client.complete(BODY)
    await client.aclose()
    await client.complete(BODY)
    assert pool.opened == 2


async def test_429_is_retried_after_the_seconds_it_asks_for(
    server: Endpoint, pool: SessionPool
) -> None:
    sleep = RecordingSleep()
    client = client_for(server, pool, sleep)
    server.script = [
        Reply(429, {"Retry-After": "3"}),
        Reply(429, {"Retry-After": "0"}),
    ]
    result = await client.complete(BODY)
    assert server.requests == 3
    assert sleep.delays == [3.0, 0.0]
    assert (result.report.attempts, result.report.retries) == (3, 2)


async def test_retry_after_as_an_http_date(server: Endpoint, pool: SessionPool) -> None:
    sleep = RecordingSleep()
    now = 1_700_000_000.0
    client = client_for(server, pool, sleep, wall_clock=lambda: now)
    date = email.utils.formatdate(now + 10, usegmt=True)
    server.script = [Reply(503, {"Retry-After": date})]
    await client.complete(BODY)
    assert sleep.delays == [10.0]


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_after_s("7", now) == 7.0
    assert retry_after_s(" 1.5 ", now) == 1.5
    assert retry_after_s(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-3", "nan"):
        assert retry_after_s(unreadable, now) is None


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_retried_with_full_jitter_backoff(
    server: Endpoint, pool: SessionPool, status: int
) -> None:
    sleep = RecordingSleep()
    # rng() = 0.5: each wait is half its exponential ceiling (0.5, 1, 2 s).
    client = client_for(server, pool, sleep, backoff_s=0.5, rng=lambda: 0.5)
    server.script = [Reply(status)] * 3
    result = await client.complete(BODY)
    assert server.requests == 4
    assert sleep.delays == [0.25, 0.5, 1.0]
    assert result.report.attempts == 4


async def test_backoff_is_capped_by_max_wait(server: Endpoint, pool: SessionPool) -> None:
    sleep = RecordingSleep()
    client = client_for(
        server, pool, sleep, backoff_s=1, max_wait_s=3, max_attempts=5, rng=lambda: 1.0
    )
    server.script = [Reply(500)] * 4
    await client.complete(BODY)
    assert sleep.delays == [1.0, 2.0, 3.0, 3.0]


async def test_gives_up_after_max_attempts(server: Endpoint, pool: SessionPool) -> None:
    client = client_for(server, pool, max_attempts=3)
    server.default = Reply(503)
    with pytest.raises(ModelCallError) as caught:
        await client.complete(BODY)
    assert str(caught.value) == "endpoint answered HTTP 503 (after 3 attempts)"
    assert (caught.value.kind, caught.value.status) == ("http", 503)
    assert caught.value.report.attempts == 3
    assert caught.value.report.usage is None
    assert server.requests == 3


async def test_a_retry_after_beyond_the_limit_ends_the_call(
    server: Endpoint, pool: SessionPool
) -> None:
    sleep = RecordingSleep()
    client = client_for(server, pool, sleep, max_wait_s=20)
    server.default = Reply(429, {"Retry-After": "120"})
    with pytest.raises(ModelCallError, match=r"HTTP 429 .*retry in 120s, over the 20s limit"):
        await client.complete(BODY)
    assert server.requests == 1
    assert sleep.delays == []


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_not_retried(server: Endpoint, pool: SessionPool, status: int) -> None:
    sleep = RecordingSleep()
    client = client_for(server, pool, sleep)
    server.default = Reply(status, {"Retry-After": "1"})
    with pytest.raises(ModelCallError, match=f"^endpoint answered HTTP {status}$"):
        await client.complete(BODY)
    assert server.requests == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(raw=b"<html>busy</html>"), "response body is not JSON"),
        (Reply(raw=b"[" + b" " * (300 * 1024) + b"]"), "reply is too large"),
    ],
)
async def test_an_unusable_body_is_not_retried(
    server: Endpoint, pool: SessionPool, reply: Reply, reason: str
) -> None:
    client = client_for(server, pool)
    server.default = reply
    with pytest.raises(ModelCallError, match=f"^{reason}$") as caught:
        await client.complete(BODY)
    assert caught.value.kind == "reply"
    assert server.requests == 1


async def test_a_dropped_connection_is_retried(server: Endpoint, pool: SessionPool) -> None:
    sleep = RecordingSleep()
    client = client_for(server, pool, sleep)
    server.script = [Reply(drop=True), Reply(drop=True)]
    result = await client.complete(BODY)
    assert server.requests == 3
    assert len(sleep.delays) == 2
    assert result.report.attempts == 3
    assert result.usage == Usage(11, 7, 18)


async def test_a_refused_connection_fails_after_its_attempts(pool: SessionPool) -> None:
    sleep = RecordingSleep()
    client = ModelClient(
        "http://127.0.0.1:1/v1", pool=pool, sleep=sleep, limits=LimitRegistry(), max_attempts=2
    )
    with pytest.raises(ModelCallError, match=r"^request failed: \w+ \(after 2 attempts\)$") as e:
        await client.complete(BODY)
    assert e.value.kind == "connection"
    assert len(sleep.delays) == 1


async def test_a_timeout_is_retried_then_fails(server: Endpoint, pool: SessionPool) -> None:
    client = client_for(server, pool, timeout=0.05, max_attempts=2)
    server.default = Reply(hang=True)
    with pytest.raises(ModelCallError) as caught:
        await client.complete(BODY)
    assert str(caught.value) == "no reply within 0.05s (after 2 attempts)"
    assert caught.value.kind == "timeout"
    assert server.requests == 2


async def test_a_timeout_then_an_answer(server: Endpoint, pool: SessionPool) -> None:
    # A second long enough for the answer on a loaded machine; the first attempt hangs.
    client = client_for(server, pool, timeout=1.0)
    server.script = [Reply(hang=True)]
    result = await client.complete(BODY)
    assert result.report.attempts == 2


async def test_concurrency_cap_is_shared_by_the_endpoints_clients(
    server: Endpoint, pool: SessionPool
) -> None:
    limits = LimitRegistry()
    first = client_for(server, pool, concurrency=3, limits=limits)
    second = client_for(server, pool, concurrency=3, limits=limits)
    server.gate.clear()  # hold every request in the server
    calls = [asyncio.create_task((first if i % 2 else second).complete(BODY)) for i in range(10)]
    await until(lambda: server.in_flight >= 3, "three requests in flight")
    await settle()
    assert (server.in_flight, server.requests) == (3, 3)
    server.gate.set()
    results = await asyncio.gather(*calls)
    assert len(results) == 10 and server.requests == 10
    assert server.peak == 3
    # The pool opened no more connections than could be in flight at once.
    assert len(server.peers) <= 3


def test_different_limits_for_one_endpoint_are_refused() -> None:
    limits = LimitRegistry()
    ModelClient("http://h/v1", limits=limits, concurrency=4)
    ModelClient("http://h/v1/chat/completions", limits=limits, concurrency=4)  # same endpoint
    with pytest.raises(ValueError, match="already has limits concurrency=4"):
        ModelClient("http://h/v1", limits=limits, concurrency=5)
    with pytest.raises(ValueError, match="rpm"):
        ModelClient("http://h/v1", limits=limits, concurrency=4, rpm=10)


async def test_rpm_limit_spaces_requests(server: Endpoint, pool: SessionPool) -> None:
    clock = ManualClock()
    limits = LimitRegistry(clock=clock, sleep=clock.sleep)
    # 120 a minute: two a second, in bursts of at most two.
    client = client_for(server, pool, rpm=120, limits=limits)
    calls = [asyncio.create_task(client.complete(BODY)) for _ in range(5)]

    async def admitted(count: int) -> None:
        await until(lambda: server.requests == count, f"{count} requests admitted")
        await until(lambda: clock.sleeping == 1 or count == 5, "the next one waiting")
        await settle()
        assert server.requests == count

    await admitted(2)  # the burst
    clock.advance(0.25)  # half a token: nobody more
    await admitted(2)
    clock.advance(0.25)
    await admitted(3)
    clock.advance(0.5)
    await admitted(4)
    clock.advance(60)  # a long pause refills the bucket only up to its burst
    await admitted(5)
    await asyncio.gather(*calls)
    assert clock.slept and all(wait <= 0.5 for wait in clock.slept)


async def test_metrics_count_tokens_retries_and_duration(
    server: Endpoint, pool: SessionPool, metric_reader: InMemoryMetricReader
) -> None:
    client = client_for(server, pool, step="summarise")
    server.script = [Reply(503), Reply(429)]
    await client.complete(BODY)
    server.default = Reply(400)
    with pytest.raises(ModelCallError):
        await client.complete(BODY)
    points = metric_points(metric_reader)
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in points["sluice.model.tokens"]}
    assert tokens == {"input": 11, "output": 7}
    assert {p.attributes["sluice.step"] for p in points["sluice.model.tokens"]} == {"summarise"}
    retries = {p.attributes["error.type"]: p.value for p in points["sluice.model.retries"]}
    assert retries == {"503": 1, "429": 1}
    durations = {
        p.attributes.get("error.type"): p.count for p in points["sluice.model.call.duration"]
    }
    assert durations == {None: 1, "400": 1}


async def test_no_metrics_recorded_while_metrics_are_off(
    server: Endpoint, pool: SessionPool
) -> None:
    from sluicegate.streams import metrics

    assert not metrics.enabled()
    await client_for(server, pool).complete(BODY)  # must not touch the SDK or fail
