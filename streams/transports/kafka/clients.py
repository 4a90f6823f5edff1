"""What the Kafka transport hands aiokafka's clients, and how it treats their failures.

It owns the default producer and consumer options and the group timing,
the split of ``tuning`` into the options each aiokafka class accepts
(``_pick``, ``_check_tuning``), the wrapping of aiokafka errors into
``TransportError`` (``_error``), and the quiet shutdown of a client on
cleanup paths (``_quietly``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from sluicegate.streams.transport import TransportError

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.kafka")

# Records are batched per partition up to this size. 128-256 KiB measured best
# on Tansu (16 KiB, aiokafka's default, is half as fast); it stays well under
# Kafka's default 1 MiB ``message.max.bytes``, which a batch must not exceed.
_BATCH_BYTES: Final = 256 * 1024

PRODUCER_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        # The runner checkpoints to Postgres only after the broker acked its
        # outputs, so an ack must mean "replicated": acks=all. On a single
        # broker (Tansu, compose) it costs nothing measurable.
        "acks": "all",
        # Tansu answers InitProducerId with an error, so idempotence is off by
        # default. aiokafka keeps one request in flight per partition, so a
        # retry can duplicate but never reorder; duplicates carry the same
        # event ids, which the next step absorbs. Pass
        # enable_idempotence=True against real Kafka to avoid them.
        "enable_idempotence": False,
        "max_batch_size": _BATCH_BYTES,
        # publish_batch sends closed batches, which never linger; a single
        # publish() is awaited on its own, so lingering would only add latency.
        "linger_ms": 0,
    }
)

CONSUMER_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        # When a partition has nothing new, answer within 100 ms rather than
        # aiokafka's 500 ms, so a fetch(timeout) near its deadline still sees
        # messages that arrive meanwhile.
        "fetch_max_wait_ms": 100,
        # Fetch sizes barely matter here: consuming is bound by aiokafka's
        # per-record Python cost, not by round trips (see the micro benchmark).
        "max_partition_fetch_bytes": 1024 * 1024,
    }
)

# Group membership timing. Tansu holds a JoinGroup for about half the session
# timeout (at least 1 s), so a short session makes joins fast: 2 s gives 1 s
# joins, Kafka's usual 10 s would give 5 s. A session shorter than the broker's
# ``group.min.session.timeout.ms`` (6 s on Apache Kafka) is refused, so we ask
# the broker for that floor first. Heartbeats go every quarter session.
_PREFERRED_SESSION_MS: Final = 2000
_HEARTBEATS_PER_SESSION: Final = 4


def _parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters)


# Options that aiokafka's classes take from us, never from tuning.
_OURS: Final = frozenset(
    {"topics", "loop", "bootstrap_servers", "group_id", "enable_auto_commit", "auto_offset_reset"}
)
_PRODUCER_OPTIONS: Final = _parameters(AIOKafkaProducer) - _OURS
_CONSUMER_OPTIONS: Final = _parameters(AIOKafkaConsumer) - _OURS
_ADMIN_OPTIONS: Final = _parameters(AIOKafkaAdminClient) - _OURS
_CLIENT_OPTIONS: Final = _parameters(AIOKafkaClient) - _OURS


def _pick(options: Mapping[str, Any], accepted: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in accepted}


def _check_tuning(tuning: Mapping[str, Any]) -> None:
    known = _PRODUCER_OPTIONS | _CONSUMER_OPTIONS | _ADMIN_OPTIONS
    unknown = sorted(set(tuning) - known)
    if unknown:
        raise TypeError(f"unknown Kafka tuning option(s): {', '.join(unknown)}")


def _error(what: str, exc: BaseException) -> TransportError:
    # aiokafka's errors already start with their class name.
    detail = str(exc) if isinstance(exc, KafkaError) else f"{type(exc).__name__}: {exc}"
    return TransportError(f"{what}: {detail}")


async def _quietly(closing: Any) -> None:
    """Await a stop/close, logging rather than raising: used on cleanup paths."""
    try:
        await closing
    except Exception as exc:
        log.debug("ignored error while closing a Kafka client: %r", exc)
