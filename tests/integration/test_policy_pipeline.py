"""The policy gate inside the real pipeline, on both transports, against Postgres.

Each rule of the reference bundle is exercised through real brokers: the
decision reaches the tools (or not), and each decision has its audit row with
reasons and the bundle version.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from sluicegate.pipeline import build_steps
from sluicegate.runtime import run_steps
from sluicegate.streams.envelope import Event
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    prepare_database,
    publish_events,
    scalar_rows,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def task(session: str, prompt: str, *, tenant: str = "acme", at: datetime = T0) -> Event:
    return Event(
        source="tests",
        type="task.submitted",
        tenant=tenant,
        session=session,
        time=at,
        data={"prompt": prompt},
    )


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_reference_policies_decide_in_the_pipeline(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str, prefix: str
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    forbidden = task("forbid", "run shell: rm -rf /")
    oversized = task("big", "echo " + "x" * 5000)
    pii = task("pii", "email alice@example.com the summary")
    # globex: a budget of 20 per session at cost 1 a calculator call; one call
    # a minute (event time), so only the budget can stop the 21st.
    budget = [
        task("budget", f"what is {i} + 1", tenant="globex", at=T0 + timedelta(minutes=i))
        for i in range(21)
    ]
    # globex: 10 calls per sliding minute; 12 within one minute.
    rate = [
        task("rate", f"what is {i} * 2", tenant="globex", at=T0 + timedelta(seconds=i))
        for i in range(12)
    ]
    events = [forbidden, oversized, pii, *budget, *rate]
    stop = asyncio.Event()
    worker = asyncio.create_task(run_steps(build_steps(), settings, stop=stop))
    try:
        await publish_events(settings, events)
        assert await wait_for_results(settings, len(events), timeout_s=90) == len(events)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)

    results = {r.task_id: r for r in await all_results(settings)}
    assert results[forbidden.id].status == "denied"
    assert results[oversized.id].status == "denied"
    assert results[pii.id].status == "completed"
    # What reached the tool had the address masked.
    answer = str(results[pii.id].answer)
    assert "alice@example.com" not in answer and "[email]" in answer
    assert [results[e.id].status for e in budget] == ["completed"] * 20 + ["denied"]
    assert [results[e.id].status for e in rate] == ["completed"] * 10 + ["denied"] * 2

    rows = await scalar_rows(
        settings,
        "SELECT a.session, a.decision, a.reasons, a.policy_version FROM audit_log a "
        "WHERE a.kind = 'decision' AND a.step = 'gate' ORDER BY a.session, a.time",
    )
    by_session: dict[str, list[tuple[str, list[str]]]] = {}
    for session, decision, reasons, version in rows:
        assert str(version).startswith("sha256:")
        by_session.setdefault(str(session), []).append((str(decision), list(reasons)))
    assert by_session["forbid"] == [("deny", ["dangerous_tool", "tool_not_allowed"])]
    assert by_session["big"] == [("deny", ["args_too_large"])]
    assert by_session["pii"] == [("redact", ["pii_redacted"])]
    assert ("deny", ["budget_exceeded"]) in by_session["budget"]
    assert [d for d, _ in by_session["budget"]].count("allow") == 20
    assert [r for _, r in by_session["rate"]].count(["rate_limited"]) == 2
    await drop_schema(settings)
