"""The broker-free parts of NATS ownership: rendezvous hashing, keys, values, the status view."""

from __future__ import annotations

import re

import pytest

from sluicegate.streams.transports.nats import NatsTransport, NatsTuning
from sluicegate.streams.transports.nats.leases import (
    LEASE,
    MEMBER,
    STATIC,
    Entry,
    Holder,
    lease_key,
    member_key,
    new_worker_id,
    ownership_view,
    rendezvous_owner,
)

PARTITIONS = 64


def assignment(members: list[str], group: str = "g") -> dict[int, str | None]:
    return {p: rendezvous_owner(group, p, members) for p in range(PARTITIONS)}


def test_rendezvous_is_deterministic_and_order_free() -> None:
    assert assignment(["a", "b", "c"]) == assignment(["c", "a", "b"])
    assert rendezvous_owner("g", 0, []) is None


def test_rendezvous_spreads_partitions() -> None:
    owners = assignment([f"w{i}" for i in range(4)])
    counts = {w: sum(1 for o in owners.values() if o == w) for w in set(owners.values())}
    assert len(counts) == 4
    assert min(counts.values()) >= PARTITIONS // 4 // 3  # no member starves


def test_a_joining_member_takes_only_what_it_wins() -> None:
    before = assignment(["a", "b", "c"])
    after = assignment(["a", "b", "c", "d"])
    moved = {p for p in before if before[p] != after[p]}
    assert moved, "the new member got nothing"
    assert all(after[p] == "d" for p in moved)


def test_a_leaving_member_gives_up_only_its_own() -> None:
    before = assignment(["a", "b", "c"])
    after = assignment(["a", "c"])
    moved = {p for p in before if before[p] != after[p]}
    assert moved == {p for p, owner in before.items() if owner == "b"}


def test_groups_hash_independently() -> None:
    assert assignment(["a", "b", "c"], "one") != assignment(["a", "b", "c"], "two")


def test_keys_are_single_tokens_per_part() -> None:
    assert lease_key("intake", 3) == "l.intake.3"
    assert lease_key("my.step", 0) == "l.my_step.0"
    assert member_key("intake", "w1") == "m.intake.w1"
    assert member_key("intake", "w1", static=True) == "s.intake.w1"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", new_worker_id())
    assert new_worker_id() != new_worker_id()


def test_holder_roundtrip_and_foreign_values() -> None:
    holder = Holder("w1", "abcd")
    assert Holder.decode(holder.encode(pid=1)) == holder
    assert Holder.decode(b"not json") is None
    assert Holder.decode(b'{"worker": "x"}') is None


def test_ownership_view_groups_workers_and_leases() -> None:
    def entry(kind: str, group: str, name: str, worker: str, ns: int) -> Entry:
        value = Holder(worker, "i").encode()
        return Entry(kind, group, name, value, revision=1, written_ns=ns)  # type: ignore[arg-type]

    view = ownership_view(
        [
            entry(MEMBER, "intake", "w1", "w1", 1_000_000_000),
            entry(MEMBER, "gate", "w1", "w1", 3_000_000_000),
            entry(STATIC, "intake", "w2", "w2", 2_000_000_000),
            entry(LEASE, "intake", "0", "w1", 1),
            entry(LEASE, "intake", "1", "w2", 1),
        ]
    )
    assert [(w.worker, w.groups, w.static) for w in view.workers] == [
        ("w1", ("gate", "intake"), False),
        ("w2", ("intake",), True),
    ]
    assert view.workers[0].last_heartbeat.timestamp() == 3.0
    assert view.leases == {("intake", 0): "w1", ("intake", 1): "w2"}
    as_json = view.to_json()
    assert as_json["leases"] == [
        {"group": "intake", "partition": 0, "owner": "w1"},
        {"group": "intake", "partition": 1, "owner": "w2"},
    ]


def test_tuning_requires_a_heartbeat_within_half_the_ttl() -> None:
    NatsTuning(lease_ttl=2.0, heartbeat=1.0)
    with pytest.raises(ValueError, match="heartbeat"):
        NatsTuning(lease_ttl=2.0, heartbeat=1.5)
    with pytest.raises(ValueError, match="heartbeat"):
        NatsTuning(heartbeat=0)


def test_worker_id_must_be_one_key_token() -> None:
    t = NatsTransport("nats://x", prefix="p", partitions=1, worker_id="host-1_a")
    assert t.worker_id == "host-1_a"
    with pytest.raises(ValueError, match="worker_id"):
        NatsTransport("nats://x", prefix="p", partitions=1, worker_id="a.b")
