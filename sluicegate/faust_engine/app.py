"""The Faust app that carries sluicegate's steps: its id, its settings, topic names.

One app per worker process, one consumer group per set of steps: workers
started with the same ``--steps`` share the group ``<prefix>.faust`` (all
steps) or ``<prefix>.faust.<step>.<step>...`` (a subset, sorted), and Faust
spreads the partitions over them. Faust's assignor co-partitions topics with
the same partition count, so one worker owns partition ``p`` of every input
topic and of every state table's changelog: a session's events and its state
land on the same worker.

The settings are what a Faust user would pick for a small cluster, and the
ones ``benchmarks/faust_step.py`` measured on Tansu: group session and
rebalance timeouts of 10 s (Faust's 60 s defaults stall ~30 s in group joins
there), heartbeats every 3 s, producer batches as large as our Kafka
transport's, acks from all replicas, the in-memory table store, no web server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import faust

from sluicegate.streams.transport import TopicPartition

# Faust's settings, besides the broker, id, datadir and partition count.
FAUST_SETTINGS: Final[Mapping[str, Any]] = {
    "broker_session_timeout": 10.0,
    "broker_rebalance_timeout": 10.0,
    "broker_heartbeat_interval": 3.0,
    "producer_max_batch_size": 256 * 1024,
    # The runner checkpoints only after the broker acked its outputs: an ack
    # must mean "replicated", as in streams.transports.kafka.
    "producer_acks": -1,
    # Postgres holds the truth; the table is a mirror restored from its
    # changelog, so nothing needs to persist on the worker's disk.
    "store": "memory://",
    "topic_replication_factor": 1,
    "table_standby_replicas": 0,
    # Faust refuses to recover a changelog partition when the offset it has
    # read exceeds the partition's end as ListOffsets reports it. Tansu
    # reports the base offset of the last record batch + 1 there (see
    # streams.transports.kafka), so the check fires on a correct changelog as
    # soon as a worker that read it keeps the partition through a rebalance.
    # The table is repaired from Postgres after every recovery anyway.
    "recovery_consistency_check": False,
    "web_enabled": False,
    "processing_guarantee": "at_least_once",
    # On stop, Faust would wait for every delivered event to be acked; the
    # runners have stopped by then, and what they did not commit is re-read
    # from Postgres's offsets on the next start anyway.
    "stream_wait_empty": False,
    # With no committed offset (a new group) start at the beginning, as the
    # native runner's groups do; the rebalance bridge commits Postgres's
    # offsets before Faust seeks, so this only matters without a checkpoint.
    "consumer_auto_offset_reset": "earliest",
}


def app_id(prefix: str, steps: Iterable[str], all_steps: Iterable[str]) -> str:
    """The Faust app id, which is also its consumer group and its topics' prefix."""
    chosen = sorted(set(steps))
    if chosen == sorted(set(all_steps)):
        return f"{prefix}.faust"
    return f"{prefix}.faust.{'.'.join(chosen)}"


def table_name(step: str) -> str:
    """The name of a step's state table (its changelog is ``<app id>-<name>-changelog``)."""
    return f"{step}-state"


def build_app(
    *,
    app_id: str,
    bootstrap: str,
    partitions: int,
    datadir: Path,
    security: Mapping[str, Any] | None = None,
) -> faust.App:
    """An unstarted Faust app; agents and tables are added by the engine before it starts.

    ``security``: aiokafka's protocol, SASL and TLS options
    (``service_security.kafka_security_options``), as Faust's broker credentials.
    """
    credentials = broker_credentials(security or {})
    extra: dict[str, Any] = {} if credentials is None else {"broker_credentials": credentials}
    return faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        datadir=str(datadir),
        topic_partitions=partitions,
        **FAUST_SETTINGS,
        **extra,
    )


def broker_credentials(security: Mapping[str, Any]) -> Any:
    """Faust's credentials for aiokafka's security options; None for plaintext."""
    protocol = security.get("security_protocol")
    if protocol is None:
        return None
    if str(protocol).startswith("SASL_"):
        # Faust speaks SASL_SSL when given a TLS context, SASL_PLAINTEXT without.
        return faust.SASLCredentials(
            username=security["sasl_plain_username"],
            password=security["sasl_plain_password"],
            mechanism=security["sasl_mechanism"],
            ssl_context=security.get("ssl_context"),
        )
    return faust.SSLCredentials(security["ssl_context"])


class KafkaNames:
    """Logical topic names <-> Kafka topic names under one prefix (as the Kafka transport)."""

    def __init__(self, prefix: str) -> None:
        self._head = f"{prefix}."

    def kafka(self, logical: str) -> str:
        return self._head + logical

    def kafka_topics(self, logical: Sequence[str]) -> list[str]:
        return [self.kafka(topic) for topic in logical]

    def logical(self, kafka_topic: str) -> str:
        return kafka_topic.removeprefix(self._head)

    def logical_tps(self, tps: Iterable[Any]) -> frozenset[TopicPartition]:
        """Faust or aiokafka topic-partitions (``.topic``, ``.partition``) under our prefix."""
        return frozenset(
            TopicPartition(self.logical(tp.topic), tp.partition)
            for tp in tps
            if tp.topic.startswith(self._head)
        )
