"""NATS JetStream transport.

This package owns everything sluicegate does on NATS: one JetStream stream per
logical topic (``<prefix>_<topic>``, dots become ``_``) holding the subjects
``<prefix>.<topic>.<partition>``; pipelined publishing with broker acks; and
consumption through one pull consumer per owned partition, durable per
(group, partition) with AckAll, or ephemeral with AckNone for observers.

NATS has no message keys, no consumer groups and no rebalancing, so:

- the key travels in a header (``sluice-key``, or ``sluice-key-b64`` when it is
  not printable text) and the partition comes from
  :func:`streams.partitioning.partition_for`, the same function Kafka uses;
- ``Nats-Msg-Id`` is the event id (header ``ce_id``), so JetStream's duplicate
  window absorbs outputs that a replayed step produces again;
- the workers of a group share its partitions through heartbeats and leases
  in a KV bucket (``<prefix>_owners``) with rendezvous hashing, or own fixed
  ones (``partitions=``, ``--instance i/n``) whose leases they claim; see
  ``ownership``. A reader that takes a partition over resets its durable to
  just after the ack floor, so whatever a crashed worker fetched and never
  committed comes back at once instead of after ``ack_wait``.

Offsets are JetStream stream sequences: they grow within a partition but are
shared by all partitions of a topic, so they have gaps.

Throughput is bound by nats-py's per-message Python cost, so both paths
avoid its slow spots (benchmarks/nats_transport_micro.py measures them):

- publishing sends each message as a core publish with a reply subject under
  one wildcard inbox and counts the acks per batch, in a bounded window,
  instead of a future per message (``js.publish_async``); the HPUB command is
  built here, because nats-py's header encoding costs more than the rest of a
  publish (``fast_publish``; it uses nats-py internals, pinned at 2.16);
- fetching keeps one pull request per owned partition in flight, raw on
  ``$JS.API.CONSUMER.MSG.NEXT``, into one inbox subscription per partition,
  and prefetches the next batch while the caller works on the current one.

The modules: ``names`` (names, validation, :class:`NatsTuning`), ``wire``
(headers, HPUB commands, publish acks), ``transport`` (:class:`NatsTransport`),
``subscription`` (:class:`NatsSubscription`), ``reader`` (one owned
partition's consumer and pull requests), ``leases`` (the ownership bucket, its
keys, rendezvous hashing, :func:`read_ownership`) and ``ownership`` (the
protocol that takes, keeps and gives up a group's partitions).
"""

from sluicegate.streams.transports.nats.leases import (
    OwnershipView,
    WorkerInfo,
    new_worker_id,
    read_ownership,
)
from sluicegate.streams.transports.nats.names import (
    NatsTuning,
    consumer_name,
    stream_name,
    subject_for,
)
from sluicegate.streams.transports.nats.subscription import NatsSubscription
from sluicegate.streams.transports.nats.transport import NatsTransport
from sluicegate.streams.transports.nats.wire import (
    EVENT_ID_HEADER,
    KEY_B64_HEADER,
    KEY_HEADER,
    MSG_ID_HEADER,
    encode_key,
    split_headers,
)

__all__ = [
    "EVENT_ID_HEADER",
    "KEY_B64_HEADER",
    "KEY_HEADER",
    "MSG_ID_HEADER",
    "NatsSubscription",
    "NatsTransport",
    "NatsTuning",
    "OwnershipView",
    "WorkerInfo",
    "consumer_name",
    "encode_key",
    "new_worker_id",
    "read_ownership",
    "split_headers",
    "stream_name",
    "subject_for",
]
