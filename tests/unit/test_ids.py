from __future__ import annotations

import uuid

from sluicegate.streams.envelope import Event
from sluicegate.streams.ids import derived_id, new_id, timestamp_ms


def test_new_ids_are_uuid7_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_derived_ids_are_deterministic_and_distinct() -> None:
    parent = new_id()
    a = derived_id(parent, "planner", 0)
    assert a == derived_id(parent, "planner", 0)
    assert len({a, derived_id(parent, "planner", 1), derived_id(parent, "tools", 0)}) == 3
    assert uuid.UUID(a).version == 7
    # The derived id keeps the parent's timestamp, so it still sorts by time.
    assert timestamp_ms(a) == timestamp_ms(parent)


def test_derived_id_of_non_uuid_input_is_still_stable() -> None:
    assert derived_id("upstream-42", "intake", 0) == derived_id("upstream-42", "intake", 0)


def test_event_derive_carries_context() -> None:
    parent = Event(
        source="s", type="task.submitted", tenant="t", session="x", traceparent="00-a-b-01"
    )
    child = parent.derive(step="intake", index=0, type="task.accepted", data={"k": 1})
    assert child.causationid == parent.id
    assert (child.tenant, child.session, child.traceparent) == ("t", "x", "00-a-b-01")
    assert child.id == parent.derive(step="intake", index=0, type="x", data={}).id
