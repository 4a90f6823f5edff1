"""``sluice serve`` over real NATS and Postgres: every endpoint, tenant isolation, 401/413/429.

One gateway serves the module (tenants acme and globex); the round trip
runs the reference pipeline in the test's loop beside it. Sessions are
named after their tenant (a-..., g-...), so what a stream delivers shows
whose it is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import pytest

from sluicegate.settings import Settings
from sluicegate.sinks.db import connect
from sluicegate.streams.transport import OutMessage, TransportError
from tests.integration.gateway_support import hold, in_thread, new_key, revoke, served
from tests.integration.pipeline_support import (
    prepare_database,
    running_pipeline,
    settings_for,
)
from tests.services import new_prefix

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def gw_settings(nats_url: str, database_url: str) -> Settings:
    settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap="127.0.0.1:1",  # not used: the gateway publishes to NATS here
        database_url=database_url,
        prefix=new_prefix(),
    ).model_copy(
        # No key cache, so a revoked key is refused on the next request; a
        # small batch limit, so 413 for too many tasks is cheap to reach.
        update={"gateway_key_cache": 0.0, "gateway_max_batch": 5, "gateway_max_wait": 60.0}
    )
    in_thread(lambda: prepare_database(settings))
    return settings


@pytest.fixture(scope="module")
def keys(gw_settings: Settings) -> dict[str, str]:
    return {tenant: new_key(gw_settings, tenant) for tenant in ("acme", "globex")}


@pytest.fixture(scope="module")
def url(gw_settings: Settings) -> Iterator[str]:
    with served(gw_settings) as base:
        yield base


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def post(base: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else None
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}{path}", json=None if data is not None else body, data=data, headers=headers
        ) as response,
    ):
        return response.status, await response.json(content_type=None), response.headers


async def get(base: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}{path}", headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_submit_shapes_and_idempotent_ids(url: str, keys: dict[str, str]) -> None:
    acme, globex = keys["acme"], keys["globex"]
    task = {"prompt": "what is 2 + 2"}
    status, plain, headers = await post(
        url, "/v1/tasks", {"session": "a-1", "data": task}, auth(acme)
    )
    assert status == 202 and headers["Location"] == f"/v1/tasks/{plain['task_id']}"

    structured = {
        "specversion": "1.0",
        "id": "order-1",
        "source": "crm",
        "type": "task.submitted",
        "session": "a-1",
        "data": task,
    }
    ce = auth(acme, **{"Content-Type": "application/cloudevents+json"})
    first = await post(url, "/v1/tasks", orjson_bytes(structured), ce)
    retry = await post(url, "/v1/tasks", orjson_bytes(structured), ce)
    binary_headers = auth(
        acme,
        **{
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": "order-1",
            "ce-source": "crm",
            "ce-type": "task.submitted",
            "ce-session": "a-1",
        },
    )
    binary = await post(url, "/v1/tasks", orjson_bytes(task), binary_headers)
    plain_same_id = await post(
        url, "/v1/tasks", {"id": "order-1", "session": "a-1", "data": task}, auth(acme)
    )
    # The same id is the same task, in every shape; another tenant's "order-1" is its own.
    theirs = {**structured, "session": "g-1"}
    other = await post(url, "/v1/tasks", orjson_bytes(theirs), auth(globex, **ce_type()))
    ids = {r[1]["task_id"] for r in (first, retry, binary, plain_same_id)}
    assert [r[0] for r in (first, retry, binary, plain_same_id, other)] == [202] * 5
    assert len(ids) == 1 and other[1]["task_id"] not in ids and plain["task_id"] not in ids

    status, batch, _ = await post(
        url,
        "/v1/tasks:batch",
        [{"session": "a-2", "data": task}, {**structured, "id": "order-2"}],
        auth(acme),
    )
    assert status == 202 and len(batch["task_ids"]) == 2
    assert batch["task_ids"][0] not in ids

    # All or nothing: the bad item is named.
    status, problem, _ = await post(
        url, "/v1/tasks:batch", [{"session": "a-2", "data": task}, {"session": "a-2"}], auth(acme)
    )
    assert (status, problem["detail"].startswith("item 1:")) == (400, True)


def ce_type() -> dict[str, str]:
    return {"Content-Type": "application/cloudevents+json"}


def orjson_bytes(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


async def next_result(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next ``event: result`` of a server-sent event stream."""
    import orjson

    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if event.get("event") == "result":
                return dict(orjson.loads(event["data"]))
            event = {}
            continue
        name, _, value = line.partition(":")
        event[name] = value.strip()
    raise AssertionError("the stream ended")


