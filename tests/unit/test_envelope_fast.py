"""The envelope's fast paths give what the pydantic model gives.

``Event.derive`` assembles outputs without a second validation and
``codec.encode`` dumps events without the model's serializer (issue 20); here
both are held to the model's own results, and what the fast checks refuse
goes through the model with its errors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from sluicegate.streams.codec import decode, encode
from sluicegate.streams.envelope import Event, wire_dict
from sluicegate.streams.ids import derived_id
from sluicegate.streams.transports.kafka.names import _Headers

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def inputs() -> list[Event]:
    return [
        Event(source="s", type="t", tenant="a", session="b"),
        Event(
            source="upstream",
            type="task.submitted",
            tenant="acme",
            session="s-1",
            subject="ticket 7",
            causationid="c",
            traceparent=TRACEPARENT,
            tracestate="k=v",
            time=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
            data={"text": "ünïcode", "n": 1, "nested": {"none": None, "list": [1.5, None]}},
        ),
    ]


def by_model(event: Event, **kw: Any) -> Event:
    """What ``derive`` built before its fast path: the model's constructor."""
    subject = kw.get("subject")
    return Event(
        id=derived_id(event.id, kw["step"], kw["index"]),
        source=kw.get("source") or f"sluicegate/{kw['step']}",
        type=kw["type"],
        time=event.time,
        subject=subject if subject is not None else event.subject,
        tenant=event.tenant,
        session=event.session,
        causationid=event.id,
        traceparent=event.traceparent,
        tracestate=event.tracestate,
        data=kw["data"],
    )


@pytest.mark.parametrize("source", [None, "custom/source"])
@pytest.mark.parametrize("subject", [None, "another subject"])
def test_derive_builds_what_the_model_builds(source: str | None, subject: str | None) -> None:
    for event in inputs():
        kw: dict[str, Any] = {
            "step": "gate",
            "index": 2,
            "type": "action.decided",
            "data": {"decision": "allow", "reasons": [], "x": None},
            "source": source,
            "subject": subject,
        }
        fast, model = event.derive(**kw), by_model(event, **kw)
        assert fast == model
        assert fast.model_fields_set == model.model_fields_set
        assert fast.model_dump() == model.model_dump()
        assert encode(fast) == encode(model)
        assert decode(encode(fast)) == model


def test_derive_copies_the_data_dict_as_validation_did() -> None:
    data = {"n": 1}
    out = inputs()[0].derive(step="s", index=0, type="t", data=data)
    data["n"] = 2
    assert out.data == {"n": 1}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"type": ""}, "type"),
        ({"type": "x" * 257}, "type"),
        ({"data": {1: "not a string key"}}, "data"),
        ({"data": ["not", "an", "object"]}, "data"),
        ({"source": "x" * 513}, "source"),
    ],
)
def test_what_the_fast_checks_refuse_the_model_explains(kw: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"step": "s", "index": 0, "type": "t", "data": {}} | kw
    with pytest.raises(ValidationError) as caught:
        inputs()[0].derive(**args)
    assert {str(e["loc"][0]) for e in caught.value.errors()} == {field}


class Nested(BaseModel):
    when: datetime
    items: list[int]


def test_encode_writes_what_the_model_dump_wrote() -> None:
    for event in [*inputs(), decode(encode(inputs()[1]))]:
        assert wire_dict(event) == event.model_dump(exclude_none=True)
        assert list(wire_dict(event)) == list(event.model_dump(exclude_none=True))
        assert encode(event) == orjson.dumps(event.model_dump(exclude_none=True))


def test_a_model_inside_data_is_written_as_its_dump() -> None:
    nested = Nested(when=datetime(2026, 1, 1, tzinfo=UTC), items=[1, 2])
    event = Event(source="s", type="t", tenant="a", session="b", data={"m": nested})
    assert orjson.loads(encode(event))["data"] == {
        "m": {"when": "2026-01-01T00:00:00+00:00", "items": [1, 2]}
    }


def test_what_json_cannot_hold_still_fails_to_encode() -> None:
    event = Event(source="s", type="t", tenant="a", session="b", data={"s": {1, 2}})
    with pytest.raises(TypeError):
        encode(event)


def test_kafka_headers_answer_membership_without_a_key_error() -> None:
    headers = _Headers([("ce_id", b"e1"), ("empty", None)])
    assert "ce_id" in headers and "missing" not in headers and "empty" not in headers
    assert headers.get("ce_id") == "e1"
    assert headers.get("missing") is None and headers.get("missing", "d") == "d"
    assert dict(headers) == {"ce_id": "e1"}
    # Found by a scan before anything decoded them all, as the dict has them:
    repeated = _Headers([("h", b"first"), ("h", b"last"), ("bad", b"\xff")])
    assert repeated.get("h") == "last" and repeated.get("bad") == "\ufffd"
    assert dict(repeated) == {"h": "last", "bad": "\ufffd"}
    assert repeated.get("h") == "last" and "bad" in repeated
