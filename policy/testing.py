"""Helpers for driving the gate by hand: events, contexts and throwaway bundles.

For unit tests and examples (the runner builds real contexts). Nothing here
is used by the gate itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from sluicegate.policy.bundle import DATA_FILE, default_bundle_path
from sluicegate.policy.schemas import ACTION_PROPOSED, ProposedAction
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def proposed_event(
    tool: str,
    args: Mapping[str, Any] | None = None,
    *,
    tenant: str = "acme",
    session: str = "s1",
    agent: str = "assistant",
    at: float = 0.0,
    id: str | None = None,
    usage: Mapping[str, Any] | None = None,
) -> Event:
    """An ``action.proposed`` event ``at`` seconds after :data:`EPOCH`.

    ``usage`` (``{"total_tokens", "session_total_tokens"}``) is put on the
    data as the planner would; without it the data has no ``usage`` key.
    """
    data: dict[str, Any] = {
        "task_id": "task-1",
        "agent": agent,
        "action_index": 0,
        "action_count": 1,
        "tool": tool,
        "args": dict(args or {}),
    }
    if usage is not None:
        data["usage"] = dict(usage)
    event = Event(
        source="tests",
        type=ACTION_PROPOSED,
        tenant=tenant,
        session=session,
        time=EPOCH + timedelta(seconds=at),
        data=data,
    )
    return event.model_copy(update={"id": id}) if id else event


def context(event: Event, state: MutableMapping[str, Any] | None = None) -> Context:
    """A Context as the runner builds it for the gate, data validated."""
    return Context(
        step="gate",
        event=event,
        state={} if state is None else state,
        partition=0,
        data=ProposedAction.model_validate(event.data),
    )


def write_bundle(
    path: Path, modules: Mapping[str, str], data: Mapping[str, Any] | None = None
) -> Path:
    """A bundle directory at ``path`` with exactly these modules and data (replacing any)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name, text in modules.items():
        (path / name).write_text(text)
    (path / DATA_FILE).write_bytes(orjson.dumps(dict(data or {}), option=orjson.OPT_INDENT_2))
    return path


def copy_reference_bundle(path: Path) -> Path:
    """A writable copy of the reference policies at ``path``."""
    shutil.copytree(default_bundle_path(), path)
    return path
