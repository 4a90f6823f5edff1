"""The gateway's parts without a server: request shapes, tenant scoping, batching and 429, keys."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from sluicegate.gateway.auth import Authenticator
from sluicegate.gateway.ingest import batch_fields, scope, scoped_id, task_fields
from sluicegate.gateway.problems import Problem
from sluicegate.gateway.submitter import BackedUp, Submitter
from sluicegate.sinks.api_keys import parse_key, secret_hash
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import OutMessage

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_three_shapes_give_the_same_fields() -> None:
    data = {"prompt": "hi"}
    plain = task_fields(
        {"content-type": "application/json"}, b'{"session":"s","data":{"prompt":"hi"}}'
    )
    structured = task_fields(
        {"content-type": "application/cloudevents+json; charset=utf-8"},
        b'{"specversion":"1.0","session":"s","data":{"prompt":"hi"}}',
    )
    binary = task_fields(
        {"content-type": "application/json", "ce-specversion": "1.0", "ce-session": "a%20b"},
        b'{"prompt":"hi"}',
    )
    assert plain == {"session": "s", "data": data}
    assert structured["data"] == data and structured["specversion"] == "1.0"
    assert binary == {"specversion": "1.0", "session": "a b", "data": data}  # percent-decoded


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "text/plain"}, b"x", 415),
        ({}, b"{}", 415),
        ({"content-type": "application/cloudevents+json"}, b'{"session":"s"}', 400),
        ({"content-type": "application/json"}, b"[1]", 400),
        ({"content-type": "application/json"}, b"{nope", 400),
        ({"ce-specversion": "1.0", "content-type": "text/xml"}, b"<a/>", 415),
        ({"ce-specversion": "1.0", "content-type": "application/json"}, b'"text"', 400),
    ],
)
def test_bad_shapes_are_problems(headers: dict[str, str], body: bytes, status: int) -> None:
    with pytest.raises(Problem) as caught:
        task_fields(headers, body)
    assert caught.value.status == status


def test_batch_limits() -> None:
    json = {"content-type": "application/json"}
    assert len(batch_fields(json, b'[{"session":"s"},{"session":"t"}]', limit=2)) == 2
    for body, status in [(b"[]", 400), (b"{}", 400), (b"[{}, {}, {}]", 413), (b"[1]", 400)]:
        with pytest.raises(Problem) as caught:
            batch_fields(json, body, limit=2)
        assert caught.value.status == status


def test_scope_binds_tenant_ids_and_trace() -> None:
    fields = scope({"id": "order-1", "session": "s"}, "acme", traceparent=PARENT)
    assert fields["tenant"] == "acme" and fields["traceparent"] == PARENT
    assert fields["id"] == scoped_id("acme", "order-1") != scoped_id("globex", "order-1")
    assert uuid.UUID(fields["id"]).version == 8
    # No id: a fresh one each time; the event's own traceparent wins; a bad header is ignored.
    own = "00-11111111111111111111111111111111-2222222222222222-01"
    kept = scope({"session": "s", "traceparent": own}, "acme", traceparent=PARENT)
    assert kept["traceparent"] == own and kept["id"] != scope({"session": "s"}, "acme")["id"]
    assert "traceparent" not in scope({"session": "s"}, "acme", traceparent="garbage")
    for bad, status in [({"tenant": "globex"}, 403), ({"id": 5}, 400), ({"id": ""}, 400)]:
        with pytest.raises(Problem) as caught:
            scope(bad, "acme")
        assert caught.value.status == status
    assert scope({"tenant": "acme"}, "acme")["tenant"] == "acme"


class Gate:
    """A transport stand-in whose publishes wait for ``open``."""

    name = "gate"
    prefix = "gate"

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.started = asyncio.Event()
        self.batches: list[list[OutMessage]] = []

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        self.started.set()
        await self.open.wait()
        self.batches.append(list(messages))


def message(i: int) -> OutMessage:
    return OutMessage("tasks", b"{}", key=str(i).encode())


async def test_submitter_batches_requests_and_backs_up() -> None:
    gate = Gate()
    publisher = Publisher(gate, batch_size=10)  # type: ignore[arg-type]
    submitter = Submitter(publisher, max_pending=4, stall_s=3600, flushers=1)
    submitter.start()
    try:
        first = asyncio.create_task(submitter.submit([message(0)]))
        await gate.started.wait()
        waiting = [asyncio.create_task(submitter.submit([message(i)])) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(BackedUp) as caught:  # 4 pending: a fifth is refused
            await submitter.submit([message(4)])
        assert caught.value.retry_after == 1
        gate.open.set()
        await asyncio.gather(first, *waiting)
        # The three that queued behind the first went out as one batch.
        assert [len(batch) for batch in gate.batches] == [1, 3]
        assert submitter.pending == 0
    finally:
        await submitter.close()


async def test_submitter_stalled_broker_backs_up() -> None:
    now = [0.0]
    gate = Gate()
    submitter = Submitter(
        Publisher(gate),
        max_pending=100,
        stall_s=2.0,
        clock=lambda: now[0],  # type: ignore[arg-type]
    )
    submitter.start()
    try:
        first = asyncio.create_task(submitter.submit([message(0)]))
        await gate.started.wait()
        submitter.check(1)  # in flight, but not for long
        now[0] = 5.0
        with pytest.raises(BackedUp, match="not acknowledged"):
            submitter.check(1)
        gate.open.set()
        await first
        submitter.check(1)
    finally:
        await submitter.close()


async def test_authenticator() -> None:
    calls: list[str] = []

    async def lookup(key: str) -> str | None:
        calls.append(key)
        return "acme" if key == "good" else None

    now = [0.0]
    auth = Authenticator(lookup, ttl=5.0, clock=lambda: now[0])
    for headers in (
        {},
        {"authorization": "Basic x"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer bad"},
    ):
        with pytest.raises(Problem) as caught:
            await auth.tenant(headers)
        assert caught.value.status == 401 and "WWW-Authenticate" in caught.value.headers
    assert await auth.tenant({"authorization": "bearer good"}) == "acme"
    assert await auth.tenant({"authorization": "Bearer good"}) == "acme"
    assert calls.count("good") == 1  # cached
    now[0] = 6.0
    assert await auth.tenant({"authorization": "Bearer good"}) == "acme"
    assert calls.count("good") == 2  # looked up again after the ttl


def test_key_format() -> None:
    key = "sg_0123456789ab_" + "A" * 43
    assert parse_key(key) == ("0123456789ab", "A" * 43)
    assert parse_key("sg_0123456789ab_short") is None and parse_key("") is None
    assert len(secret_hash("x")) == 64
