"""Logical names and headers, and their Kafka counterparts.

It owns the mapping of logical topics and groups onto Kafka's under one
prefix (:class:`_Names`), and of message headers onto record headers:
encoded when producing, decoded lazily when consuming (:class:`_Headers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from aiokafka import TopicPartition as KafkaTopicPartition

from sluicegate.streams.transport import TopicPartition

_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})


def _encode_headers(headers: Mapping[str, str] | None) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    return [(k, v.encode()) for k, v in headers.items()]


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode(errors="replace")


class _Headers(Mapping[str, str]):
    """A record's headers, decoded on first access.

    Decoding every header of every record up front costs more than building
    the Message itself, and most consumers never look at most headers.
    """

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: Sequence[tuple[str, bytes | None]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        if self._decoded is None:
            try:
                self._decoded = {k: v.decode() for k, v in self._raw if v is not None}
            except UnicodeDecodeError:
                # Headers are advisory (the body is the event): a foreign
                # producer's undecodable header must not fail the consumer.
                self._decoded = {
                    k: v.decode(errors="replace") for k, v in self._raw if v is not None
                }
        return self._decoded

    def __getitem__(self, key: str) -> str:
        return self._dict()[key]

    # Mapping's own ``__contains__`` and ``get`` go through ``__getitem__``
    # and raise a KeyError for every absent header: the runner asks every
    # input whether it is a replay, so that cost ~10% of a step's CPU. Until
    # something decodes them all, one header is found by a scan of the few
    # raw ones, decoding only its value.
    def __contains__(self, key: object) -> bool:
        if self._decoded is not None:
            return key in self._decoded
        return any(k == key and v is not None for k, v in self._raw)

    def get(self, key: str, default: Any = None) -> Any:
        if self._decoded is not None:
            return self._decoded.get(key, default)
        found = None
        for k, v in self._raw:
            if k == key and v is not None:
                found = v  # the last of a repeated header, as in the dict
        return default if found is None else _text(found)

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return repr(self._dict())


class _Names:
    """Logical names <-> Kafka names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self._head = f"{prefix}."
        self._logical: dict[str, str] = {}

    def kafka(self, logical: str) -> str:
        return self._head + logical

    def group(self, group: str) -> str:
        return self._head + group

    def logical(self, kafka_topic: str) -> str:
        name = self._logical.get(kafka_topic)
        if name is None:
            name = kafka_topic.removeprefix(self._head)
            self._logical[kafka_topic] = name
        return name

    def kafka_tp(self, tp: TopicPartition) -> KafkaTopicPartition:
        return KafkaTopicPartition(self.kafka(tp.topic), tp.partition)

    def logical_tps(self, tps: Iterable[Any]) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(self.logical(tp.topic), tp.partition) for tp in tps)
