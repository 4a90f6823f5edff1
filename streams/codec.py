"""Wire codec: CloudEvents structured mode, JSON via orjson, with a size limit.

On the wire the body is the whole event as JSON (``specversion`` included) and
the header ``content-type: application/cloudevents+json`` marks structured
mode, as the CloudEvents Kafka and NATS bindings define it. The event id and
trace context are copied into headers too, so a consumer can route, dedupe and
trace without decoding the body.

Every decoding failure raises :class:`DecodeError`, whose ``reason`` is one of
the ``REASON_*`` codes below: the runner dead-letters with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from sluicegate.streams.envelope import Event, wire_dict
from sluicegate.streams.errors import SluiceError

CONTENT_TYPE = "application/cloudevents+json"
DEFAULT_MAX_BYTES = 1024 * 1024

# Header names. ``ce_id`` follows the CloudEvents Kafka binding's prefix; in
# structured mode readers take attributes from the body, so it is advisory.
H_CONTENT_TYPE = "content-type"
H_ID = "ce_id"
H_TYPE = "ce_type"
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"

REASON_TOO_LARGE = "too_large"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_INVALID_JSON = "invalid_json"
REASON_NOT_OBJECT = "not_an_object"
REASON_MISSING = "missing_attribute"
REASON_INVALID = "invalid_attribute"
REASON_UNKNOWN_TYPE = "unknown_type"
REASON_INVALID_DATA = "invalid_data"

# A registry key standing for every event type not registered by name (a
# step typed ``Step[Ticket]`` validates all its input as ``Ticket``).
ANY_TYPE = "*"


class DecodeError(SluiceError, ValueError):
    """A message that cannot become an :class:`Event`; ``reason`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodeError(SluiceError, ValueError):
    """An event that cannot be put on the wire (too large)."""


class DataRegistry:
    """Maps an event ``type`` to the pydantic model its ``data`` must satisfy."""

    def __init__(self) -> None:
        self._models: dict[str, type[BaseModel]] = {}

    def register(self, event_type: str, model: type[BaseModel]) -> None:
        self._models[event_type] = model

    def model_for(self, event_type: str) -> type[BaseModel] | None:
        return self._models.get(event_type) or self._models.get(ANY_TYPE)

    def __contains__(self, event_type: object) -> bool:
        return event_type in self._models or ANY_TYPE in self._models

    def validate(self, event: Event, *, strict_types: bool = True) -> BaseModel | None:
        """Validate ``event.data``; raise :class:`DecodeError` when it does not fit."""
        model = self.model_for(event.type)
        if model is None:
            if strict_types:
                raise DecodeError(REASON_UNKNOWN_TYPE, f"no schema for event type {event.type!r}")
            return None
        if not event.data:
            required = [name for name, f in model.model_fields.items() if f.is_required()]
            if required:
                needs = ", ".join(f"data.{name}" for name in required)
                raise DecodeError(
                    REASON_MISSING, f"missing attribute data ({event.type} needs {needs})"
                )
        try:
            return model.model_validate(event.data)
        except ValidationError as exc:
            raise DecodeError(REASON_INVALID_DATA, _describe(exc, prefix="data.")) from None


def encode(event: Event, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    body = orjson.dumps(wire_dict(event), default=_nested)
    if len(body) > max_bytes:
        raise EncodeError(f"event {event.id} is {len(body)} bytes, over the {max_bytes}-byte limit")
    return body


def _nested(value: object) -> object:
    """What orjson cannot write itself: a model in ``data`` is written as its dump."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def headers_for(event: Event) -> dict[str, str]:
    headers = {H_CONTENT_TYPE: CONTENT_TYPE, H_ID: event.id, H_TYPE: event.type}
    if event.traceparent:
        headers[H_TRACEPARENT] = event.traceparent
    if event.tracestate:
        headers[H_TRACESTATE] = event.tracestate
    return headers


def decode(
    body: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    registry: DataRegistry | None = None,
    strict_types: bool = True,
    default_time_ms: int | None = None,
) -> Event:
    """Parse and validate one message body; raise :class:`DecodeError` on any fault.

    ``default_time_ms`` is the ``time`` of an event without one (CloudEvents
    makes it optional): the runner passes the broker's timestamp, the same
    on every delivery, so a redelivered input decodes to the same event.
    """
    if len(body) > max_bytes:
        raise DecodeError(REASON_TOO_LARGE, f"{len(body)} bytes, over the {max_bytes}-byte limit")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in str(exc):
            raise DecodeError(REASON_INVALID_UTF8, str(exc)) from None
        raise DecodeError(REASON_INVALID_JSON, str(exc)) from None
    if not isinstance(raw, dict):
        raise DecodeError(REASON_NOT_OBJECT, f"body is {json_type(raw)}, not an object")
    if default_time_ms is not None and "time" not in raw:
        raw["time"] = datetime.fromtimestamp(default_time_ms / 1000, UTC)
    event = from_mapping(raw)
    if registry is not None:
        registry.validate(event, strict_types=strict_types)
    return event


# On the wire these must be present; the model's defaults (a fresh id, the
# current time) are for events we create, never for ones we receive.
WIRE_REQUIRED = ("specversion", "id", "source", "type", "time", "tenant", "session")
_WIRE_REQUIRED = frozenset(WIRE_REQUIRED)


def from_mapping(raw: Mapping[str, Any]) -> Event:
    """Build an :class:`Event` from already-parsed JSON, with typed errors."""
    if not _WIRE_REQUIRED.issubset(raw.keys()):
        absent = [name for name in WIRE_REQUIRED if name not in raw]
        raise DecodeError(REASON_MISSING, f"missing attribute {', '.join(absent)}")
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        missing = [e for e in exc.errors() if e["type"] == "missing"]
        if missing:
            names = ", ".join(_loc(e["loc"]) for e in missing)
            raise DecodeError(REASON_MISSING, f"missing attribute {names}") from None
        raise DecodeError(REASON_INVALID, _describe(exc)) from None


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


# What a pydantic type error expected, in JSON's words.
_EXPECTED = {
    "dict_type": "an object",
    "model_type": "an object",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "an array",
    "datetime_type": "an RFC 3339 time",
    "datetime_parsing": "an RFC 3339 time",
}


def json_type(value: object) -> str:
    """``value``'s JSON type, as JSON names it (``null``, not ``NoneType``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object"


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = f"{prefix}{_loc(e['loc'])}"
        if e["type"] == "missing":
            parts.append(f"missing attribute {where}")
        elif e["type"] in _EXPECTED:
            parts.append(f"{where}: expected {_EXPECTED[e['type']]}, got {json_type(e['input'])}")
        else:
            parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
