"""Read-side helpers over the sluicegate tables, for the CLI, tests and operators.

Each takes an open connection whose ``search_path`` is the sluicegate schema
(``sinks.db.connect``) and returns typed rows. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from sinks.audit import ChainBreak, ChainVerifier, StoredHead

Conn = psycopg.AsyncConnection[Any]

AUDIT_KINDS = ("processed", "decision", "dead_letter", "shadow_divergence")


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
    """The outcome of ``verify_chains``: ``first_break`` is ``None`` when every chain holds."""

    chains: int
    rows: int
    first_break: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.first_break is None


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


async def fetch_result(conn: Conn, task_id: str) -> StoredResult | None:
    cur = conn.cursor(row_factory=class_row(StoredResult))
    await cur.execute(
        sql.SQL("SELECT {} FROM results WHERE task_id = %s").format(_RESULT_COLUMNS), (task_id,)
    )
    return await cur.fetchone()


# -- audit ---------------------------------------------------------------------------


async def session_audit(conn: Conn, session: str, *, tenant: str | None = None) -> list[AuditRow]:
    """A session's audit rows in the order they were committed.

    Within one chain that is ``seq`` order; across steps (different chains)
    it is commit time, which is only as exact as the workers' clocks.
    """
    where, params = _where([("session", session), ("tenant", tenant)])
    query = (
        sql.SQL("SELECT {} FROM audit_log").format(_AUDIT_COLUMNS)
        + where
        + sql.SQL(" ORDER BY time, chain_step, chain_partition, seq")
    )
    return await _audit_rows(conn, query, params)


async def audit_by_kind(
    conn: Conn,
    kind: str,
    *,
    tenant: str | None = None,
    session: str | None = None,
    limit: int | None = None,
) -> list[AuditRow]:
    """Audit rows of one ``kind`` (see ``AUDIT_KINDS``), oldest first."""
    if kind not in AUDIT_KINDS:
        raise ValueError(f"unknown audit kind {kind!r}; one of {', '.join(AUDIT_KINDS)}")
    where, params = _where([("kind", kind), ("tenant", tenant), ("session", session)])
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
    needs no open transaction and works on an autocommit connection.
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


async def verify_chains(conn: Conn) -> VerifyReport:
    """Recompute every chain (those with a head and those with rows) and report the first break."""
    heads = {(h.step, h.partition): h for h in await chain_heads(conn)}
    # A full scan, but verifying reads every row anyway; chains with rows and
    # no head are found this way too.
    cur = await conn.execute("SELECT DISTINCT chain_step, chain_partition FROM audit_log")
    chains = sorted(set(heads) | {(step, partition) for step, partition in await cur.fetchall()})
    rows = 0
    for step, partition in chains:
        verifier = ChainVerifier(step, partition)
        found: ChainBreak | None = None
        async with aclosing(chain_rows(conn, step, partition)) as stream:
            async for row in stream:
                rows += 1
                found = verifier.feed(row)
                if found is not None:
                    break
        found = found or verifier.finish(heads.get((step, partition)))
        if found is not None:
            return VerifyReport(len(chains), rows, found)
    return VerifyReport(len(chains), rows, None)
