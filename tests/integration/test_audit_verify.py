"""The audit trail against real Postgres: ``sluice audit verify`` catches tampering, and
the append-only trigger and the ``sluice_writer`` role refuse it in the first place.

Tampering is done as the superuser with the trigger disabled, which is exactly
what the hash chain is for: whoever gets past the database's own guards still
cannot rewrite the trail unnoticed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row

from sluicegate.cli import main
from sluicegate.sinks import queries
from sluicegate.sinks.audit import GENESIS_HASH, chain_hash
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import available_migrations, pending
from sluicegate.sinks.store import PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord
from sluicegate.streams.transport import TopicPartition

pytestmark = pytest.mark.integration

Conn = psycopg.AsyncConnection[Any]
STEPS = ("gate", "worker")
PARTITIONS = (0, 1)
ROWS_PER_CHAIN = 6


@pytest.fixture
async def db(database_url: str, schema: str) -> AsyncIterator[Conn]:
    conn = await connect(database_url, schema=schema)
    yield conn
    await conn.close()


@pytest.fixture
async def trail(database_url: str, schema: str) -> None:
    """Four chains (two steps x two partitions) of six rows, in three commits each."""
    store = await PostgresCheckpointStore.connect(database_url, schema=schema)
    try:
        for commit in range(3):
            for step in STEPS:
                batch = CommitBatch(step=step)
                for p in PARTITIONS:
                    batch.offsets[TopicPartition("tasks", p)] = (commit * 2, commit * 2 + 1)
                    batch.audit += [(p, record(step, p, commit * 2 + i)) for i in range(2)]
                await store.commit(batch)
    finally:
        await store.close()


def record(step: str, partition: int, n: int) -> AuditRecord:
    decision = n % 2 == 1
    return AuditRecord(
        kind="decision" if decision else "processed",
        step=step,
        event_id=event_id(step, partition, n + 1),
        event_type="action.proposed" if decision else "task.created",
        tenant="acme",
        session=f"s{n % 3}",
        decision="allow" if decision else None,
        reasons=("within budget",) if decision else (),
        policy_version="sha256:" + "ab" * 32 if decision else None,
        trace_id=f"{n:032x}",
        detail={"tool": "search", "args": {"q": "paris"}} if decision else {},
    )


def event_id(step: str, partition: int, seq: int) -> str:
    """The id ``trail`` gives the row at ``seq`` of chain (step, partition)."""
    return f"{step}-{partition}-{seq}"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    monkeypatch.setenv("SLUICE_DATABASE_URL", database_url)
    monkeypatch.setenv("SLUICE_DB_SCHEMA", schema)


async def sluice(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI as a user would (its own event loop, so in a thread); (code, out, err)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def tamper(db: Conn, *statements: str | sql.Composed, params: Any = None) -> None:
    """Run ``statements`` as the superuser with the append-only trigger switched off."""
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    try:
        for statement in statements:
            query = statement.encode() if isinstance(statement, str) else statement
            await db.execute(query, params)
    finally:
        await db.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


async def chain_row(db: Conn, step: str, partition: int, seq: int) -> dict[str, Any]:
    cur = db.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM audit_log WHERE chain_step = %s AND chain_partition = %s AND seq = %s",
        (step, partition, seq),
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def insert_row(db: Conn, row: dict[str, Any]) -> None:
    columns = list(row)
    values = [orjson.dumps(v).decode() if c in ("reasons", "detail") else v for c, v in row.items()]
    await tamper(
        db,
        sql.SQL("INSERT INTO audit_log ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        ),
        params=values,
    )


# -- intact ---------------------------------------------------------------------------


@pytest.mark.usefixtures("trail", "cli_env")
async def test_an_intact_trail_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await sluice(capsys, "audit", "verify")
    assert (code, err) == (0, "")
    assert out.startswith("audit trail intact: 4 chains, 24 rows in ")
    assert out.count("\n") == 1

    code, out, _ = await sluice(capsys, "audit", "verify", "--json")
    report = orjson.loads(out)
    assert (code, report["ok"], report["chains"], report["rows"], report["breaks"]) == (
        0,
        True,
        4,
        24,
        [],
    )


@pytest.mark.usefixtures("cli_env")
async def test_an_empty_trail_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await sluice(capsys, "audit", "verify")
    assert code == 0
    assert out.startswith("audit trail intact: 0 chains, 0 rows")


# -- tampering: each kind is caught and the row named --------------------------------


async def change_reasons(db: Conn) -> None:
    await tamper(
        db,
        "UPDATE audit_log SET reasons = '[\"over budget\"]'"
        " WHERE chain_step = 'worker' AND chain_partition = 0 AND seq = 4",
    )


async def delete_row(db: Conn) -> None:
    await tamper(
        db,
        "DELETE FROM audit_log WHERE chain_step = 'gate' AND chain_partition = 1 AND seq = 2",
    )


async def swap_rows(db: Conn) -> None:
    where = "chain_step = 'worker' AND chain_partition = 1"
    await tamper(
        db,
        # Through a free seq: the primary key would refuse a direct swap.
        f"UPDATE audit_log SET seq = 1000 WHERE {where} AND seq = 3",
        f"UPDATE audit_log SET seq = 3 WHERE {where} AND seq = 4",
        f"UPDATE audit_log SET seq = 4 WHERE {where} AND seq = 1000",
    )


async def forge_in_the_middle(db: Conn) -> None:
    """A row slipped in after seq 2, linked to it, with a hash that looks right."""
    where = "chain_step = 'gate' AND chain_partition = 0"
    await tamper(
        db,
        f"UPDATE audit_log SET seq = seq + 1000 WHERE {where} AND seq > 2",
        f"UPDATE audit_log SET seq = seq - 999 WHERE {where} AND seq > 1000",
    )
    row = await chain_row(db, "gate", 0, 2)
    forged = {**row, "seq": 3, "event_id": "forged", "prev_hash": row["hash"], "hash": "f" * 64}
    await insert_row(db, forged)


async def forge_at_the_tail(db: Conn) -> None:
    """A row appended with a correctly recomputed hash, but linked to the wrong row."""
    last = await chain_row(db, "worker", 0, ROWS_PER_CHAIN)
    before = await chain_row(db, "worker", 0, ROWS_PER_CHAIN - 1)
    forged = {**last, "seq": ROWS_PER_CHAIN + 1, "event_id": "forged", "decision": "allow"}
    forged["prev_hash"] = before["hash"]
    forged["hash"] = chain_hash(forged["prev_hash"], forged)
    await insert_row(db, forged)


TAMPERING = {
    # name: (tamper, chain, seq named, event named, problem)
    "edited-reasons": (change_reasons, ("worker", 0), 4, event_id("worker", 0, 4), "hash_mismatch"),
    "deleted-row": (delete_row, ("gate", 1), 3, event_id("gate", 1, 3), "seq_gap"),
    "swapped-rows": (swap_rows, ("worker", 1), 3, event_id("worker", 1, 4), "prev_hash_mismatch"),
    "forged-row": (forge_in_the_middle, ("gate", 0), 3, "forged", "hash_mismatch"),
    "forged-tail": (
        forge_at_the_tail,
        ("worker", 0),
        ROWS_PER_CHAIN + 1,
        "forged",
        "prev_hash_mismatch",
    ),
}


@pytest.mark.usefixtures("trail", "cli_env")
@pytest.mark.parametrize("case", list(TAMPERING))
async def test_verify_catches_tampering_and_names_the_row(
    db: Conn, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    action, (step, partition), seq, named, problem = TAMPERING[case]
    await action(db)

    code, out, err = await sluice(capsys, "audit", "verify")
    assert code == 1
    (line,) = out.splitlines()
    assert line.startswith(f"BROKEN chain ({step}, {partition}) seq {seq} (event {named}): ")
    assert line.endswith(f" [{problem}]")
    assert err.startswith("sluice: error: audit trail broken: 1 of 4 chains")

    code, out, _ = await sluice(capsys, "audit", "verify", "--json")
    report = orjson.loads(out)
    assert (code, report["ok"]) == (1, False)
    (found,) = report["breaks"]
    assert (found["chain_step"], found["chain_partition"], found["seq"]) == (step, partition, seq)
    assert (found["event_id"], found["problem"]) == (named, problem)


@pytest.mark.usefixtures("trail", "cli_env")
async def test_verify_reports_every_broken_chain_once(
    db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    for action in (change_reasons, delete_row, swap_rows, forge_in_the_middle):
        await action(db)
    # A second edit further down an already broken chain is not reported again.
    await tamper(
        db,
        "UPDATE audit_log SET decision = 'deny'"
        " WHERE chain_step = 'worker' AND chain_partition = 0 AND seq = 6",
    )
    code, out, _ = await sluice(capsys, "audit", "verify", "--json")
    report = orjson.loads(out)
    assert code == 1
    assert [(b["chain_step"], b["chain_partition"], b["seq"]) for b in report["breaks"]] == [
        ("gate", 0, 3),
        ("gate", 1, 3),
        ("worker", 0, 4),
        ("worker", 1, 3),
    ]


@pytest.mark.usefixtures("trail", "cli_env")
async def test_verify_catches_changes_at_the_end_of_a_chain(
    db: Conn, capsys: pytest.CaptureFixture[str]
) -> None:
    # gate/0: the last row removed. gate/1: a perfectly linked row appended
    # without moving the head. worker/0: the head pointed at another hash.
    await tamper(
        db,
        "DELETE FROM audit_log WHERE chain_step = 'gate' AND chain_partition = 0 AND seq = 6",
    )
    last = await chain_row(db, "gate", 1, ROWS_PER_CHAIN)
    appended = {
        **last,
        "seq": ROWS_PER_CHAIN + 1,
        "event_id": "appended",
        "prev_hash": last["hash"],
    }
    appended["hash"] = chain_hash(last["hash"], appended)
    await insert_row(db, appended)
    await db.execute(
        "UPDATE audit_chains SET hash = %s WHERE step = 'worker' AND partition = 0", ("e" * 64,)
    )

    code, out, _ = await sluice(capsys, "audit", "verify", "--json")
    breaks = {(b["chain_step"], b["chain_partition"]): b for b in orjson.loads(out)["breaks"]}
    assert code == 1
    assert set(breaks) == {("gate", 0), ("gate", 1), ("worker", 0)}
    assert (breaks["gate", 0]["seq"], breaks["gate", 0]["event_id"]) == (6, None)
    assert breaks["gate", 0]["problem"] == "missing_tail"
    assert "rows end at seq 5" in breaks["gate", 0]["reason"]
    assert (breaks["gate", 1]["seq"], breaks["gate", 1]["event_id"]) == (7, "appended")
    assert breaks["gate", 1]["problem"] == "past_head"
    assert (breaks["worker", 0]["seq"], breaks["worker", 0]["problem"]) == (6, "head_mismatch")
    assert breaks["worker", 0]["event_id"] == event_id("worker", 0, 6)


@pytest.mark.usefixtures("trail")
async def test_a_chain_without_a_head_is_broken(db: Conn) -> None:
    await db.execute("DELETE FROM audit_chains WHERE step = 'gate' AND partition = 1")
    report = await queries.verify_chains(db)
    (found,) = report.breaks
    assert (found.chain_step, found.chain_partition, found.seq) == ("gate", 1, 1)
    assert (found.problem, found.event_id) == ("missing_head", event_id("gate", 1, 1))


@pytest.mark.usefixtures("trail")
async def test_verify_streams_in_pages_and_reports_progress(db: Conn) -> None:
    seen: list[int] = []
    report = await queries.verify_chains(db, progress=seen.append, page=4)
    assert report.ok and report.rows == 24
    # Six rows per chain in pages of four: 4 + 2, four times.
    assert seen == [4, 2] * 4
    assert await queries.estimate_audit_rows(db) == 24


async def test_verify_reads_one_snapshot_while_workers_commit(
    database_url: str, schema: str, db: Conn
) -> None:
    store = await PostgresCheckpointStore.connect(database_url, schema=schema)
    stop = asyncio.Event()

    async def keep_committing() -> int:
        n = 0
        while not stop.is_set():
            batch = CommitBatch(step="worker")
            batch.audit = [(0, record("worker", 0, n + i)) for i in range(50)]
            await store.commit(batch)
            n += 50
        return n

    writer = asyncio.create_task(keep_committing())
    try:
        reports = [await queries.verify_chains(db, page=30) for _ in range(5)]
    finally:
        stop.set()
        await writer
        await store.close()
    # Rows committed after the head was read would look like forgeries past
    # the head without a consistent snapshot.
    assert all(r.ok for r in reports), [r.breaks for r in reports]


# -- the database refuses tampering in the first place ---------------------------------


@pytest.mark.usefixtures("trail")
@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("UPDATE audit_log SET reasons = '[]' WHERE seq = 1", "UPDATE"),
        ("DELETE FROM audit_log WHERE seq = 1", "DELETE"),
        ("TRUNCATE audit_log", "TRUNCATE"),
    ],
)
async def test_the_trigger_refuses_rewrites_even_for_the_owner(
    db: Conn, statement: str, operation: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=f"append-only: {operation}"):
        await db.execute(statement.encode())
    assert await queries.count_audit(db) == 24


@pytest.fixture
async def as_writer(db: Conn) -> AsyncIterator[Conn]:
    """``db`` acting as the restricted role, as a worker logged in under it would."""
    await db.execute("SET ROLE sluice_writer")
    yield db
    await db.execute("RESET ROLE")


@pytest.mark.usefixtures("trail")
async def test_the_writer_role_may_append_and_read_audit_log(db: Conn, as_writer: Conn) -> None:
    await as_writer.execute(
        "INSERT INTO audit_log (chain_step, chain_partition, seq, time, tenant, session,"
        " event_id, step, event_type, kind, prev_hash, hash)"
        " VALUES ('other', 0, 1, now(), 'acme', 's1', 'e1', 'other', 't', 'processed', %s, %s)",
        (GENESIS_HASH, "0" * 64),
    )
    assert await queries.count_audit(as_writer) == 25


@pytest.mark.usefixtures("trail")
@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE audit_log SET reasons = '[]' WHERE seq = 1", "permission denied"),
        ("DELETE FROM audit_log WHERE seq = 1", "permission denied"),
        ("TRUNCATE audit_log", "permission denied"),
        ("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only", "must be owner"),
        ("DROP TRIGGER audit_log_append_only ON audit_log", "must be owner"),
    ],
)
async def test_the_writer_role_may_not_rewrite_audit_log(
    as_writer: Conn, statement: str, refusal: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=refusal):
        await as_writer.execute(statement.encode())


@pytest.fixture
async def worker_login(database_url: str, schema: str) -> AsyncIterator[str]:
    """A URL logging in as a fresh LOGIN member of sluice_writer, as the README says."""
    role = f"t_worker_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE sluice_writer").format(sql.Identifier(role))
        )
    yield psycopg.conninfo.make_conninfo(database_url, user=role)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_workers_commit_under_the_writer_role(
    worker_login: str, schema: str, db: Conn
) -> None:
    # What a worker does on start: check the schema is migrated, open the store.
    assert await pending(worker_login, schema=schema) == []
    store = await PostgresCheckpointStore.connect(worker_login, schema=schema)
    try:
        for first in (0, 2):
            batch = CommitBatch(step="worker")
            batch.offsets[TopicPartition("tasks", 0)] = (first, first + 1)
            batch.audit = [(0, record("worker", 0, first + i)) for i in range(2)]
            await store.commit(batch)
        assert await store.load_offsets("worker", [TopicPartition("tasks", 0)]) == {
            TopicPartition("tasks", 0): 3
        }
        # Read back from audit_log: the input (processed) rows only.
        assert await store.load_recent_ids("worker", 0, 10) == {
            event_id("worker", 0, 1),
            event_id("worker", 0, 3),
        }
    finally:
        await store.close()
    assert (await queries.verify_chains(db)).ok
    worker = await connect(worker_login, schema=schema)
    async with worker:
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            await worker.execute("DELETE FROM audit_log")


async def test_the_role_migration_is_idempotent(db: Conn) -> None:
    (role_sql,) = (m.sql for m in available_migrations() if m.version == "0002_writer_role")
    await db.execute(role_sql.encode())
    await db.execute(role_sql.encode())
    cur = await db.execute(
        "SELECT privilege_type FROM information_schema.role_table_grants"
        " WHERE grantee = 'sluice_writer' AND table_schema = current_schema()"
        " AND table_name = 'audit_log' ORDER BY 1"
    )
    assert [p for (p,) in await cur.fetchall()] == ["INSERT", "SELECT"]


def test_readme_tells_how_to_run_workers_under_the_role() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Audit trail", 1)[1]
    assert "IN ROLE sluice_writer" in section
    assert "SLUICE_DATABASE_URL" in section
