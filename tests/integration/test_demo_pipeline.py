"""``sluice demo --pipeline``: the example app (examples/triage) on real NATS and Postgres."""

from __future__ import annotations

import pytest
from triage.app import pipeline

from sluicegate.demo_pipeline import run_pipeline_demo
from tests.integration.pipeline_support import drop_schema, settings_for, unique_prefix

pytestmark = pytest.mark.integration


async def test_the_example_app_runs_its_samples(
    nats_url: str, kafka_bootstrap: str, database_url: str
) -> None:
    settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )
    outcome = await run_pipeline_demo(settings, pipeline(), transport="nats", say=lambda _: None)
    # The demo works in a schema of its own, next to the test's.
    await drop_schema(settings.model_copy(update={"db_schema": f"{settings.db_schema}_demo"}))
    assert outcome.ok, outcome
    statuses = sorted(outcome.results[e.id].status for _, e in outcome.published)
    assert statuses == ["escalated", "replied", "routed", "routed", "routed", "routed", "routed"]
    assert not outcome.dead_letters
