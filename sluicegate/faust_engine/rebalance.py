"""Faust's rebalances → the runners, and Postgres's offsets → Faust's consumer group.

Faust runs a rebalance as: revoke (its streams drain: every delivered event
must be acked, so the runners finish what they hold), the
``on_partitions_revoked`` signal, assignment, table recovery from the
changelogs, the ``on_rebalance_complete`` signal, and only then a seek of the
input partitions to the group's committed offsets and the resumption of
fetching. The bridge hooks the two signals:

- revoked: each step's subscription forgets the partitions and the runner
  drops their offsets and state (``on_revoke``);
- rebalance complete: each runner loads offsets, state and recent ids of its
  new partitions from Postgres (``on_assign``; the table is recovered by then,
  so the state mirror can be compared), and the bridge commits, for every
  assigned input partition, the offset after Postgres's last processed one
  (0 where Postgres has none) to the group, and seeks the consumer there
  (Faust's own seek that follows skips offset 0).

So Postgres decides where processing resumes, as on the native engine, and
Faust's own timed commits (which may run ahead of Postgres when Faust acks
events it skipped during a rebalance) never decide what is lost. Where two
steps of one app read the same topic, the earlier of their offsets wins and
the other skips what it already has.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import faust
from faust.types import TP

from sluicegate.faust_engine.app import KafkaNames
from sluicegate.faust_engine.state import SessionTable
from sluicegate.faust_engine.subscription import FaustSubscription
from sluicegate.streams.transport import TopicPartition

log = logging.getLogger("sluicegate.faust")


class RebalanceBridge:
    """Connects a Faust app's rebalance signals to its steps' subscriptions and tables."""

    def __init__(self, app: faust.App, names: KafkaNames) -> None:
        self.app = app
        self.names = names
        self.rebalances = 0
        self._steps: list[tuple[FaustSubscription, SessionTable]] = []

    def add(self, subscription: FaustSubscription, table: SessionTable) -> None:
        self._steps.append((subscription, table))

    def connect(self) -> None:
        # Strong references: the bridge lives as long as the worker.
        self.app.on_partitions_revoked.connect(self._revoked)
        self.app.on_rebalance_complete.connect(self._completed)

    # mode's signals call receivers as (sender, *args, signal=..., **kwargs).
    async def _revoked(self, sender: Any, /, *args: Any, signal: Any = None, **_: Any) -> None:
        tps = self.names.logical_tps(args[0] if args else ())
        for sub, table in self._steps:
            mine = frozenset(tp for tp in tps if tp.topic in sub.topics)
            if mine:
                await sub.revoke(mine)
                table.forget({tp.partition for tp in mine})

    async def _completed(self, sender: Any, /, *args: Any, signal: Any = None, **_: Any) -> None:
        assigned = self.names.logical_tps(self.app.consumer.assignment())
        targets: dict[TopicPartition, int] = {}
        for sub, _table in self._steps:
            mine = frozenset(tp for tp in assigned if tp.topic in sub.topics)
            for tp, offset in (await sub.assign(mine)).items():
                targets[tp] = min(offset, targets.get(tp, offset))
        self.rebalances += 1
        if targets:
            await self._commit(targets)
        log.info("assigned %d input partitions, resuming at Postgres's offsets", len(targets))

    async def _commit(self, targets: Mapping[TopicPartition, int]) -> None:
        offsets = {TP(self.names.kafka(tp.topic), tp.partition): o for tp, o in targets.items()}
        # Consumer._commit (faust-streaming 0.15, pinned) commits exactly these
        # offsets; the public commit() only commits what streams acked. An
        # error propagates: Faust then crashes the app and the worker exits,
        # rather than resume from offsets Postgres did not choose.
        consumer: Any = self.app.consumer
        committed = await consumer._commit(offsets)
        if not committed:
            # Only when the group rebalanced meanwhile: the next
            # rebalance-complete commits again before its seek.
            log.warning("Postgres offsets not committed to the group (rebalancing again)")
            return
        # Faust's own seek to the committed offsets (next, in its recovery)
        # goes through aiokafka's seek_to_committed, which skips a committed
        # offset of 0: a partition Postgres has nothing of would resume
        # wherever the consumer stood. Seen after a crash: an input partition
        # resumed 53 messages in, and those 53 were never processed. So the
        # bridge seeks every partition itself, 0 included.
        await consumer.seek_wait(offsets)
