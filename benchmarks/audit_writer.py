"""Audit trail benchmark: the writer against a raw COPY of the same rows, and verify's speed.

Figures, in one run since these machines are noisy:

- ``writer``: audit-only commits through ``PostgresCheckpointStore`` (fencing,
  chain heads, hashing, COPY, offsets), batches of 500 rows as the runner
  commits them; the same workload as ``store_commit.py``'s audit mode, whose
  batch builder, timer and raw COPY this reuses;
- ``raw_copy``: ``BEGIN; COPY; COMMIT`` of the very rows the writer produces
  (already hashed, binary, sent with psycopg's ``write_row``) into a table
  with audit_log's columns and indexes. Budget (issue 20): writer >= 0.75 x
  raw_copy. Rounds interleave, so drift in the machine's load hits both alike;
- ``client``: the writer's Python work per row without a database:
  ``link_us_per_row`` is ``iter_links`` alone (canonical JSON, storability
  check, sha256); ``copy_path_us_per_row`` is the whole COPY path through
  psycopg's ``AsyncCopy`` with a writer that drops the data, as the store
  runs it (``iter_copy_data``: the same plus the binary rows) and as it ran
  before (``iter_links`` + ``write_row`` per row), for comparison;
- ``verify``: ``verify_chains`` over ``--verify-rows`` rows written by the
  writer (rows/s), and the latency of a session's timeline query
  (``session_audit``, 20 rows) at that table size, plus the bytes per row.

Everything lives in throwaway schemas, dropped at the end.

    .venv/bin/python benchmarks/audit_writer.py [--verify-rows 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import AsyncCopy, sql
from psycopg.abc import Buffer
from psycopg.copy import AsyncWriter
from store_commit import Timer, copy_rows, make_batches, raw_copier

from sluicegate.sinks import queries
from sluicegate.sinks.audit import GENESIS_HASH, ChainHead, iter_copy_data, iter_links
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.store import AUDIT_COPY_TYPES, JsonTextBinaryDumper, PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord

Conn = psycopg.AsyncConnection[Any]
PROBE_SESSION = "probe-session"
BUDGET = 0.75  # writer / raw_copy, issue 20


async def writer_vs_raw(args: argparse.Namespace, schema: str) -> dict[str, Any]:
    """Interleaved rounds of audit-only commits and raw COPYs of the same rows."""
    store = await PostgresCheckpointStore.connect(args.database_url, schema=schema)
    raw = await connect(args.database_url, schema=schema)
    try:
        await raw.execute("CREATE TABLE raw_audit (LIKE audit_log INCLUDING ALL)")
        total = args.warmup + args.batches
        batches = make_batches(
            total, step="w", events=args.events, states=0, results=0, partitions=args.partitions
        )
        rows = copy_rows(batches)
        raw_copy = raw_copier(raw, "raw_audit")
        writer, baseline = Timer("writer"), Timer("raw_copy")
        await Timer("warm-up").run(batches[: args.warmup], store.commit)
        await Timer("warm-up").run(rows[: args.warmup], raw_copy)
        step = max(1, args.batches // args.rounds)
        for start in range(args.warmup, total, step):
            await writer.run(batches[start : start + step], store.commit)
            await baseline.run(rows[start : start + step], raw_copy)
    finally:
        await store.close()
        await raw.close()
    return {
        "writer": _timer_json(writer, args.events),
        "raw_copy": _timer_json(baseline, args.events),
        "ratio": writer.rate() / baseline.rate(),
        "budget": BUDGET,
    }


def _timer_json(timer: Timer, rows_per_batch: int) -> dict[str, float]:
    ordered = sorted(timer.latencies)
    return {
        "rows_per_s": timer.rate() * rows_per_batch,
        "batch_p50_ms": statistics.median(ordered) * 1000,
        "batch_p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
    }


async def client_cost(args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per row of the writer's Python work, best of passes (see the docstring)."""
    batches = make_batches(20, step="w", events=args.events, states=0, results=0, partitions=4)
    rows = len(batches) * args.events
    now = datetime.now(UTC)

    def links() -> None:
        heads = {p: ChainHead(0, GENESIS_HASH) for p in range(4)}
        for batch in batches:
            for _row in iter_links("w", now, batch.audit, heads):
                pass

    async def copy_data(conn: Conn) -> None:
        heads = {p: ChainHead(0, GENESIS_HASH) for p in range(4)}
        for batch in batches:
            async with AsyncCopy(conn.cursor(), binary=True, writer=_Discard()) as copy:
                for chunk in iter_copy_data("w", now, batch.audit, heads):
                    await copy.write(chunk)

    async def write_rows(conn: Conn) -> None:
        heads = {p: ChainHead(0, GENESIS_HASH) for p in range(4)}
        for batch in batches:
            async with AsyncCopy(conn.cursor(), binary=True, writer=_Discard()) as copy:
                copy.set_types(AUDIT_COPY_TYPES)
                for row in iter_links("w", now, batch.audit, heads):
                    await copy.write_row(row)

    best = dict.fromkeys(("link", "copy_data", "write_row"), float("inf"))
    # A connection only for its adapters: the copies never reach the server.
    async with await connect(args.database_url) as conn:
        conn.adapters.register_dumper(None, JsonTextBinaryDumper)
        for _ in range(args.client_passes):
            t0 = time.thread_time()
            links()
            t1 = time.thread_time()
            await copy_data(conn)
            t2 = time.thread_time()
            await write_rows(conn)
            t3 = time.thread_time()
            for key, spent in (("link", t1 - t0), ("copy_data", t2 - t1), ("write_row", t3 - t2)):
                best[key] = min(best[key], spent)
    return {
        "link_us_per_row": best["link"] / rows * 1e6,
        "copy_path_us_per_row": best["copy_data"] / rows * 1e6,
        "copy_path_before_us_per_row": best["write_row"] / rows * 1e6,
    }


