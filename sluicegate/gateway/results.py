"""Reading results for the gateway: one task (waiting for it if asked) and the live stream.

Results are rows the pipeline's last step commits to Postgres, so both read
the ``results`` table, always with the caller's tenant in the query: another
tenant's task is as unknown as one that does not exist.

The stream polls the ``(tenant, created_at)`` index. A row's ``created_at``
is when its transaction began, and transactions commit out of that order, so
each poll reads again from ``OVERLAP`` before the newest time seen and skips
the task ids already sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from sluicegate.gateway.ingest import MAX_ID, scoped_id
from sluicegate.sinks.queries import StoredResult, fetch_result, results_since

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]

# A storing transaction (one checkpoint commit) lasts far less than this.
OVERLAP = timedelta(seconds=10)
POLL_S = 0.25
PAGE = 500
# An SSE comment this often keeps proxies and clients from timing out a quiet stream.
HEARTBEAT_S = 15.0
# How often a waiting task read looks again: quickly at first, then less often.
WAIT_STEPS_S = (0.02, 0.05, 0.1, 0.2, 0.5)


def result_body(result: StoredResult) -> dict[str, Any]:
    return {
        "task_id": result.task_id,
        "status": result.status,
        "answer": result.answer,
        "session": result.session,
        "trace_id": result.trace_id,
        "created_at": result.created_at.isoformat(),
    }


async def read_result(pool: Pool, task_id: str, tenant: str) -> StoredResult | None:
    """The tenant's result for ``task_id``: the id the gateway answered, or the client's own.

    A client that chose an id (and perhaps never saw the 202) may ask by it;
    the task id is derived from it (``ingest.scoped_id``), so both find it.
    """
    async with pool.connection() as conn:
        found = await fetch_result(conn, task_id, tenant=tenant)
        if found is None and len(task_id) <= MAX_ID:
            found = await fetch_result(conn, scoped_id(tenant, task_id), tenant=tenant)
        return found


async def wait_for_result(
    pool: Pool, task_id: str, tenant: str, wait_s: float
) -> StoredResult | None:
    """The result, looking again until ``wait_s`` has passed; None if it is not there by then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    step = 0
    while True:
        result = await read_result(pool, task_id, tenant)
        left = deadline - loop.time()
        if result is not None or left <= 0:
            return result
        await asyncio.sleep(min(left, WAIT_STEPS_S[min(step, len(WAIT_STEPS_S) - 1)]))
        step += 1


async def start_time(pool: Pool, tenant: str, last_event_id: str | None) -> datetime:
    """Where a stream starts: after the result a reconnecting client saw last, else now."""
    async with pool.connection() as conn:
        if last_event_id:
            seen = await fetch_result(conn, last_event_id, tenant=tenant)
            if seen is not None:
                return seen.created_at
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


async def result_events(
    pool: Pool, tenant: str, since: datetime, *, skip: str | None = None
) -> AsyncIterator[bytes]:
    """Server-sent events of ``tenant``'s results from ``since`` on, until cancelled.

    Without ``skip`` (a new stream, ``since`` = now) every result already
    visible is history, and anything that turns up later is news, even with
    an earlier ``created_at`` (its transaction began before the stream did).
    With ``skip`` (resuming after that result, stored at ``since``) the
    results stored before ``since`` are taken as delivered and those from
    ``since`` on are sent (a few may come twice: clients dedupe by id).
    """
    sent: dict[str, datetime] = {}
    async for seen in _unseen(pool, tenant, since - OVERLAP, sent):
        if skip is None or seen.created_at < since:
            sent[seen.task_id] = seen.created_at
    if skip:
        sent[skip] = since
    newest = since
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    yield b"retry: 1000\n\n"
    while True:
        async for result in _unseen(pool, tenant, newest - OVERLAP, sent):
            sent[result.task_id] = result.created_at
            newest = max(newest, result.created_at)
            quiet_since = loop.time()
            yield _event(result)
        # Forget what can no longer come back within the overlap.
        horizon = newest - OVERLAP
        for task_id in [t for t, at in sent.items() if at < horizon]:
            del sent[task_id]
        if loop.time() - quiet_since >= HEARTBEAT_S:
            quiet_since = loop.time()
            yield b": keep-alive\n\n"
        await asyncio.sleep(POLL_S)


async def _unseen(
    pool: Pool, tenant: str, start: datetime, sent: dict[str, datetime]
) -> AsyncIterator[StoredResult]:
    """Results from ``start`` on not in ``sent``, page by page (a burst may exceed one)."""
    after: str | None = None
    while True:
        async with pool.connection() as conn:
            rows = await results_since(conn, tenant, start, after=after, limit=PAGE)
        for result in rows:
            if result.task_id not in sent:
                yield result
        if len(rows) < PAGE:
            return
        start, after = rows[-1].created_at, rows[-1].task_id


def _event(result: StoredResult) -> bytes:
    data = orjson.dumps(result_body(result))
    return b"id: %s\nevent: result\ndata: %s\n\n" % (result.task_id.encode(), data)
