"""The gate's decisions as OPA decision-log events (``sluice audit export --format opa``).

One JSON object per ``decision`` audit row, shaped as OPA's decision logs
are (https://www.openpolicyagent.org/docs/management-decision-logs), so the
tools that read OPA's logs read ours:

- ``decision_id``: the decided event's id (one decision per action);
- ``labels``: ``{"id": "sluicegate", "version": ..., "step": ...}``;
- ``path``: ``sluice/gate/decision``, the rule the gate queries;
- ``input``: tenant, agent, tool, arguments and the session's spend at the
  time; the arguments as the gate forwarded them, so PII the policy redacts
  is masked, and ``masked`` lists each of those places as a JSON pointer
  (``/input/args/to``). Rows written before arguments were audited have no
  ``input.args`` and list ``/input/args`` under ``erased``;
- ``result``: decision, reasons, cost and mask placements (never the text);
- ``bundles``: ``{"sluice": {"revision": <bundle content hash>}}``;
- ``timestamp``: RFC 3339 UTC; ``metrics``: evaluation time when measured;
  ``trace_id`` when the action was traced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row

Conn = psycopg.AsyncConnection[Any]

PATH: Final = "sluice/gate/decision"
BUNDLE: Final = "sluice"

_ROWS = """
SELECT time, step, event_id, tenant, session, decision, reasons, policy_version, trace_id, detail
FROM audit_log
WHERE kind = 'decision' AND (%(since)s::timestamptz IS NULL OR time >= %(since)s)
  AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
ORDER BY time, chain_step, chain_partition, seq
"""


def _version() -> str:
    try:
        return metadata.version("sluicegate")
    except metadata.PackageNotFoundError:
        return "unknown"


def pointer(*keys: str | int) -> str:
    """A JSON pointer (RFC 6901) to ``keys``: ``~`` and ``/`` escaped."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def event(row: dict[str, Any], version: str) -> dict[str, Any]:
    """One ``decision`` audit row as an OPA decision-log event."""
    detail = row["detail"] if isinstance(row["detail"], dict) else {}
    found = detail.get("masks")
    masks: list[Any] = found if isinstance(found, list) else []
    input_doc: dict[str, Any] = {
        "tenant": row["tenant"],
        "session": row["session"],
        "agent": detail.get("agent"),
        "tool": detail.get("tool"),
        "spend": detail.get("spend"),
    }
    out: dict[str, Any] = {
        "decision_id": row["event_id"],
        "labels": {"id": "sluicegate", "version": version, "step": row["step"]},
        "path": PATH,
        "input": input_doc,
        "result": {
            "decision": row["decision"],
            "reasons": row["reasons"],
            "cost": detail.get("cost"),
            "masks": masks,
        },
        "bundles": {BUNDLE: {"revision": row["policy_version"] or ""}},
        "timestamp": row["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if "args" in detail:
        input_doc["args"] = detail["args"]
        placed = [
            m["path"] for m in masks if isinstance(m, dict) and isinstance(m.get("path"), list)
        ]
        if placed:
            out["masked"] = sorted({pointer("input", "args", *path) for path in placed})
    else:
        out["erased"] = [pointer("input", "args")]
    if isinstance(detail.get("eval_us"), int):
        out["metrics"] = {"timer_rego_query_eval_ns": detail["eval_us"] * 1000}
    if row["trace_id"]:
        out["trace_id"] = row["trace_id"]
    return out


async def events(
    conn: Conn, *, since: datetime | None = None, tenant: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every decision from ``since`` on, oldest first, read through a server-side cursor."""
    version = _version()
    async with conn.transaction():
        cur = conn.cursor("opa_export", row_factory=dict_row)
        await cur.execute(_ROWS, {"since": since, "tenant": tenant})
        async for row in cur:
            yield event(row, version)