class _Discard(AsyncWriter):
    """Where ``client_cost``'s copies go: nowhere (the data is dropped)."""

    async def write(self, data: Buffer) -> None:
        pass


async def verify_speed(args: argparse.Namespace, schema: str) -> dict[str, Any]:
    """Fill a schema through the writer, then time verify and a session query on it."""
    store = await PostgresCheckpointStore.connect(args.database_url, schema=schema)
    per_batch = 5000
    n_batches = max(1, args.verify_rows // per_batch)
    try:
        for start in range(0, n_batches, 20):
            # Built as we go: a 10M-row run would not fit in memory at once.
            chunk = make_batches(
                min(20, n_batches - start),
                step=f"v{start // 20 % 4}",
                events=per_batch,
                states=0,
                results=0,
                partitions=args.partitions,
            )
            for batch in chunk:
                batch.offsets.clear()
                await store.commit(batch)
        await store.commit(_probe_batch())
    finally:
        await store.close()
    conn = await connect(args.database_url, schema=schema)
    async with conn:
        await conn.execute("VACUUM ANALYZE audit_log")
        t0 = time.perf_counter()
        report = await queries.verify_chains(conn)
        verify_s = time.perf_counter() - t0
        assert report.ok, report.breaks
        latencies = []
        for _ in range(30):
            t0 = time.perf_counter()
            found = await queries.session_audit(conn, PROBE_SESSION)
            latencies.append(time.perf_counter() - t0)
        assert len(found) == 20
        cur = await conn.execute("SELECT pg_total_relation_size('audit_log')")
        size = (await cur.fetchone() or (0,))[0]
    return {
        "rows": report.rows,
        "chains": report.chains,
        "seconds": verify_s,
        "rows_per_s": report.rows / verify_s,
        "session_query_ms_p50": statistics.median(latencies) * 1000,
        "bytes_per_row_with_indexes": size / report.rows,
    }


def _probe_batch() -> CommitBatch:
    batch = CommitBatch(step="probe")
    batch.audit = [
        (0, AuditRecord("processed", "probe", f"probe-{i}", "task.created", "acme", PROBE_SESSION))
        for i in range(20)
    ]
    return batch


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = f"bench_{uuid.uuid4().hex[:10]}"
    schemas = (f"{base}_w", f"{base}_v")
    for schema in schemas:
        await migrate(args.database_url, schema=schema)
    try:
        results: dict[str, Any] = await writer_vs_raw(args, schemas[0])
        results["client"] = await client_cost(args)
        if args.verify_rows:
            results["verify"] = await verify_speed(args, schemas[1])
    finally:
        if not args.keep:
            async with await psycopg.AsyncConnection.connect(
                args.database_url, autocommit=True
            ) as conn:
                for schema in schemas:
                    await conn.execute(
                        sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
                    )
    results["setup"] = {
        "events_per_batch": args.events,
        "batches": args.batches,
        "partitions": args.partitions,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    writer, raw = results["writer"], results["raw_copy"]
    print(f"{'':<22}{'rows/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for label, figures in (("audit writer", writer), ("raw COPY", raw)):
        print(
            f"{label:<22}{figures['rows_per_s']:>12,.0f}"
            f"{figures['batch_p50_ms']:>10.2f}{figures['batch_p99_ms']:>10.2f}"
        )
    verdict = "ok" if results["ratio"] >= results["budget"] else "UNDER BUDGET"
    print(f"writer / raw COPY: {results['ratio']:.3f} (budget {results['budget']}: {verdict})")
    client = results["client"]
    print(
        f"writer's client work per row: serialise + hash {client['link_us_per_row']:.2f} us;"
        f" the COPY path {client['copy_path_us_per_row']:.2f} us"
        f" (with write_row per row: {client['copy_path_before_us_per_row']:.2f} us)"
    )
    verify = results.get("verify")
    if verify:
        print(
            f"verify: {verify['rows']:,} rows in {verify['seconds']:.1f} s"
            f" = {verify['rows_per_s']:,.0f} rows/s; session query p50"
            f" {verify['session_query_ms_p50']:.2f} ms;"
            f" {verify['bytes_per_row_with_indexes']:.0f} bytes/row with indexes"
        )


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
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--client-passes", type=int, default=10)
    parser.add_argument("--verify-rows", type=int, default=200_000, help="rows to verify (0: skip)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the schemas for inspection")
    args = parser.parse_args()
    try:
        results = asyncio.run(run(args))
    except psycopg.OperationalError as exc:
        raise SystemExit(f"cannot reach Postgres: {exc}") from None
    print_table(results)
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
