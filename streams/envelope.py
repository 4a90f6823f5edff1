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
        return Event(
            id=derived_id(self.id, step, index),
            source=source or f"sluicegate/{step}",
            type=type,
            time=self.time,
            subject=subject if subject is not None else self.subject,
            tenant=self.tenant,
            session=self.session,
            causationid=self.id,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            data=data,
        )
