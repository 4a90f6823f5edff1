"""``sluice audit show --session S`` against real Postgres: the table, JSON lines, filters."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.sinks.store import PostgresCheckpointStore
from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.step import AuditRecord

pytestmark = pytest.mark.integration

POLICY = "sha256:" + "5f1c0e8a9b12" + "0" * 52
TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    monkeypatch.setenv("SLUICE_DATABASE_URL", database_url)
    monkeypatch.setenv("SLUICE_DB_SCHEMA", schema)


def row(step: str, kind: str, event: str, *, session: str = "s1", **kw: Any) -> AuditRecord:
    return AuditRecord(
        kind=kind,
        step=step,
        event_id=event,
        event_type=kw.pop("event_type", "task.created"),
        tenant=kw.pop("tenant", "acme"),
        session=session,
        trace_id=kw.pop("trace_id", TRACE),
        **kw,
    )


@pytest.fixture
async def timeline(database_url: str, schema: str) -> datetime:
    """Two commits for session s1 (and one row of s2); returns a time between them."""
    store = await PostgresCheckpointStore.connect(database_url, schema=schema)
    try:
        await store.commit(
            CommitBatch(
                step="intake",
                audit=[
                    (0, row("intake", "processed", "task-1")),
                    (0, row("intake", "processed", "task-9", session="s2")),
                    (0, row("intake", "dead_letter", "bad-1", event_type="unknown")),
                ],
            )
        )
        await asyncio.sleep(0.01)
        between = datetime.now(UTC)
        await asyncio.sleep(0.01)
        deny = row(
            "gate",
            "decision",
            "act-1",
            event_type="action.proposed",
            decision="deny",
            reasons=("tool not allowed", "over budget"),
            policy_version=POLICY,
            detail={"tool": "shell"},
        )
        allow = row(
            "gate",
            "decision",
            "act-2",
            event_type="action.proposed",
            decision="allow",
            policy_version=POLICY,
            tenant="globex",
            trace_id=None,
        )
        await store.commit(CommitBatch(step="gate", audit=[(1, deny), (1, allow)]))
    finally:
        await store.close()
    return between


async def sluice(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["audit", "show", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.usefixtures("timeline", "cli_env")
async def test_show_prints_an_aligned_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await sluice(capsys, "--session", "s1")
    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == [
        "TIME",
        "STEP",
        "KIND",
        "EVENT",
        "TYPE",
        "TASK/EVENT",
        "ID",
        "DECISION",
        "POLICY",
        "TRACE",
        "ID",
        "REASONS",
    ]
    assert len(lines) == 4
    # Aligned: every column starts where its header does.
    columns = ("STEP", "KIND", "EVENT TYPE", "TASK/EVENT ID", "DECISION", "POLICY", "TRACE ID")
    for column in (*columns, "REASONS"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines)
    assert [line.split()[1:5] for line in lines] == [
        ["intake", "processed", "task.created", "task-1"],
        ["intake", "dead_letter", "unknown", "bad-1"],
        ["gate", "decision", "action.proposed", "act-1"],
        ["gate", "decision", "action.proposed", "act-2"],
    ]
    deny = lines[2]
    assert "deny" in deny
    assert "sha256:5f1c0e8a9b12 " in deny and POLICY not in deny
    assert TRACE in deny
    assert deny.endswith("tool not allowed; over budget")
    assert lines[0].split()[0].endswith("Z")


@pytest.mark.usefixtures("timeline", "cli_env")
async def test_show_json_lines_hold_every_column(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await sluice(capsys, "--session", "s1", "--json")
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [r["event_id"] for r in rows] == ["task-1", "bad-1", "act-1", "act-2"]
    deny = rows[2]
    assert deny["reasons"] == ["tool not allowed", "over budget"]
    assert deny["detail"] == {"tool": "shell"}
    assert deny["policy_version"] == POLICY
    assert (deny["chain_step"], deny["chain_partition"], deny["seq"]) == ("gate", 1, 1)
    assert len(deny["hash"]) == 64
    assert datetime.fromisoformat(deny["time"]).tzinfo is not None


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(
    ("flags", "events"),
    [
        (["--kind", "decision"], ["act-1", "act-2"]),
        (["--kind", "dead_letter"], ["bad-1"]),
        (["--tenant", "globex"], ["act-2"]),
        (["--tenant", "acme", "--kind", "decision"], ["act-1"]),
        (["--since", "1h"], ["task-1", "bad-1", "act-1", "act-2"]),
        (["--since", "BETWEEN"], ["act-1", "act-2"]),
        (["--since", "2999-01-01"], []),
    ],
)
async def test_show_filters(
    capsys: pytest.CaptureFixture[str], timeline: datetime, flags: list[str], events: list[str]
) -> None:
    flags = [timeline.isoformat() if f == "BETWEEN" else f for f in flags]
    code, out, _ = await sluice(capsys, "--session", "s1", "--json", *flags)
    assert code == 0
    assert [orjson.loads(line)["event_id"] for line in out.splitlines()] == events


@pytest.mark.usefixtures("timeline", "cli_env")
async def test_show_says_when_nothing_matches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await sluice(capsys, "--session", "nobody")
    assert (code, out) == (0, "")
    assert err == "no audit rows for session 'nobody' with these filters\n"


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "15x"], "--since"),
        (["--kind", "approved"], "--kind"),
        (["--schema", "Bad-Name"], "--schema"),
        ([], "--session"),
    ],
)
async def test_a_bad_filter_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    args = flags if named == "--session" else ["--session", "s1", *flags]
    code, out, err = await sluice(capsys, *args)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert named in err
    assert err.startswith("sluice audit show: error:")


async def test_an_unreachable_database_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_DATABASE_URL", "postgresql://postgres:secret@127.0.0.1:9/postgres")
    code, out, err = await sluice(capsys, "--session", "s1")
    assert (code, out) == (1, "")
    assert err.startswith("sluice: error: cannot reach Postgres at 127.0.0.1:9/postgres")
    assert "secret" not in err


@pytest.mark.usefixtures("cli_env")
async def test_an_unmigrated_schema_says_what_to_do(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_DB_SCHEMA", f"t_none_{uuid.uuid4().hex[:8]}")
    code, _, err = await sluice(capsys, "--session", "s1")
    assert code == 1
    assert "run `sluice db migrate` first" in err
