"""The store's binary COPY data (``iter_copy_data``) against psycopg's ``write_row``.

The store no longer hands ``iter_links``' tuples to psycopg row by row: it
writes the PGCOPY stream ``iter_copy_data`` builds. Whatever the records
hold (NULs, non-ASCII text, floats, empty or missing values, long fields),
those bytes must be exactly what psycopg's binary ``write_row`` makes of
``iter_links``' rows with the store's COPY types, and the chain heads must
advance alike, so the stored rows and hashes stay what they were.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import pq
from psycopg._copy_base import BinaryFormatter  # what AsyncCopy.write_row runs
from psycopg.adapt import AdaptersMap, Transformer

from sluicegate.sinks.audit import (
    COPY_COLUMNS,
    GENESIS_HASH,
    PGCOPY_HEADER,
    PGCOPY_TRAILER,
    ChainHead,
    iter_copy_data,
    link,
    verify_chain,
)
from sluicegate.sinks.store import AUDIT_COPY_TYPES, JsonTextBinaryDumper
from sluicegate.streams.step import AuditRecord
from tests.unit.test_audit_writer import records, text
from tests.unit.test_sinks_audit import record

T0 = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)

# The audit writer tests' records, the same strategies.


def write_row_data(
    chain_step: str,
    time: datetime,
    pairs: list[tuple[int, AuditRecord]],
    heads: dict[int, ChainHead],
) -> bytes:
    """The stream psycopg's binary ``write_row`` makes of ``link``'s rows (the old path)."""
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_dumper(None, JsonTextBinaryDumper)
    formatter = BinaryFormatter(Transformer(adapters))
    oids = [adapters.types.get_oid(name) for name in AUDIT_COPY_TYPES]
    formatter.transformer.set_dumper_types(oids, pq.Format.BINARY)
    out = bytearray()
    for row in link(chain_step, time, pairs, heads):
        out += formatter.write_row(row)
    out += formatter.end()
    return bytes(out)


def copy_data(
    chain_step: str,
    time: datetime,
    pairs: list[tuple[int, AuditRecord]],
    heads: dict[int, ChainHead],
    chunk_rows: int = 64,
) -> bytes:
    return b"".join(iter_copy_data(chain_step, time, pairs, heads, chunk_rows=chunk_rows))


def both(
    chain_step: str,
    time: datetime,
    pairs: list[tuple[int, AuditRecord]],
    start: dict[int, tuple[int, str]],
    chunk_rows: int = 64,
) -> tuple[bytes, bytes]:
    """Old and new streams for the same batch, each from its own copy of the heads."""
    old_heads = {p: ChainHead(*head) for p, head in start.items()}
    new_heads = {p: ChainHead(*head) for p, head in start.items()}
    old = write_row_data(chain_step, time, pairs, old_heads)
    new = copy_data(chain_step, time, pairs, new_heads, chunk_rows)
    assert new_heads == old_heads
    return old, new


@settings(max_examples=300, deadline=None)
@given(
    chain_step=text,
    partitions=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    batch=st.lists(records, min_size=8, max_size=8),
    start=st.integers(0, 2**40),
    chunk_rows=st.integers(1, 5),
)
def test_the_copy_data_is_what_write_row_sends(
    chain_step: str,
    partitions: list[int],
    batch: list[AuditRecord],
    start: int,
    chunk_rows: int,
) -> None:
    pairs = list(zip(partitions, batch, strict=False))
    heads = {p: (start, GENESIS_HASH if start == 0 else f"{p:x}" * 64) for p in partitions}
    old, new = both(chain_step, T0, pairs, heads, chunk_rows)
    assert new == old


def test_awkward_values_encode_alike() -> None:
    floats = [-0.0, 0.0, 1e15, 1e16, 9007199254740993.0, 2.0**63, 1e20, 1e-7, 5e-324, 0.1 + 0.2]
    pairs = [
        (0, record(0)),
        (0, record(1, causation_id=None, decision=None, policy_version=None, trace_id=None)),
        (0, record(2, reasons=(), detail={})),  # the empty jsonb fields
        (0, record(3, tenant="", session="", event_id="", reasons=("",), detail={"": ""})),
        (0, record(4, session="s\x00\x00", detail={"k\x00": "v\x00", "n": [None, True]})),
        (0, record(5, tenant="Zürich ✓ 😀", reasons=("ß", "\u2028", '"\\'), step="\x01\x1f\x7f")),
        (0, record(6, detail={"f": floats, "nested": {"x": {"y": floats[::-1]}}})),
        (0, record(7, detail={"big": 2**64 - 1, "neg": -(2**63), "u": "\ufffd"})),
        (1, record(8, event_id="e" * 1023, trace_id="t" * 1024, session="é" * 700)),
        (1, record(9, causation_id="c" * 70_000, reasons=("r" * 5000,))),
    ]
    old, new = both("gate\x00é", T0, pairs, {0: (0, GENESIS_HASH), 1: (41, "b" * 64)})
    assert new == old


@pytest.mark.parametrize(
    "time",
    [
        T0,
        datetime(2000, 1, 1, tzinfo=UTC),  # the Postgres epoch: zero
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before it: negative
        datetime(2025, 6, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),  # not UTC
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_the_timestamp_encodes_alike(time: datetime) -> None:
    old, new = both("w", time, [(0, record())], {0: (0, GENESIS_HASH)})
    assert new == old


@pytest.mark.parametrize("rows", [0, 1, 63, 64, 65, 128, 500])
def test_chunks_hold_whole_rows_and_frame_the_stream(rows: int) -> None:
    pairs = [(i % 3, record(i)) for i in range(rows)]
    heads = {p: ChainHead(0, GENESIS_HASH) for p in range(3)}
    chunks = list(iter_copy_data("w", T0, pairs, heads, chunk_rows=64))
    assert len(chunks) == rows // 64 + 1
    assert chunks[0].startswith(PGCOPY_HEADER) and chunks[-1].endswith(PGCOPY_TRAILER)
    old, _ = both("w", T0, pairs, {p: (0, GENESIS_HASH) for p in range(3)})
    assert b"".join(chunks) == old


def test_heads_advance_as_they_do_for_iter_links() -> None:
    pairs = [(p, record(i)) for i, p in enumerate([2, 0, 2, 2, 1, 0])]
    genesis = ChainHead(0, GENESIS_HASH)
    heads = {0: genesis, 1: ChainHead(7, "c" * 64), 2: ChainHead(0, GENESIS_HASH)}
    expected = {p: ChainHead(h.seq, h.hash) for p, h in heads.items()}
    rows = [dict(zip(COPY_COLUMNS, r, strict=True)) for r in link("w", T0, pairs, expected)]
    copy_data("w", T0, pairs, heads)
    assert heads == expected
    for p in (0, 2):
        chain = [r | {"reasons": orjson.loads(r["reasons"])} for r in rows]
        chain = [
            r | {"detail": orjson.loads(r["detail"])} for r in chain if r["chain_partition"] == p
        ]
        assert verify_chain("w", p, chain) is None
