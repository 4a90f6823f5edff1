"""Commit throughput of ``PostgresCheckpointStore``, against a raw COPY of the same rows.

Each batch is what the runner commits after 500 input events of one
partition: 500 audit rows, about 100 changed session states, a few final
results and the partition's offsets. Batches rotate over the partitions and
are built before the clock starts, so only the commit is timed. Three
figures, in one run since these machines are noisy:

- ``full``: the whole commit (fencing, chain, COPY, states, results, offsets);
- ``audit``: the same batches with only audit rows and offsets (the audit writer);
- ``raw_copy``: a plain ``BEGIN; COPY; COMMIT`` of the very rows the audit
  writer produced (already hashed, binary, sent with psycopg's ``write_row``),
  into a table with audit_log's columns and indexes. The budget (issue 20) is
  audit >= 0.75 x raw_copy.

Everything lives in a throwaway schema, dropped at the end.

    python benchmarks/store_commit.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from sluicegate.sinks.audit import COPY_COLUMNS, GENESIS_HASH, ChainHead, link
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.store import AUDIT_COPY_TYPES, JsonTextBinaryDumper, PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord, ResultRecord, StateKey
from sluicegate.streams.transport import TopicPartition

SESSIONS = 2000


def make_batches(
    n: int, *, step: str, events: int, states: int, results: int, partitions: int
) -> list[CommitBatch]:
    """``n`` batches rotating over ``partitions``, offsets increasing per partition."""
    next_offset = dict.fromkeys(range(partitions), 0)
    batches = []
    for b in range(n):
        partition = b % partitions
        first = next_offset[partition]
        next_offset[partition] = first + events
        batch = CommitBatch(step=step)
        batch.offsets[TopicPartition("tasks", partition)] = (first, first + events - 1)
        batch.audit = [(partition, _record(step, b, i)) for i in range(events)]
        for i in range(states):
            key = StateKey("acme", f"session-{(b * states + i) % SESSIONS}")
            batch.states[(partition, key)] = _state(b, i)
        batch.results = [
            ResultRecord(f"task-{b}-{i}", "acme", f"session-{i}", "done", {"answer": "42"})
            for i in range(results)
        ]
        batches.append(batch)
    return batches


def _record(step: str, b: int, i: int) -> AuditRecord:
    decision = i % 5 == 0
    return AuditRecord(
        kind="decision" if decision else "processed",
        step=step,
        event_id=f"01J{b:010d}{i:013d}",
        event_type="action.proposed" if decision else "task.created",
        tenant="acme",
        session=f"session-{(b * 500 + i) % SESSIONS}",
        causation_id=f"01J{b:010d}{i:013d}-cause",
        decision="allow" if decision else None,
        reasons=("within budget",) if decision else (),
        policy_version="sha256:5f1c0e" if decision else None,
        trace_id=f"{b:016x}{i:016x}",
        detail={"tool": "search", "cost": 3, "args": {"q": "weather in paris"}} if decision else {},
    )


def _state(b: int, i: int) -> bytes:
    state = {"calls": b + i, "spend": 12.5, "tools": ["search", "calc"], "window": [1, 2, 3]}
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)


class Timer:
    """Per-item latencies of one kind of work, accumulated over interleaved rounds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.latencies: list[float] = []

    async def run(self, items: Sequence[Any], work: Callable[[Any], Awaitable[None]]) -> None:
        for item in items:
            t0 = time.perf_counter()
            await work(item)
            self.latencies.append(time.perf_counter() - t0)

    def rate(self) -> float:
        return len(self.latencies) / sum(self.latencies)

    def report(self) -> None:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000
        print(
            f"{self.label:>10}: {self.rate():8.1f} batches/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
        )


def copy_rows(batches: Sequence[CommitBatch]) -> list[list[tuple[Any, ...]]]:
    """The audit rows ``link`` produces for each batch, for the raw COPY baseline."""
    heads: dict[int, ChainHead] = {}
    out = []
    for batch in batches:
        for partition, _ in batch.audit:
            heads.setdefault(partition, ChainHead(0, GENESIS_HASH))
        out.append(link("raw", datetime.now(UTC), batch.audit, heads))
    return out


