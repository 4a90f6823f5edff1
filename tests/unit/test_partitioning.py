from __future__ import annotations

import pytest

from sluicegate.streams.partitioning import owned_partitions, partition_for


def test_matches_kafka_java_client_murmur2() -> None:
    # Kafka's default partitioner: toPositive(murmur2(key)) % n. aiokafka's murmur2
    # is the Java client's port; ours must agree with it for every key.
    from aiokafka.partitioner import murmur2

    for key in (b"", b"a", b"session-1", b"\x00\xff"):
        assert partition_for(key, 12) == (murmur2(key) & 0x7FFFFFFF) % 12


# Vectors from Apache Kafka's UtilsTest.testMurmur2 (the Java client's murmur2).
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_kafka_reference_vectors() -> None:
    for key, java_hash in KAFKA_MURMUR2.items():
        assert partition_for(key, 1000) == (java_hash & 0x7FFFFFFF) % 1000, key


def test_stable_and_in_range() -> None:
    for i in range(500):
        k = f"s{i}".encode()
        p = partition_for(k, 7)
        assert 0 <= p < 7
        assert partition_for(k, 7) == p


def test_owned_partitions_cover_all_exactly_once() -> None:
    parts = [owned_partitions(i, 3, 8) for i in range(3)]
    assert sorted(p for ps in parts for p in ps) == list(range(8))
    with pytest.raises(ValueError, match="instance 3"):
        owned_partitions(3, 3, 8)


def test_a_message_goes_to_its_own_partition_or_its_keys() -> None:
    from sluicegate.streams.transport import OutMessage, TransportError, target_partition

    assert target_partition(OutMessage("t", b"", key=b"s1"), 6) == partition_for(b"s1", 6)
    assert target_partition(OutMessage("t", b"", key=b"s1", partition=5), 6) == 5
    for bad in (6, -1):
        with pytest.raises(TransportError, match=f"topic 't' has no partition {bad}"):
            target_partition(OutMessage("t", b"", partition=bad), 6)
