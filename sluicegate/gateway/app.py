"""The gateway's HTTP application (Starlette): routes, authentication, limits, errors.

:class:`Gateway` holds what the routes share (the broker connection and its
publisher, the Postgres pool, the key cache) and is started before the
server listens, so a broker or database that is not there stops
``sluice serve`` with one line instead of a server that answers 503.
:func:`create_app` builds the ASGI app over a started gateway.

Every route but ``/healthz`` and ``/openapi.json`` needs an API key, and the
key's tenant is the only tenant a request can publish as or read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluicegate.agents.graph import Pipeline
from sluicegate.cli_errors import redact
from sluicegate.gateway import approvals, ingest, page
from sluicegate.gateway.auth import Authenticator
from sluicegate.gateway.bodies import read_body
from sluicegate.gateway.openapi import document
from sluicegate.gateway.problems import Problem, problem_response, render
from sluicegate.gateway.results import (
    Pool,
    read_result,
    result_body,
    result_events,
    start_time,
    wait_for_result,
)
from sluicegate.gateway.store import make_pool
from sluicegate.gateway.submitter import BackedUp, Submitter
from sluicegate.publishing import make_publisher
from sluicegate.runtime import NotMigratedError
from sluicegate.settings import Settings
from sluicegate.sinks import api_keys
from sluicegate.sinks.queries import AUDIT_KINDS, AuditRow, session_audit
from sluicegate.streams.codec import DEFAULT_MAX_BYTES, REASON_TOO_LARGE, DecodeError
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import OutMessage, Transport, TransportError

log = logging.getLogger("sluicegate.gateway")

SOURCE = "sluicegate/gateway"


class Gateway:
    """The gateway's shared parts; ``start`` connects them, ``close`` lets go."""

    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        *,
        pipeline: Pipeline | None = None,
        topic: str = "tasks",
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.topic = topic
        self.max_event_bytes = DEFAULT_MAX_BYTES
        self.max_body_bytes = int(settings.gateway_max_body_mb * 1024 * 1024)
        self.publisher: Publisher = make_publisher(transport, topic=topic, pipeline=pipeline)
        self.publisher.source = SOURCE
        self.submitter = Submitter(self.publisher, max_pending=settings.gateway_max_pending)
        self.pool: Pool = make_pool(
            settings.resolved_database_url(),
            schema=settings.db_schema,
            connect_timeout=settings.db_connect_timeout,
            statement_timeout=settings.db_statement_timeout,
        )
        self.auth = Authenticator(self._lookup, ttl=settings.gateway_key_cache)

    async def start(self) -> None:
        url = self.settings.resolved_database_url()
        # One plain connection first: a refused or failed one raises psycopg's
        # own error (one line from the CLI), where the pool would log every
        # retry and then only say it timed out.
        await _connect_once(url, self.settings.db_connect_timeout)
        try:
            await self.pool.open(wait=True, timeout=self.settings.db_connect_timeout)
        except PoolTimeout:
            await self.pool.close()
            raise TimeoutError(
                f"Postgres at {redact(url)} did not answer within "
                f"{self.settings.db_connect_timeout:g}s"
            ) from None
        try:
            async with self.pool.connection() as conn:
                # A schema without the keys table: `sluice db migrate` was not run.
                cur = await conn.execute("SELECT to_regclass('api_keys') IS NOT NULL")
                row = await cur.fetchone()
            if not (row and row[0]):
                raise NotMigratedError(
                    f"schema {self.settings.db_schema!r} has no api_keys table: "
                    "run `sluice db migrate` first"
                )
            await self.transport.connect()
            # Upstream may submit before any worker has created the topic.
            await self.transport.ensure_topics([self.topic])
        except BaseException:
            await self.pool.close()
            raise
        self.submitter.start()

    async def close(self) -> None:
        await self.submitter.close()
        await self.transport.close()
        await self.pool.close()

    async def _lookup(self, key: str) -> str | None:
        async with self.pool.connection() as conn:
            return await api_keys.tenant_of(conn, key)

    # -- what a submit does --------------------------------------------------------

    def encode(self, fields: dict[str, Any]) -> tuple[str, OutMessage]:
        """Complete, validate and encode one event; ``Problem`` naming what is wrong."""
        try:
            event = self.publisher.prepare(fields)
            return event.id, self.publisher.encode(event)
        except DecodeError as exc:
            status = 413 if exc.reason == REASON_TOO_LARGE else 400
            raise Problem(status, exc.detail, reason=exc.reason) from None

    async def submit(self, messages: list[OutMessage]) -> None:
        try:
            await self.submitter.submit(messages)
        except BackedUp as exc:
            raise Problem(
                429,
                f"publishing is backed up: {exc}",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except TransportError as exc:
            raise Problem(
                503, f"the broker did not take the tasks: {exc}", headers={"Retry-After": "5"}
            ) from None


async def _connect_once(url: str, timeout: float) -> None:
    """Connect once, so that a refused connection raises psycopg's own error."""
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, round(timeout)))
    await conn.close()


