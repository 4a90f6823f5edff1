"""The audit hash chain: the canonical form, the hash, the writer's fast path, the verifier."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sluicegate.sinks.audit import (
    CANONICAL_FIELDS,
    COPY_COLUMNS,
    GENESIS_HASH,
    ChainHead,
    StoredHead,
    canonical_json,
    chain_hash,
    format_time,
    link,
    verify_chain,
)
from sluicegate.streams.step import AuditRecord

T0 = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)


def record(i: int = 0, **overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "kind": "decision",
        "step": "gate",
        "event_id": f"ev-{i}",
        "event_type": "action.proposed",
        "tenant": "acme",
        "session": "s-1",
        "causation_id": "task-1",
        "decision": "deny",
        "reasons": ("tool not allowed", "budget"),
        "policy_version": "sha256:abc",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "detail": {"z": 1, "a": {"y": [1, 2], "b": "é"}},
    }
    fields.update(overrides)
    return AuditRecord(**fields)


def as_row(copy_row: tuple[Any, ...]) -> dict[str, Any]:
    """A COPY tuple from ``link`` as the dict a verifier reads back from Postgres."""
    row = dict(zip(COPY_COLUMNS, copy_row, strict=True))
    row["reasons"] = json.loads(row["reasons"])
    row["detail"] = json.loads(row["detail"])
    return row


def external_hash(prev: str, row: dict[str, Any]) -> str:
    """The spec in the module docstring, reproduced with the standard library only."""
    doc = {name: row[name] for name in CANONICAL_FIELDS}
    if isinstance(doc["time"], datetime):
        doc["time"] = doc["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev.encode() + text.encode()).hexdigest()


def test_time_always_has_microseconds_and_z() -> None:
    assert format_time(T0) == "2025-01-31T12:00:00.000000Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2025, 1, 31, 14, 0, 0, 5, tzinfo=plus_two)) == (
        "2025-01-31T12:00:00.000005Z"
    )
    with pytest.raises(ValueError):
        format_time(datetime(2025, 1, 31))


def test_canonical_json_is_sorted_compact_and_exactly_the_fields() -> None:
    (row,) = link("gate", T0, [(3, record())], {3: ChainHead(0, GENESIS_HASH)})
    as_dict = as_row(row)
    as_dict["extra column"] = "ignored"
    assert canonical_json(as_dict) == (
        b'{"causation_id":"task-1","chain_partition":3,"chain_step":"gate",'
        b'"decision":"deny","detail":{"a":{"b":"\xc3\xa9","y":[1,2]},"z":1},'
        b'"event_id":"ev-0","event_type":"action.proposed","kind":"decision",'
        b'"policy_version":"sha256:abc","reasons":["tool not allowed","budget"],'
        b'"seq":1,"session":"s-1","step":"gate","tenant":"acme",'
        b'"time":"2025-01-31T12:00:00.000000Z","trace_id":"0af7651916cd43dd8448eb211c80319c"}'
    )


def test_link_chains_from_genesis_and_matches_chain_hash_and_the_spec() -> None:
    heads = {0: ChainHead(0, GENESIS_HASH), 1: ChainHead(7, "f" * 64)}
    records = [(0, record(0)), (1, record(1)), (0, record(2, causation_id=None)), (1, record(3))]
    rows = [as_row(r) for r in link("gate", T0, records, heads)]

    assert [(r["chain_partition"], r["seq"]) for r in rows] == [(0, 1), (1, 8), (0, 2), (1, 9)]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert rows[1]["prev_hash"] == "f" * 64
    assert rows[2]["prev_hash"] == rows[0]["hash"]
    for r in rows:
        # The writer's fast path, the public helper and a stdlib reimplementation agree.
        assert r["hash"] == chain_hash(r["prev_hash"], r) == external_hash(r["prev_hash"], r)
    assert heads[0] == ChainHead(2, rows[2]["hash"])
    assert heads[1] == ChainHead(9, rows[3]["hash"])


def test_time_as_datetime_or_string_hashes_the_same() -> None:
    (row,) = (as_row(r) for r in link("gate", T0, [(0, record())], {0: ChainHead(0, GENESIS_HASH)}))
    assert chain_hash(GENESIS_HASH, {**row, "time": T0}) == row["hash"]


def test_nul_characters_are_replaced_before_hashing() -> None:
    bad = record(detail={"note": "a\x00b"}, tenant="ac\x00me", reasons=("x\x00",))
    (row,) = (as_row(r) for r in link("gate", T0, [(0, bad)], {0: ChainHead(0, GENESIS_HASH)}))
    assert row["detail"] == {"note": "a\ufffdb"}
    assert row["tenant"] == "ac\ufffdme"
    assert row["reasons"] == ["x\ufffd"]
    assert chain_hash(GENESIS_HASH, row) == row["hash"]


def test_numbers_are_hashed_as_jsonb_gives_them_back() -> None:
    detail = {"neg_zero": -0.0, "big": 1e16, "bigger": 1.5e17, "huge": 1e300, "ok": [12.5, 3.0]}
    (row,) = (
        as_row(r)
        for r in link("gate", T0, [(0, record(detail=detail))], {0: ChainHead(0, GENESIS_HASH)})
    )
    assert row["detail"] == {
        "neg_zero": 0.0,
        "big": 10**16,
        "bigger": 15 * 10**16,
        "huge": 1e300,
        "ok": [12.5, 3.0],
    }
    assert isinstance(row["detail"]["big"], int) and isinstance(row["detail"]["ok"][1], float)
    assert chain_hash(GENESIS_HASH, row) == row["hash"]


def chain_of(n: int) -> list[dict[str, Any]]:
    heads = {0: ChainHead(0, GENESIS_HASH)}
    return [as_row(r) for r in link("gate", T0, [(0, record(i)) for i in range(n)], heads)]


def test_verify_accepts_an_intact_chain_with_its_head() -> None:
    rows = chain_of(5)
    head = StoredHead("gate", 0, 5, rows[-1]["hash"])
    assert verify_chain("gate", 0, rows, head) is None
    assert verify_chain("gate", 0, [], None) is None


@pytest.mark.parametrize(
    ("tamper", "seq", "reason"),
    [
        (lambda rows: rows[2].update(decision="allow"), 3, "hash does not match"),
        (lambda rows: rows.pop(2), 4, "expected seq 3"),
        (lambda rows: rows[3].update(prev_hash="0" * 64), 4, "prev_hash"),
        (lambda rows: rows.pop(), 5, "head is seq 5"),
    ],
    ids=["edited", "gap", "relinked", "tail-removed"],
)
def test_verify_names_the_first_broken_row(tamper: Any, seq: int, reason: str) -> None:
    rows = chain_of(5)
    head = StoredHead("gate", 0, 5, rows[-1]["hash"])
    tamper(rows)
    found = verify_chain("gate", 0, rows, head)
    assert found is not None
    assert (found.chain_step, found.chain_partition, found.seq) == ("gate", 0, seq)
    assert reason in found.reason
