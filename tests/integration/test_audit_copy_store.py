"""The store's audit COPY (``iter_copy_data``) stores what psycopg's ``write_row`` stored.

Batches go through ``PostgresCheckpointStore``; the same records are linked
again with the commits' timestamps and copied row by row with ``write_row``
(the store's path before) into a table like ``audit_log``. Both tables must
read back byte for byte the same (binary ``COPY TO``: every column as
Postgres stores it, jsonb included), and the chains must verify. On a
connection whose client encoding is not UTF-8 the store falls back to
``write_row``, with the same result.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sluicegate.sinks import queries
from sluicegate.sinks import store as store_module
from sluicegate.sinks.audit import COPY_COLUMNS, GENESIS_HASH, ChainHead, link
from sluicegate.sinks.db import connect
from sluicegate.sinks.store import AUDIT_COPY_TYPES, JsonTextBinaryDumper, PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord
from sluicegate.streams.transport import TopicPartition

pytestmark = pytest.mark.integration

Conn = psycopg.AsyncConnection[Any]


def record(i: int, *, wide: bool = True, **overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "kind": ("processed", "decision", "dead_letter", "shadow_divergence")[i % 4],
        "step": "gate",
        "event_id": f"01J{i:013d}",
        "event_type": "action.proposed",
        "tenant": "acme",
        "session": f"session-{i % 3}",
        "causation_id": f"task-{i}" if i % 2 else None,
        "decision": "allow" if i % 2 else None,
        "reasons": ("within budget", "é") if i % 3 else (),
        "policy_version": "sha256:5f1c0e" if i % 2 else None,
        "trace_id": f"{i:032x}" if i % 5 else None,
        "detail": {"tool": "search", "cost": 3.5, "args": {"q": "café"}} if i % 2 else {},
    }
    if wide:  # beyond Latin-1
        fields["tenant"] = "Zürich ✓ 😀" if i % 7 == 0 else "acme"
    fields.update(overrides)
    return AuditRecord(**fields)


def batches(*, wide: bool = True) -> list[CommitBatch]:
    awkward = [
        record(101, wide=wide, detail={"v": -0.0, "big": 1e16, "huge": 1e20, "small": 1e-7}),
        record(102, wide=wide, event_id="e" * 2000, reasons=("",), detail={"": ""}),
        record(103, wide=wide, tenant="", session="", decision="", trace_id=""),
    ]
    if wide:  # NUL becomes U+FFFD, which Latin-1 cannot carry either way
        awkward.append(record(100, session="a\x00b", detail={"note": "x\x00y", "k\x00": [None]}))
    out = []
    for n in range(3):
        batch = CommitBatch(step="worker")
        audit = [(i % 2, record(n * 100 + i, wide=wide)) for i in range(150)]
        if n == 1:
            audit[10:10] = [(1, r) for r in awkward]
        batch.audit = audit
        for p in (0, 1):
            batch.offsets[TopicPartition("tasks", p)] = (n * 1000, n * 1000 + 999)
        out.append(batch)
    return out


async def copy_out(conn: Conn, table: str) -> bytes:
    query = sql.SQL("COPY (SELECT {} FROM {} ORDER BY chain_step, chain_partition, seq) TO STDOUT")
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    data = bytearray()
    async with conn.cursor().copy(
        query.format(columns, sql.Identifier(table)) + sql.SQL(" (FORMAT BINARY)")
    ) as copy:
        async for block in copy:
            data += block
    return bytes(data)


async def write_row_copy(conn: Conn, committed: list[CommitBatch], table: str) -> None:
    """The committed batches again, as the store wrote them before: ``link`` + ``write_row``."""
    conn.adapters.register_dumper(None, JsonTextBinaryDumper)
    await conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE audit_log INCLUDING ALL)").format(sql.Identifier(table))
    )
    cur = await conn.execute("SELECT DISTINCT time FROM audit_log ORDER BY time")
    times = [t for (t,) in await cur.fetchall()]
    assert len(times) == len(committed)
    heads = {p: ChainHead(0, GENESIS_HASH) for p in (0, 1)}
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    )
    for batch, time in zip(committed, times, strict=True):
        async with conn.transaction(), conn.cursor().copy(copy_sql) as copy:
            copy.set_types(AUDIT_COPY_TYPES)
            for row in link(batch.step, time, batch.audit, heads):
                await copy.write_row(row)


async def commit_and_compare(conninfo: str, database_url: str, schema: str, *, wide: bool) -> None:
    committed = batches(wide=wide)
    store = await PostgresCheckpointStore.connect(conninfo, schema=schema)
    try:
        for batch in committed:
            await store.commit(batch)
    finally:
        await store.close()
    conn = await connect(database_url, schema=schema)
    try:
        await write_row_copy(conn, committed, "audit_before")
        stored, before = await copy_out(conn, "audit_log"), await copy_out(conn, "audit_before")
        assert stored == before
        report = await queries.verify_chains(conn)
        assert report.ok, report.first_break
        assert (report.chains, report.rows) == (2, sum(len(b.audit) for b in committed))
        cur = await conn.execute("SELECT count(*) FROM audit_log WHERE session = 'a\ufffdb'")
        assert await cur.fetchone() == ((1,) if wide else (0,))
    finally:
        await conn.close()


def refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the store took the other COPY path")


async def test_the_store_stores_what_write_row_stored(
    database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "iter_links", refuse)
    await commit_and_compare(database_url, database_url, schema, wide=True)


async def test_a_connection_not_in_utf8_falls_back_to_write_row(
    database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "iter_copy_data", refuse)
    latin1 = make_conninfo(database_url, client_encoding="LATIN1")
    async with await psycopg.AsyncConnection.connect(latin1) as conn:
        assert conn.info.encoding == "iso8859-1"
    await commit_and_compare(latin1, database_url, schema, wide=False)
