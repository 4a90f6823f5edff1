"""The event envelope: a CloudEvents 1.0 shaped pydantic model.

Attribute names follow CloudEvents 1.0 (``id``, ``source``, ``type``, ``time``,
``subject``, ``data``) plus the extensions ``tenant``, ``session``,
``causationid`` and the distributed-tracing extension (``traceparent``,
``tracestate``). CloudEvents extension names must be lowercase alphanumerics,
which is why ``causationid`` has no separator.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluicegate.streams.ids import derived_id, new_id

SPECVERSION: Literal["1.0"] = "1.0"
DATACONTENTTYPE: Literal["application/json"] = "application/json"


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """One event on a topic. ``session`` is the partition key."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = SPECVERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=512)
    type: str = Field(min_length=1, max_length=256)
    time: datetime = Field(default_factory=_now)
    subject: str | None = None
    datacontenttype: Literal["application/json"] = DATACONTENTTYPE
    tenant: str = Field(min_length=1, max_length=128)
    session: str = Field(min_length=1, max_length=256)
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # CloudEvents times are RFC 3339, which always carries an offset.
        if value.tzinfo is None:
            raise ValueError("time must carry a UTC offset (RFC 3339)")
        return value

    @property
    def key(self) -> bytes:
        """The partition key: the session, as bytes."""
        return self.session.encode()

    def derive(
        self,
        *,
        step: str,
        index: int,
        type: str,
        data: dict[str, Any],
        source: str | None = None,
        subject: str | None = None,
    ) -> Event:
        """An output event caused by this one, with a deterministic id.

        Tenant, session and trace context carry over; ``causationid`` points
        here. ``time`` is the input's: derived events keep the time of the
        occurrence that started them (event time), so a replayed input yields
        byte-identical outputs and time windows (rate limits) replay the same.
        """
        source = source or f"sluicegate/{step}"
        if subject is None:
            subject = self.subject
        if _fits(source, 512) and _fits(type, 256) and _is_data(data) and _maybe_str(subject):
            # Everything else comes from this (validated) event: build the
            # output without a second validation (one per output event; the
            # model's __init__ costs about 6 us of the step's hot path).
            return _assemble(
                {
                    "specversion": SPECVERSION,
                    "id": derived_id(self.id, step, index),
                    "source": source,
                    "type": type,
                    "time": self.time,
                    "subject": subject,
                    "datacontenttype": DATACONTENTTYPE,
                    "tenant": self.tenant,
                    "session": self.session,
                    "causationid": self.id,
                    "traceparent": self.traceparent,
                    "tracestate": self.tracestate,
                    # A copy, as validation would make: a step may reuse its dict.
                    "data": dict(data),
                },
                set(_DERIVED_SET),
            )
        # Something a check above refuses: the model says what, in its words.
        return Event(
            id=derived_id(self.id, step, index),
            source=source,
            type=type,
            time=self.time,
            subject=subject,
            tenant=self.tenant,
            session=self.session,
            causationid=self.id,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            data=data,
        )


# -- the fast paths --------------------------------------------------------------
#
# Every output event is built and encoded on a step's hot path. ``derive``
# assembles it from values checked by hand against the model's constraints
# (what the checks do not plainly accept goes through the model, so errors
# read as before), and ``wire_dict`` dumps it without the serializer's walk.
# Decoding keeps ``Event.model_validate``: pydantic-core validates a parsed
# dict in about 3 us, faster than the same checks written in Python.
# tests/unit/test_envelope_fast.py holds both to the model's results.

FIELDS: tuple[str, ...] = tuple(Event.model_fields)
# What a derived event's fields_set is when the model builds it.
_DERIVED_SET = frozenset(FIELDS) - {"specversion", "datacontenttype"}
_new = object.__new__
_set = object.__setattr__


def _assemble(values: dict[str, Any], fields_set: set[str]) -> Event:
    """An ``Event`` from values already known to be valid, in ``FIELDS`` order."""
    event: Event = _new(Event)
    _set(event, "__dict__", values)
    _set(event, "__pydantic_fields_set__", fields_set)
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _fits(value: object, most: int) -> bool:
    return type(value) is str and 0 < len(value) <= most


def _maybe_str(value: object) -> bool:
    return value is None or type(value) is str


def _is_data(value: object) -> bool:
    return type(value) is dict and all(type(k) is str for k in value)


def wire_dict(event: Event) -> dict[str, Any]:
    """``event.model_dump(exclude_none=True)`` without the serializer's walk.

    The same keys in the same order; values as the model holds them (the
    codec's JSON writer turns a model nested in ``data`` into its dump).
    """
    return {k: v for k, v in event.__dict__.items() if v is not None}