def raw_copier(
    conn: psycopg.AsyncConnection[Any], table: str
) -> Callable[[list[tuple[Any, ...]]], Awaitable[None]]:
    """``BEGIN; COPY rows INTO table; COMMIT`` on ``conn``: the baseline for the audit writer.

    The same bytes as the writer sends (binary, same types: psycopg's
    ``write_row`` here, ``iter_copy_data`` in the writer), so a ratio against
    it measures the writer's own work: fencing, chaining, hashing, the extra
    statements. ``table`` should have audit_log's columns and indexes.
    """
    conn.adapters.register_dumper(None, JsonTextBinaryDumper)
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    )

    async def raw_copy(rows: list[tuple[Any, ...]]) -> None:
        async with conn.transaction(), conn.cursor().copy(copy_sql) as copy:
            copy.set_types(AUDIT_COPY_TYPES)
            for row in rows:
                await copy.write_row(row)

    return raw_copy


async def run(args: argparse.Namespace) -> None:
    base = f"bench_{uuid.uuid4().hex[:10]}"
    # Full commits in a schema of their own, so audit_log in the other one and
    # the raw COPY table grow alike and their indexes cost the same.
    schemas = (f"{base}_full", f"{base}_audit")
    for schema in schemas:
        await migrate(args.database_url, schema=schema)
    full_store = await PostgresCheckpointStore.connect(args.database_url, schema=schemas[0])
    audit_store = await PostgresCheckpointStore.connect(args.database_url, schema=schemas[1])
    raw = await connect(args.database_url, schema=schemas[1])
    try:
        await raw.execute("CREATE TABLE raw_audit (LIKE audit_log INCLUDING ALL)")
        shape = {"events": args.events, "partitions": args.partitions}
        total = args.warmup + args.batches
        full = make_batches(total, step="w", states=args.states, results=args.results, **shape)
        audit_only = make_batches(total, step="w", states=0, results=0, **shape)
        raw_rows = copy_rows(audit_only)
        raw_copy = raw_copier(raw, "raw_audit")
        print(
            f"batches of {args.events} audit rows, {args.states} states, {args.results} results;"
            f" {args.batches} timed after {args.warmup} warm-up, {args.partitions} partitions"
        )
        timers = Timer("full"), Timer("audit"), Timer("raw_copy")
        plan: list[tuple[Timer, Sequence[Any], Callable[[Any], Awaitable[None]]]] = [
            (timers[0], full, full_store.commit),
            (timers[1], audit_only, audit_store.commit),
            (timers[2], raw_rows, raw_copy),
        ]
        for _, items, do in plan:
            await Timer("warm-up").run(items[: args.warmup], do)
        # Interleaved rounds, so drift in the machine's load hits all three alike.
        step = max(1, args.batches // args.rounds)
        for start in range(args.warmup, total, step):
            for timer, items, do in plan:
                await timer.run(items[start : start + step], do)
        for timer in timers:
            timer.report()
        full_rate, audit_rate, raw_rate = (timer.rate() for timer in timers)
        print(
            f"full commit: {full_rate * args.events:,.0f} audit rows/s "
            f"(+ {full_rate * args.states:,.0f} state upserts/s)"
        )
        print(
            f"audit writer: {audit_rate * args.events:,.0f} rows/s; raw COPY "
            f"{raw_rate * args.events:,.0f} rows/s; ratio {audit_rate / raw_rate:.2f} (budget 0.75)"
        )
    finally:
        await full_store.close()
        await audit_store.close()
        if not args.keep:
            for schema in schemas:
                await raw.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        await raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "SLUICE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--events", type=int, default=500, help="audit rows per batch")
    parser.add_argument("--states", type=int, default=100, help="state upserts per batch")
    parser.add_argument("--results", type=int, default=5, help="results per batch")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--keep", action="store_true", help="keep the schema for inspection")
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except psycopg.OperationalError as exc:
        raise SystemExit(f"cannot reach Postgres: {exc}") from None


if __name__ == "__main__":
    main()
