"""``ChainVerifier``: what each kind of damage is called, and which row is named."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from sluicegate.sinks.audit import (
    COPY_COLUMNS,
    GENESIS_HASH,
    HASH_MISMATCH,
    HEAD_MISMATCH,
    MISSING_HEAD,
    MISSING_TAIL,
    PAST_HEAD,
    PREV_HASH_MISMATCH,
    SEQ_GAP,
    ChainBreak,
    ChainHead,
    ChainVerifier,
    StoredHead,
    link,
    verify_chain,
)
from sluicegate.streams.step import AuditRecord

T0 = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)


def chain_of(n: int) -> list[dict[str, Any]]:
    """``n`` rows of one chain over three commits (so three timestamps), as read back."""
    heads = {0: ChainHead(0, GENESIS_HASH)}
    rows = []
    for i in range(n):
        record = AuditRecord("processed", "w", f"e{i + 1}", "task.created", "acme", "s1")
        for copy_row in link("w", T0 + timedelta(seconds=i // 3), [(0, record)], heads):
            row = dict(zip(COPY_COLUMNS, copy_row, strict=True))
            row["reasons"], row["detail"] = (
                orjson.loads(row["reasons"]),
                orjson.loads(row["detail"]),
            )
            rows.append(row)
    return rows


def head_of(rows: list[dict[str, Any]]) -> StoredHead:
    return StoredHead("w", 0, rows[-1]["seq"], rows[-1]["hash"])


def run(rows: list[dict[str, Any]], head: StoredHead | None) -> ChainBreak | None:
    verifier = ChainVerifier("w", 0, head)
    for row in rows:
        found = verifier.feed(row)
        if found is not None:
            return found
    return verifier.finish()


def test_an_intact_chain_and_an_empty_one_hold() -> None:
    rows = chain_of(7)
    assert run(rows, head_of(rows)) is None
    assert run([], None) is None


def edit(rows: list[dict[str, Any]]) -> None:
    rows[3]["reasons"] = ["forged"]


def drop(rows: list[dict[str, Any]]) -> None:
    del rows[3]


def swap(rows: list[dict[str, Any]]) -> None:
    rows[3], rows[4] = {**rows[4], "seq": 4}, {**rows[3], "seq": 5}


def relink(rows: list[dict[str, Any]]) -> None:
    rows[3]["prev_hash"] = rows[1]["hash"]


@pytest.mark.parametrize(
    ("damage", "seq", "event", "problem"),
    [
        (edit, 4, "e4", HASH_MISMATCH),
        (drop, 5, "e5", SEQ_GAP),
        (swap, 4, "e5", PREV_HASH_MISMATCH),
        (relink, 4, "e4", PREV_HASH_MISMATCH),
    ],
)
def test_damage_is_named_at_its_first_row(
    damage: Callable[[list[dict[str, Any]]], None], seq: int, event: str, problem: str
) -> None:
    rows = chain_of(7)
    head = head_of(rows)
    damage(rows)
    found = run(rows, head)
    assert found is not None
    assert (found.seq, found.event_id, found.problem) == (seq, event, problem)
    assert str(found).startswith(f"chain (w, 0) seq {seq} (event {event}): ")


def test_the_end_of_a_chain_is_checked_against_its_head() -> None:
    rows = chain_of(5)
    found = run(rows[:-1], head_of(rows))
    assert found is not None
    assert (found.seq, found.event_id, found.problem) == (5, None, MISSING_TAIL)
    assert "no such row" in str(found)

    found = run(rows, head_of(rows[:-1]))
    assert found is not None
    assert (found.seq, found.event_id, found.problem) == (5, "e5", PAST_HEAD)

    found = run(rows, StoredHead("w", 0, 5, "0" * 64))
    assert found is not None
    assert (found.seq, found.problem) == (5, HEAD_MISMATCH)

    found = run(rows, None)
    assert found is not None
    assert (found.seq, found.event_id, found.problem) == (1, "e1", MISSING_HEAD)


def test_without_a_head_only_the_links_are_checked() -> None:
    rows = chain_of(5)
    assert verify_chain("w", 0, rows[:-1]) is None
    assert verify_chain("w", 0, rows[:-1], head_of(rows)) is not None


def test_times_are_hashed_as_stored_across_commits() -> None:
    # The verifier formats each commit's timestamp once; rows of different
    # commits (and equal instants in another zone) must still hash right.
    rows = chain_of(9)
    plus_two = [{**r, "time": r["time"].astimezone(UTC).astimezone()} for r in rows]
    assert run(plus_two, head_of(rows)) is None