async def until_task(response: aiohttp.ClientResponse, task_id: str) -> list[dict[str, Any]]:
    """Results from the stream up to and including ``task_id``'s."""
    seen = []
    while True:
        result = await next_result(response)
        seen.append(result)
        if result["task_id"] == task_id:
            return seen


async def test_round_trip_through_the_pipeline(
    url: str, keys: dict[str, str], gw_settings: Settings
) -> None:
    acme, globex = keys["acme"], keys["globex"]
    async with (
        running_pipeline(gw_settings),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.get(f"{url}/v1/results/stream", headers=auth(acme)) as acme_stream,
        http.get(f"{url}/v1/results/stream", headers=auth(globex)) as globex_stream,
    ):
        assert acme_stream.status == 200
        assert acme_stream.headers["Content-Type"].startswith("text/event-stream")
        status, accepted, _ = await post(
            url,
            "/v1/tasks",
            {"session": "a-trip", "data": {"prompt": "what is 6 * 7"}},
            auth(acme, traceparent=TRACEPARENT),
        )
        assert status == 202
        task_id = accepted["task_id"]

        status, result = await get(url, f"/v1/tasks/{task_id}?wait=60", auth(acme))
        assert status == 200, result
        assert result["status"] == "completed" and "42" in result["answer"]["text"]
        # The traceparent header continued into the pipeline's trace.
        assert result["trace_id"] == TRACE_ID

        status, timeline = await get(url, "/v1/sessions/a-trip/audit", auth(acme))
        assert status == 200
        steps = [event["step"] for event in timeline["events"]]
        assert steps[0] == "intake" and "responder" in steps
        assert {event["trace_id"] for event in timeline["events"]} == {TRACE_ID}

        # Another tenant knows nothing of it.
        assert (await get(url, f"/v1/tasks/{task_id}", auth(globex)))[0] == 404
        assert (await get(url, "/v1/sessions/a-trip/audit", auth(globex))) == (
            200,
            {"session": "a-trip", "events": []},
        )

        streamed = await until_task(acme_stream, task_id)
        assert streamed[-1]["answer"] == result["answer"]

        status, theirs, _ = await post(
            url,
            "/v1/tasks",
            {"session": "g-trip", "data": {"prompt": "what is 1 + 1"}},
            auth(globex),
        )
        assert status == 202
        # globex's stream carries globex's results only (sessions say whose).
        seen = await until_task(globex_stream, theirs["task_id"])
        assert all(result["session"].startswith("g-") for result in seen)

        # Resuming with Last-Event-ID starts after that result.
        async with http.get(
            f"{url}/v1/results/stream", headers=auth(acme, **{"Last-Event-ID": task_id})
        ) as resumed:
            status, again, _ = await post(
                url,
                "/v1/tasks",
                {"session": "a-trip", "data": {"prompt": "what is 2 * 3"}},
                auth(acme),
            )
            resumed_with = await until_task(resumed, again["task_id"])
            assert task_id not in {result["task_id"] for result in resumed_with}


async def test_unauthorized(url: str, keys: dict[str, str], gw_settings: Settings) -> None:
    calls = [
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks:batch"),
        ("GET", "/v1/tasks/x"),
        ("GET", "/v1/results/stream"),
        ("GET", "/v1/sessions/a-1/audit"),
        ("GET", "/v1/approvals"),
        ("POST", "/v1/approvals/x:approve"),
        ("POST", "/v1/approvals/x:deny"),
    ]
    bad = [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer sg_000000000000_" + "x" * 43},
    ]
    async with aiohttp.ClientSession() as http:
        for method, path in calls:
            for headers in bad:
                async with http.request(method, f"{url}{path}", headers=headers) as response:
                    body = await response.json(content_type=None)
                    assert response.status == 401, (method, path, headers)
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert response.headers["Content-Type"] == "application/problem+json"
                    assert body["status"] == 401

    # A revoked key is refused (the module's gateway caches no key).
    key = new_key(gw_settings, "acme")
    assert (await get(url, "/v1/sessions/a-1/audit", auth(key)))[0] == 200
    revoke(gw_settings, key)
    assert (await get(url, "/v1/sessions/a-1/audit", auth(key)))[0] == 401


