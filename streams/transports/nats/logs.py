"""Which log a NATS partition is, and where it ends.

A stream's creation time is its incarnation: a stream deleted and created
again (or lost with a server's storage) is a new log, and progress stored
for the old one must not be applied to it. A partition's end is the stream
sequence of the last message on its subject.
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from sluicegate.streams.transport import TopicPartition, TransportError
from sluicegate.streams.transports.nats.names import stream_name, subject_for


async def log_ids(js: JetStreamContext, prefix: str, topics: Sequence[str]) -> dict[str, str]:
    """``nats:<stream>@<creation time>`` of each topic whose stream exists."""
    ids: dict[str, str] = {}
    for topic in dict.fromkeys(topics):
        name = stream_name(prefix, topic)
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot look up stream {name} ({topic!r}): {exc!r}") from exc
        created = info.created.isoformat() if info.created else "unknown"
        ids[topic] = f"nats:{name}@{created}"
    return ids


async def log_ends(
    js: JetStreamContext, prefix: str, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The stream sequence of each partition's last message (0 when it has none)."""
    ends: dict[TopicPartition, int] = {}
    for tp in tps:
        stream = stream_name(prefix, tp.topic)
        try:
            last = await js.get_last_msg(stream, subject_for(prefix, tp.topic, tp.partition))
        except NotFoundError:
            ends[tp] = 0
            continue
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot read the end of {tp} in {stream}: {exc!r}") from exc
        ends[tp] = int(last.seq or 0)
    return ends
