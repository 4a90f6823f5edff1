"""Spotting partitions that have lag and make no progress: :class:`StallWatch`.

A reader can stop delivering without an error anyone sees (a pull request
lost in a broker restart, a consumer deleted and not made again, an inbox
unsubscribed by a rewind that failed half way). The runner would wait for
it forever. The watch compares, per owned partition, how far the log goes
with how far the runner got: a partition whose log holds more than was
committed, with nothing of it in flight, and whose progress (committed
offset, inputs admitted) has not moved for ``timeout_s`` is stalled. The
runner reports it (log, metric, ``/readyz``) and repairs its reader by
seeking it to where it should be, which makes the transport recreate what
it needs (NATS: the consumer and its inbox; Kafka: the fetch position).

Partitions with inputs in flight are not judged: a slow step holds back its
own key for as long as it takes, which is not a reader's fault. Neither is
a runner at its in-flight bound, which fetches nothing by design.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sluicegate.streams.transport import TopicPartition


@dataclass(frozen=True, slots=True)
class PartitionView:
    """What the runner knows of one partition at a check."""

    committed: int | None  # last offset stored as done; None: nothing yet
    end: int | None  # last offset in the log; None: unknown
    admitted: int  # inputs admitted so far (a running count)
    busy: bool  # inputs of it are in flight


class StallWatch:
    """Per partition: since when it has lag and no progress."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._since: dict[TopicPartition, tuple[tuple[int | None, int], float]] = {}
        self.stalled: frozenset[TopicPartition] = frozenset()

    def check(
        self, now: float, views: Mapping[TopicPartition, PartitionView]
    ) -> set[TopicPartition]:
        """Update with ``views`` (the partitions judged now); returns the stalled ones."""
        stalled: set[TopicPartition] = set()
        for tp in list(self._since):
            if tp not in views:
                del self._since[tp]
        for tp, view in views.items():
            progress = (view.committed, view.admitted)
            seen = self._since.get(tp)
            if seen is None or seen[0] != progress or view.busy or not _lagging(view):
                self._since[tp] = (progress, now)
                continue
            if now - seen[1] >= self.timeout_s:
                stalled.add(tp)
        self.stalled = frozenset(stalled)
        return stalled

    def repaired(self, now: float, tps: Iterable[TopicPartition]) -> None:
        """``tps`` were just repaired: give them a full timeout before judging them again."""
        for tp in tps:
            seen = self._since.get(tp)
            if seen is not None:
                self._since[tp] = (seen[0], now)

    def pause(self, now: float) -> None:
        """Nothing can progress now (the runner is at its bound): restart every clock."""
        for tp, (progress, _) in list(self._since.items()):
            self._since[tp] = (progress, now)
        self.stalled = frozenset()


def _lagging(view: PartitionView) -> bool:
    if view.end is None:
        return False
    if view.committed is None:
        # Offsets start at 0 (Kafka) or 1 (NATS, whose empty log ends at 0):
        # an end of 0 is ambiguous, so a log of one message is left unjudged.
        return view.end >= 1
    return view.end > view.committed
