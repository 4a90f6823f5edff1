"""Kafka transport on aiokafka: topics, producing, consumer groups, observers.

It owns the mapping of the ``Transport`` contract onto the Kafka protocol:

- a logical topic ``name`` is the Kafka topic ``<prefix>.<name>``, created with
  exactly ``partitions`` partitions; a consumer group ``g`` is the Kafka group
  ``<prefix>.<g>``, so one prefix namespaces a whole deployment (and a test);
- we pick the partition ourselves with :func:`streams.partitioning.partition_for`
  and pass it explicitly, so a key lands on the same partition number as on NATS;
- ``publish_batch`` builds one record batch per partition and pipelines them;
- group subscriptions commit manually (``offset + 1`` per partition), static
  ones (``partitions=``) assign and still use the group's committed offsets,
  observers (``group=None``) assign everything and never commit.

It is tuned for, and tested against, both Apache Kafka and the Tansu broker of
the local stack; the Tansu quirks it works around are noted where they bite.

The modules: ``clients`` (aiokafka options, errors, cleanup), ``names``
(logical <-> Kafka names, headers), ``transport`` (:class:`KafkaTransport`)
and ``subscription`` (:class:`KafkaSubscription` and its rebalance listener).
"""

from sluicegate.streams.transports.kafka.clients import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS
from sluicegate.streams.transports.kafka.subscription import KafkaSubscription
from sluicegate.streams.transports.kafka.transport import KafkaTransport

__all__ = [
    "CONSUMER_DEFAULTS",
    "PRODUCER_DEFAULTS",
    "KafkaSubscription",
    "KafkaTransport",
]
