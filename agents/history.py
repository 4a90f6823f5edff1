"""The ``context`` step: a rolling per-session history under a token budget.

``task.accepted`` becomes ``context.packed``: the task plus the earlier
prompts of its session that fit the budget (oldest first), then the task's
own prompt joins the history and the oldest turns are evicted until the
history fits again.

Tokens are estimated, not counted with a real tokenizer (which would tie the
pipeline to one model): ``max(words, ceil(chars / 4))``, where words are
whitespace-separated. Taking the larger of the two usual approximations means
neither many short words nor one very long "word" slips under the budget, and
it bounds the stored history at about ``4 * budget`` characters.

Only prompts are kept: the step sees no answers, since it sits upstream of
them and a feedback topic would make the pipeline cyclic.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.keyed import duplicate, remember
from sluicegate.agents.schemas import (
    CONTEXT_PACKED,
    TASK_ACCEPTED,
    ContextPacked,
    HistoryTurn,
    TaskAccepted,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

HISTORY_KEY = "history"
SEEN_KEY = "seen_tasks"


def estimate_tokens(text: str) -> int:
    """Approximate token count: the larger of the word count and ``ceil(len / 4)``."""
    return max(len(text.split()), math.ceil(len(text) / 4))


# The whole history validated and dumped in one call each: per turn from
# Python it was about 50 us per task for a full history of 32 turns.
_TURNS: TypeAdapter[list[HistoryTurn]] = TypeAdapter(list[HistoryTurn])


def load_history(state: MutableMapping[str, Any]) -> list[HistoryTurn]:
    """The stored turns, oldest first; entries that no longer validate are dropped."""
    raw = state.get(HISTORY_KEY)
    if not isinstance(raw, list):
        return []
    try:
        return _TURNS.validate_python(raw)
    except ValidationError:
        pass  # some entry does not validate: keep those that do
    turns: list[HistoryTurn] = []
    for item in raw:
        try:
            turns.append(HistoryTurn.model_validate(item))
        except ValidationError:
            continue
    return turns


def evict(turns: list[HistoryTurn], budget: int, max_turns: int) -> list[HistoryTurn]:
    """Drop the oldest turns until the rest fit ``budget`` tokens and ``max_turns``."""
    total = sum(t.tokens for t in turns)
    start = 0
    while start < len(turns) and (total > budget or len(turns) - start > max_turns):
        total -= turns[start].tokens
        start += 1
    return turns[start:]


class ContextStep(Step[TaskAccepted]):
    name = "context"
    inputs = (topics.TASKS_ACCEPTED,)
    outputs = (topics.CONTEXT,)
    types = (TASK_ACCEPTED,)

    def __init__(
        self, *, token_budget: int = 512, max_turns: int = 32, remember_ids: int = 512
    ) -> None:
        self.token_budget = token_budget
        # A cap on turns too, so a stream of one-word prompts stays small.
        self.max_turns = max_turns
        self.remember_ids = remember_ids

    async def process(self, event: Event, ctx: Context[TaskAccepted]) -> list[Output]:
        task = ctx.data
        if remember(ctx.state, SEEN_KEY, task.task_id, self.remember_ids):
            return duplicate(ctx)
        # Evict first as well: a smaller budget after a restart still holds.
        history = evict(load_history(ctx.state), self.token_budget, self.max_turns)
        packed = ContextPacked(
            task=task,
            history=history,
            history_tokens=sum(t.tokens for t in history),
            token_budget=self.token_budget,
        )
        turn = HistoryTurn(
            task_id=task.task_id, prompt=task.prompt, tokens=estimate_tokens(task.prompt)
        )
        kept = evict([*history, turn], self.token_budget, self.max_turns)
        ctx.state[HISTORY_KEY] = _TURNS.dump_python(kept, mode="json")
        return [ctx.output(topics.CONTEXT, CONTEXT_PACKED, packed.model_dump(mode="json"))]
