"""The ``intake`` step: admits upstream tasks once each.

``task.submitted`` on ``tasks`` becomes ``task.accepted`` on
``tasks.accepted``, with the submitted event's id as the task id. An exact
duplicate (same event id, e.g. a publisher retry) is dropped and audited.
The runner already absorbs re-produced ids within its window; the ids kept
in keyed state here survive restarts and rebalances, per session.
"""

from __future__ import annotations

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.keyed import duplicate, remember
from sluicegate.agents.schemas import TASK_ACCEPTED, TASK_SUBMITTED, TaskAccepted, TaskSubmitted
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

RECENT_IDS_KEY = "recent_ids"


class IntakeStep(Step[TaskSubmitted]):
    name = "intake"
    inputs = (topics.TASKS,)
    outputs = (topics.TASKS_ACCEPTED,)
    types = (TASK_SUBMITTED,)

    def __init__(self, *, remember_ids: int = 512) -> None:
        # How many recent task ids per session are kept to drop duplicates.
        self.remember_ids = remember_ids

    async def process(self, event: Event, ctx: Context[TaskSubmitted]) -> list[Output]:
        task = ctx.data
        if remember(ctx.state, RECENT_IDS_KEY, event.id, self.remember_ids):
            return duplicate(ctx)
        accepted = TaskAccepted(
            task_id=event.id,
            prompt=task.prompt,
            agent=task.agent,
            metadata=task.metadata,
            submitted_at=event.time,
        )
        return [ctx.output(topics.TASKS_ACCEPTED, TASK_ACCEPTED, accepted.model_dump(mode="json"))]
