"""``sluice audit``: flag parsing and output formatting, no database needed."""

from __future__ import annotations

import io
import os
import sys
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.cli_audit import _progress_bar, format_table, parse_since, row_json
from sluicegate.sinks.queries import AuditRow

NOW = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def unreachable_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags are checked before any connection: a bad one never reaches this port."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_DATABASE_URL", "postgresql://postgres@127.0.0.1:9/postgres")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("3d", NOW - timedelta(days=3)),
        ("1w", NOW - timedelta(weeks=1)),
        ("2025-01-30T08:00:00Z", datetime(2025, 1, 30, 8, tzinfo=UTC)),
        ("2025-01-30T10:00:00+02:00", datetime(2025, 1, 30, 8, tzinfo=UTC)),
        ("2025-01-30T08:00:00", datetime(2025, 1, 30, 8, tzinfo=UTC)),
        ("2025-01-30", datetime(2025, 1, 30, tzinfo=UTC)),
    ],
)
def test_since_takes_durations_and_iso_times(text: str, expected: datetime) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "15x", "-2h", "2025-13-01", ""])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, now=NOW)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["show", "--session", "s", "--since", "soon"], "--since"),
        (["show", "--session", "s", "--kind", "approved"], "--kind"),
        (["show"], "--session"),
        (["verify", "--schema", "No-Such"], "--schema"),
    ],
)
def test_bad_flags_exit_2_on_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    assert main(["audit", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and named in err


def test_an_unreachable_database_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify"]) == 1
    assert capsys.readouterr().err.startswith("sluice: error: cannot reach Postgres at 127.0.0.1:9")


def audit_row(**overrides: object) -> AuditRow:
    fields: dict[str, object] = {
        "chain_step": "gate",
        "chain_partition": 0,
        "seq": 1,
        "time": datetime(2025, 1, 31, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1))),
        "tenant": "acme",
        "session": "s1",
        "event_id": "e1",
        "causation_id": None,
        "step": "gate",
        "event_type": "action.proposed",
        "kind": "decision",
        "decision": "deny",
        "reasons": ["tool not allowed", "budget"],
        "policy_version": "sha256:" + "ab" * 32,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "detail": {"tool": "shell"},
        "prev_hash": "0" * 64,
        "hash": "1" * 64,
    }
    fields.update(overrides)
    return AuditRow(**fields)  # type: ignore[arg-type]


def test_the_table_is_aligned_with_reasons_last() -> None:
    rows = [
        audit_row(),
        audit_row(
            step="intake",
            kind="processed",
            event_type="task.created",
            decision=None,
            reasons=[],
            policy_version=None,
            trace_id=None,
        ),
    ]
    header, first, second = format_table(rows)
    assert header.startswith("TIME  ") and header.endswith("REASONS")
    assert first.startswith("2025-01-31T12:00:00.123Z  gate  ")
    assert "sha256:abababababab  0af7" in first
    assert first.endswith("tool not allowed; budget")
    assert second.split() == [
        "2025-01-31T12:00:00.123Z",
        "intake",
        "processed",
        "task.created",
        "e1",
        "-",
        "-",
        "-",
        "-",
    ]
    for column in ("KIND", "TASK/EVENT ID", "DECISION", "TRACE ID", "REASONS"):
        start = header.index(column)
        assert first[start - 2 : start] == second[start - 2 : start] == "  "


def test_json_lines_carry_every_column_in_utc() -> None:
    doc = orjson.loads(row_json(audit_row()))
    assert set(doc) == set(AuditRow.__dataclass_fields__)
    assert doc["time"] == "2025-01-31T12:00:00.123456Z"
    assert doc["policy_version"] == "sha256:" + "ab" * 32


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_goes_to_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with _progress_bar(1000) as advance:
        assert advance is not None
        advance(400)
        advance(600)
    # The bar (total from the estimate) was drawn, then cleared on exit.
    assert "verifying:" in terminal.getvalue() and "/1.00k" in terminal.getvalue()

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with _progress_bar(1000) as advance:
        assert advance is None


def test_the_id_column_names_the_task_when_the_row_says() -> None:
    header, line = format_table([audit_row(detail={"task_id": "t-7"})])
    start = header.index("TASK/EVENT ID")
    assert line[start:].startswith("task t-7  ")
