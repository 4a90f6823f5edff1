"""Names and settings of the NATS transport.

It owns how logical names map onto JetStream's (``stream_name``,
``subject_for``, ``consumer_name``, ``owners_bucket``, ``key_token``), what a
topic or prefix may look like, the JetStream API error codes the transport
acts on, and its knobs (:class:`NatsTuning`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sluicegate.streams.transport import TransportError

# JetStream API error codes we act on.
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_STREAM_NOT_FOUND = 10059
# A publish whose expected last subject sequence did not match (KV compare-and-set).
_ERR_WRONG_LAST_SEQUENCE = (10071, 10164)

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+")
_CONSUMER_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class NatsTuning:
    """Knobs of :class:`NatsTransport`, passed as keyword arguments.

    Sizes in bytes, durations in seconds.
    """

    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    duplicate_window: float = 120.0
    # 1 MiB events plus headers. The server's own ``max_payload`` (1 MiB by
    # default) must be raised to match for events that large.
    max_msg_size: int = 1024 * 1024 + 64 * 1024
    max_age: float = 0.0  # 0 keeps messages until the limits below remove them
    max_bytes: int = -1
    # Publishing: acks outstanding at once, per publish_batch call.
    publish_window: int = 4096
    publish_window_bytes: int = 32 * 1024 * 1024
    # A batch fails when no ack at all arrived for this long.
    publish_ack_timeout: float = 10.0
    # Write HPUB commands straight into nats-py's output buffer (see _hpub).
    fast_publish: bool = True
    api_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_reconnect_attempts: int = 60
    # Consuming. ack_wait only matters for a worker that hangs without closing:
    # a new subscription resets the durable and redelivers at once.
    ack_wait: float = 120.0
    max_ack_pending: int = 65536
    pull_expires: float = 5.0
    fetch_max_bytes: int = 16 * 1024 * 1024
    # How long fetch keeps waiting for a batch the server says is on its way.
    fill_wait: float = 0.05
    observer_inactive_threshold: float = 60.0
    # Ownership (ownership.py). Workers' heartbeats and partition leases live
    # in a KV bucket whose max_age is lease_ttl: a key not refreshed within it
    # vanishes, so a dead worker's partitions move after about lease_ttl +
    # heartbeat. Every heartbeat a worker re-puts its heartbeat, refreshes its
    # leases and rebalances; lease_ttl must allow at least one missed beat.
    lease_ttl: float = 10.0
    heartbeat: float = 2.0

    def __post_init__(self) -> None:
        if self.storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        if self.publish_window < 2 or self.publish_window_bytes <= 0:
            raise ValueError("publish_window must be at least 2 and publish_window_bytes positive")
        if self.pull_expires <= 0 or self.fetch_max_bytes <= 0:
            raise ValueError("pull_expires and fetch_max_bytes must be positive")
        if not 0 < 2 * self.heartbeat <= self.lease_ttl:
            raise ValueError(
                f"heartbeat ({self.heartbeat}s) must be positive and at most half of "
                f"lease_ttl ({self.lease_ttl}s)"
            )


def stream_name(prefix: str, topic: str) -> str:
    return f"{prefix}_{topic}".replace(".", "_")


def subject_for(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}.{topic}.{partition}"


def consumer_name(group: str, partition: int) -> str:
    return f"{_CONSUMER_UNSAFE.sub('_', group)}-p{partition}"


def owners_bucket(prefix: str) -> str:
    """The KV bucket holding the workers' heartbeats and partition leases of ``prefix``."""
    return f"{prefix}_owners"


def key_token(text: str) -> str:
    """``text`` as one KV key token (groups and worker ids; dots separate tokens)."""
    return _CONSUMER_UNSAFE.sub("_", text) or "_"


def _check_topic(topic: str) -> None:
    if not _TOPIC_RE.fullmatch(topic):
        raise TransportError(f"topic {topic!r} is not a valid NATS subject token sequence")
