"""A NATS topic's partition count, kept in its stream's description.

JetStream streams have no partitions: ours are subjects ``<prefix>.<topic>.<p>``
under one stream, so nothing stops a publisher configured with 8 partitions
from writing to subjects no worker configured with 4 ever reads. The count
the stream was created with is written into its description (a field every
server version has), and a worker or publisher that disagrees is refused.
"""

from __future__ import annotations

import re

from sluicegate.streams.transport import TransportError

_COUNT = re.compile(r"\bpartitions=(\d+)\b")


def describe_partitions(topic: str, partitions: int) -> str:
    return f"sluicegate topic {topic}; partitions={partitions}"


def check_partitions(description: str | None, stream: str, topic: str, partitions: int) -> None:
    """Refuse a count that disagrees with the stream's (streams from before this say none)."""
    found = _COUNT.search(description or "")
    if found is None:
        return
    existing = int(found.group(1))
    if existing != partitions:
        raise TransportError(
            f"topic {topic!r} (stream {stream}) has {existing} partitions, but "
            f"SLUICE_PARTITIONS is {partitions}: use {existing}, or recreate the topic"
        )