async def test_tenant_named_in_the_task_must_be_the_keys(url: str, keys: dict[str, str]) -> None:
    body = {"session": "a-1", "tenant": "globex", "data": {"prompt": "hi"}}
    status, problem, _ = await post(url, "/v1/tasks", body, auth(keys["acme"]))
    assert status == 403 and "globex" in problem["detail"]
    status, _, _ = await post(url, "/v1/tasks:batch", [body], auth(keys["acme"]))
    assert status == 403


async def test_bad_requests(url: str, keys: dict[str, str]) -> None:
    acme = keys["acme"]
    big = {"session": "a-1", "data": {"prompt": "x" * (1024 * 1024)}}
    assert (await post(url, "/v1/tasks", big, auth(acme)))[0] == 413
    many = [{"session": "a-1", "data": {"prompt": "hi"}}] * 6  # the module's limit is 5
    assert (await post(url, "/v1/tasks:batch", many, auth(acme)))[0] == 413
    status, problem, _ = await post(url, "/v1/tasks", b"{nope", auth(acme, **ce_type()))
    assert (status, problem["reason"]) == (400, "invalid_json")
    status, problem, _ = await post(
        url, "/v1/tasks", b"hello", auth(acme, **{"Content-Type": "text/plain"})
    )
    assert status == 415
    ill_typed = {"session": "a-1", "data": {"prompt": 5}}
    status, problem, _ = await post(url, "/v1/tasks", ill_typed, auth(acme))
    assert (status, problem["reason"]) == (400, "invalid_data")
    assert (await get(url, "/v1/tasks/x?wait=abc", auth(acme)))[0] == 400
    assert (await get(url, "/v1/tasks/x?wait=9999", auth(acme)))[0] == 400
    assert (await get(url, "/v1/sessions/a-1/audit?kind=nope", auth(acme)))[0] == 400
    assert (await get(url, "/v1/nothing", auth(acme)))[0] == 404


async def test_health_and_openapi(url: str) -> None:
    status, health = await get(url, "/healthz", {})
    assert (status, health["status"], health["publishing"]) == (200, "ok", "ok")
    status, doc = await get(url, "/openapi.json", {})
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert {"/v1/tasks", "/v1/tasks:batch", "/v1/tasks/{task_id}", "/v1/results/stream"} <= set(
        doc["paths"]
    )
    # The data schema is the pipeline's: the reference pipeline's task.submitted.
    assert "prompt" in doc["components"]["schemas"]["TaskSubmitted"]["properties"]


class HeldTransport:
    """A transport whose publishes wait until the test lets them through."""

    name = "held"
    prefix = "held"
    partitions = 1

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.published: list[OutMessage] = []

    async def connect(self) -> None:
        return None

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        return None

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        self.started.set()
        await asyncio.to_thread(self.release.wait, 60)
        self.published.extend(messages)

    async def close(self) -> None:
        return None


async def test_backed_up_publishing_answers_429(
    gw_settings: Settings, keys: dict[str, str]
) -> None:
    held = HeldTransport()
    settings = gw_settings.model_copy(update={"gateway_max_pending": 1})
    task = {"session": "a-429", "data": {"prompt": "what is 1 + 1"}}
    with served(settings, transport=held) as base:  # type: ignore[arg-type]
        first = asyncio.create_task(post(base, "/v1/tasks", task, auth(keys["acme"])))
        await asyncio.to_thread(held.started.wait, 30)
        status, problem, headers = await post(base, "/v1/tasks", task, auth(keys["acme"]))
        assert status == 429 and headers["Retry-After"] == "1", problem
        assert (await get(base, "/healthz", {}))[1]["pending"] == 1
        held.release.set()
        assert (await first)[0] == 202
    assert len(held.published) == 1


