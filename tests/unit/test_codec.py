from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from sluicegate.streams.codec import (
    CONTENT_TYPE,
    DataRegistry,
    DecodeError,
    EncodeError,
    decode,
    encode,
    headers_for,
)
from sluicegate.streams.envelope import Event


def make_event(**overrides: object) -> Event:
    fields: dict[str, object] = {
        "source": "upstream/crm",
        "type": "task.submitted",
        "tenant": "acme",
        "session": "s-1",
        "data": {"prompt": "what is 2+2"},
    }
    fields.update(overrides)
    return Event.model_validate(fields)


def valid_body(**overrides: object) -> dict[str, object]:
    body = orjson.loads(encode(make_event()))
    body.update(overrides)
    return body  # type: ignore[no-any-return]


def test_roundtrip_is_structured_mode_cloudevent() -> None:
    event = make_event(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    body = encode(event)
    raw = orjson.loads(body)
    assert raw["specversion"] == "1.0"
    assert raw["datacontenttype"] == "application/json"
    assert "subject" not in raw  # absent optional attributes are omitted, not null
    assert decode(body) == event
    headers = headers_for(event)
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["ce_id"] == event.id
    assert headers["traceparent"] == event.traceparent


@pytest.mark.parametrize(
    ("body", "reason", "mentions"),
    [
        (b"\xff\xfe{not utf8", "invalid_utf8", "UTF-8"),
        (b'{"id": "x", ', "invalid_json", ""),
        (b"[1, 2, 3]", "not_an_object", "an array"),
        (
            orjson.dumps({k: v for k, v in valid_body().items() if k != "id"}),
            "missing_attribute",
            "id",
        ),
        (orjson.dumps(valid_body(time="yesterday")), "invalid_attribute", "time"),
        (orjson.dumps(valid_body(time="2026-11-23T10:00:00")), "invalid_attribute", "offset"),
        (orjson.dumps(valid_body(specversion="0.3")), "invalid_attribute", "specversion"),
        (orjson.dumps(valid_body(tenant=7)), "invalid_attribute", "tenant"),
    ],
)
def test_bad_input_raises_typed_error_with_reason(body: bytes, reason: str, mentions: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert info.value.reason == reason
    assert mentions in str(info.value)


def test_two_mib_body_is_too_large() -> None:
    big = orjson.dumps(valid_body(data={"blob": "x" * (2 * 1024 * 1024)}))
    with pytest.raises(DecodeError) as info:
        decode(big)
    assert info.value.reason == "too_large"
    assert "1048576" in info.value.detail


def test_encode_refuses_oversized_event() -> None:
    with pytest.raises(EncodeError, match="over the 1048576-byte limit"):
        encode(make_event(data={"blob": "x" * (1024 * 1024)}))


class TaskData(BaseModel):
    prompt: str


def test_registry_validates_data_per_type() -> None:
    registry = DataRegistry()
    registry.register("task.submitted", TaskData)
    assert decode(encode(make_event()), registry=registry).data == {"prompt": "what is 2+2"}
    with pytest.raises(DecodeError) as info:
        decode(encode(make_event(data={"prompt": 3})), registry=registry)
    assert info.value.reason == "invalid_data"
    assert "data.prompt" in info.value.detail
    with pytest.raises(DecodeError) as unknown:
        decode(encode(make_event(type="task.unheard_of")), registry=registry)
    assert unknown.value.reason == "unknown_type"
    assert (
        decode(
            encode(make_event(type="task.unheard_of")), registry=registry, strict_types=False
        ).type
        == "task.unheard_of"
    )


def test_time_must_carry_offset() -> None:
    with pytest.raises(ValueError, match="offset"):
        make_event(time=datetime(2026, 1, 1))
    assert make_event(time=datetime(2026, 1, 1, tzinfo=UTC)).time.year == 2026


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    tenant=st.text(min_size=1, max_size=20),
    session=st.text(min_size=1, max_size=40),
)
def test_any_json_data_roundtrips(data: dict[str, object], tenant: str, session: str) -> None:
    event = make_event(data=data, tenant=tenant, session=session)
    assert decode(encode(event)) == event


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_other_errors(body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(body)


def test_an_event_without_time_gets_the_brokers_timestamp() -> None:
    body = b'{"specversion":"1.0","id":"e1","source":"s","type":"t","tenant":"a","session":"b"}'
    event = decode(body, default_time_ms=1_700_000_000_000)
    assert event.time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    # Without a broker timestamp (a library caller) time stays required.
    with pytest.raises(DecodeError, match="missing attribute time"):
        decode(body)


def test_errors_speak_json_null_and_name_missing_data() -> None:
    body = b'{"specversion":"1.0","id":"e1","source":"s","type":"t","tenant":null,"session":"b"}'
    with pytest.raises(DecodeError, match="tenant: expected a string, got null"):
        decode(body, default_time_ms=0)

    class Prompt(BaseModel):
        prompt: str

    registry = DataRegistry()
    registry.register("t", Prompt)
    no_data = b'{"specversion":"1.0","id":"e1","source":"s","type":"t","tenant":"a","session":"b"}'
    with pytest.raises(DecodeError) as info:
        decode(no_data, default_time_ms=0, registry=registry)
    assert str(info.value) == "missing_attribute: missing attribute data (t needs data.prompt)"
