"""Read-side helpers over the sluicegate tables, for the CLI, tests and operators.

Each takes an open connection whose ``search_path`` is the sluicegate schema
(``sinks.db.connect``) and returns typed rows. Nothing here writes.

Growth, and why ``audit_log`` is not partitioned (yet)
------------------------------------------------------
Measured with ``benchmarks/audit_writer.py`` (PG 15, 2 vCPU shared with other
work, default 128 MB shared_buffers), rows written through the store:

=========  ================  ==================  =========================
rows       verify_chains     session timeline    size with its 5 indexes
=========  ================  ==================  =========================
200 k      3.7 s (54 k/s)    0.6 ms (20 rows)    554 B/row
1 M        27 s (37 k/s)     1.2 ms              479 B/row (0.48 GB)
10 M       248 s (40 k/s)    1.1 ms              473 B/row (4.7 GB)
=========  ================  ==================  =========================

Neither query would get faster with time partitions. ``verify_chains`` reads
every row whatever the layout and is bound by recomputing hashes in Python
(linear: ~4 min per 10 M rows here, ~40 min per 100 M). The session query is
a ``(session, time)`` index lookup and stayed at ~1 ms from 200 k to 10 M
rows; partitions would turn it into one probe per partition unless
``--since`` prunes them. Partitioning would cost: the primary key must then
include ``time``, so Postgres would no longer enforce one row per
``(chain_step, chain_partition, seq)``; paging a chain by ``seq`` probes every
partition; partitions must be created ahead (no pg_partman here) and each
needs the append-only trigger and the writer role's grants (TRUNCATE of a
single partition does not fire the parent's statement trigger).

Where it starts to matter: a retention policy (old months archived and
dropped, which only works per partition, since DELETE is refused), or a
table of roughly 100 M+ rows (~50 GB) where index maintenance, anti-wraparound
VACUUM and a full verify (~40 min) hurt. The plan then, in a new migration:
(1) verification checkpoints, a table of ``(chain, seq, hash, verified_at)``
kept by ``sluice audit verify``, so a run starts from the last checkpoint and
archived rows before it need not be read (this, not partitioning, is what
keeps verify bounded); (2) ``audit_log`` becomes the first partition of a
table partitioned by ``RANGE (time)``, monthly (attach after adding a
matching CHECK on ``time`` so ATTACH need not scan), with the trigger and
grants applied per partition by the function that creates next month's.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from sluicegate.sinks.audit import ChainBreak, ChainVerifier, StoredHead

Conn = psycopg.AsyncConnection[Any]

AUDIT_KINDS = (
    "processed",
    "decision",
    "dead_letter",
    "shadow_divergence",
    "dlq_replay",
    "approval",
)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One ``audit_log`` row."""

    chain_step: str
    chain_partition: int
    seq: int
    time: datetime
    tenant: str
    session: str
    event_id: str
    causation_id: str | None
    step: str
    event_type: str
    kind: str
    decision: str | None
    reasons: list[str]
    policy_version: str | None
    trace_id: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One ``results`` row."""

    task_id: str
    tenant: str
    session: str
    status: str
    answer: Any
    trace_id: str | None
    step: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of ``verify_chains``: the first break of each broken chain, in chain order."""

    chains: int
    rows: int
    breaks: tuple[ChainBreak, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first_break(self) -> ChainBreak | None:
        return self.breaks[0] if self.breaks else None


_AUDIT_COLUMNS = sql.SQL(", ").join(sql.Identifier(name) for name in AuditRow.__dataclass_fields__)
_RESULT_COLUMNS = sql.SQL(", ").join(
    sql.Identifier(name) for name in StoredResult.__dataclass_fields__
)


def _where(conditions: list[tuple[str, object]]) -> tuple[sql.Composable, list[object]]:
    """``WHERE a = %s AND ...`` over the conditions whose value is not ``None``."""
    present = [(column, value) for column, value in conditions if value is not None]
    if not present:
        return sql.SQL(""), []
    clause = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(
        sql.SQL("{} = %s").format(sql.Identifier(column)) for column, _ in present
    )
    return clause, [value for _, value in present]


def _limit(limit: int | None) -> sql.Composable:
    return sql.SQL("") if limit is None else sql.SQL(" LIMIT {}").format(sql.Literal(int(limit)))


# -- results ---------------------------------------------------------------------


async def count_results(conn: Conn, *, tenant: str | None = None, status: str | None = None) -> int:
    where, params = _where([("tenant", tenant), ("status", status)])
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM results") + where, params)
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def fetch_results(
    conn: Conn,
    *,
    tenant: str | None = None,
    session: str | None = None,
    status: str | None = None,
    limit: int | None = None,
) -> list[StoredResult]:
    """Results, oldest first."""
    where, params = _where([("tenant", tenant), ("session", session), ("status", status)])
    query = (
        sql.SQL("SELECT {} FROM results").format(_RESULT_COLUMNS)
        + where
        + sql.SQL(" ORDER BY created_at, task_id")
        + _limit(limit)
    )
    cur = conn.cursor(row_factory=class_row(StoredResult))
    await cur.execute(query, params)
    return await cur.fetchall()


async def fetch_result(
    conn: Conn, task_id: str, *, tenant: str | None = None
) -> StoredResult | None:
    """One result; with ``tenant``, only if it is that tenant's."""
    where, params = _where([("task_id", task_id), ("tenant", tenant)])
    cur = conn.cursor(row_factory=class_row(StoredResult))
    await cur.execute(sql.SQL("SELECT {} FROM results").format(_RESULT_COLUMNS) + where, params)
    return await cur.fetchone()


async def results_since(
    conn: Conn, tenant: str, since: datetime, *, after: str | None = None, limit: int = 500
) -> list[StoredResult]:
    """A tenant's results stored at or after ``since``, oldest first (the gateway's stream).

    With ``after`` (a task id stored at ``since``), only those after it in
    (created_at, task_id) order: the next page. ``created_at`` is when the
    storing transaction began, so a result may turn up later with a time
    before one already read: callers read again from a little before the
    last time they saw, and drop what they had. Served by the
    ``(tenant, created_at)`` index.
    """
    if after is None:
        where, params = sql.SQL(" WHERE tenant = %s AND created_at >= %s"), [tenant, since]
    else:
        where = sql.SQL(" WHERE tenant = %s AND (created_at, task_id) > (%s, %s)")
        params = [tenant, since, after]
    query = (
        sql.SQL("SELECT {} FROM results").format(_RESULT_COLUMNS)
        + where
        + sql.SQL(" ORDER BY created_at, task_id")
        + _limit(limit)
    )
    cur = conn.cursor(row_factory=class_row(StoredResult))
    await cur.execute(query, params)
    return await cur.fetchall()


# -- audit ---------------------------------------------------------------------------


async def session_audit(
    conn: Conn,
    session: str,
    *,
    tenant: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
) -> list[AuditRow]:
    """A session's audit rows in the order they were committed, optionally filtered.

    Within one chain that is ``seq`` order; across steps (different chains)
    it is commit time, which is only as exact as the workers' clocks.
    ``since`` keeps rows committed at or after it. Served by the
    ``(session, time)`` index.
    """
    if kind is not None:
        _check_kind(kind)
    where, params = _where([("session", session), ("tenant", tenant), ("kind", kind)])
    if since is not None:
        where += sql.SQL(" AND time >= %s")
        params.append(since)
    query = (
        sql.SQL("SELECT {} FROM audit_log").format(_AUDIT_COLUMNS)
        + where
        + sql.SQL(" ORDER BY time, chain_step, chain_partition, seq")
    )
    return await _audit_rows(conn, query, params)


def _check_kind(kind: str) -> None:
    if kind not in AUDIT_KINDS:
        raise ValueError(f"unknown audit kind {kind!r}; one of {', '.join(AUDIT_KINDS)}")


async def audit_by_kind(
    conn: Conn,
    kind: str,
    *,
    tenant: str | None = None,
    session: str | None = None,
    limit: int | None = None,
    since: datetime | None = None,
) -> list[AuditRow]:
    """Audit rows of one ``kind`` (see ``AUDIT_KINDS``), oldest first; ``since``: from then on."""
    _check_kind(kind)
    where, params = _where([("kind", kind), ("tenant", tenant), ("session", session)])
    if since is not None:
        where += sql.SQL(" AND time >= %s")
        params.append(since)
    query = (
        sql.SQL("SELECT {} FROM audit_log").format(_AUDIT_COLUMNS)
        + where
        + sql.SQL(" ORDER BY time, chain_step, chain_partition, seq")
        + _limit(limit)
    )
    return await _audit_rows(conn, query, params)


async def audit_by_event(conn: Conn, event_id: str) -> list[AuditRow]:
    """Every audit row about one event (one per step that saw it, plus decisions)."""
    query = sql.SQL(
        "SELECT {} FROM audit_log WHERE event_id = %s ORDER BY time, chain_step, seq"
    ).format(_AUDIT_COLUMNS)
    return await _audit_rows(conn, query, [event_id])


async def count_audit(conn: Conn, *, kind: str | None = None, step: str | None = None) -> int:
    where, params = _where([("kind", kind), ("chain_step", step)])
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM audit_log") + where, params)
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _audit_rows(conn: Conn, query: sql.Composed, params: list[object]) -> list[AuditRow]:
    cur = conn.cursor(row_factory=class_row(AuditRow))
    await cur.execute(query, params)
    return await cur.fetchall()


# -- chains --------------------------------------------------------------------------


async def chain_heads(conn: Conn) -> list[StoredHead]:
    """Every chain's head, ordered by (step, partition)."""
    cur = conn.cursor(row_factory=class_row(StoredHead))
    await cur.execute(
        "SELECT step, partition, seq, hash FROM audit_chains ORDER BY step, partition"
    )
    return await cur.fetchall()


async def chain_rows(
    conn: Conn, step: str, partition: int, *, page: int = 5000
) -> AsyncGenerator[dict[str, Any], None]:
    """One chain's rows in ``seq`` order, as dicts, fetched a page at a time.

    Pages by ``seq`` (the primary key) rather than a server-side cursor, so it
    needs no open transaction and works on an autocommit connection; memory
    stays at one page whatever the chain's length.
    """
    after = 0
    cur = conn.cursor(row_factory=dict_row)
    query = sql.SQL(
        "SELECT {} FROM audit_log WHERE chain_step = %s AND chain_partition = %s AND seq > %s"
        " ORDER BY seq LIMIT %s"
    ).format(_AUDIT_COLUMNS)
    while True:
        await cur.execute(query, (step, partition, after, page))
        rows = await cur.fetchall()
        for row in rows:
            yield row
        if len(rows) < page:
            return
        after = rows[-1]["seq"]


# Every (chain_step, chain_partition) with rows, by skipping along the
# primary key: one index probe per chain instead of a scan of every row.
_CHAINS_WITH_ROWS = """
WITH RECURSIVE chains AS (
    (SELECT chain_step, chain_partition FROM audit_log
     ORDER BY chain_step, chain_partition LIMIT 1)
    UNION ALL
    SELECT next.chain_step, next.chain_partition
    FROM chains c, LATERAL (
        SELECT chain_step, chain_partition FROM audit_log a
        WHERE (a.chain_step, a.chain_partition) > (c.chain_step, c.chain_partition)
        ORDER BY a.chain_step, a.chain_partition LIMIT 1
    ) next
)
SELECT chain_step, chain_partition FROM chains
"""


async def estimate_audit_rows(conn: Conn) -> int:
    """How many rows ``verify_chains`` will read, cheaply: the sum of the chain heads.

    Exact while the trail is intact; falls back on the planner's estimate
    when no chain has a head.
    """
    cur = await conn.execute(
        "SELECT coalesce((SELECT sum(seq) FROM audit_chains), 0)::bigint,"
        " (SELECT greatest(reltuples, 0)::bigint FROM pg_class"
        "  WHERE oid = to_regclass('audit_log'))"
    )
    row = await cur.fetchone()
    if row is None:
        return 0
    heads, planner = row
    return int(heads) if heads else int(planner or 0)


async def verify_chains(
    conn: Conn, *, progress: Callable[[int], object] | None = None, page: int = 5000
) -> VerifyReport:
    """Recompute every chain and report the first break of each broken one.

    Covers chains with a head in ``audit_chains`` and chains with rows but
    no head. Streams each chain in pages of ``page`` rows, so memory stays
    flat however long the trail; ``progress`` is called with the number of
    rows read after each page. Runs in one REPEATABLE READ, READ ONLY
    transaction, so heads and rows come from the same snapshot and commits
    landing meanwhile cannot look like breaks; ``conn`` must not be inside a
    transaction already.
    """
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        heads = {(h.step, h.partition): h for h in await chain_heads(conn)}
        cur = await conn.execute(_CHAINS_WITH_ROWS)
        chains = sorted(set(heads) | {(step, part) for step, part in await cur.fetchall()})
        rows = 0
        breaks: list[ChainBreak] = []
        for step, partition in chains:
            verifier = ChainVerifier(step, partition, heads.get((step, partition)))
            found, read = await _verify_chain(conn, verifier, page, progress)
            rows += read
            if found is not None:
                breaks.append(found)
    return VerifyReport(len(chains), rows, tuple(breaks))


async def _verify_chain(
    conn: Conn,
    verifier: ChainVerifier,
    page: int,
    progress: Callable[[int], object] | None,
) -> tuple[ChainBreak | None, int]:
    """Feed one chain to ``verifier`` page by page; (its first break, rows read)."""
    read = 0
    stream = chain_rows(conn, verifier.chain_step, verifier.chain_partition, page=page)
    async with aclosing(stream):
        async for row in stream:
            read += 1
            if progress is not None and read % page == 0:
                progress(page)
            found = verifier.feed(row)
            if found is not None:
                break
        else:
            found = verifier.finish()
    if progress is not None and read % page:
        progress(read % page)
    return found, read
