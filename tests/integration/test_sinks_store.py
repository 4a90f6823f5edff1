"""``PostgresCheckpointStore`` against the real Postgres: one transaction per batch,
fencing, the hash chain across commits and partitions, results exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row

from sluicegate.sinks import queries
from sluicegate.sinks.audit import CANONICAL_FIELDS, GENESIS_HASH, chain_hash
from sluicegate.sinks.db import connect
from sluicegate.sinks.store import PostgresCheckpointStore, _Commit
from sluicegate.streams.checkpoint import (
    CheckpointStore,
    CommitBatch,
    StaleBatchError,
    StorePermanentError,
)
from sluicegate.streams.step import AuditRecord, ResultRecord, StateKey
from sluicegate.streams.transport import TopicPartition

pytestmark = pytest.mark.integration

Conn = psycopg.AsyncConnection[Any]
TP0 = TopicPartition("tasks", 0)
TP1 = TopicPartition("tasks", 1)


@pytest.fixture
async def make_store(database_url: str, schema: str) -> AsyncIterator[Callable[[], Any]]:
    made: list[PostgresCheckpointStore] = []

    async def factory() -> PostgresCheckpointStore:
        store = await PostgresCheckpointStore.connect(database_url, schema=schema)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store: Callable[[], Any]) -> PostgresCheckpointStore:
    result: PostgresCheckpointStore = await make_store()
    return result


@pytest.fixture
async def db(database_url: str, schema: str) -> AsyncIterator[Conn]:
    conn = await connect(database_url, schema=schema)
    yield conn
    await conn.close()


def audit(event_id: str, *, kind: str = "processed", session: str = "s1", **kw: Any) -> AuditRecord:
    return AuditRecord(
        kind=kind,
        step="worker",
        event_id=event_id,
        event_type="task.created",
        tenant="acme",
        session=session,
        **kw,
    )


def batch(
    offsets: dict[TopicPartition, tuple[int, int]] | None = None,
    *,
    events: int = 0,
    partition: int = 0,
    tag: str = "",
    states: dict[tuple[int, StateKey], bytes] | None = None,
    results: list[ResultRecord] | None = None,
) -> CommitBatch:
    return CommitBatch(
        step="worker",
        offsets=offsets or {},
        states=states or {},
        audit=[(partition, audit(f"{tag}e{i}")) for i in range(events)],
        results=results or [],
    )


def result(task_id: str, answer: Any = None) -> ResultRecord:
    return ResultRecord(task_id, "acme", "s1", "done", {"answer": answer})


async def scalar(db: Conn, query: str) -> Any:
    cur = await db.execute(query.encode())
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def footprint(db: Conn) -> tuple[Any, ...]:
    """Everything a commit can change, to compare before and after a failed one."""
    tables = ("step_offsets", "step_state", "results", "audit_log", "audit_chains")
    parts = []
    for table in tables:
        cur = await db.execute(
            sql.SQL("SELECT to_jsonb(t)::text FROM {} t ORDER BY 1").format(sql.Identifier(table))
        )
        parts.append(tuple(r[0] for r in await cur.fetchall()))
    return tuple(parts)


# -- round trip ----------------------------------------------------------------------


async def test_commit_then_load_returns_what_was_written(store: PostgresCheckpointStore) -> None:
    key_a, key_b = StateKey("acme", "s1"), StateKey("acme", "s2")
    state_a = orjson.dumps({"n": 1, "tools": ["a", "b"], "spend": 2.5}, option=orjson.OPT_SORT_KEYS)
    state_b = orjson.dumps({"z": {"y": None}, "a": "é"}, option=orjson.OPT_SORT_KEYS)
    outcome = await store.commit_batch(
        batch(
            {TP0: (0, 9), TP1: (3, 4)},
            events=3,
            states={(0, key_a): state_a, (1, key_b): state_b},
            results=[result("task-1")],
        )
    )
    assert (outcome.audit_rows, outcome.states, outcome.results_inserted) == (3, 2, 1)

    other = TopicPartition("tasks", 2)
    assert await store.load_offsets("worker", [TP0, TP1, other]) == {TP0: 9, TP1: 4}
    assert await store.load_offsets("other-step", [TP0]) == {}
    assert await store.load_states("worker", [0]) == {key_a: state_a}
    assert await store.load_states("worker", [0, 1, 5]) == {key_a: state_a, key_b: state_b}
    assert await store.load_recent_ids("worker", 0, 10) == {"e0", "e1", "e2"}

    # Updating a state replaces it.
    newer = orjson.dumps({"n": 2}, option=orjson.OPT_SORT_KEYS)
    await store.commit(batch({TP0: (10, 10)}, states={(0, key_a): newer}))
    assert (await store.load_states("worker", [0]))[key_a] == newer


async def test_recent_ids_are_the_newest_input_rows(store: PostgresCheckpointStore) -> None:
    await store.commit(batch({TP0: (0, 4)}, events=5, tag="old-"))
    decisions = [(0, audit(f"d{i}", kind="decision", decision="allow")) for i in range(3)]
    newer = batch({TP0: (5, 7)}, events=3, tag="new-")
    newer.audit.extend(decisions)
    await store.commit(newer)
    assert await store.load_recent_ids("worker", 0, 4) == {"new-e0", "new-e1", "new-e2", "old-e4"}
    assert await store.load_recent_ids("worker", 1, 4) == set()


async def test_it_is_a_checkpoint_store(store: PostgresCheckpointStore) -> None:
    assert isinstance(store, CheckpointStore)


async def test_concurrent_commits_on_one_store_take_turns(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    partitions = [TopicPartition("tasks", p) for p in range(8)]
    await asyncio.gather(
        *(store.commit(batch({tp: (0, 9)}, events=5, partition=tp.partition)) for tp in partitions)
    )
    assert await store.load_offsets("worker", partitions) == dict.fromkeys(partitions, 9)
    report = await queries.verify_chains(db)
    assert (report.ok, report.chains, report.rows) == (True, 8, 40)


async def test_empty_batch_is_a_no_op(store: PostgresCheckpointStore, db: Conn) -> None:
    before = await footprint(db)
    await store.commit(CommitBatch(step="worker"))
    assert await footprint(db) == before


# -- fencing ----------------------------------------------------------------------------


async def test_stale_batch_is_refused_and_writes_nothing(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    await store.commit(batch({TP0: (0, 9), TP1: (0, 9)}, events=2))
    before = await footprint(db)
    key = StateKey("acme", "s1")
    # Partition 1 is fine, partition 0 overlaps what is stored: the whole batch goes.
    zombie = batch(
        {TP0: (9, 12), TP1: (10, 12)},
        events=3,
        tag="z",
        states={(0, key): b"{}"},
        results=[result("task-z")],
    )
    with pytest.raises(StaleBatchError, match=r"tasks\[0\]: stored offset 9 >= batch start 9"):
        await store.commit(zombie)
    assert await footprint(db) == before
    assert store.stats.stale == 1

    await store.commit(batch({TP0: (10, 12)}, events=1, tag="ok"))
    assert await store.load_offsets("worker", [TP0, TP1]) == {TP0: 12, TP1: 9}


async def test_a_batch_under_a_stale_ownership_epoch_is_refused(
    make_store: Callable[[], Any], db: Conn
) -> None:
    old, new = await make_store(), await make_store()
    claimed = await old.claim("worker", [TP0, TP1], "old-worker")
    assert {tp: (p.offset, p.epoch, p.owner) for tp, p in claimed.items()} == {
        TP0: (None, 1, "old-worker"),
        TP1: (None, 1, "old-worker"),
    }
    mine = {TP0: 1, TP1: 1}
    done = batch({TP0: (0, 4)}, events=2)
    done.epochs = mine
    await old.commit(done)
    # Another worker takes partition 0: epoch 2, and it resumes where old stopped.
    (taken,) = (await new.claim("worker", [TP0], "new-worker")).values()
    assert (taken.offset, taken.epoch, taken.owner) == (4, 2, "new-worker")
    before = await footprint(db)
    # Old's next batch touches no offset (work done above a gap) but is fenced all the same.
    zombie = batch(events=3, tag="z")
    zombie.epochs = mine
    with pytest.raises(StaleBatchError, match=r"epoch 1 is stale \(now 2, owner new-worker\)"):
        await old.commit(zombie)
    assert await footprint(db) == before
    # The new owner commits under its epoch; both see the same progress.
    ok = batch({TP0: (5, 9)}, events=1, tag="n")
    ok.epochs = {TP0: 2}
    await new.commit(ok)
    progress = await old.load_progress("worker", [TP0, TP1])
    assert {tp: (p.offset, p.epoch, p.owner) for tp, p in progress.items()} == {
        TP0: (9, 2, "new-worker"),
        TP1: (None, 1, "old-worker"),
    }


async def test_two_workers_racing_on_a_partition_one_wins(
    make_store: Callable[[], Any], db: Conn
) -> None:
    live, zombie = await make_store(), await make_store()
    await live.commit(batch({TP0: (0, 9)}, events=1))
    for round_ in range(5):
        first = 10 + 10 * round_
        attempt = [
            s.commit(batch({TP0: (first, first + 9)}, events=20, tag=f"{name}{round_}-"))
            for s, name in ((live, "live"), (zombie, "zombie"))
        ]
        outcomes = await asyncio.gather(*attempt, return_exceptions=True)
        assert sum(isinstance(o, StaleBatchError) for o in outcomes) == 1, outcomes
        assert sum(o is None for o in outcomes) == 1, outcomes
    assert await scalar(db, "SELECT count(*) FROM audit_log") == 1 + 5 * 20
    assert (await queries.verify_chains(db)).ok


async def test_first_commits_of_a_new_partition_race_cleanly(
    make_store: Callable[[], Any],
) -> None:
    stores = [await make_store() for _ in range(4)]
    outcomes = await asyncio.gather(
        *(s.commit(batch({TP0: (0, 9)}, events=2)) for s in stores), return_exceptions=True
    )
    assert sorted(type(o).__name__ for o in outcomes) == [
        "NoneType",
        "StaleBatchError",
        "StaleBatchError",
        "StaleBatchError",
    ]


# -- all or nothing ---------------------------------------------------------------------


async def test_invalid_state_mid_commit_leaves_nothing(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    await store.commit(batch({TP0: (0, 4)}, events=3, results=[result("task-1")]))
    before = await footprint(db)
    broken = batch(
        {TP0: (5, 9), TP1: (0, 3)},
        events=4,
        partition=0,
        tag="b",
        states={(0, StateKey("acme", "good")): b'{"ok":1}', (0, StateKey("acme", "bad")): b"{no"},
        results=[result("task-2")],
    )
    broken.audit.append((1, audit("b-p1")))
    # The state upsert runs after the audit COPY, in the last round trip.
    # Postgres refusing the data is permanent (retrying cannot help): the
    # store says so, with Postgres's error as the cause.
    with pytest.raises(StorePermanentError) as refused:
        await store.commit(broken)
    assert isinstance(refused.value.__cause__, errors.InvalidTextRepresentation)
    assert await footprint(db) == before
    assert store.stats.failed == 1

    # The store is still usable and the chain continues without a gap.
    await store.commit(batch({TP0: (5, 9)}, events=2, tag="c"))
    assert await scalar(db, "SELECT max(seq) FROM audit_log WHERE chain_partition = 0") == 5
    assert (await queries.verify_chains(db)).ok


async def test_connection_lost_mid_commit_leaves_nothing_and_reconnects(
    store: PostgresCheckpointStore, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.commit(batch({TP0: (0, 4)}, events=3))
    before = await footprint(db)
    finish = _Commit.finish

    async def killed_after_copy(self: _Commit, *args: Any, **kwargs: Any) -> Any:
        # The audit rows are already COPYed, in the open transaction.
        await db.execute("SELECT pg_terminate_backend(%s)", (self.conn.info.backend_pid,))
        return await finish(self, *args, **kwargs)

    monkeypatch.setattr(_Commit, "finish", killed_after_copy)
    with pytest.raises(psycopg.OperationalError):
        await store.commit(batch({TP0: (5, 9)}, events=4, tag="lost", results=[result("t")]))
    monkeypatch.undo()
    assert await footprint(db) == before

    # The runner retries the same batch: a new connection, and it lands.
    await store.commit(batch({TP0: (5, 9)}, events=4, tag="lost", results=[result("t")]))
    assert await scalar(db, "SELECT count(*) FROM audit_log") == 7
    assert await store.load_offsets("worker", [TP0]) == {TP0: 9}


async def test_cancelled_commit_rolls_back(
    store: PostgresCheckpointStore, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.commit(batch({TP0: (0, 4)}, events=1))
    before = await footprint(db)
    started = asyncio.Event()
    finish = _Commit.finish

    async def slow_finish(self: _Commit, *args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(10)
        return await finish(self, *args, **kwargs)

    monkeypatch.setattr(_Commit, "finish", slow_finish)
    task = asyncio.create_task(store.commit(batch({TP0: (5, 9)}, events=2, tag="c")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    assert await footprint(db) == before
    await store.commit(batch({TP0: (5, 9)}, events=2, tag="c"))
    assert await scalar(db, "SELECT count(*) FROM audit_log") == 3


# -- the chain ----------------------------------------------------------------------------


async def test_chains_recompute_across_commits_steps_and_partitions(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    offsets = {p: 0 for p in range(3)}
    for round_ in range(4):
        for step in ("worker", "gate"):
            b = CommitBatch(step=step)
            for p in range(3):
                tp = TopicPartition("tasks", p)
                n = 1 + (round_ + p) % 3
                b.offsets[tp] = (offsets[p], offsets[p] + n - 1)
                b.audit.extend((p, audit(f"{step}-{round_}-{p}-{i}")) for i in range(n))
            await store.commit(b)
        offsets = {p: offsets[p] + 1 + (round_ + p) % 3 for p in range(3)}

    cur = db.cursor(row_factory=dict_row)
    await cur.execute("SELECT * FROM audit_log ORDER BY chain_step, chain_partition, seq")
    rows = await cur.fetchall()
    heads = {(h.step, h.partition): h for h in await queries.chain_heads(db)}
    assert set(heads) == {(s, p) for s in ("worker", "gate") for p in range(3)}
    by_chain: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        by_chain.setdefault((row["chain_step"], row["chain_partition"]), []).append(row)
    for key, chain in by_chain.items():
        assert [r["seq"] for r in chain] == list(range(1, len(chain) + 1))
        prev = GENESIS_HASH
        for row in chain:
            assert set(CANONICAL_FIELDS) <= set(row)
            assert row["prev_hash"] == prev
            assert chain_hash(prev, row) == row["hash"]
            prev = row["hash"]
        assert (heads[key].seq, heads[key].hash) == (len(chain), prev)
    report = await queries.verify_chains(db)
    assert (report.ok, report.chains, report.rows) == (True, 6, len(rows))


async def test_verify_names_a_tampered_row(
    store: PostgresCheckpointStore, db: Conn, database_url: str, schema: str
) -> None:
    await store.commit(batch({TP0: (0, 4)}, events=5))
    # A superuser can switch the trigger off; the chain still gives it away.
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    await db.execute("UPDATE audit_log SET decision = 'allow' WHERE seq = 3")
    report = await queries.verify_chains(db)
    assert report.first_break is not None
    assert (report.first_break.chain_step, report.first_break.seq) == ("worker", 3)

    await db.execute("DELETE FROM audit_log WHERE seq >= 3")
    report = await queries.verify_chains(db)
    assert report.first_break is not None
    assert report.first_break.seq == 3
    assert "rows end at seq 2" in report.first_break.reason


async def test_nul_characters_do_not_stall_the_partition(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    b = batch({TP0: (0, 0)}, results=[result("task-nul", "a\x00b")])
    b.audit.append((0, audit("e-nul", detail={"note": "x\x00y"})))
    await store.commit(b)
    (row,) = await queries.session_audit(db, "s1")
    assert row.detail == {"note": "x\ufffdy"}
    stored = await queries.fetch_result(db, "task-nul")
    assert stored is not None and stored.answer == {"answer": "a\ufffdb"}
    assert (await queries.verify_chains(db)).ok


async def test_awkward_numbers_in_detail_still_verify(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    values = [-0.0, 1e15, 1e16, 9007199254740993.0, 1.5e17, 2.0**63, 1e19, 1e20, 1.5e300]
    values += [12.5, 1e-7, 5e-324, 0.1 + 0.2, -1e16, 2**63 - 1, -(2**63)]
    b = batch({TP0: (0, 0)})
    b.audit = [
        (0, audit(f"e{i}", detail={"v": v, "nested": [{"v": v}]})) for i, v in enumerate(values)
    ]
    await store.commit(b)
    report = await queries.verify_chains(db)
    assert report.ok, report.first_break


# -- results ----------------------------------------------------------------------------


async def test_duplicate_result_is_counted_not_stored(
    store: PostgresCheckpointStore, db: Conn
) -> None:
    first = await store.commit_batch(batch({TP0: (0, 0)}, results=[result("task-1", "first")]))
    assert (first.results_inserted, first.results_duplicate) == (1, 0)
    again = await store.commit_batch(
        batch(
            {TP0: (1, 2)},
            results=[result("task-1", "second"), result("task-2"), result("task-2", "x")],
        )
    )
    assert (again.results_inserted, again.results_duplicate) == (1, 2)
    assert (store.stats.results_inserted, store.stats.results_duplicate) == (2, 2)
    assert await queries.count_results(db) == 2
    stored = await queries.fetch_result(db, "task-1")
    assert stored is not None and stored.answer == {"answer": "first"}
    assert stored.step == "worker"


# -- queries ------------------------------------------------------------------------------


async def test_query_helpers(store: PostgresCheckpointStore, db: Conn) -> None:
    b = batch({TP0: (0, 2)}, results=[result("task-1"), result("task-2")])
    b.audit = [
        (0, audit("e1", session="s1", trace_id="a" * 32)),
        (0, audit("e1", kind="decision", decision="deny", reasons=("budget",), session="s1")),
        (0, audit("e2", session="s2")),
    ]
    await store.commit(b)
    await store.commit(CommitBatch(step="worker", audit=[(0, audit("e3", session="s1"))]))

    rows = await queries.session_audit(db, "s1", tenant="acme")
    assert [(r.event_id, r.kind, r.seq) for r in rows] == [
        ("e1", "processed", 1),
        ("e1", "decision", 2),
        ("e3", "processed", 4),
    ]
    (denied,) = await queries.audit_by_kind(db, "decision")
    assert (denied.decision, denied.reasons, denied.session) == ("deny", ["budget"], "s1")
    assert len(await queries.audit_by_kind(db, "processed", limit=2)) == 2
    assert [r.kind for r in await queries.audit_by_event(db, "e1")] == ["processed", "decision"]
    with pytest.raises(ValueError):
        await queries.audit_by_kind(db, "nonsense")
    assert await queries.count_audit(db, kind="processed") == 3
    assert await queries.count_results(db, tenant="acme") == 2
    assert await queries.count_results(db, tenant="other") == 0
    assert [r.task_id for r in await queries.fetch_results(db, session="s1")] == [
        "task-1",
        "task-2",
    ]
    (head,) = await queries.chain_heads(db)
    assert (head.step, head.partition, head.seq) == ("worker", 0, 4)