# --- helpers ------------------------------------------------------------------------


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _trace_headers(request: Request) -> dict[str, str | None]:
    return {
        "traceparent": request.headers.get("traceparent"),
        "tracestate": request.headers.get("tracestate"),
    }


# --- routes -------------------------------------------------------------------------


async def submit_task(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = await gateway.auth.tenant(request.headers)
    body = await read_body(request, gateway.max_event_bytes)
    fields = ingest.scope(
        ingest.task_fields(request.headers, body), tenant, **_trace_headers(request)
    )
    task_id, message = gateway.encode(fields)
    await gateway.submit([message])
    return json_response({"task_id": task_id}, 202, {"Location": f"/v1/tasks/{task_id}"})


async def submit_batch(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = await gateway.auth.tenant(request.headers)
    body = await read_body(request, gateway.max_body_bytes)
    items = ingest.batch_fields(request.headers, body, limit=gateway.settings.gateway_max_batch)
    trace = _trace_headers(request)
    task_ids: list[str] = []
    messages: list[OutMessage] = []
    for index, fields in enumerate(items):
        # All or nothing: the first bad item is named and nothing is published.
        try:
            task_id, message = gateway.encode(ingest.scope(fields, tenant, **trace))
        except Problem as exc:
            raise Problem(exc.status, f"item {index}: {exc.detail}", reason=exc.reason) from None
        task_ids.append(task_id)
        messages.append(message)
    await gateway.submit(messages)
    return json_response({"task_ids": task_ids}, 202)


async def get_task(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = await gateway.auth.tenant(request.headers)
    task_id = request.path_params["task_id"]
    wait = _wait_param(request.query_params.get("wait"), gateway.settings.gateway_max_wait)
    if wait > 0:
        result = await wait_for_result(gateway.pool, task_id, tenant, wait)
    else:
        result = await read_result(gateway.pool, task_id, tenant)
    if result is None:
        raise Problem(404, f"no result for task {task_id!r} (yet)")
    return json_response(result_body(result))


def _wait_param(value: str | None, limit: float) -> float:
    if value is None or value == "":
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= limit:  # also NaN
        raise Problem(400, f"wait must be a number of seconds from 0 to {limit:g}, got {value!r}")
    return wait


async def stream_results(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = await gateway.auth.tenant(request.headers)
    last = request.headers.get("last-event-id") or None
    since = await start_time(gateway.pool, tenant, last)
    return StreamingResponse(
        result_events(gateway.pool, tenant, since, skip=last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def get_session_audit(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = await gateway.auth.tenant(request.headers)
    session = request.path_params["session"]
    kind = request.query_params.get("kind") or None
    if kind is not None and kind not in AUDIT_KINDS:
        raise Problem(400, f"unknown audit kind {kind!r}; one of {', '.join(AUDIT_KINDS)}")
    async with gateway.pool.connection() as conn:
        rows = await session_audit(conn, session, tenant=tenant, kind=kind)
    return json_response({"session": session, "events": [_audit_body(row) for row in rows]})


def _audit_body(row: AuditRow) -> dict[str, Any]:
    return {
        "time": row.time.isoformat(),
        "event_id": row.event_id,
        "causation_id": row.causation_id,
        "step": row.step,
        "event_type": row.event_type,
        "kind": row.kind,
        "decision": row.decision,
        "reasons": row.reasons,
        "policy_version": row.policy_version,
        "trace_id": row.trace_id,
        "detail": row.detail,
        "chain": {
            "step": row.chain_step,
            "partition": row.chain_partition,
            "seq": row.seq,
            "prev_hash": row.prev_hash,
            "hash": row.hash,
        },
    }


async def healthz(request: Request) -> Response:
    submitter = _gateway(request).submitter
    try:
        submitter.check(0)
        publishing = "ok"
    except BackedUp:
        publishing = "backed_up"
    return json_response({"status": "ok", "publishing": publishing, "pending": submitter.pending})


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


# --- errors -------------------------------------------------------------------------


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return render(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("Postgres unavailable for %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        503, "the database is unavailable; try again shortly", headers={"Retry-After": "5"}
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return problem_response(500, f"unexpected error: {type(exc).__name__}")


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app over a started ``gateway``."""
    app = Starlette(
        routes=[
            Route("/v1/tasks", submit_task, methods=["POST"]),
            Route("/v1/tasks:batch", submit_batch, methods=["POST"]),
            Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
            Route("/v1/results/stream", stream_results, methods=["GET"]),
            Route("/v1/sessions/{session}/audit", get_session_audit, methods=["GET"]),
            Route("/v1/approvals", approvals.list_held, methods=["GET"]),
            Route("/v1/approvals/{approval_id}:approve", approvals.approve, methods=["POST"]),
            Route("/v1/approvals/{approval_id}:deny", approvals.deny, methods=["POST"]),
            Route("/ui", page.page, methods=["GET"]),
            Route("/ui/app.js", page.script, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={
            Problem: _problem,
            HTTPException: _http_error,
            psycopg.OperationalError: _unavailable,
            PoolTimeout: _unavailable,
            Exception: _unexpected,
        },
    )
    app.state.gateway = gateway
    app.state.openapi = orjson.dumps(document(gateway))
    return app
