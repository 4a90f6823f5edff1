"""Turning a submit request into event fields: CloudEvents HTTP binding and plain JSON.

Three shapes are accepted by ``POST /v1/tasks``:

- structured mode: ``Content-Type: application/cloudevents+json``, the body one
  CloudEvent (``specversion`` required);
- binary mode: a ``ce-specversion`` header, the attributes in ``ce-*`` headers
  (percent-encoded, as the binding says) and the body the event's ``data``, a
  JSON object;
- plain JSON: ``{"session": ..., "data": {...}}``, optionally with ``id``,
  ``type``, ``subject`` and ``time``.

``POST /v1/tasks:batch`` takes a JSON array of the structured or plain
objects (``application/json`` or ``application/cloudevents-batch+json``).

Whatever the shape, :func:`scope` then binds the fields to the caller's
tenant: a ``tenant`` that is not the key's is refused, and an ``id`` the
client chose becomes an id derived from (tenant, id), so a retry gets the
same task id while no tenant can name (or collide with) another's events.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import orjson

from sluicegate.gateway.problems import Problem
from sluicegate.streams.codec import (
    REASON_INVALID,
    REASON_INVALID_JSON,
    REASON_MISSING,
    REASON_NOT_OBJECT,
    json_type,
)
from sluicegate.streams.ids import new_id

CE_JSON = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
MAX_ID = 128

# W3C Trace Context: version 00, a non-zero trace id and parent id, flags.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
# Binary mode: the attributes our envelope knows, read from ce-<name> headers.
_CE_HEADER_ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "tenant",
    "session",
    "causationid",
    "dataschema",
)


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"body is not JSON: {exc}", reason=REASON_INVALID_JSON) from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Problem(400, f"{what} is {json_type(value)}, not an object", reason=REASON_NOT_OBJECT)
    return value


def task_fields(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The event fields of a ``POST /v1/tasks`` request, in any of its three shapes."""
    media = media_type(headers.get("content-type"))
    if "ce-specversion" in headers:
        return _binary(headers, media, body)
    if media == CE_JSON:
        fields = _object(_loads(body), "the body")
        if "specversion" not in fields:
            raise Problem(
                400,
                "a structured-mode CloudEvent carries specversion (1.0)",
                reason=REASON_MISSING,
            )
        return fields
    if media == JSON:
        return _object(_loads(body), "the body")
    raise Problem(
        415,
        f"unsupported content type {media or '(none)'!r}: send {JSON}, {CE_JSON}, "
        "or a binary-mode CloudEvent (ce-* headers and a JSON body)",
    )


def _binary(headers: Mapping[str, str], media: str, body: bytes) -> dict[str, Any]:
    if media and not _is_json(media):
        raise Problem(
            415, f"binary-mode data must be JSON (an object), not {media!r}", reason=REASON_INVALID
        )
    fields: dict[str, Any] = {}
    for name in _CE_HEADER_ATTRIBUTES:
        value = headers.get(f"ce-{name}")
        if value is not None:
            fields[name] = unquote(value)
    fields["data"] = _object(_loads(body), "the data (the body)") if body.strip() else {}
    return fields


def batch_fields(headers: Mapping[str, str], body: bytes, *, limit: int) -> list[dict[str, Any]]:
    """The event fields of each item of a ``POST /v1/tasks:batch`` request."""
    media = media_type(headers.get("content-type"))
    if media not in (JSON, CE_BATCH):
        raise Problem(
            415, f"unsupported content type {media or '(none)'!r}: send {JSON} or {CE_BATCH}"
        )
    items = _loads(body)
    if not isinstance(items, list):
        raise Problem(
            400, f"the body is {json_type(items)}, not an array of tasks", reason=REASON_NOT_OBJECT
        )
    if not items:
        raise Problem(400, "the batch is empty", reason=REASON_MISSING)
    if len(items) > limit:
        raise Problem(
            413, f"{len(items)} tasks in one batch; at most {limit} (SLUICE_GATEWAY_MAX_BATCH)"
        )
    return [_object(item, f"item {i}") for i, item in enumerate(items)]


def scoped_id(tenant: str, client_id: str) -> str:
    """The task id for a client's event id: the same for a retry, distinct per tenant.

    A UUID (version 8, RFC 9562) from SHA-256 of (tenant, id), so that no
    tenant can choose the id its event gets on the topics: its ids can
    neither shadow another tenant's (the pipeline drops a repeated id) nor
    be guessed from theirs.
    """
    digest = hashlib.sha256(f"{tenant}\x1f{client_id}".encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0b11 << 62)) | (0b10 << 62)  # RFC variant
    return str(uuid.UUID(int=value))


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a W3C ``traceparent``; anything else is ignored, as the spec says."""
    if value is None:
        return None
    value = value.strip().lower()
    return value if _TRACEPARENT.fullmatch(value) else None


def scope(
    fields: dict[str, Any],
    tenant: str,
    *,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> dict[str, Any]:
    """Bind ``fields`` to ``tenant`` and the request's trace; raises ``Problem`` when it can't."""
    given = fields.get("tenant")
    if given is not None and given != tenant:
        raise Problem(403, f"tenant {given!r} is not this API key's tenant")
    fields["tenant"] = tenant
    client_id = fields.get("id")
    if client_id is None:
        fields["id"] = new_id()
    elif isinstance(client_id, str) and 0 < len(client_id) <= MAX_ID:
        fields["id"] = scoped_id(tenant, client_id)
    else:
        raise Problem(
            400, f"id must be a string of 1 to {MAX_ID} characters", reason=REASON_INVALID
        )
    # The event's own trace context wins; else the request's continues into it.
    parent = valid_traceparent(traceparent)
    if parent is not None and not fields.get("traceparent"):
        fields["traceparent"] = parent
        if tracestate:
            fields["tracestate"] = tracestate
    return fields
