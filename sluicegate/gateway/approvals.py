"""The gateway's approval endpoints: a tenant's held actions, approved or denied over HTTP.

The store is ``sinks/approvals.py`` (issue 18), the same one ``sluice
approvals`` uses; the gate's tick picks a decision up from there whoever made
it. A key sees and decides only its tenant's held actions (another tenant's
is 404, as an unknown one), and the decision records the key that made it as
``api-key <key_id>``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from starlette.requests import Request
from starlette.responses import Response

from sluicegate.gateway.bodies import read_body
from sluicegate.gateway.problems import Problem
from sluicegate.sinks.approvals import decide, get_approval, list_approvals
from sluicegate.streams.approvals import APPROVED, DENIED, PENDING, ApprovalError

STATUSES = (PENDING, APPROVED, DENIED, "all")
MAX_REASON = 2000
MAX_LIMIT = 1000
DECISION_BODY_LIMIT = 64 * 1024


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def list_held(request: Request) -> Response:
    gateway = request.app.state.gateway
    tenant = await gateway.auth.tenant(request.headers)
    status = request.query_params.get("status") or PENDING
    if status not in STATUSES:
        raise Problem(400, f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    raw_limit = request.query_params.get("limit") or str(MAX_LIMIT)
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise Problem(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    async with gateway.pool.connection() as conn:
        rows = await list_approvals(
            conn, status=None if status == "all" else status, tenant=tenant, limit=int(raw_limit)
        )
    return _json({"approvals": [row.as_json() for row in rows]})


async def approve(request: Request) -> Response:
    return await _decide(request, approved=True)


async def deny(request: Request) -> Response:
    return await _decide(request, approved=False)


async def _decide(request: Request, *, approved: bool) -> Response:
    gateway = request.app.state.gateway
    tenant, key_id = await gateway.auth.caller(request.headers)
    approval_id = request.path_params["approval_id"]
    reason = _reason(await read_body(request, DECISION_BODY_LIMIT))
    async with gateway.pool.connection() as conn:
        held = await get_approval(conn, approval_id)
        if held is None or held.tenant != tenant:
            raise Problem(404, f"no held action {approval_id!r}")
        try:
            row = await decide(
                conn,
                approval_id,
                approved=approved,
                by=f"api-key {key_id}",
                reason=reason,
                now=datetime.now(UTC),
            )
        except ApprovalError as exc:
            raise Problem(409, str(exc)) from None
    return _json(row.as_json())


def _reason(body: bytes) -> str:
    """The required ``{"reason": "..."}`` of a decision."""
    try:
        parsed = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"body is not JSON: {exc}", reason="invalid_json") from None
    reason = parsed.get("reason") if isinstance(parsed, dict) else None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise Problem(
            400, f'a decision needs {{"reason": "..."}}: text of 1 to {MAX_REASON} characters'
        )
    return reason.strip()
