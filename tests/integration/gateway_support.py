"""A gateway served for a test on a free loopback port, in a thread with its own event loop.

Its own loop, so sync tests (schemathesis, blocking clients) and async ones
(the pipeline running in the test's loop, aiohttp clients) can both talk to
it over real HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sluicegate.gateway.app import Gateway
from sluicegate.gateway.server import Listening, listening
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.sinks import api_keys
from sluicegate.sinks.approvals import INSERT_APPROVALS, insert_columns
from sluicegate.sinks.db import connect
from sluicegate.streams.approvals import ApprovalRequest
from sluicegate.streams.transport import Transport

T = TypeVar("T")


def in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh loop in another thread (not the test's loop)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(make())  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def new_key(settings: Settings, tenant: str) -> str:
    async def make() -> str:
        conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
        try:
            return (await api_keys.create_key(conn, tenant, label="test")).key
        finally:
            await conn.close()

    return in_thread(make)


def revoke(settings: Settings, key: str) -> None:
    parsed = api_keys.parse_key(key)
    assert parsed is not None

    async def go() -> None:
        conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
        try:
            await api_keys.revoke_key(conn, parsed[0])
        finally:
            await conn.close()

    in_thread(go)


def hold(settings: Settings, tenant: str, approval_id: str) -> None:
    """A pending held action of ``tenant``, as the gate records one (issue 18's table)."""
    request = ApprovalRequest(
        id=approval_id,
        step="gate",
        tenant=tenant,
        session=f"{tenant[0]}-held",
        partition=0,
        task_id=f"task-{approval_id}",
        tool="refund",
        args={"amount": 250},
        reasons=("refund_over_threshold",),
        deadline=datetime.now(UTC) + timedelta(hours=1),
        event_id=f"event-{approval_id}",
    )

    async def go() -> None:
        conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
        try:
            await conn.execute(INSERT_APPROVALS, insert_columns("gate", [request]))
        finally:
            await conn.close()

    in_thread(go)


@contextmanager
def served(
    settings: Settings, transport: Transport | None = None, *, retry_for_s: float | None = None
) -> Iterator[str]:
    """The gateway over ``settings`` (and ``transport``, or the configured one) at its URL."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        gateway = Gateway(settings, transport or make_transport(settings))
        if retry_for_s is not None:  # how long a failing publish is retried before 503
            gateway.publisher.retry_for_s = retry_for_s
        async with listening(gateway, "127.0.0.1", 0) as server:
            box["server"], box["loop"] = server, asyncio.get_running_loop()
            ready.set()
            await server.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="test-gateway", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the gateway did not start within 60 s")
    if "error" in box:
        raise box["error"]
    server: Listening = box["server"]
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        box["loop"].call_soon_threadsafe(server.stop)
        thread.join(60)
        if "error" in box:
            raise box["error"]
