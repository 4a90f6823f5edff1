"""The gateway's Postgres: a small connection pool on the sluicegate schema.

Requests read keys, results and audit rows; a pool keeps a few connections
open instead of connecting per request. Each connection gets the schema's
``search_path`` and orjson codecs, as ``sinks.db.connect`` gives its own.
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from sluicegate.sinks.db import check_schema


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def make_pool(
    url: str,
    *,
    schema: str,
    max_size: int = 10,
    connect_timeout: float = 10.0,
    statement_timeout: float = 30.0,
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """An unopened pool (``await pool.open(wait=True)`` connects)."""
    check_schema(schema)

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        # A stuck query must not hold a request (and a pool slot) for ever.
        await conn.execute(
            sql.SQL("SET statement_timeout = {}").format(
                sql.Literal(f"{int(statement_timeout * 1000)}ms")
            )
        )
        set_json_loads(orjson.loads, conn)
        set_json_dumps(_dumps, conn)

    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        configure=configure,
        kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout))},
        timeout=connect_timeout,
    )
