"""Kafka topic ids: what tells a recreated topic from the one that stood there before.

Brokers give every topic a UUID at creation (KIP-516; Apache Kafka 2.8+, and
Tansu) in Metadata responses from version 10. aiokafka 0.14 speaks Metadata up
to version 5, so this module declares version 10's request and response with
aiokafka's own protocol types and sends it on an ``AIOKafkaClient``. The
layouts follow the Kafka protocol's published message definitions
(MetadataRequest / MetadataResponse, v10, flexible encoding).

A broker that answers without ids (older than 2.8, or one that fills in the
zero UUID) gives none; callers then fall back to the topic's name alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from io import BytesIO
from typing import Any, ClassVar

from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

_METADATA = 3
_NO_ERROR = 0
_ZERO = bytes(16)


class _Uuid(AbstractType[bytes]):  # type: ignore[misc]
    """The protocol's UUID: 16 raw bytes."""

    @classmethod
    def encode(cls, value: bytes | None) -> bytes:
        return value or _ZERO

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        return data.read(16)


class _MetadataResponseV10(Response):  # type: ignore[misc]
    API_KEY = _METADATA
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", _Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataRequestV10(RequestStruct):  # type: ignore[misc]
    API_KEY = _METADATA
    API_VERSION = 10
    FLEXIBLE_VERSION: ClassVar[bool] = True
    RESPONSE_TYPE = _MetadataResponseV10
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIdsRequest(Request[_MetadataRequestV10]):  # type: ignore[misc]
    """Metadata v10 for the named topics, never creating one."""

    API_KEY = _METADATA
    # Sent even where the client has not learnt the broker's versions yet;
    # a broker without v10 answers with an error, which means "no ids".
    ALLOW_UNKNOWN_API_VERSION = True

    def __init__(self, names: Sequence[str]) -> None:
        self._names = list(names)

    def build(self, request_struct_class: type[_MetadataRequestV10]) -> _MetadataRequestV10:
        topics: list[tuple[None, str, dict[int, bytes]]] = [(None, n, {}) for n in self._names]
        return request_struct_class(topics, False, False, False, {})


async def topic_ids(client: Any, names: Sequence[str]) -> dict[str, str]:
    """The id of each of ``names`` that exists and has one (a bootstrapped ``AIOKafkaClient``)."""
    if not names:
        return {}
    node = client.get_random_node()
    response = await client.send(node, _TopicIdsRequest(names))
    ids: dict[str, str] = {}
    for error_code, name, raw_id, *_rest in response.topics:
        if error_code == _NO_ERROR and raw_id and raw_id != _ZERO:
            ids[name] = str(uuid.UUID(bytes=raw_id))
    return ids
