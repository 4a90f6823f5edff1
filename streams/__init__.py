"""The runtime: event envelope and codec, the Transport protocol and its NATS,
Kafka and in-memory implementations, partitioning, the step runner, keyed
state and trace propagation. Imports nothing else of sluicegate's."""

from sluicegate.streams.codec import (
    DataRegistry,
    DecodeError,
    EncodeError,
    decode,
    encode,
    headers_for,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    Subscription,
    TopicPartition,
    Transport,
)

__all__ = [
    "DataRegistry",
    "DecodeError",
    "EncodeError",
    "Event",
    "Message",
    "OutMessage",
    "Subscription",
    "TopicPartition",
    "Transport",
    "decode",
    "encode",
    "headers_for",
]
