"""Key → partition, the same function on every transport.

Kafka's default partitioner hashes the key with murmur2 (positive part, modulo
the partition count). NATS uses the same function for its partition subjects,
so a session lands on the same partition number whichever transport carries it.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import count

from aiokafka.partitioner import murmur2

_round_robin = count()


def partition_for(key: bytes | None, partitions: int) -> int:
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    if key is None:
        return next(_round_robin) % partitions
    return _hash(key) % partitions


# aiokafka's murmur2 is pure Python; sessions repeat, so memoise per key.
@lru_cache(maxsize=65536)
def _hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


def owned_partitions(instance: int, instances: int, partitions: int) -> list[int]:
    """Partitions worker ``instance`` of ``instances`` owns (0-based), round-robin."""
    if not 0 <= instance < instances:
        raise ValueError(f"instance {instance} is not in 0..{instances - 1}")
    return [p for p in range(partitions) if p % instances == instance]
