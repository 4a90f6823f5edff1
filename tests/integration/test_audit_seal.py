"""Sealed chain heads against real Postgres: the owner's rewrite that the chains miss.

The database owner disables the trigger, rewrites a row, recomputes every
later hash of its chain and moves the head in ``audit_chains``: plain
``sluice audit verify`` finds nothing (that is the gap), ``verify
--public-key`` names the chain against the last seal. An untouched trail
verifies with its seals; a forged or foreign seal is refused.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from psycopg.rows import dict_row

from sluicegate.sinks.audit import chain_hash

# The trail and the fixtures are test_audit_verify's (imported, pytest uses them;
# ``schema`` comes from conftest.py).
from tests.integration.test_audit_verify import (  # noqa: F401
    Conn,
    chain_row,
    cli_env,
    db,
    sluice,
    trail,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    private, public = tmp_path / "seal.pem", tmp_path / "seal.pub"
    code, out, _ = await sluice(
        capsys, "audit", "keygen", "--private-key", str(private), "--public-key", str(public)
    )
    assert code == 0 and out.startswith("key "), out
    assert private.stat().st_mode & 0o077 == 0
    return private, public


async def rewrite_and_move_head(
    db: Conn,  # noqa: F811
    step: str,
    partition: int,
    seq: int,
) -> None:
    """What an owner can do: change a row, re-hash the rest of its chain, move the head."""
    cur = db.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM audit_log WHERE chain_step = %s AND chain_partition = %s AND seq >= %s "
        "ORDER BY seq",
        (step, partition, seq),
    )
    rows = await cur.fetchall()
    prev = (await chain_row(db, step, partition, seq - 1))["hash"] if seq > 1 else "0" * 64
    statements = []
    for row in rows:
        if row["seq"] == seq:
            row["reasons"] = ["nothing_to_see"]
        row["prev_hash"] = prev
        row["hash"] = chain_hash(prev, row)
        prev = row["hash"]
        statements.append((row["seq"], row["reasons"], row["prev_hash"], row["hash"]))
    await db.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    try:
        for s, reasons, prev_hash, digest in statements:
            await db.execute(
                "UPDATE audit_log SET reasons = %s::jsonb, prev_hash = %s, hash = %s "
                "WHERE chain_step = %s AND chain_partition = %s AND seq = %s",
                (orjson.dumps(reasons).decode(), prev_hash, digest, step, partition, s),
            )
    finally:
        await db.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
    await db.execute(
        "UPDATE audit_chains SET hash = %s WHERE step = %s AND partition = %s",
        (prev, step, partition),
    )


@pytest.mark.usefixtures("trail", "cli_env")
async def test_owner_rewrite_with_head_move_is_caught_by_the_seal(
    db: Conn,  # noqa: F811
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    private, public = keys
    code, out, err = await sluice(capsys, "audit", "seal", "--key", str(private), "--json")
    assert code == 0, err
    sealed = orjson.loads(out)
    assert len(sealed["document"]["heads"]) == 4

    code, out, _ = await sluice(capsys, "audit", "verify", "--public-key", str(public))
    assert code == 0 and "every one of 1 seals holds" in out, out

    await rewrite_and_move_head(db, "gate", 1, 3)
    # The chains alone cannot see it: every hash and the head agree again.
    code, out, _ = await sluice(capsys, "audit", "verify")
    assert code == 0, out
    code, out, err = await sluice(capsys, "audit", "verify", "--public-key", str(public), "--json")
    assert code == 1
    report = orjson.loads(out)
    assert report["ok"] is False and report["breaks"] == []
    [problem] = report["seal_problems"]
    assert problem["problem"] == "sealed_hash_mismatch"
    assert (problem["chain_step"], problem["chain_partition"], problem["seq"]) == ("gate", 1, 6)
    code, out, err = await sluice(capsys, "audit", "verify", "--public-key", str(public))
    assert code == 1 and "does not match its seals" in err, err


@pytest.mark.usefixtures("trail", "cli_env")
async def test_forged_and_foreign_seals_are_refused(
    db: Conn,  # noqa: F811
    keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    private, public = keys
    other = (tmp_path / "other.pem", tmp_path / "other.pub")
    code, _, _ = await sluice(
        capsys, "audit", "keygen", "--private-key", str(other[0]), "--public-key", str(other[1])
    )
    assert code == 0
    # No seal yet: nothing to hold the trail to.
    code, out, err = await sluice(capsys, "audit", "verify", "--public-key", str(public))
    assert code == 1 and "no seals" in out, out
    assert (await sluice(capsys, "audit", "seal", "--key", str(private)))[0] == 0
    assert (await sluice(capsys, "audit", "seal", "--key", str(other[0])))[0] == 0
    code, out, _ = await sluice(capsys, "audit", "verify", "--public-key", str(public))
    assert code == 1 and "seal_other_key" in out, out
    # Both keys (a rotation): both seals hold.
    code, out, _ = await sluice(
        capsys, "audit", "verify", "--public-key", str(public), "--public-key", str(other[1])
    )
    assert code == 0, out
    # A seal whose document was edited no longer verifies.
    await db.execute("ALTER TABLE audit_seals DISABLE TRIGGER audit_seals_append_only")
    await db.execute(
        "UPDATE audit_seals SET document = replace(document, '\"seq\":6', '\"seq\":5')"
    )
    await db.execute("ALTER TABLE audit_seals ENABLE TRIGGER audit_seals_append_only")
    code, out, _ = await sluice(
        capsys, "audit", "verify", "--public-key", str(public), "--public-key", str(other[1])
    )
    assert code == 1 and "seal_bad_signature" in out, out
    # Bad input is one line, exit 2.
    code, _, err = await sluice(capsys, "audit", "verify", "--public-key", str(private))
    assert code == 2 and "not a PEM public key" in err and "Traceback" not in err, err
