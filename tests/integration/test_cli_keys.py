"""``sluice keys create|list|revoke`` against Postgres: printed once, stored hashed, revocable."""

from __future__ import annotations

import os

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.sinks.api_keys import parse_key, secret_hash
from tests.integration.gateway_support import in_thread
from tests.integration.pipeline_support import (
    env_for,
    prepare_database,
    scalar_rows,
    settings_for,
)

pytestmark = pytest.mark.integration


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_keys_lifecycle(
    database_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_for(
        "nats",
        nats_url="nats://unused:1",
        kafka_bootstrap="x:1",
        database_url=database_url,
        prefix=prefix,
    )
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in env_for(settings).items():
        monkeypatch.setenv(name, value)

    # Before `sluice db migrate`: one line saying so.
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "sluice db migrate" in err and "Traceback" not in err
    in_thread(lambda: prepare_database(settings))

    code, out, err = run(capsys, "keys", "create", "--tenant", "acme", "--label", "crm")
    key = out.strip()
    parsed = parse_key(key)
    assert code == 0 and parsed is not None and "not shown again" in err
    key_id, secret = parsed
    # Stored: the hash, never the key.
    rows = in_thread(
        lambda: scalar_rows(settings, "SELECT key_id, tenant, secret_hash FROM api_keys")
    )
    assert rows == [(key_id, "acme", secret_hash(secret))]

    code, out, _ = run(capsys, "keys", "list", "--json")
    listed = orjson.loads(out)
    assert code == 0 and (listed["key_id"], listed["tenant"], listed["label"]) == (
        key_id,
        "acme",
        "crm",
    )
    assert listed["revoked_at"] is None and secret not in out

    code, _, err = run(capsys, "keys", "revoke", key)  # the whole key works as well as its id
    assert code == 0 and "revoked" in err
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and "revoked" in out
    code, _, err = run(capsys, "keys", "revoke", "000000000000")
    assert code == 1 and "no key" in err

    code, _, err = run(capsys, "keys", "create", "--tenant", "")
    assert code == 2 and "invalid tenant" in err