async def test_approvals(url: str, keys: dict[str, str], gw_settings: Settings) -> None:
    acme, globex = keys["acme"], keys["globex"]
    for tenant, approval_id in [("acme", "ap-1"), ("acme", "ap-2"), ("globex", "gp-1")]:
        hold(gw_settings, tenant, approval_id)
    status, listed = await get(url, "/v1/approvals", auth(acme))
    assert status == 200 and [a["id"] for a in listed["approvals"]] == ["ap-1", "ap-2"]
    assert listed["approvals"][0]["tool"] == "refund"

    reason = {"reason": "customer is known"}
    # Another tenant's held action is as unknown as one that does not exist.
    assert (await post(url, "/v1/approvals/gp-1:approve", reason, auth(acme)))[0] == 404
    assert (await post(url, "/v1/approvals/nope:deny", reason, auth(acme)))[0] == 404
    assert (await post(url, "/v1/approvals/ap-1:approve", {}, auth(acme)))[0] == 400

    status, decided, _ = await post(url, "/v1/approvals/ap-1:approve", reason, auth(acme))
    key_id = acme.split("_")[1]
    assert status == 200, decided
    assert (decided["status"], decided["decided_by"]) == ("approved", f"api-key {key_id}")
    assert (await post(url, "/v1/approvals/ap-1:deny", reason, auth(acme)))[0] == 409
    status, denied, _ = await post(url, "/v1/approvals/ap-2:deny", {"reason": "no"}, auth(acme))
    assert (status, denied["status"], denied["decided_reason"]) == (200, "denied", "no")

    assert (await get(url, "/v1/approvals", auth(acme)))[1] == {"approvals": []}
    status, everything = await get(url, "/v1/approvals?status=all", auth(acme))
    assert [a["status"] for a in everything["approvals"]] == ["approved", "denied"]
    status, theirs = await get(url, "/v1/approvals", auth(globex))
    assert [a["id"] for a in theirs["approvals"]] == ["gp-1"]
    assert (await get(url, "/v1/approvals?status=maybe", auth(acme)))[0] == 400


async def test_round_trip_on_kafka(kafka_bootstrap: str, database_url: str) -> None:
    settings = settings_for(
        "kafka",
        nats_url="nats://unused:1",
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=new_prefix(),
    )
    await prepare_database(settings)
    key = new_key(settings, "acme")
    with served(settings) as base:
        async with running_pipeline(settings):
            status, accepted, _ = await post(
                base,
                "/v1/tasks",
                {"id": "k-1", "session": "a-kafka", "data": {"prompt": "what is 5 * 5"}},
                auth(key, traceparent=TRACEPARENT),
            )
            assert status == 202
            status, result = await get(base, f"/v1/tasks/{accepted['task_id']}?wait=60", auth(key))
            # The client's own id finds it too (a client that never saw the 202).
            assert (await get(base, "/v1/tasks/k-1", auth(key))) == (200, result)
    assert status == 200, result
    assert "25" in result["answer"]["text"] and result["trace_id"] == TRACE_ID


class RefusingTransport(HeldTransport):
    """A broker that takes nothing."""

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        raise TransportError("the broker is away")


async def test_a_broker_that_takes_nothing_answers_503(
    gw_settings: Settings, keys: dict[str, str]
) -> None:
    task = {"session": "a-503", "data": {"prompt": "what is 1 + 1"}}
    with served(gw_settings, transport=RefusingTransport(), retry_for_s=0) as base:  # type: ignore[arg-type]
        status, problem, headers = await post(base, "/v1/tasks", task, auth(keys["acme"]))
    assert status == 503 and "Retry-After" in headers
    assert "the broker is away" in problem["detail"]


def store_result(settings: Settings, task_id: str, tenant: str, *, age_s: float = 0.0) -> None:
    """A results row as a worker's commit writes it, its transaction begun ``age_s`` ago."""

    async def go() -> None:
        conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
        try:
            await conn.execute(
                "INSERT INTO results (task_id, tenant, session, status, answer, created_at)"
                " VALUES (%s, %s, %s, 'completed', '{}'::jsonb, now() - make_interval(secs => %s))",
                (task_id, tenant, f"{tenant[0]}-late", age_s),
            )
        finally:
            await conn.close()

    in_thread(go)


async def test_stream_delivers_a_late_commit(
    url: str, keys: dict[str, str], gw_settings: Settings
) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.get(f"{url}/v1/results/stream", headers=auth(keys["acme"])) as stream,
    ):
        assert (await stream.content.readline()).startswith(b"retry:")  # the stream has begun
        # Committed now, but its transaction began before the stream did.
        await asyncio.to_thread(store_result, gw_settings, "late-1", "acme", age_s=5.0)
        await asyncio.to_thread(store_result, gw_settings, "late-g", "globex", age_s=5.0)
        await asyncio.to_thread(store_result, gw_settings, "late-2", "acme")
        seen = [r["task_id"] for r in await until_task(stream, "late-2")]
    assert seen == ["late-1", "late-2"]
